"""The primitive calls of the tiles of some runs, planned once per geometry (today's engine).

Each run's block table is cut into [`Tile`][dilated.sparse.tiles.Tile]s; one tile is one call of
[`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] on strided views of
the ``(batch, seq, heads, head_dim)`` inputs (nothing is copied): the call's problems are the
product of up to four index dimensions (batch, segment, folded phase, stacked tile), of which
adjacent ones with compatible strides merge into the primitive's batch dimension; another one
takes the head slot when a call has one head (or when looping over the real heads instead makes
fewer calls, unless the setting ``sparse_head_slot`` of
[`dilated.core.settings`][dilated.core.settings] is off), and any left over is looped. In the forward pass a run's one-row tiles may instead
be one launch of [`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into]
(``_RowsStep``). [`dilated.sparse.engine`][dilated.sparse.engine]
runs the plans.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dilated.core.caching import PlanCache
from dilated.core.settings import get_settings
from dilated.kernels.block_rows import RowsTable
from dilated.sparse.runs import RunTable, _Run
from dilated.sparse.tiles import Tile, is_row_tile, plan_tiles

__all__: list[str] = []

#: ``(coefficient of the batch stride, of the seq stride, of the head stride)``.
_Coef = tuple[int, int, int]


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


@dataclass(frozen=True)
class _RowsStep:
    """The one-row tiles of a run as one [`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into]
    launch (forward only), after the run's other calls. ``first``: its table with each entry's
    flag set where no earlier call wrote the rows; ``merging``: every flag clear. The run is the
    geometry the kernel reads."""

    run: _Run
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


_PLANS: PlanCache[tuple[object, ...], _Plan] = PlanCache(
    "dilated.sparse.tile_plan.steps",
    maxsize=64,
    key="the rows-kernel entry size, each run and its table's bytes, the block size, causality, "
    "the batch, every tensor's strides, the key mask's strides and the head-slot setting",
)


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
    head_slot = get_settings().sparse_head_slot
    key = (
        rows_block_m,
        tuple((run, table.numpy().tobytes(), table.shape[0]) for run, table in runs),
        block,
        is_causal,
        tensors[0].shape[0],
        tuple(t.stride() for t in tensors),
        None if mask is None else mask.stride(),
        head_slot,
    )
    return _PLANS.get_or_build(
        key, lambda: _plan_steps(runs, block, is_causal, tensors, mask, rows_block_m, head_slot)
    )


def _plan_steps(
    runs: Sequence[RunTable],
    block: int,
    is_causal: bool,
    tensors: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    rows_block_m: int,
    head_slot: bool,
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
            plan = _problems(call, strides, heads_ok=head_slot and mask is None)
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
    merging = tuple((*e[:4], 0) for e in entries)
    return _RowsStep(
        run,
        RowsTable(tuple(entries), tuple(key_runs), block_m),
        RowsTable(merging, tuple(key_runs), block_m),
    )
