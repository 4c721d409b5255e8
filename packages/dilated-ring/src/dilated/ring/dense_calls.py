"""The dense calls of one ring step and the copies of one block, planned once per shard geometry.

This rank's queries of a spanning branch against one block are, for each phase, each pair of
a query piece and a key piece of the same segment, and each call of
[`pair_calls`][dilated.ring.layout.pair_calls], one dense problem: an *atom*. Atoms of the same
shape whose offsets step evenly (the phases of a branch: one query row and one head apart,
one packed part apart in the block; the segments of striped shards: one segment apart) are one
index dimension of a strided view, and so is the batch. The planner merges adjacent index
dimensions whose strides agree, gives the largest one the primitive's batch axis and, when each
atom has one query and one key/value head and there is no key mask, another one its head axis
(a branch with ``r >= heads``: the phases as heads, head stride ``seq_stride + head_stride``);
any dimension left is looped. With contiguous shards and no key mask a step is one call per
[`pair_calls`][dilated.ring.layout.pair_calls] call (one when causal) whenever the batch is one
or ``r >= heads``, and ``min(batch, phases)`` otherwise.

Offsets are in *units*: a query-side tensor ``(batch, seq / P, heads, head_dim)`` (contiguous)
holds unit ``(i, t, j)`` at ``((i * seq / P + t) * heads + j) * head_dim``, its LSE ``(batch,
seq / P, heads)`` at the unit itself; a block is flat, its key half first, each half the phases'
parts ``(batch, rows_p, kv_heads_p, head_dim)`` one after the other.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dilated.core.caching import plan_cache
from dilated.ring.layout import PhaseLayout, Piece, pair_calls
from dilated.ring.plan import SpanningBranch

__all__ = [
    "JOINED",
    "BlockCalls",
    "DenseCall",
    "PackCopy",
    "block_calls",
    "block_units",
    "joined_layouts",
    "pack_copies",
    "plan_calls",
]

#: The block owner of the members' blocks joined into one (all-gather, contiguous shards).
JOINED = -1

#: Offsets or strides in the spaces a call reads: (query units, block units, key positions).
_Vec = tuple[int, int, int]


@dataclass(frozen=True)
class DenseCall:
    """One call of the primitive: views ``(batch, rows, heads, head_dim)`` of the query-side
    tensors and of a block, and ``(batch, k_rows)`` of the key mask.

    ``q_stride``/``k_stride`` are the (batch, row, head) strides in units, ``mask_stride`` the
    (batch, row) strides of the mask; ``kv_index``: the phase's query heads read their
    key/value heads in no regular grouping, so the keys are gathered one per query head;
    ``number``: the call's index in the step (its dropout seed follows it).
    """

    number: int
    batch: int
    q_rows: int
    heads: int
    k_rows: int
    kv_heads: int
    q_stride: tuple[int, int, int]
    q_offset: int
    k_stride: tuple[int, int, int]
    k_offset: int
    mask_stride: tuple[int, int]
    mask_offset: int
    causal: bool
    kv_index: tuple[int, ...] | None


@dataclass(frozen=True)
class BlockCalls:
    """The calls of this rank's queries against one block, and the block's key half in units
    (its value half starts there)."""

    calls: tuple[DenseCall, ...]
    half: int


class _CallShape(NamedTuple):
    """What atoms batched into one call share (everything but their offsets)."""

    q_rows: int
    q_row: int
    heads: int
    q_head: int
    k_rows: int
    kv_heads: int
    k_batch: int
    mask_row: int
    causal: bool
    kv_index: tuple[int, ...] | None


class _CopyShape(NamedTuple):
    """What pieces packed by one copy share: rows, shard row step, heads, their step (or
    the heads themselves when they step unevenly) and the part's batch stride in units."""

    rows: int
    local_step: int
    kv_heads: int
    step: int | tuple[int, ...]
    k_batch: int


@dataclass(frozen=True)
class _Atom:
    phase: int
    shape: Hashable
    at: _Vec
    # (phase, piece index, first row, stop) of its query rows and of its key rows.
    q_span: tuple[int, int, int, int]
    k_span: tuple[int, int, int, int]


def block_units(layouts: Sequence[PhaseLayout], batch: int) -> tuple[int, ...]:
    """Offsets in units of each phase's part in a half block, and the half's size last."""
    return tuple(
        itertools.accumulate((batch * ph.rows * len(ph.kv_heads) for ph in layouts), initial=0)
    )


def _atoms(
    mine: Sequence[PhaseLayout], theirs: Sequence[PhaseLayout], heads: int, batch: int, causal: bool
) -> list[_Atom]:
    parts = block_units(theirs, batch)
    atoms = []
    for c, (ph, th) in enumerate(zip(mine, theirs)):
        kvh = len(th.kv_heads)
        hq = len(range(heads)[ph.heads])
        kv_index = None if ph.uniform else ph.kv_index
        for ia, a in enumerate(ph.pieces):
            for ib, b in enumerate(th.pieces):
                if a.segment != b.segment:
                    continue
                for call in pair_calls(a, b, causal):
                    nq, nk = call.q_hi - call.q_lo, call.k_hi - call.k_lo
                    shape = _CallShape(
                        nq, a.local_step * heads, hq, ph.heads.step or 1, nk, kvh,
                        th.rows * kvh, b.pos_step, call.causal, kv_index,
                    )  # fmt: skip
                    at = (
                        (a.local + call.q_lo * a.local_step) * heads + ph.heads.start,
                        parts[c] + (b.packed + call.k_lo) * kvh,
                        b.pos + call.k_lo * b.pos_step,
                    )
                    q_span = (c, ia, call.q_lo, call.q_hi)
                    atoms.append(_Atom(c, shape, at, q_span, (c, ib, call.k_lo, call.k_hi)))
    return atoms


def _sub(a: _Vec, b: _Vec) -> _Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _steps(items: Sequence[_Vec], step: _Vec) -> bool:
    base = items[0]
    return all(v == tuple(x + i * s for x, s in zip(base, step)) for i, v in enumerate(items))


def _disjoint(atoms: Sequence[_Atom]) -> bool:
    """No two atoms share a query row or a key row (their results would race in one call)."""
    for rows in ([a.q_span for a in atoms], [a.k_span for a in atoms]):
        ordered = sorted(rows)
        for x, y in itertools.pairwise(ordered):
            if x[:2] == y[:2] and y[2] < x[3]:
                return False
    return True


#: Index dims ``(size, stride)``, outer first.
_Dims = list[tuple[int, _Vec]]


@dataclass(frozen=True)
class _Group:
    """Atoms of one shape at ``base + sum_i index_i * stride_i`` over ``dims``."""

    atoms: list[_Atom]
    base: _Vec
    dims: _Dims


def _upward(base: _Vec, dims: _Dims) -> tuple[_Vec, _Dims] | None:
    """The same grid with every stride non-negative (a view cannot step backwards), or None
    when a dim steps forwards in one space and backwards in another."""
    out = []
    for size, stride in dims:
        if all(x <= 0 for x in stride):
            base = tuple(b + (size - 1) * x for b, x in zip(base, stride))  # type: ignore[assignment]
            stride = (-stride[0], -stride[1], -stride[2])
        elif any(x < 0 for x in stride):
            return None
        out.append((size, stride))
    return base, out


def _lattice(atoms: list[_Atom]) -> _Group | None:
    """The atoms as one grid: phases by segments, or one progression; None when they are no
    such grid or share rows."""
    n = len(atoms)
    if n == 1:
        return _Group(atoms, atoms[0].at, [])
    if not _disjoint(atoms):
        return None
    at = [a.at for a in atoms]
    dims: _Dims | None = None
    phases = [c for c, _ in itertools.groupby(a.phase for a in atoms)]
    n1 = len(phases)
    if n1 > 1 and n % n1 == 0 and len(set(phases)) == n1:
        n2 = n // n1
        rows = [at[i * n2 : (i + 1) * n2] for i in range(n1)]
        step_p = _sub(rows[1][0], rows[0][0])
        step_s = _sub(rows[0][1], rows[0][0]) if n2 > 1 else (0, 0, 0)
        blocks = all(len({a.phase for a in atoms[i * n2 : (i + 1) * n2]}) == 1 for i in range(n1))
        if blocks and all(_steps(r, step_s) for r in rows) and _steps([r[0] for r in rows], step_p):
            dims = [(n1, step_p)] + ([(n2, step_s)] if n2 > 1 else [])
    if dims is None and _steps(at, _sub(at[1], at[0])):
        dims = [(n, _sub(at[1], at[0]))]
    upward = None if dims is None else _upward(at[0], dims)
    return None if upward is None else _Group(atoms, *upward)


def _groups(atoms: list[_Atom]) -> list[_Group]:
    """Atoms of one shape that form a grid: the whole shape if it can, else each phase's
    atoms, else one atom each."""
    by_shape: dict[Hashable, list[_Atom]] = {}
    for a in atoms:
        by_shape.setdefault(a.shape, []).append(a)
    out = []
    for atoms_of_shape in by_shape.values():
        group = _lattice(atoms_of_shape)
        if group is not None:
            out.append(group)
            continue
        for _, phase in itertools.groupby(atoms_of_shape, key=lambda a: a.phase):
            part = list(phase)
            group = _lattice(part)
            out.extend([group] if group is not None else [_Group([a], a.at, []) for a in part])
    return out


def _merge(dims: list[tuple[int, _Vec]], masked: bool) -> list[tuple[int, _Vec]]:
    """Adjacent dims whose strides agree in every space read (the mask's only when masked)."""
    merged: list[tuple[int, _Vec]] = []
    for size, stride in dims:
        if size == 1:
            continue
        if merged:
            psize, pstride = merged[-1]
            spaces = 3 if masked else 2
            if all(pstride[s] == size * stride[s] for s in range(spaces)):
                merged[-1] = (psize * size, stride)
                continue
        merged.append((size, stride))
    return merged


def _slots(
    dims: list[tuple[int, _Vec]], one_head: bool, masked: bool
) -> tuple[int | None, int | None]:
    """Which dim takes the batch axis and which (if any) the head axis: fewest calls."""
    best: tuple[int, int | None, int | None] = (math.prod(s for s, _ in dims), None, None)
    for i in range(len(dims)):
        rest = math.prod(s for j, (s, _) in enumerate(dims) if j != i)
        if rest < best[0]:
            best = (rest, i, None)
        if one_head and not masked:
            for j, (size_j, _) in enumerate(dims):
                if j != i and rest // size_j < best[0]:
                    best = (rest // size_j, i, j)
    return best[1], best[2]


def _calls_of(group: _Group, batch_dim: tuple[int, _Vec], masked: bool) -> list[DenseCall]:
    """The calls of one group: its dims and the batch merged, given the batch and head axes,
    the rest looped."""
    shape = group.atoms[0].shape
    assert isinstance(shape, _CallShape)
    all_dims = _merge([batch_dim, *group.dims], masked)
    one_head = shape.heads == 1 and shape.kv_heads == 1
    b_slot, h_slot = _slots(all_dims, one_head and shape.kv_index is None, masked)
    loops = [d for i, d in enumerate(all_dims) if i not in (b_slot, h_slot)]
    bsize, bstride = all_dims[b_slot] if b_slot is not None else (1, (0, 0, 0))
    heads, kv_heads = shape.heads, shape.kv_heads
    q_h, k_h = shape.q_head, 1
    if h_slot is not None:
        heads = kv_heads = all_dims[h_slot][0]
        q_h, k_h = all_dims[h_slot][1][0], all_dims[h_slot][1][1]
    calls = []
    for index in itertools.product(*(range(s) for s, _ in loops)):
        at = list(group.base)
        for i, (_, stride) in zip(index, loops):
            at = [x + i * s for x, s in zip(at, stride)]
        calls.append(
            DenseCall(
                0, bsize, shape.q_rows, heads, shape.k_rows, kv_heads,
                (bstride[0], shape.q_row, q_h), at[0], (bstride[1], shape.kv_heads, k_h), at[1],
                (bstride[2], shape.mask_row), at[2], shape.causal, shape.kv_index,
            )
        )  # fmt: skip
    return calls


def plan_calls(
    branch: SpanningBranch,
    theirs: Sequence[PhaseLayout],
    batch: int,
    masked: bool,
) -> BlockCalls:
    """The calls of this rank's queries of ``branch`` against a block of ``theirs`` layouts."""
    g = branch.geometry
    atoms = _atoms(branch.mine, theirs, g.heads, batch, g.is_causal)
    calls: list[DenseCall] = []
    for group in _groups(atoms):
        shape = group.atoms[0].shape
        assert isinstance(shape, _CallShape)
        batch_dim = (batch, (g.shard * g.heads, shape.k_batch, g.seq))
        calls += _calls_of(group, batch_dim, masked)
    numbered = tuple(dataclasses.replace(c, number=i) for i, c in enumerate(calls))
    return BlockCalls(numbered, block_units(theirs, batch)[-1])


@plan_cache(
    "dilated.ring.dense_calls.block_calls",
    maxsize=4096,
    key="(spanning branch, block owner or JOINED, batch, key mask given)",
)
def block_calls(branch: SpanningBranch, src: int, batch: int, masked: bool) -> BlockCalls:
    """[`plan_calls`][dilated.ring.dense_calls.plan_calls] against ``src``'s block (or the
    joined block), worked out once per key."""
    theirs = joined_layouts(branch) if src == JOINED else branch.layouts[src]
    assert theirs is not None
    return plan_calls(branch, theirs, batch, masked)


@plan_cache("dilated.ring.dense_calls.joined_layouts", maxsize=1024, key="(spanning branch)")
def joined_layouts(branch: SpanningBranch) -> tuple[PhaseLayout, ...] | None:
    """The layouts of the members' blocks side by side as one block, keys in sub-problem row
    order, or None when they are no such key range.

    With contiguous shards a spanning segment's members hold consecutive rows of every
    phase's sub-problem, so their blocks joined are one key range: each phase then needs at
    most two dense calls (the keys before this rank's rows, and the causal diagonal) whatever
    the number of ranks. Every member's phases must then have one piece each and equal rows
    and heads (the joined block is the members' blocks concatenated along their rows).
    """
    if branch.geometry.load_balance != "contiguous" or len(branch.members) < 2:
        return None
    layouts = [branch.layouts[m] for m in branch.members]
    first = layouts[0]
    shape = {(ph.rows, len(ph.kv_heads)) for lay in layouts for ph in lay}
    if len(shape) != 1 or any(len(ph.pieces) != 1 for lay in layouts for ph in lay):
        return None
    for c in range(len(first)):
        for prev, nxt in itertools.pairwise(lay[c].pieces[0] for lay in layouts):
            if prev.row_step != 1 or (nxt.segment, nxt.row) != (
                prev.segment,
                prev.row + prev.count,
            ):
                return None
    total = first[0].rows * len(layouts)
    joined = []
    for ph in first:
        p0 = ph.pieces[0]
        piece = Piece(p0.segment, total, 0, 1, 0, p0.row, 1, p0.pos, p0.pos_step)
        joined.append(
            PhaseLayout(ph.phase, ph.heads, ph.kv_heads, ph.kv_index, ph.uniform, total, (piece,))
        )
    return tuple(joined)


@dataclass(frozen=True)
class PackCopy:
    """One strided copy between a key/value shard ``(batch, seq / P, kv_heads, head_dim)`` and
    a half block: ``size`` (``head_dim`` last), the shard's strides and offset in units of
    ``head_dim``, the half block's, and ``kv_index`` (heads gathered by index: the dims are
    then ``(batch, rows, heads)`` and the shard side reads every head)."""

    size: tuple[int, ...]
    shard_stride: tuple[int, ...]
    shard_offset: int
    block_stride: tuple[int, ...]
    block_offset: int
    kv_index: tuple[int, ...] | None


@plan_cache("dilated.ring.dense_calls.pack_copies", maxsize=1024, key="(spanning branch, batch)")
def pack_copies(branch: SpanningBranch, batch: int) -> tuple[PackCopy, ...]:
    """The copies that pack this rank's key/value rows of ``branch`` into its block (and, in
    reverse, add its block's gradient into them): one per phase and piece, phases of the same
    shape stepping evenly joined into one."""
    g = branch.geometry
    mine = branch.mine
    parts = block_units(mine, batch)
    atoms = []
    for c, ph in enumerate(mine):
        kvh, kv = len(ph.kv_heads), ph.kv_heads
        step = kv[1] - kv[0] if kvh > 1 else 1
        strided = step > 0 and all(b - a == step for a, b in itertools.pairwise(kv))
        for i, pc in enumerate(ph.pieces):
            piece = _CopyShape(pc.count, pc.local_step, kvh, step if strided else kv, ph.rows * kvh)
            at = (pc.local * g.kv_heads + (kv[0] if strided else 0), parts[c] + pc.packed * kvh, 0)
            atoms.append(_Atom(c, piece, at, (c, i, 0, pc.count), (c, i, 0, pc.count)))
    copies = []
    shard_batch = g.shard * g.kv_heads
    for group in _groups(atoms):
        shape = group.atoms[0].shape
        assert isinstance(shape, _CopyShape)
        row = shape.local_step * g.kv_heads
        if isinstance(shape.step, tuple):  # heads gathered by index: one copy per piece
            for atom in group.atoms:
                copies.append(
                    PackCopy(
                        (batch, shape.rows, g.kv_heads), (shard_batch, row, 1), atom.at[0],
                        (shape.k_batch, shape.kv_heads, 1), atom.at[1], shape.step,
                    )
                )  # fmt: skip
            continue
        copies.append(
            PackCopy(
                (*(s for s, _ in group.dims), batch, shape.rows, shape.kv_heads),
                (*(v[0] for _, v in group.dims), shard_batch, row, shape.step),
                group.base[0],
                (*(v[1] for _, v in group.dims), shape.k_batch, shape.kv_heads, 1),
                group.base[1],
                None,
            )
        )
    return tuple(copies)
