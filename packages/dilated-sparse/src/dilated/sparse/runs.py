"""The runs of a branch: the dense sub-problems of [`subproblems`][dilated.core.branches.subproblems]
grouped so that one strided view covers each.

A run is a set of segments of one branch computed by the same calls: every full segment of a
phase (the phases folded into one index dimension when every phase has as many heads and there
is no grouped-query attention: head ``p`` at row offset ``p``, stride ``seq_stride +
head_stride``), or a short last segment. Both engines of dilated-sparse (the tiles of
[`dilated.sparse.engine`][dilated.sparse.engine] and the flash-attn-4 block tables of
[`dilated.sparse.flash4_path`][dilated.sparse.flash4_path]) and the distributed op plan their
calls per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dilated.core.branches import SubProblem, subproblems
from dilated.core.caching import plan_cache
from dilated.core.sparsity import BranchLayout
from dilated.kernels.block_rows import RowsGeometry

__all__ = ["RunTable", "branch_runs", "run_tables"]


@dataclass(frozen=True)
class _Run(RowsGeometry):
    """Segments of one branch computed by the same tiles: a
    [`RowsGeometry`][dilated.kernels.block_rows.RowsGeometry] (what the rows kernel reads)
    with its branch.

    Query head ``c`` of folded phase ``p`` is head ``phase0 + p + c * rate`` at rows
    ``phase0 + p + rate * (start + i)``; it reads key/value head ``kv0 + p + (c // kv_group) *
    kv_step`` (``kv_index`` set: a gathered copy of the key/value heads instead).
    """

    branch: int
    kv_index: tuple[int, ...] | None
    # Query rows (and everything shaped like them) are read ``q_shift`` rows earlier: a rank
    # holding rows ``q_shift ..`` of a segment passes its shard as the queries.
    q_shift: int = 0

    @property
    def kv_heads(self) -> int:
        """Key/value heads the run reads (query heads per key/value head: ``kv_group``)."""
        return self.heads // self.kv_group


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


@plan_cache(
    "dilated.sparse.runs.branch_runs", maxsize=256, key="(seq, heads, kv_heads, branch, w, r)"
)
def branch_runs(
    seq: int, heads: int, kv_heads: int, branch: int, w: int, r: int
) -> tuple[_Run, ...]:
    """The runs of branch ``branch`` ``(w, r)`` on ``seq`` tokens: its sub-problems
    ([`subproblems`][dilated.core.branches.subproblems]) grouped into runs that one call (or a
    few) can take, shared by the single-process and the distributed op."""
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
        runs.append(
            _Run(
                rate=r, phase0=0, phases=len(full), heads=hp, kv0=0, kv_step=r, kv_group=1,
                start=0, count=sp.count, length=sp.length, branch=branch, kv_index=None,
            )
        )  # fmt: skip
    for sp in sps:
        if fold and sp in full:
            continue
        runs.append(_single_run(branch, sp))
    return tuple(runs)


def _single_run(branch: int, sp: SubProblem) -> _Run:
    hp = len(sp.kv_heads)
    strided = _strided_kv(sp.kv_heads)
    # Not strided: a gathered copy of the key/value heads, one per query head.
    kv0, step, count = (0, 1, hp) if strided is None else strided
    return _Run(
        rate=sp.rate, phase0=sp.phase, phases=1, heads=hp, kv0=kv0, kv_step=step,
        kv_group=hp // count, start=sp.start, count=sp.count, length=sp.length, branch=branch,
        kv_index=sp.kv_heads if strided is None else None,
    )  # fmt: skip


#: A run and the bool ``(nb, nb)`` block table its tiles come from.
RunTable = tuple[_Run, torch.Tensor]


def run_tables(
    layouts: Sequence[BranchLayout], seq: int, heads: int, kv_heads: int
) -> list[RunTable]:
    """Every branch's runs on ``seq`` tokens, each with its branch's block table."""
    return [
        (run, lay.blocks)
        for i, lay in enumerate(layouts)
        for run in branch_runs(seq, heads, kv_heads, i, lay.segment_length, lay.dilation_rate)
    ]
