"""Block-sparse dilated attention as calls of the shared sub-problem primitive, without autograd.

Each branch's sub-problems ([`subproblems`][dilated.core.branches.subproblems]) are cut into
the [`Tile`][dilated.sparse.tiles.Tile]s of their block layout. One tile is one call of
[`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] on strided views of
the ``(batch, seq, heads, head_dim)`` inputs (nothing is copied): the call's problems are the
product of up to four index dimensions (batch, segment, folded phase, stacked tile), of which
adjacent ones with compatible strides merge into the primitive's batch dimension; another one
takes the head slot when a call has one head (or when looping over the real heads instead makes
fewer calls), and any left over is looped. The results are merged into float32 accumulators with
[`merge_into`][dilated.kernels.merge.merge_into] (on CUDA its one-launch Triton form; a call on rows
nothing was merged into yet writes its result without reading them, and the accumulators are
not even filled when the first branch writes every row before anything merges into it). In
the forward pass, where [`ROWS_KERNEL`][dilated.sparse.engine.ROWS_KERNEL] allows, a run's
one-row tiles (a band's edge rows, whose windows all differ in length) are instead one launch of
[`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into] after the run's other calls,
merging in its epilogue: one launch where there were ``2W`` calls, each paying cuDNN's host
cost. The backward pass enumerates the primitive's calls (edge rows included) and gives each
one the FINAL merged output and LSE ([`subproblem_attention_backward`][dilated.kernels.subproblem.subproblem_attention_backward]),
so the parts' gradients add up to the gradient of the whole; they are added into float32
accumulators with [`add_into`][dilated.kernels.accumulate.add_into], and the key gradients of a
stack whose windows overlap with [`add_windows`][dilated.kernels.accumulate.add_windows].
The calls of one geometry (layouts, shapes, strides) are planned once and cached.

Phases are folded into one index dimension (head ``p`` at row offset ``p``: stride
``seq_stride + head_stride``) for full segments when every phase has as many heads and there is
no grouped-query attention; otherwise each phase is its own run.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dilated.core.branches import SubProblem, compute_dtype, subproblems
from dilated.core.reference import call_dropout_seed
from dilated.core.sparsity import BranchLayout
from dilated.kernels import block_rows
from dilated.kernels.accumulate import add_into, add_windows
from dilated.kernels.block_rows import RowsGeometry, RowsTable, rows_forward_into
from dilated.kernels.merge import merge_into
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward
from dilated.sparse.tiles import Tile, is_row_tile, plan_tiles

__all__ = [
    "RunTable",
    "backward_into",
    "block_sparse_backward",
    "block_sparse_forward",
    "count_calls",
    "forward_into",
]

#: ``(coefficient of the batch stride, of the seq stride, of the head stride)``.
_Coef = tuple[int, int, int]


@dataclass(frozen=True)
class _Run:
    """Segments of one branch computed by the same tiles.

    Query head ``c`` of folded phase ``p`` is head ``head0 + p + c * rate`` at rows
    ``phase0 + p + rate * (start + i)``; it reads key/value head ``kv0 + p + (c // kv_group) *
    kv_step`` (``kv_index`` set: a gathered copy of the key/value heads instead).
    """

    branch: int
    rate: int
    phase0: int
    phases: int
    heads: int
    kv0: int
    kv_step: int
    kv_heads: int
    kv_index: tuple[int, ...] | None
    start: int
    count: int
    length: int
    # Query rows (and everything shaped like them) are read ``q_shift`` rows earlier: a rank
    # holding rows ``q_shift ..`` of a segment passes its shard as the queries.
    q_shift: int = 0


def _strided_kv(kv: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(first, step, count)`` when query head ``c`` reads ``first + (c // group) * step``."""
    group = 1
    while group < len(kv) and kv[group] == kv[0]:
        group += 1
    if len(kv) % group:
        return None
    count = len(kv) // group
    step = kv[group] - kv[0] if count > 1 else 1
    if step <= 0 or any(kv[c] != kv[0] + (c // group) * step for c in range(len(kv))):
        return None
    return kv[0], step, count


@functools.lru_cache(maxsize=256)
def _branch_runs(
    seq: int, heads: int, kv_heads: int, branch: int, w: int, r: int
) -> tuple[_Run, ...]:
    sps = subproblems(seq, heads, kv_heads, w, r)
    full = [sp for sp in sps if sp.start == 0 and sp.length == w // r]
    fold = (
        heads == kv_heads
        and len(full) > 1
        and len(full) == min(r, heads)
        and (r >= heads or heads % r == 0)
    )
    runs = []
    if fold:
        sp = full[0]
        hp = len(range(heads)[sp.heads])
        runs.append(_Run(branch, r, 0, len(full), hp, 0, r, hp, None, 0, sp.count, sp.length))
    for sp in sps:
        if fold and sp in full:
            continue
        runs.append(_single_run(branch, sp))
    return tuple(runs)


def _single_run(branch: int, sp: SubProblem) -> _Run:
    hp = len(sp.kv_heads)
    strided = _strided_kv(sp.kv_heads)
    if strided is None:
        return _Run(
            branch, sp.rate, sp.phase, 1, hp, 0, 1, hp, sp.kv_heads, sp.start, sp.count, sp.length
        )
    kv0, step, count = strided
    return _Run(
        branch, sp.rate, sp.phase, 1, hp, kv0, step, count, None, sp.start, sp.count, sp.length
    )


@dataclass(frozen=True)
class _TileGeometry:
    """The geometry of one tile of one run: index dims, rows and heads of queries and keys."""

    dims: tuple[tuple[int, _Coef], ...]
    q_offset: _Coef
    k_offset: _Coef
    q_rows: int
    k_rows: int
    row: _Coef
    q_heads: tuple[int, _Coef]
    k_heads: tuple[int, _Coef]
    causal: bool
    key_blocks: int
    block_rows: int
    overlapping_keys: bool
    step_rows: int


def _call(run: _Run, tile: Tile, batch: int, block: int) -> _TileGeometry:
    r = run.rate
    dims: list[tuple[int, _Coef]] = [(batch, (1, 0, 0)), (run.count, (0, run.length * r, 0))]
    if run.phases > 1:
        dims.append((run.phases, (0, 1, 1)))
    if tile.stack > 1:
        dims.append((tile.stack, (0, tile.step * block * r, 0)))
    q_row0 = tile.q0 * block
    k_row0 = tile.k0 * block
    q_rows = min(q_row0 + tile.qn * block, run.length) - q_row0
    k_rows = min(k_row0 + tile.kn * block, run.length) - k_row0
    kv_head0 = 0 if run.kv_index is not None else run.kv0
    return _TileGeometry(
        dims=tuple(d for d in dims if d[0] > 1),
        q_offset=(0, run.phase0 + (run.start + q_row0 - run.q_shift) * r, run.phase0),
        k_offset=(0, run.phase0 + (run.start + k_row0) * r, kv_head0),
        q_rows=q_rows,
        k_rows=k_rows,
        row=(0, r, 0),
        q_heads=(run.heads, (0, 0, r)),
        k_heads=(run.kv_heads, (0, 0, run.kv_step)),
        causal=tile.causal,
        key_blocks=tile.kn,
        block_rows=block,
        overlapping_keys=tile.stack > 1 and tile.kn > tile.step,
        step_rows=tile.step * block,
    )


def _stride(coef: _Coef, strides: tuple[int, int, int]) -> int:
    return coef[0] * strides[0] + coef[1] * strides[1] + coef[2] * strides[2]


@dataclass(frozen=True)
class _Problems:
    """How a call's index dims map onto the primitive: looped, batch and (maybe) head slot.

    ``head_loop``: the call's real heads are looped one at a time (their count), so that an
    index dim can take the head slot; 0 when the heads stay in it. ``keys_stack``: the view
    dimension (0: batch, 2: head slot) of a stack whose key windows overlap inside one call, or
    None.
    """

    loops: tuple[tuple[int, tuple[_Coef, ...]], ...]
    batch: tuple[int, tuple[_Coef, ...]]
    head_slot: tuple[int, tuple[_Coef, ...]] | None
    head_loop: int
    keys_stack: int | None


def _problems(
    call: _TileGeometry, strides: Sequence[tuple[int, int, int]], heads_ok: bool
) -> _Problems:
    """Merge adjacent index dims whose strides agree in every tensor; pick batch and head slot.

    A merged group keeps the coefficients of its innermost dim (the stride of one step). The
    largest group is the batch; the next one takes the head slot when there is one head, or
    when looping over the heads instead makes fewer calls; the rest is looped.
    """
    groups: list[tuple[int, tuple[_Coef, ...]]] = []
    for size, coef in call.dims:
        if groups:
            psize, pcoefs = groups[-1]
            inner = pcoefs[-1]
            if all(_stride(inner, s) == _stride(coef, s) * size for s in strides):
                groups[-1] = (psize * size, (*pcoefs[:-1], coef))
                continue
        groups.append((size, (coef,)))
    if not groups:
        groups = [(1, ((0, 0, 0),))]
    order = sorted(range(len(groups)), key=lambda i: -groups[i][0])
    batch = groups[order[0]]
    rest = order[1:]
    heads = call.q_heads[0]
    one_head = heads == 1 and call.k_heads[0] == 1
    head_slot = None
    head_loop = 0
    in_call = [order[0]]
    if heads_ok and rest:
        keep_heads = math.prod(groups[i][0] for i in rest)
        loop_heads = heads * math.prod(groups[i][0] for i in rest[1:])
        if one_head or loop_heads < keep_heads:
            head_slot = groups[rest[0]]
            head_loop = 0 if one_head else heads
            in_call.append(rest[0])
            rest = rest[1:]
    loops = tuple(groups[i] for i in sorted(rest))
    # The stack dim is the last one; its overlapping key windows meet only inside one call.
    stack = None
    if call.overlapping_keys and len(groups) - 1 in in_call:
        stack = 0 if in_call[0] == len(groups) - 1 else 2
    return _Problems(loops, batch, head_slot, head_loop, stack)


def _strides(x: torch.Tensor, heads: bool = True) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2) if heads else 0


@dataclass(frozen=True)
class _Step:
    """One primitive call: the run, the call geometry, the index of every looped dim and the
    looped head (None when the heads are not looped). ``first``: no earlier call of the same
    pass wrote its query rows (they belong to the first branch and to no earlier tile)."""

    run: _Run
    call: _TileGeometry
    plan: _Problems
    loop: tuple[int, ...]
    head: int | None
    first: bool = False
    # (role, strides, head_dim) -> as_strided (size, stride, offset) of ``_view``: the steps
    # of a plan are cached, so each view's geometry is worked out once.
    views: dict[tuple[str, tuple[int, ...], int], tuple[tuple[int, ...], tuple[int, ...], int]] = (
        field(default_factory=dict, compare=False, hash=False, repr=False)
    )


def _tile_blocks(tile: Tile) -> set[int]:
    return {tile.q0 + e * tile.step + i for e in range(tile.stack) for i in range(tile.qn)}


def _view(x: torch.Tensor, step: _Step, role: str) -> torch.Tensor:
    """``(batch, rows, heads, x.shape[3])`` view of ``x`` ``(batch, seq, heads, d)`` for one call.

    ``role``: ``"q"`` (queries, and every tensor shaped like them: output, LSE, gradients),
    ``"k"`` (keys, values and their gradients) or ``"mask"`` (a ``(batch, seq, 1, 1)`` key mask).
    """
    key = (role, x.stride(), x.shape[3])
    geometry = step.views.get(key)
    if geometry is None:
        s = _strides(x, role != "mask")
        size, stride, base = _geometry(step, role, s, x.shape[3])
        geometry = step.views[key] = (size, (*stride[:3], x.stride(3)), base)
    size, stride, base = geometry
    return x.as_strided(size, stride, x.storage_offset() + base)


def _geometry(
    step: _Step, role: str, s: tuple[int, int, int], d: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    c, plan = step.call, step.plan
    queries = role == "q"
    offset = c.q_offset if queries else c.k_offset
    hsize, hcoef = c.q_heads if queries else c.k_heads
    base = _stride(offset, s)
    for i, (_, coefs) in zip(step.loop, plan.loops):
        base += i * _stride(coefs[-1], s)
    if step.head is not None:
        # One query head per call; the keys are those of its key/value head.
        group = c.q_heads[0] // c.k_heads[0]
        base += (step.head if queries else step.head // group) * _stride(hcoef, s)
    if plan.head_slot is not None:
        hsize, hcoef = plan.head_slot[0], plan.head_slot[1][-1]
    if role == "mask":
        hsize, hcoef = 1, (0, 0, 0)
    return (
        (plan.batch[0], c.q_rows if queries else c.k_rows, hsize, d),
        (_stride(plan.batch[1][-1], s), _stride(c.row, s), _stride(hcoef, s)),
        base,
    )


#: Let an index dim (segments, phases, stacked tiles) take the primitive's head slot. With it
#: off every call keeps its real heads there and loops over the other index dims instead.
HEAD_SLOT = True

#: A run and the bool ``(nb, nb)`` block table its tiles come from.
RunTable = tuple[_Run, torch.Tensor]


def _run_tables(
    layouts: Sequence[BranchLayout], seq: int, heads: int, kv_heads: int
) -> list[RunTable]:
    return [
        (run, lay.blocks)
        for i, lay in enumerate(layouts)
        for run in _branch_runs(seq, heads, kv_heads, i, lay.segment_length, lay.dilation_rate)
    ]


@dataclass(frozen=True)
class _RowsStep:
    """The one-row tiles of a run as one [`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into]
    launch (forward only), after the run's other calls. ``first``: its table with each entry's
    flag set where no earlier call wrote the rows; ``merging``: every flag clear."""

    run: _Run
    geometry: RowsGeometry
    first: RowsTable
    merging: RowsTable


@dataclass(frozen=True)
class _Plan:
    """Every call of some runs, in the order both passes use (dropout seeds follow the
    primitive calls). ``writes_every_row``: the first branch has rate 1, writes every row of
    every head, and each of its calls either writes rows nothing wrote yet or merges onto rows
    all written before, so accumulators that hold nothing yet need no fill."""

    steps: tuple[_Step | _RowsStep, ...]
    writes_every_row: bool


_PLANS: OrderedDict[tuple[object, ...], _Plan] = OrderedDict()
_PLANS_SIZE = 64


def _steps(
    runs: Sequence[RunTable],
    block: int,
    is_causal: bool,
    tensors: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    rows_block_m: int = 0,
) -> _Plan:
    """The calls of ``runs`` on these tensors' strides, planned once per geometry.
    ``rows_block_m``: compute one-row tiles with the rows kernel, in entries of that many
    rows (0: every tile is a primitive call)."""
    key = (
        rows_block_m,
        tuple((run, table.numpy().tobytes(), table.shape[0]) for run, table in runs),
        block,
        is_causal,
        tensors[0].shape[0],
        tuple(t.stride() for t in tensors),
        None if mask is None else mask.stride(),
        HEAD_SLOT,
    )
    hit = _PLANS.get(key)
    if hit is None:
        hit = _PLANS[key] = _plan_steps(runs, block, is_causal, tensors, mask, rows_block_m)
        if len(_PLANS) > _PLANS_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return hit


def _plan_steps(
    runs: Sequence[RunTable],
    block: int,
    is_causal: bool,
    tensors: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    rows_block_m: int,
) -> _Plan:
    b = tensors[0].shape[0]
    strides = [_strides(t) for t in tensors]
    if mask is not None:
        strides.append((mask.stride(0), mask.stride(1), 0))
    first_branch = runs[0][0].branch if runs else None
    every_row = bool(runs) and runs[0][0].rate == 1
    steps: list[_Step | _RowsStep] = []
    for run, table in runs:
        # Runs of one branch hold disjoint rows; a later branch covers them again.
        written: set[int] | None = set() if run.branch == first_branch else None
        rows_kernel = rows_block_m > 0 and _rows_run(run)
        tiles = plan_tiles(table, run.length, block, is_causal, split_edges=not rows_kernel)
        row_tiles = [t for t in tiles if rows_kernel and is_row_tile(t)]
        for tile in tiles:
            if row_tiles and is_row_tile(tile):
                continue
            call = _call(run, tile, b, block)
            plan = _problems(call, strides, heads_ok=HEAD_SLOT and mask is None)
            first = False
            if written is not None:
                blocks = _tile_blocks(tile)
                first = not (blocks & written)
                # A merge onto rows only partly written would read unfilled ones.
                every_row &= first or blocks <= written
                written |= blocks
            heads: Sequence[int | None] = range(plan.head_loop) if plan.head_loop else [None]
            for loop in itertools.product(*(range(size) for size, _ in plan.loops)):
                for head in heads:
                    steps.append(_Step(run, call, plan, loop, head, first))
        if row_tiles:
            blocks = {t.q0 for t in row_tiles}
            fresh: set[int] = set()
            if written is not None:
                # Each entry writes rows nothing wrote yet or merges onto written ones.
                fresh = blocks - written
                written |= blocks
            steps.append(_rows_step(run, row_tiles, block, rows_block_m, fresh))
        if written is not None:
            every_row &= written.issuperset(range(-(-run.length // block)))
    return _Plan(tuple(steps), every_row)


def _rows_run(run: _Run) -> bool:
    """Whether the rows kernel can take a run (its keys are strided heads of the same rows)."""
    return run.kv_index is None and run.q_shift == 0


def _rows_step(
    run: _Run, tiles: Sequence[Tile], block: int, block_m: int, fresh: set[int]
) -> _RowsStep:
    """One rows launch for one-row ``tiles``: an entry per ``block_m`` rows of each query block,
    over the block's key runs (adjacent ones joined); ``fresh``: blocks nothing wrote yet."""
    by_block: dict[int, list[tuple[int, int]]] = {}
    for t in sorted(tiles, key=lambda t: (t.q0, t.k0)):
        lo, hi = t.k0 * block, min((t.k0 + t.kn) * block, run.length)
        keys = by_block.setdefault(t.q0, [])
        if keys and keys[-1][1] == lo:
            keys[-1] = (keys[-1][0], hi)
        else:
            keys.append((lo, hi))
    entries: list[tuple[int, int, int, int, int]] = []
    key_runs: list[tuple[int, int]] = []
    for a, keys in by_block.items():
        stop = min((a + 1) * block, run.length)
        run0 = len(key_runs)
        key_runs.extend(keys)
        for q_lo in range(a * block, stop, block_m):
            entries.append((q_lo, min(q_lo + block_m, stop), run0, len(key_runs), a in fresh))
    geometry = RowsGeometry(
        rate=run.rate, phase0=run.phase0, phases=run.phases, heads=run.heads, kv0=run.kv0,
        kv_step=run.kv_step, kv_group=run.heads // run.kv_heads, start=run.start,
        count=run.count, length=run.length,
    )  # fmt: skip
    merging = tuple((*e[:4], 0) for e in entries)
    return _RowsStep(
        run,
        geometry,
        RowsTable(tuple(entries), tuple(key_runs), block_m),
        RowsTable(merging, tuple(key_runs), block_m),
    )


#: Compute one-row tiles (a band's edge rows) with the rows kernel in one launch per run: None
#: (default) where Triton runs on CUDA for the inputs, True forces it wherever it runs (the
#: tests use it under ``TRITON_INTERPRET=1``), False never (one primitive call per tile).
ROWS_KERNEL: bool | None = None


def _rows_block_m(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: torch.Tensor, dropout_p: float
) -> int:
    """Rows per entry of the rows kernel for these inputs and accumulators, 0 when it is off."""
    if ROWS_KERNEL is False or (ROWS_KERNEL is None and not q.is_cuda):
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
    runs = _run_tables(layouts, n, h, kv_heads)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of block-sparse dilated attention on validated inputs, without autograd.

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

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q`` (0 for uncovered rows)
        and ``lse`` ``(batch, heads, seq)`` float32 (float64 for float64 inputs; ``-inf`` there).
    """
    runs = _run_tables(layouts, q.shape[1], q.shape[2], k.shape[2])
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
                    q, k, v, mask8, acc, acc_lse, step.geometry,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` given the final ``out`` ``(batch, seq, heads, head_dim)`` and ``lse``
    ``(batch, heads, seq)`` of [`block_sparse_forward`][dilated.sparse.engine.block_sparse_forward]
    (same arguments). Returns float32 gradients (float64 for float64 inputs)."""
    work = compute_dtype(q.dtype)
    lse4 = lse.transpose(1, 2).unsqueeze(-1).contiguous()
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    runs = _run_tables(layouts, q.shape[1], q.shape[2], k.shape[2])
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
