"""Block-sparse dilated attention as calls of the shared sub-problem primitive, without autograd.

Each branch's sub-problems are grouped into runs ([`dilated.sparse.runs`][dilated.sparse.runs]),
each run's block layout is cut into the [`Tile`][dilated.sparse.tiles.Tile]s of its dense
rectangles, and every tile is one call of
[`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] on strided views
([`dilated.sparse.tile_plan`][dilated.sparse.tile_plan] plans the calls once per geometry). The
results are merged into float32 accumulators with
[`merge_into`][dilated.kernels.merge.merge_into] (on CUDA its one-launch Triton form; a call on
rows nothing was merged into yet writes its result without reading them, and the accumulators
are not even filled when the first branch writes every row before anything merges into it). In
the forward pass, where the setting ``sparse_rows_kernel`` of
[`dilated.core.settings`][dilated.core.settings] allows, a run's
one-row tiles (a band's edge rows, whose windows all differ in length) are instead one launch of
[`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into] after the run's other calls,
merging in its epilogue: one launch where there were ``2W`` calls, each paying cuDNN's host
cost. The backward pass enumerates the primitive's calls (edge rows included) and gives each
one the FINAL merged output and LSE ([`subproblem_attention_backward`][dilated.kernels.subproblem.subproblem_attention_backward]),
so the parts' gradients add up to the gradient of the whole; they are added into float32
accumulators with [`add_into`][dilated.kernels.accumulate.add_into], and the key gradients of a
stack whose windows overlap with [`add_windows`][dilated.kernels.accumulate.add_windows].

This is the ``"tiles"`` path. [`block_sparse_forward`][dilated.sparse.engine.block_sparse_forward]
and [`block_sparse_backward`][dilated.sparse.engine.block_sparse_backward] choose between it and
the ``"flash4"`` path ([`dilated.sparse.flash4_path`][dilated.sparse.flash4_path]: one
flash-attn-4 call per run over its block tables) by the setting ``sparse_flash4`` ([`dilated.sparse.paths`][dilated.sparse.paths]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dilated.core.branches import compute_dtype
from dilated.core.reference import call_dropout_seed
from dilated.core.settings import alias_module_switches, get_settings
from dilated.core.sparsity import BranchLayout
from dilated.kernels import block_rows
from dilated.kernels.accumulate import add_into, add_windows
from dilated.kernels.block_rows import rows_forward_into
from dilated.kernels.merge import merge_into
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward
from dilated.sparse import flash4_path, paths

# The distributed op imports the runs from here.
from dilated.sparse.runs import RunTable as RunTable
from dilated.sparse.runs import _Run
from dilated.sparse.runs import branch_runs as branch_runs
from dilated.sparse.runs import run_tables as run_tables
from dilated.sparse.tile_plan import _RowsStep, _Step, _steps, _TileGeometry, _view

__all__ = [
    "RunTable",
    "backward_into",
    "block_sparse_backward",
    "block_sparse_forward",
    "count_calls",
    "forward_into",
]


def _rows_block_m(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: torch.Tensor, dropout_p: float
) -> int:
    """Rows per entry of the rows kernel for these inputs and accumulators, 0 when it is off
    (the setting ``sparse_rows_kernel``)."""
    rows_kernel = get_settings().sparse_rows_kernel
    if rows_kernel is False or (rows_kernel is None and not q.is_cuda):
        return 0
    if acc.dtype != torch.float32:
        return 0
    if q.shape[1] != k.shape[1] or not block_rows.rows_supported(q, k, v, dropout_p):
        return 0
    return block_rows.block_m(q.shape[3])


def count_calls(
    layouts: Sequence[BranchLayout],
    block_size: int,
    shape: tuple[int, int, int, int],
    kv_heads: int,
    is_causal: bool,
    rows_kernel: bool = False,
) -> int:
    """Launches of attention one forward pass makes on contiguous inputs of ``shape`` (for
    benchmarks): primitive calls, and rows kernel launches with ``rows_kernel``."""
    b, n, h, d = shape
    q = torch.empty(shape, device="meta")
    k = torch.empty(b, n, kv_heads, d, device="meta")
    lse = torch.empty(b, n, h, 1, device="meta")
    runs = run_tables(layouts, n, h, kv_heads)
    block_m = block_rows.block_m(d) if rows_kernel else 0
    return len(_steps(runs, block_size, is_causal, [q, k, k, q, lse], None, block_m).steps)


def _kv_sources(run: _Run, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if run.kv_index is None:
        return k, v
    # Heads of a phase whose key/value heads are no strided slice: gather them once per run.
    idx = torch.tensor(run.kv_index, device=k.device)
    return k.index_select(2, idx), v.index_select(2, idx)


@dataclass(frozen=True)
class _Views:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor | None


def _inputs(
    step: _Step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask4: torch.Tensor | None
) -> _Views:
    km = None if mask4 is None else _view(mask4, step, "mask")[..., 0, 0]
    return _Views(_view(q, step, "q"), _view(k, step, "k"), _view(v, step, "k"), km)


def block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layouts: Sequence[BranchLayout],
    block_size: int,
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    layout_key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of block-sparse dilated attention on validated inputs, without autograd,
    on the path [`choose_path`][dilated.sparse.paths.choose_path] picks.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k, v: ``(batch, seq, kv_heads, head_dim)``.
        layouts: every branch's layout
            ([`resolve_layouts`][dilated.core.sparsity.resolve_layouts]).
        block_size: rows per block.
        scale, is_causal: as in
            [`block_sparse_dilated_attention`][dilated.sparse.block_sparse_dilated_attention].
        key_padding_mask: bool ``(batch, seq)`` in the internal form (True = a key that may be
            attended) that [`prepare_call`][dilated.core.functional.prepare_call] returns, or None.
        dropout_p: dropout on the probabilities; needs ``dropout_seed``.
        dropout_seed: seed of the first call's dropout mask (call ``i`` uses ``seed + i``).
        layout_key: the layouts' [`layout_key`][dilated.sparse.layouts.layout_key], which
            the flash4 path caches its tables by (else it hashes the tables' bytes).

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q`` (0 for uncovered rows)
        and ``lse`` ``(batch, heads, seq)`` float32 (float64 for float64 inputs; ``-inf`` there).
    """
    if paths.choose_path(q, k, dropout_p=dropout_p) == "flash4":
        return flash4_path.forward(
            q, k, v, layouts, block_size, scale=scale, is_causal=is_causal,
            key_padding_mask=key_padding_mask, layout_key=layout_key,
        )  # fmt: skip
    runs = run_tables(layouts, q.shape[1], q.shape[2], k.shape[2])
    acc, acc_lse = uninitialized_accumulators(q)
    forward_into(
        runs, block_size, q, k, v, acc, acc_lse, scale=scale, is_causal=is_causal,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p, dropout_seed=dropout_seed,
        empty=True,
    )  # fmt: skip
    return acc.to(q.dtype), acc_lse[..., 0].transpose(1, 2).contiguous()


def _uninitialized(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def uninitialized_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfilled ``(acc, acc_lse)`` for ``q`` ``(batch, n, heads, head_dim)``: float32 (float64
    for float64 inputs) ``(batch, n, heads, head_dim)`` and ``(batch, n, heads, 1)``, for a
    [`forward_into`][dilated.sparse.engine.forward_into] with ``empty=True``, which fills them
    only where its calls do not write every row first."""
    b, n, h, d = q.shape
    work = compute_dtype(q.dtype)
    return _uninitialized((b, n, h, d), work, q.device), _uninitialized(
        (b, n, h, 1), work, q.device
    )


def forward_into(
    runs: Sequence[RunTable],
    block_size: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    acc: torch.Tensor,
    acc_lse: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    empty: bool = False,
) -> None:
    """Merge the tiles of ``runs`` into ``acc`` ``(batch, n, heads, head_dim)`` and ``acc_lse``
    ``(batch, n, heads, 1)`` (float32, in place). ``q`` is shaped like ``acc``; ``k``/``v``
    hold the keys the runs address (another length when a run has a ``q_shift``). ``empty``:
    the accumulators hold nothing yet, whatever their contents (see
    [`uninitialized_accumulators`][dilated.sparse.engine.uninitialized_accumulators]): they are
    filled with zeros and ``-inf`` unless every row is written before anything merges into it,
    and a call on rows no earlier call wrote writes its result instead of merging it."""
    work = acc.dtype
    mask4 = None if key_padding_mask is None else key_padding_mask[:, :, None, None]
    sources: dict[_Run, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        plan = _steps(
            runs, block_size, is_causal, [q, k, v, acc, acc_lse], key_padding_mask,
            _rows_block_m(q, k, v, acc, dropout_p),
        )  # fmt: skip
        if empty and not plan.writes_every_row:
            acc.zero_()
            acc_lse.fill_(float("-inf"))
        mask8: torch.Tensor | None = None
        for i, step in enumerate(plan.steps):
            if isinstance(step, _RowsStep):
                if key_padding_mask is not None and mask8 is None:
                    mask8 = key_padding_mask.to(torch.int8).contiguous()
                rows_forward_into(
                    q, k, v, mask8, acc, acc_lse, step.run,
                    step.first if empty else step.merging, scale=scale,
                )  # fmt: skip
                continue
            c = step.call
            if step.run not in sources:
                sources = {step.run: _kv_sources(step.run, k, v)}
            ks, vs = sources[step.run]
            x = _inputs(step, q, ks, vs, mask4)
            out, lse = subproblem_attention(
                x.q,
                x.k,
                x.v,
                scale=scale,
                is_causal=c.causal,
                key_mask=x.key_mask,
                dropout_p=dropout_p,
                dropout_seed=call_dropout_seed(dropout_seed, i),
            )
            lse_view = _view(acc_lse, step, "q")[..., 0].transpose(1, 2)
            # Nothing merged into these rows yet: the merge writes without reading.
            merge_into(
                _view(acc, step, "q"), lse_view, out, lse.to(work), first=step.first and empty
            )


def _add_keys(
    acc: torch.Tensor, grad: torch.Tensor, call: _TileGeometry, stack: int | None
) -> None:
    """Add a call's key gradient into the accumulator view (overlapping windows summed)."""
    if stack is None:
        add_into(acc, grad)
    else:
        add_windows(acc, grad, stack, call.step_rows)


def block_sparse_backward(
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
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    layout_key: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` given the final ``out`` ``(batch, seq, heads, head_dim)`` and ``lse``
    ``(batch, heads, seq)`` of [`block_sparse_forward`][dilated.sparse.engine.block_sparse_forward]
    (same arguments). Returns float32 gradients (float64 for float64 inputs) on the tiles path,
    gradients in the dtype of ``q`` (summed in float32) on the flash4 path."""
    if paths.choose_path(q, k, dropout_p=dropout_p) == "flash4":
        return flash4_path.backward(
            grad_out, q, k, v, out, lse, layouts, block_size, scale=scale, is_causal=is_causal,
            key_padding_mask=key_padding_mask, layout_key=layout_key,
        )  # fmt: skip
    work = compute_dtype(q.dtype)
    lse4 = lse.transpose(1, 2).unsqueeze(-1).contiguous()
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    runs = run_tables(layouts, q.shape[1], q.shape[2], k.shape[2])
    backward_into(
        runs, block_size, grad_out, q, k, v, out, lse4, dq, dk, dv, scale=scale,
        is_causal=is_causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )  # fmt: skip
    return dq, dk, dv


def backward_into(
    runs: Sequence[RunTable],
    block_size: int,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse4: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> None:
    """Add the gradients of the tiles of ``runs`` into ``dq``/``dk``/``dv`` (float32, shaped like
    ``q``/``k``/``v``) given the final ``out`` and ``lse4`` ``(batch, n, heads, 1)``."""
    work = dq.dtype
    grad_out = grad_out.contiguous()
    mask4 = None if key_padding_mask is None else key_padding_mask[:, :, None, None]
    current: _Run | None = None
    ks, vs, dks, dvs = k, v, dk, dv
    tensors = [q, k, v, grad_out, out, lse4, dq, dk, dv]
    for i, step in enumerate(_steps(runs, block_size, is_causal, tensors, key_padding_mask).steps):
        assert isinstance(step, _Step)  # planned without the rows kernel
        c, run = step.call, step.run
        if run is not current:
            _flush(current, dk, dv, dks, dvs)
            current = run
            ks, vs = _kv_sources(run, k, v)
            dks, dvs = (
                (dk, dv)
                if run.kv_index is None
                else (
                    torch.zeros(ks.shape, dtype=work, device=q.device),
                    torch.zeros(vs.shape, dtype=work, device=q.device),
                )
            )
        x = _inputs(step, q, ks, vs, mask4)

        def view_q(t: torch.Tensor, step: _Step = step) -> torch.Tensor:
            return _view(t, step, "q")

        gq, gk, gv = subproblem_attention_backward(
            view_q(grad_out),
            x.q,
            x.k,
            x.v,
            view_q(out),
            view_q(lse4)[..., 0].transpose(1, 2),
            scale=scale,
            is_causal=c.causal,
            key_mask=x.key_mask,
            dropout_p=dropout_p,
            dropout_seed=call_dropout_seed(dropout_seed, i),
        )
        add_into(view_q(dq), gq)
        _add_keys(_view(dks, step, "k"), gk, c, step.plan.keys_stack)
        _add_keys(_view(dvs, step, "k"), gv, c, step.plan.keys_stack)
    _flush(current, dk, dv, dks, dvs)


def _flush(
    run: _Run | None, dk: torch.Tensor, dv: torch.Tensor, dks: torch.Tensor, dvs: torch.Tensor
) -> None:
    """Add the gradients of a run's gathered key/value heads back into their heads."""
    if run is None or run.kv_index is None:
        return
    idx = torch.tensor(run.kv_index, device=dk.device)
    dk.index_add_(2, idx, dks)
    dv.index_add_(2, idx, dvs)


# The switches this module (and tile_plan) had are settings now; the old spellings still work.
alias_module_switches(
    __name__, {"ROWS_KERNEL": "sparse_rows_kernel", "HEAD_SLOT": "sparse_head_slot"}
)
