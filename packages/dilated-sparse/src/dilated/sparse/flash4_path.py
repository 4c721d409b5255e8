"""The ``"flash4"`` path: block-sparse dilated attention as one flash-attn-4 call per run.

Per branch, each run of segments ([`dilated.sparse.runs`][dilated.sparse.runs]) is one
block-sparse flash-attn-4 call ([`dilated.kernels.flash4_block_sparse`][dilated.kernels.flash4_block_sparse])
over strided views of the inputs: the segments are its batch, the phase's rows its rows, the
phase's heads (or the phases) its heads ([`plan_calls`][dilated.sparse.flash4_plan.plan_calls]).
Its block tables ([`dilated.sparse.block_tables`][dilated.sparse.block_tables]) are built once
per (layout, shape, block size) on the CPU and kept on the device, forward (per query block) and
backward (per key block); a call pays a dict lookup for them, plus a few device operations
when a key padding mask refines them. The ``mask_mod`` runs only on partial blocks: the causal
diagonal, a layout whose blocks do not align with the kernel's, keys of padded rows.

Forward: every call writes its output and LSE into its region of one workspace (flash-attn-4's
``out=``/``lse=``), then one launch merges every piece of every branch by its LSE
([`merge_pieces`][dilated.kernels.piece_gather.merge_pieces]). Backward: every call, given the
final merged output and LSE, writes its gradients into its regions, and one launch per tensor
sums them ([`sum_pieces`][dilated.kernels.piece_gather.sum_pieces]); where that workspace would
be too large, in groups of branches, each group's sum added to the ones before
([`dilated.sparse.flash4_workspace`][dilated.sparse.flash4_workspace]).

[`call_forward`][dilated.sparse.flash4_path.call_forward] and
[`call_backward`][dilated.sparse.flash4_path.call_backward] are the block body of one call,
for callers that merge elsewhere (a sharded op).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from dilated.core.caching import PlanCache
from dilated.core.sparsity import BranchLayout
from dilated.kernels import flash4_block_sparse as fa4
from dilated.kernels._tables import upload
from dilated.kernels.flash4_block_sparse import BlockLists
from dilated.kernels.flash4_masks import KEEP_PER_BATCH, KEEP_PER_HEAD, ElementMask
from dilated.kernels.piece_gather import merge_pieces, sum_pieces
from dilated.kernels.strided_plan import kv_layout
from dilated.sparse.block_tables import (
    BlockClasses,
    KeptLists,
    block_classes,
    kept_lists,
    key_states,
    lists_of,
    refine,
)
from dilated.sparse.flash4_plan import Coef, Flash4Call, Flash4Plan, plan_calls, stride_of
from dilated.sparse.flash4_workspace import (
    BranchGroup,
    backward_budget,
    branch_groups,
    layout_bytes,
    piece_offsets,
)
from dilated.sparse.runs import run_tables

__all__ = ["RunTables", "backward", "call_backward", "call_forward", "forward"]


@dataclass(frozen=True)
class RunTables:
    """A run geometry's block tables on one device.

    Attributes:
        forward, backward: the lists without padding (batch and heads broadcast).
        kept: ``(forward, backward)`` [`KeptLists`][dilated.sparse.block_tables.KeptLists] a key
            padding mask refines.
        mask: the partial blocks' rule without padding.
        aux: the int32 layout table when ``mask`` reads it, padded to whole kernel blocks.
    """

    forward: BlockLists
    backward: BlockLists
    kept: tuple[KeptLists, KeptLists]
    mask: ElementMask
    aux: tuple[torch.Tensor, ...]


def _run_tables_on(
    classes: BlockClasses, table: torch.Tensor, rows: int, layout_block: int, causal: bool,
    device: torch.device,
) -> RunTables:  # fmt: skip
    block = fa4.BLOCK
    c = classes.classes
    aux: tuple[torch.Tensor, ...] = ()
    if classes.lookup:
        # The mask reads whole kernel blocks, past the rows' end too.
        size = (-(-rows // block[0]) * block[0] - 1) // layout_block + 1
        nb = min(table.shape[0], -(-rows // layout_block))
        padded = torch.zeros(size, size, dtype=torch.int32)
        padded[:nb, :nb] = table[:nb, :nb].to(torch.int32)
        aux = (upload(padded, device),)
    kept = (kept_lists(c).to(device), kept_lists(c.t().contiguous()).to(device))
    mask = ElementMask(causal=causal, layout_block=layout_block if classes.lookup else 0)
    forward, backward = lists_of(c, False, device, block), lists_of(c, True, device, block)
    return RunTables(forward, backward, kept, mask, aux)


@dataclass(frozen=True)
class _Prepared:
    """A plan, its block classes (CPU) and, per device, its tables and piece offsets."""

    plan: Flash4Plan
    classes: tuple[BlockClasses, ...]
    layouts: tuple[BranchLayout, ...]
    block_size: int
    causal: bool
    on_device: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    def tables(self, device: torch.device) -> tuple[RunTables, ...]:
        """Every run geometry's [`RunTables`][dilated.sparse.flash4_path.RunTables] on ``device``."""
        key = ("tables", device)
        hit = self.on_device.get(key)
        if hit is None:
            hit = tuple(
                _run_tables_on(
                    cls, self.layouts[branch].blocks, rows, self.block_size, self.causal, device
                )
                for cls, (branch, rows) in zip(self.classes, self.plan.tables)
            )
            if not _capturing(device):
                self.on_device[key] = hit
        assert isinstance(hit, tuple)
        return hit

    def groups(self, head_dim: int, element_size: int, budget: int) -> list[BranchGroup]:
        """The backward's [`branch_groups`][dilated.sparse.flash4_workspace.branch_groups]."""
        key = ("groups", head_dim, element_size, budget)
        hit = self.on_device.get(key)
        if hit is None:
            hit = self.on_device[key] = branch_groups(
                self.plan, len(self.layouts), head_dim, element_size, budget
            )
        assert isinstance(hit, list)
        return hit

    def pieces(
        self, kind: str, device: torch.device, head_dim: int, element_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offsets, address mask)`` of the piece table ``kind`` (``"out"``: values and LSE;
        ``"dq"``, ``"dk"``, ``"dv"``: gradients) as byte offsets from the workspace's start."""
        key = (kind, device, head_dim, element_size)
        hit = self.on_device.get(key)
        if hit is None:
            hit = piece_offsets(self.plan, kind, head_dim, element_size)
            hit = tuple(upload(t, device) for t in hit)
            if not _capturing(device):
                self.on_device[key] = hit
        assert isinstance(hit, tuple)
        return hit[0], hit[1]


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured (device copies made then belong to the graph:
    never cached)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_PREPARED: PlanCache[tuple[object, ...], _Prepared] = PlanCache(
    "dilated.sparse.flash4_path.plans",
    maxsize=64,
    key="the layout key (or the layouts' bytes), the block size, causality, the kernel's block, "
    "the batch, sequence, heads and key/value heads, and the strides of q, k and v; per device "
    "the entry holds its tables and piece offsets",
)


def _prepared(
    layouts: Sequence[BranchLayout],
    block_size: int,
    causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout_key: str | None,
) -> _Prepared:
    """The plan of these layouts and tensors, cached by the layout key (or the tables' bytes),
    the block size, causality, the shapes and the strides."""
    b, n, h, _ = q.shape
    content: object = layout_key
    if content is None:
        content = tuple((lay.segment_length, lay.dilation_rate, lay.blocks.numpy().tobytes())
                        for lay in layouts)  # fmt: skip
    key = (content, block_size, causal, fa4.BLOCK, b, n, h, k.shape[2], q.stride(), k.stride(),
           v.stride())  # fmt: skip
    return _PREPARED.get_or_build(key, lambda: _plan(layouts, block_size, causal, q, k, v))


def _plan(
    layouts: Sequence[BranchLayout],
    block_size: int,
    causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> _Prepared:
    b, n, h, _ = q.shape
    runs = [run for run, _ in run_tables(layouts, n, h, k.shape[2])]
    # Outputs, gradients, the LSE and the key mask are contiguous (batch, seq, ...) tensors.
    strides = [(x.stride(0), x.stride(1), x.stride(2)) for x in (q, k, v)] + [(n, 1, 1)]
    plan = plan_calls(runs, [lay.segment_length for lay in layouts], (b, n, h), strides)
    classes = tuple(
        block_classes(layouts[branch].blocks, rows, block_size, fa4.BLOCK[0], causal)
        for branch, rows in plan.tables
    )
    return _Prepared(plan, classes, tuple(layouts), block_size, causal)


def _view(x: torch.Tensor, call: Flash4Call, keys: bool) -> torch.Tensor:
    """``(B, L, H, x.shape[3])`` view of ``x`` ``(batch, seq, heads, ...)`` for ``call``."""
    s = (x.stride(0), x.stride(1), x.stride(2))
    heads, coef = call.kv_heads if keys else call.heads
    offset: Coef = call.k_offset if keys else call.q_offset
    return x.as_strided(
        (call.batch[0], call.rows, heads, x.shape[3]),
        (stride_of(call.batch[1], s), stride_of(call.row, s), stride_of(coef, s), x.stride(3)),
        x.storage_offset() + stride_of(offset, s),
    )


def _keep_view(keep: torch.Tensor, call: Flash4Call) -> torch.Tensor:
    """``(B, heads | 1, L)`` of the key mask ``keep`` ``(batch, seq)`` at the call's key rows."""
    s = (keep.stride(0), keep.stride(1), 0)
    heads = call.heads[0] if call.keys_by_head else 1
    return keep.as_strided(
        (call.batch[0], heads, call.rows),
        (stride_of(call.batch[1], s), stride_of(call.heads[1], s), stride_of(call.row, s)),
        keep.storage_offset() + stride_of(call.k_offset, s),
    )


def call_tables(
    call: Flash4Call, tables: RunTables, keep: torch.Tensor | None, backward: bool
) -> tuple[BlockLists, ElementMask, list[torch.Tensor]]:
    """The lists, rule and aux tensors of one call; ``keep`` (bool ``(batch, seq)``, True = a
    key that may be attended, or None) refines the cached lists on the device."""
    if keep is None:
        return (tables.backward if backward else tables.forward), tables.mask, list(tables.aux)
    block = tables.forward.block
    view = _keep_view(keep, call)
    lists = refine(tables.kept[int(backward)], key_states(view, block[1]), backward, block)
    rows = -(-call.rows // block[1]) * block[1]
    aux = torch.zeros(view.shape[0], view.shape[1], rows, dtype=torch.int32, device=keep.device)
    aux[..., : call.rows] = view
    by_head = call.keys_by_head
    mask = replace(tables.mask, keep=KEEP_PER_HEAD if by_head else KEEP_PER_BATCH)
    return lists, mask, [*tables.aux, aux if by_head else aux[:, 0].contiguous()]


def call_forward(
    call: Flash4Call,
    tables: RunTables,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """The block body of one call: its output ``(B, L, H, head_dim)`` into ``out`` and its LSE
    ``(B, H, L)`` into ``lse`` (float32, unit ``L`` stride), from ``q`` ``(batch, seq, heads,
    head_dim)`` and ``k``/``v`` ``(batch, seq, kv_heads, head_dim)`` (float16/bfloat16)."""
    lists, mask, aux = call_tables(call, tables, keep, backward=False)
    fa4.forward(
        _view(q, call, False), _view(k, call, True), _view(v, call, True), scale=scale,
        tables=lists, mask=mask, aux=aux, out=out, lse=lse,
    )  # fmt: skip


def call_backward(
    call: Flash4Call,
    tables: RunTables,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse3: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """The gradients of one call into ``dq`` ``(B, L, H, head_dim)``, ``dk``/``dv`` ``(B, L,
    H_kv, head_dim)`` (dtype of ``q``), given the final merged ``out`` ``(batch, seq, heads,
    head_dim)`` and ``lse3`` ``(batch, seq, heads)`` float32 (the LSE transposed)."""
    lists, mask, aux = call_tables(call, tables, keep, backward=True)
    lse = _view(lse3[..., None], call, False)[..., 0].transpose(1, 2)
    fa4.backward(
        _view(grad_out, call, False), _view(q, call, False), _view(k, call, True),
        _view(v, call, True), _view(out, call, False), lse, scale=scale, tables=lists,
        mask=mask, aux=aux, dq=dq, dk=dk, dv=dv,
    )  # fmt: skip


def _kv_group(h: int, hkv: int, layouts: Sequence[BranchLayout]) -> int | None:
    """The gather's key/value group ([`kv_layout`][dilated.kernels.strided_plan.kv_layout]):
    0 without grouped-query attention, the group when each phase reads a strided set of
    key/value heads, None when they are repeated once to one per query head."""
    layout = kv_layout(h, hkv, [lay.dilation_rate for lay in layouts])
    return {"mha": 0, "grouped": h // hkv}.get(layout)


def _regions(
    ws: torch.Tensor, call: Flash4Call, start: int, like: torch.Tensor, kv: bool, base: int = 0
) -> torch.Tensor:
    """The call's ``(B, L, H, head_dim)`` region, in the dtype of ``like``, of the workspace
    part at byte ``start`` whose first row-head is region ``base``."""
    size = call.kv_region_size if kv else call.region_size
    at = (call.kv_region if kv else call.region) - base
    heads = call.kv_heads[0] if kv else call.heads[0]
    head_dim, dtype, esize = like.shape[3], like.dtype, like.element_size()
    lo = start + at * head_dim * esize
    part = ws[lo : lo + size * head_dim * esize].view(dtype)
    return part.view(call.batch[0], call.rows, heads, head_dim)


def _piece_table(
    prepared: _Prepared, kind: str, ws: torch.Tensor, head_dim: int, esize: int,
    group: BranchGroup | None = None,
) -> torch.Tensor:  # fmt: skip
    """The device piece table of ``kind`` with addresses in ``ws``: the whole plan's, or the
    rows of ``group``'s branches with ``ws`` holding that group's regions alone."""
    offsets, mask = prepared.pieces(kind, ws.device, head_dim, esize)
    if group is None:
        return torch.add(offsets, mask, alpha=ws.data_ptr())
    lo, hi = group.branches
    shift = group.shift(prepared.plan, kind, head_dim, esize)
    return torch.add(offsets[lo:hi], mask[lo:hi], alpha=ws.data_ptr() + shift)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layouts: Sequence[BranchLayout],
    block_size: int,
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    layout_key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of block-sparse dilated attention on the flash4 path (arguments and
    result as [`block_sparse_forward`][dilated.sparse.engine.block_sparse_forward]; no
    dropout). ``layout_key``: the layouts' [`layout_key`][dilated.sparse.layouts.layout_key],
    the cache key of their tables (else their bytes are hashed)."""
    b, n, h, d = q.shape
    if _kv_group(h, k.shape[2], layouts) is None:
        k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    prepared = _prepared(layouts, block_size, is_causal, q, k, v, layout_key)
    plan, esize = prepared.plan, q.element_size()
    at = layout_bytes(plan, d, esize)
    ws = torch.empty(at["fwd_end"], dtype=torch.uint8, device=q.device)
    keep = None if key_padding_mask is None else key_padding_mask.contiguous()
    tables = prepared.tables(q.device)
    for call in plan.calls:
        lo = at["lse"] + call.region * 4
        lse_part = ws[lo : lo + call.region_size * 4].view(torch.float32)
        call_forward(
            call, tables[call.table], q, k, v, keep, scale=scale,
            out=_regions(ws, call, at["out"], q, False),
            lse=lse_part.view(call.batch[0], call.heads[0], call.rows),
        )  # fmt: skip
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    ws_, rs = [lay.segment_length for lay in layouts], [lay.dilation_rate for lay in layouts]
    merge_pieces(_piece_table(prepared, "out", ws, d, esize), out, lse, ws_, rs, plan.rmax)
    return out, lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layouts: Sequence[BranchLayout],
    block_size: int,
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    layout_key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the dtype of ``q`` given the final ``out`` ``(batch, seq, heads,
    head_dim)`` and ``lse`` ``(batch, heads, seq)`` of [`forward`][dilated.sparse.flash4_path.forward]
    (same arguments)."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    group = _kv_group(h, hkv, layouts)
    if group is None:
        k, v = (x.repeat_interleave(h // hkv, dim=2) for x in (k, v))
    prepared = _prepared(layouts, block_size, is_causal, q, k, v, layout_key)
    plan, esize = prepared.plan, q.element_size()
    keep = None if key_padding_mask is None else key_padding_mask.contiguous()
    dout = grad_out.to(q.dtype).contiguous()
    out = out.to(q.dtype).contiguous()
    lse3 = lse.float().transpose(1, 2).contiguous()
    tables = prepared.tables(q.device)
    ws_, rs = [lay.segment_length for lay in layouts], [lay.dilation_rate for lay in layouts]
    grads = [torch.empty(x.shape, dtype=q.dtype, device=q.device) for x in (q, k, v)]
    for index, part in enumerate(prepared.groups(d, esize, backward_budget(q.device))):
        at = part.layout_bytes(d, esize)
        ws = torch.empty(at["bwd_end"], dtype=torch.uint8, device=q.device)
        for call in part.calls:
            call_backward(
                call, tables[call.table], dout, q, k, v, out, lse3, keep, scale=scale,
                dq=_regions(ws, call, at["dq"], q, False, part.regions[0]),
                dk=_regions(ws, call, at["dk"], q, True, part.kv_regions[0]),
                dv=_regions(ws, call, at["dv"], q, True, part.kv_regions[0]),
            )  # fmt: skip
        lo, hi = part.branches
        for kind, grad in zip(("dq", "dk", "dv"), grads):
            sum_pieces(
                _piece_table(prepared, kind, ws, d, esize, part), grad, ws_[lo:hi], rs[lo:hi],
                plan.rmax, kv_group=0 if kind == "dq" else (group or 0), accumulate=index > 0,
            )  # fmt: skip
        # The next group's workspace may take this one's memory.
        del ws
    dq, dk, dv = grads
    if group is None:
        dk, dv = (x.view(b, n, hkv, h // hkv, d).sum(3, dtype=torch.float32).to(q.dtype)
                  for x in (dk, dv))  # fmt: skip
    return dq, dk, dv
