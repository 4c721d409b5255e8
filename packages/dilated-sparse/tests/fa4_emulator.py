"""A CPU stand-in for the block-sparse flash-attn-4 calls of ``dilated.kernels.flash4_block_sparse``.

It takes exactly the arguments the real entry points take and computes what flash-attn-4
computes with them (per its interface and kernels): for each (batch, head, block of rows) it
visits only the listed blocks; a *full* block allows every pair inside the sequence ends (no
mask), a *partial* one applies the ``mask_mod`` (here: the ``ElementMask`` evaluated from the
same aux tensors, read at every position of the block, rounded past the ends as the kernel
does); unlisted blocks are never seen. Rows with no allowed key get ``out = 0``, ``lse = -inf``;
the backward pass, like the kernel's preprocessing, treats an LSE of ``-inf`` as 0. It also
asserts what the kernel would reject or silently mis-read: shapes, dtypes, unit strides, lists
not ascending, a block listed twice, aux tensors too short for the rounded blocks.

So a wrong table, view, rule or aux tensor changes the result, and the judge catches it; only
the kernel itself (and the CuTe ``mask_mod``) is not exercised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.kernels.flash4_block_sparse import BlockLists
from dilated.kernels.flash4_masks import ElementMask


def _element_rule(
    mask: ElementMask, aux: Sequence[torch.Tensor], b: int, h: int, rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    ok = torch.ones(len(rows), len(cols), dtype=torch.bool)
    if mask.causal:
        ok &= cols[None, :] <= rows[:, None]
    at = 0
    if mask.layout_block:
        table = aux[0]
        assert table.dtype == torch.int32
        qb, kb = rows // mask.layout_block, cols // mask.layout_block
        assert int(qb.max()) < table.shape[0] and int(kb.max()) < table.shape[1], "aux too short"
        ok &= table[qb[:, None], kb[None, :]] != 0
        at = 1
    if mask.keep:
        keep = aux[at]
        assert keep.dtype == torch.int32
        row = keep[b] if mask.keep == 1 else keep[b, h]
        assert row.dim() == 1 and int(cols.max()) < row.shape[0], "keep aux too short"
        ok &= row[cols][None, :] != 0
    return ok


def allowed_pairs(
    tables: BlockLists, mask: ElementMask, aux: Sequence[torch.Tensor], batch: int, heads: int,
    rows_q: int, rows_k: int, backward: bool,
) -> torch.Tensor:  # fmt: skip
    """Bool ``(batch, heads, rows_q, rows_k)``: the pairs a call with these lists computes."""
    bq, bk = tables.block
    m, n = -(-rows_q // bq), -(-rows_k // bk)
    lines = n if backward else m
    for cnt, idx in ((tables.mask_cnt, tables.mask_idx), (tables.full_cnt, tables.full_idx)):
        assert cnt.dtype == torch.int32 and idx.dtype == torch.int32
        assert cnt.dim() == 3 and idx.dim() == 4 and cnt.shape[2] == idx.shape[2] == lines
        assert cnt.shape[0] in (1, batch) and cnt.shape[1] in (1, heads)
        assert idx.shape[3] <= (m if backward else n), "lists wider than the blocks"
    out = torch.zeros(batch, heads, m * bq, n * bk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for line in range(lines):
                seen: set[int] = set()
                for partial, (cnt, idx) in enumerate(
                    ((tables.full_cnt, tables.full_idx), (tables.mask_cnt, tables.mask_idx))
                ):
                    c = int(cnt[min(b, cnt.shape[0] - 1), min(h, cnt.shape[1] - 1), line])
                    entries = idx[min(b, idx.shape[0] - 1), min(h, idx.shape[1] - 1), line, :c]
                    entries = entries.tolist()
                    assert entries == sorted(entries), "a list is not ascending"
                    assert not seen & set(entries), "a block is listed twice"
                    seen |= set(entries)
                    for other in entries:
                        i, j = (other, line) if backward else (line, other)
                        assert 0 <= i < m and 0 <= j < n
                        rq = torch.arange(i * bq, (i + 1) * bq)
                        rk = torch.arange(j * bk, (j + 1) * bk)
                        cell = (
                            _element_rule(mask, aux, b, h, rq, rk)
                            if partial
                            else torch.ones(bq, bk, dtype=torch.bool)
                        )
                        out[b, h, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk] = cell
    return out[:, :, :rows_q, :rows_k]


def _check_io(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    assert tuple(x.shape) == shape, f"{what}: shape {tuple(x.shape)} != {shape}"
    assert x.dtype == dtype, f"{what}: dtype {x.dtype} != {dtype}"
    assert x.stride(-1) == 1, f"{what}: last stride {x.stride(-1)}"


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    group = q.shape[2] // k.shape[2]
    kd = k.double().repeat_interleave(group, dim=2)
    return torch.einsum("blhd,bmhd->bhlm", q.double(), kd) * scale


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, tables: BlockLists,
    mask: ElementMask, aux: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
) -> None:  # fmt: skip
    b, rows, h, d = q.shape
    _check_io(out, (b, rows, h, d), q.dtype, "out")
    _check_io(lse, (b, h, rows), torch.float32, "lse")
    ok = allowed_pairs(tables, mask, aux, b, h, rows, k.shape[1], backward=False)
    s = _scores(q, k, scale).masked_fill(~ok, float("-inf"))
    m = torch.logsumexp(s, -1)
    empty = ~ok.any(-1)
    p = torch.where(ok, torch.exp(s - torch.where(empty, 0.0, m)[..., None]), 0.0)
    vd = v.double().repeat_interleave(h // v.shape[2], dim=2)
    o = torch.einsum("bhlm,bmhd->blhd", p, vd)
    out.copy_(o.to(out.dtype))
    lse.copy_(torch.where(empty, float("-inf"), m).float())


def backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, *, scale: float, tables: BlockLists,
    mask: ElementMask, aux: Sequence[torch.Tensor], dq: torch.Tensor, dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:  # fmt: skip
    b, rows, h, d = q.shape
    hk, rows_k = k.shape[2], k.shape[1]
    group = h // hk
    # The kernel's inputs may have any strides (it copies what it cannot read in place).
    assert tuple(lse.shape) == (b, h, rows) and lse.dtype == torch.float32
    for g, like, what in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")):
        _check_io(g, tuple(like.shape), q.dtype, what)
    assert out.dtype == grad_out.dtype == q.dtype
    ok = allowed_pairs(tables, mask, aux, b, h, rows, rows_k, backward=True)
    s = _scores(q, k, scale)
    shift = torch.where(torch.isinf(lse), 0.0, lse.double())  # the kernel's -inf -> 0
    p = torch.where(ok, torch.exp(s - shift[..., None]), 0.0)
    do = grad_out.double()
    vd = v.double().repeat_interleave(group, dim=2)
    kd = k.double().repeat_interleave(group, dim=2)
    dp = torch.einsum("blhd,bmhd->bhlm", do, vd)
    delta = (do * out.double()).sum(-1).transpose(1, 2)  # (b, h, rows)
    ds = p * (dp - delta[..., None])
    dq.copy_((torch.einsum("bhlm,bmhd->blhd", ds, kd) * scale).to(dq.dtype))
    dkx = torch.einsum("bhlm,blhd->bmhd", ds, q.double()) * scale
    dvx = torch.einsum("bhlm,blhd->bmhd", p, do)
    dk.copy_(dkx.view(b, rows_k, hk, group, d).sum(3).to(dk.dtype))
    dv.copy_(dvx.view(b, rows_k, hk, group, d).sum(3).to(dv.dtype))
