"""Which rows of which dense sub-problems a rank holds, and which calls a pair of them needs.

For a branch ``(w, r)`` and a phase ``p``, the positions ``t = p (mod r)`` of a segment are the
rows of one dense sub-problem (row ``(t - s w - p) / r`` of segment ``s``). A rank holds its
positions as a few arithmetic runs (one for contiguous shards, two for zigzag, one of stride
``P`` for striped), so its rows of each sub-problem are *pieces*: arithmetic runs of rows that
are also arithmetic runs (strided views) of the shard. A query piece against a key piece of the
same segment is at most three dense calls on views (full, or causal-diagonal with a shift), so no
mask is ever built and nothing grows with the square of the shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dilated.core.caching import plan_cache
from dilated.ring.sharding import chunk_length

__all__ = [
    "Call",
    "PhaseLayout",
    "Piece",
    "branch_members",
    "is_local",
    "pair_calls",
    "phase_layouts",
]


@dataclass(frozen=True)
class Piece:
    """Rows of one sub-problem (one segment of one phase) held by one rank.

    Row ``i < count`` is shard index ``local + i * local_step``, packed row ``packed + i`` of the
    phase's block, sub-problem row ``row + i * row_step`` and global position
    ``pos + i * pos_step``.
    """

    segment: int
    count: int
    local: int
    local_step: int
    packed: int
    row: int
    row_step: int
    pos: int
    pos_step: int

    def local_slice(self, lo: int, hi: int) -> slice:
        """Shard indices of rows ``[lo, hi)`` of the piece."""
        start = self.local + lo * self.local_step
        return slice(start, start + (hi - lo) * self.local_step, self.local_step)

    def pos_slice(self, lo: int, hi: int) -> slice:
        """Global positions of rows ``[lo, hi)`` of the piece."""
        start = self.pos + lo * self.pos_step
        return slice(start, start + (hi - lo) * self.pos_step, self.pos_step)


@dataclass(frozen=True)
class PhaseLayout:
    """One phase of one branch on one rank: its query heads, packed key/value heads and pieces.

    ``kv_heads`` are the distinct key/value heads the phase's query heads read (ascending), the
    only ones that travel; ``kv_index[j]`` is the one query head ``j`` of the phase reads.
    ``uniform``: query head ``j`` reads ``kv_index == j // (heads / kv_heads)``, which the
    primitive's grouped-query attention takes without a copy.
    """

    phase: int
    heads: slice
    kv_heads: tuple[int, ...]
    kv_index: tuple[int, ...]
    uniform: bool
    rows: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Call:
    """One dense call of a query piece against a key piece: rows ``[q_lo, q_hi)`` of the query
    piece, rows ``[k_lo, k_hi)`` of the key piece, causal-diagonal (top-left) or full."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool


def is_local(seq: int, world_size: int, mode: str, w: int) -> bool:
    """Whether every segment of a branch lies inside one run of a rank's positions (always, in a
    world of one: the shard is the whole sequence, a short last segment included)."""
    return world_size == 1 or chunk_length(seq, world_size, mode) % w == 0


def branch_members(seq: int, world_size: int, mode: str, w: int, rank: int) -> list[int]:
    """Ranks whose keys ``rank``'s queries may read in a branch of segment length ``w``."""
    if is_local(seq, world_size, mode, w):
        return [rank]
    if mode == "contiguous" and w < seq:
        size = w // (seq // world_size)
        first = (rank // size) * size
        return list(range(first, min(first + size, world_size)))
    return list(range(world_size))


def _rank_runs(seq: int, world_size: int, mode: str, rank: int) -> list[tuple[int, int, int, int]]:
    """The rank's positions as ``(first position, step, count, first shard index)`` runs."""
    s = seq // world_size
    if mode == "contiguous":
        return [(rank * s, 1, s, 0)]
    if mode == "zigzag":
        c = s // 2
        return [(rank * c, 1, c, 0), ((2 * world_size - 1 - rank) * c, 1, c, c)]
    return [(rank, world_size, s, 0)]


def _pieces(run: tuple[int, int, int, int], w: int, r: int, p: int, packed: int) -> list[Piece]:
    """The pieces of phase ``p`` in one run, split at segment boundaries."""
    first, step, count, offset = run
    g = math.gcd(step, r)
    if (p - first) % g:
        return []
    # The run's elements m with first + m * step = p (mod r) start at m0, every r / g.
    m0 = next(m for m in range(r // g) if (first + m * step) % r == p)
    every = r // g
    total = max(0, -(-(count - m0) // every))
    pos_step = every * step
    pieces = []
    j = 0
    while j < total:
        pos = first + (m0 + j * every) * step
        segment = pos // w
        end = min(total, j + -(-((segment + 1) * w - pos) // pos_step))
        pieces.append(
            Piece(
                segment=segment,
                count=end - j,
                local=offset + m0 + j * every,
                local_step=every,
                packed=packed + j,
                row=(pos - segment * w - p) // r,
                row_step=pos_step // r,
                pos=pos,
                pos_step=pos_step,
            )
        )
        j = end
    return pieces


@plan_cache(
    "dilated.ring.layout.phase_layouts",
    maxsize=4096,
    key="(seq, world_size, load_balance, rank, w, r, heads, kv_heads)",
)
def phase_layouts(
    seq: int, world_size: int, mode: str, rank: int, w: int, r: int, heads: int, kv_heads: int
) -> tuple[PhaseLayout, ...]:
    """Every phase of branch ``(w, r)`` on ``rank`` (the phases of its query heads)."""
    group = heads // kv_heads
    layouts = []
    for p in range(min(r, heads)):
        hs = slice(p, heads, r)
        kv_of_q = [j // group for j in range(heads)[hs]]
        kv = tuple(sorted(set(kv_of_q)))
        index = tuple(kv.index(x) for x in kv_of_q)
        per = len(index) // len(kv)
        uniform = len(index) % len(kv) == 0 and all(x == i // per for i, x in enumerate(index))
        pieces: list[Piece] = []
        for run in _rank_runs(seq, world_size, mode, rank):
            pieces += _pieces(run, w, r, p, sum(pc.count for pc in pieces))
        rows = sum(pc.count for pc in pieces)
        layouts.append(PhaseLayout(p, hs, kv, index, uniform, rows, tuple(pieces)))
    return tuple(layouts)


def pair_calls(mine: Piece, theirs: Piece, is_causal: bool) -> list[Call]:
    """The dense calls of query piece ``mine`` against key piece ``theirs`` (same segment).

    Causal: key row ``b0 + j S`` is allowed for query row ``a0 + i S`` when ``j <= i + D`` with
    ``D = floor((a0 - b0) / S)``: keys before the diagonal are seen by every query (a full call),
    the diagonal is a top-left causal call, and queries past the last key see them all.
    """
    na, nb = mine.count, theirs.count
    if not is_causal:
        return [Call(0, na, 0, nb, False)]
    shift = (mine.row - theirs.row) // mine.row_step
    calls = []
    if shift > 0:
        calls.append(Call(0, na, 0, min(shift, nb), False))
    q0, k0 = max(0, -shift), max(0, shift)
    length = min(na - q0, nb - k0)
    if length > 0:
        calls.append(Call(q0, q0 + length, k0, k0 + length, True))
        if length == nb - k0 and q0 + length < na:
            calls.append(Call(q0 + length, na, k0, nb, False))
    return calls
