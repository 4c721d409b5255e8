"""A block layout as a few dense rectangles: the tiles each sub-problem is computed as.

A sub-problem of ``length`` rows has ``nb = ceil(length / B)`` blocks and a bool ``(nb, nb)``
table. [`plan_tiles`][dilated.sparse.tiles.plan_tiles] covers every allowed (query block, key
block) pair exactly once with [`Tile`][dilated.sparse.tiles.Tile]s, each one dense attention
call (a rectangle of query rows by key rows, optionally causal on the diagonal), repeated
``stack`` times along the diagonal so that rectangles of one shape at a regular step form one
call over strided views:

- rows of the table with the same run of key blocks (global rows, a dense layout) form one tall
  rectangle;
- with causality, the largest squares on the diagonal whose lower triangle is fully allowed are
  computed with the primitive's causal mask (a dense layout is then one causal square, exactly
  the plain dilated call);
- the remaining runs are grouped by their offset from the diagonal (a band's interior is one
  stack of ``B x (2W + 1) B`` rectangles, the power-of-two diagonals of ``"dilated_sparse"`` one
  stack each), and what is left (a band's edges) stays one rectangle per row
  ([`is_row_tile`][dilated.sparse.tiles.is_row_tile]); with ``split_edges``, for callers that
  make one call per such tile, consecutive such rows whose runs share a common part (every top
  edge row starts at block 0, every bottom one ends at the last block) compute that part as one
  tall rectangle and only their remainders row by row.

Tiles that span several rows come before one-row tiles on the same rows, so a row's later tiles
merge onto rows already written.

Planning reads the table on the CPU and is cached per table, so it costs nothing per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilated.core.caching import PlanCache

__all__ = ["Tile", "is_row_tile", "plan_tiles", "tile_mask"]


@dataclass(frozen=True)
class Tile:
    """``stack`` dense calls of query blocks ``[q0, q0 + qn)`` x key blocks ``[k0, k0 + kn)``,
    the ``e``-th shifted by ``e * step`` blocks in both (``step >= qn``: the queries of a stack
    never overlap). ``causal``: top-left causal mask (only on squares, ``q0 == k0``, ``qn == kn``).
    Rows past the sub-problem's length are cut (only tiles with ``stack == 1`` reach them)."""

    q0: int
    qn: int
    k0: int
    kn: int
    stack: int = 1
    step: int = 1
    causal: bool = False


def _true_runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal ``[start, stop)`` runs of True in a 1-D bool tensor."""
    padded = torch.cat(
        [torch.zeros(1, dtype=torch.int8), row.to(torch.int8), torch.zeros(1, dtype=torch.int8)]
    )
    edges = padded.diff()
    starts = torch.nonzero(edges == 1).flatten().tolist()
    stops = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, stops))


def _causal_squares(allowed: torch.Tensor) -> list[tuple[int, int]]:
    """Greedy ``(a0, size)`` squares on the diagonal whose lower triangle is all allowed."""
    nb = allowed.shape[0]
    squares = []
    a0 = 0
    while a0 < nb:
        if not bool(allowed[a0, a0]):
            a0 += 1
            continue
        a1 = a0 + 1
        while a1 < nb and bool(allowed[a1, a0 : a1 + 1].all()):
            a1 += 1
        squares.append((a0, a1 - a0))
        a0 = a1
    return squares


def _stack(rects: list[Tile], full_blocks: int) -> list[Tile]:
    """Group single rectangles of one shape and diagonal offset at a regular step into stacks."""
    groups: dict[tuple[int, int, int, bool], list[Tile]] = {}
    for t in rects:
        groups.setdefault((t.qn, t.kn, t.k0 - t.q0, t.causal), []).append(t)
    out: list[Tile] = []
    for (qn, kn, offset, causal), members in groups.items():
        members.sort(key=lambda t: t.q0)
        # Only tiles of whole blocks can repeat: a cut last block has another shape.
        whole = [t for t in members if max(t.q0 + qn, t.k0 + kn) <= full_blocks]
        out.extend(t for t in members if max(t.q0 + qn, t.k0 + kn) > full_blocks)
        i = 0
        while i < len(whole):
            first = whole[i]
            j = i + 1
            step = whole[j].q0 - first.q0 if j < len(whole) else 0
            while j < len(whole) and step >= qn and whole[j].q0 - whole[j - 1].q0 == step:
                j += 1
            if j - i == 1:
                out.append(first)
            else:
                out.append(Tile(first.q0, qn, first.q0 + offset, kn, j - i, step, causal))
            i = j
    return out


def _plan(
    table: torch.Tensor, length: int, block: int, causal: bool, split_edges: bool
) -> tuple[Tile, ...]:
    nb = table.shape[0]
    allowed = table.clone()
    if causal:
        allowed &= torch.ones(nb, nb, dtype=torch.bool).tril()
    tiles: list[Tile] = []
    if causal:
        for a0, size in _causal_squares(allowed):
            tiles.append(Tile(a0, size, a0, size, causal=True))
            allowed[a0 : a0 + size, a0 : a0 + size] &= ~torch.ones(
                size, size, dtype=torch.bool
            ).tril()
    # Consecutive rows with the same run of key blocks form one tall rectangle.
    open_rects: dict[tuple[int, int], Tile] = {}
    done: list[Tile] = []
    for a in range(nb):
        runs = set(_true_runs(allowed[a]))
        for key, t in list(open_rects.items()):
            if key not in runs:
                done.append(t)
                del open_rects[key]
        for b0, b1 in sorted(runs):
            prev = open_rects.get((b0, b1))
            q0, qn = (a, 0) if prev is None else (prev.q0, prev.qn)
            open_rects[(b0, b1)] = Tile(q0, qn + 1, b0, b1 - b0)
    done.extend(open_rects.values())
    stacked = _stack(tiles + done, length // block)
    if split_edges:
        stacked = _split_nested(stacked)
    # Multi-row tiles first, so that a row's remainders merge onto rows already written.
    return tuple(sorted(stacked, key=lambda t: (t.q0, -t.qn, t.k0)))


def _split_nested(tiles: list[Tile]) -> list[Tile]:
    """Consecutive one-row tiles whose runs all contain a common part (a band's edge rows: every
    top row starts at block 0, every bottom row ends at the last block) become one tall
    rectangle over that part plus each row's remainder. Same calls, but the shared key blocks
    are read by one call instead of one per row, which the backward pass's key gradients pay
    for once instead of once per row."""
    singles = sorted((t for t in tiles if is_row_tile(t)), key=lambda t: t.q0)
    out = [t for t in tiles if not is_row_tile(t)]
    i = 0
    while i < len(singles):
        j = i + 1
        for same in (lambda t: t.k0, lambda t: t.k0 + t.kn):
            j = i + 1
            while (
                j < len(singles)
                and singles[j].q0 == singles[j - 1].q0 + 1
                and same(singles[j]) == same(singles[i])
            ):
                j += 1
            if j - i > 1:
                break
        group = singles[i:j]
        lo = max(t.k0 for t in group)
        hi = min(t.k0 + t.kn for t in group)
        if len(group) == 1 or hi <= lo:
            out.extend(group)
        else:
            out.append(Tile(group[0].q0, len(group), lo, hi - lo))
            for t in group:
                if t.k0 < lo:
                    out.append(Tile(t.q0, 1, t.k0, lo - t.k0))
                if t.k0 + t.kn > hi:
                    out.append(Tile(t.q0, 1, hi, t.k0 + t.kn - hi))
        i = j
    return out


_CACHE: PlanCache[tuple[bytes, int, int, int, bool, bool], tuple[Tile, ...]] = PlanCache(
    "dilated.sparse.tiles.plan_tiles",
    maxsize=512,
    key="the table's used corner (bytes and size), the rows, the block size, causality and "
    "split_edges",
)


def plan_tiles(
    table: torch.Tensor, length: int, block: int, causal: bool, split_edges: bool = True
) -> tuple[Tile, ...]:
    """The tiles of one sub-problem.

    Args:
        table: the branch's bool ``(nb, nb)`` layout on the CPU (at least
            ``ceil(length / block)`` square; its top-left corner is used).
        length: rows of the sub-problem (a short last segment has fewer than ``w / r``).
        block: rows per block.
        causal: drop key blocks after the query block and mask the diagonal ones.
        split_edges: give consecutive one-row tiles with a common part one tall rectangle
            over it (for callers that compute one-row tiles one call each; see
            [`is_row_tile`][dilated.sparse.tiles.is_row_tile]).

    Returns:
        Tiles that cover every allowed (query row, key row) pair of the sub-problem exactly once.
    """
    nb = -(-length // block)
    part = table[:nb, :nb].contiguous()
    key = (part.numpy().tobytes(), nb, length, block, causal, split_edges)
    return _CACHE.get_or_build(key, lambda: _plan(part, length, block, causal, split_edges))


def is_row_tile(tile: Tile) -> bool:
    """A tile of one query block, not stacked and not causal: a band's edge rows (their key
    windows all differ in length) and whatever else no dense rectangle of several rows took."""
    return tile.stack == 1 and tile.qn == 1 and not tile.causal


def tile_mask(tiles: tuple[Tile, ...], length: int, block: int) -> torch.Tensor:
    """How many tiles cover each (query row, key row) pair, ``(length, length)`` int (for tests
    and figures: a correct plan gives exactly the allowed mask with no pair counted twice)."""
    count = torch.zeros(length, length, dtype=torch.int32)
    for t in tiles:
        for e in range(t.stack):
            q0 = (t.q0 + e * t.step) * block
            k0 = (t.k0 + e * t.step) * block
            q1 = min(q0 + t.qn * block, length)
            k1 = min(k0 + t.kn * block, length)
            cell = torch.ones(q1 - q0, k1 - k0, dtype=torch.int32)
            if t.causal:
                cell = cell.tril()
            count[q0:q1, k0:k1] += cell
    return count
