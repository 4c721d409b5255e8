"""The flash-attn-4 calls of some runs and where their results live, planned once per geometry.

Each run ([`dilated.sparse.runs`][dilated.sparse.runs]) is one block-sparse flash-attn-4 call
over strided views of the ``(batch, seq, heads, head_dim)`` inputs, or a few when one view
cannot hold it:

- the call's batch is the run's segments, with the batch rows when their strides line up
  (whole segments tiling the sequence), else one call per batch row;
- its rows are the phase's rows (stride ``r`` rows);
- its heads are the phase's heads (stride ``r`` heads), or the phases themselves (head ``p`` at
  row offset ``p``) when each phase has one head; a folded run whose phases have several heads
  each (``1 < r < heads``) is one call per phase or per head of the phases, whichever is fewer.

Every call writes its output ``(B, L, H, head_dim)`` and LSE ``(B, H, L)`` into its own
contiguous region of one workspace (the backward pass: its gradients), and a table in the form
of [`dilated.kernels.piece_gather`][dilated.kernels.piece_gather] says where each piece of each
branch lies in it, as offsets in units of "row-heads" (``head_dim`` elements of a value, one LSE
entry): one launch then merges (sums) every piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dilated.kernels.piece_gather import ROW_FIELDS
from dilated.sparse.runs import _Run

__all__ = ["Flash4Call", "Flash4Plan", "plan_calls"]

#: ``(coefficient of the batch stride, of the seq stride, of the head stride)``.
Coef = tuple[int, int, int]


def _add(a: Coef, b: Coef, times: int = 1) -> Coef:
    return (a[0] + times * b[0], a[1] + times * b[1], a[2] + times * b[2])


def stride_of(coef: Coef, strides: tuple[int, int, int]) -> int:
    """The element stride of ``coef`` in a tensor of ``(batch, seq, head)`` strides."""
    return coef[0] * strides[0] + coef[1] * strides[1] + coef[2] * strides[2]


@dataclass(frozen=True)
class Flash4Call:
    """One flash-attn-4 call: views ``(B, L, H, head_dim)`` of queries (and everything shaped
    like them) and ``(B, L, H_kv, head_dim)`` of keys and values.

    Attributes:
        run: the run it computes (all of it, or one batch row / phase / head of it).
        table: index of the run's block tables in the plan.
        batch, heads, kv_heads: ``(size, coefficient)`` of the views' first and third dims.
        rows, row: ``L`` and the coefficient of its stride.
        q_offset, k_offset: coefficients of the views' first element.
        keys_by_head: the heads are phases, whose keys are other rows (a key padding mask is
            then per head).
        region: offset of its output region in the workspace, in row-heads (``B L H`` of them;
            the LSE region has as many entries at the same offset); ``kv_region`` likewise for
            key/value gradients (``B L H_kv``).
    """

    run: _Run
    table: int
    batch: tuple[int, Coef]
    heads: tuple[int, Coef]
    kv_heads: tuple[int, Coef]
    rows: int
    row: Coef
    q_offset: Coef
    k_offset: Coef
    keys_by_head: bool
    region: int
    kv_region: int

    @property
    def region_size(self) -> int:
        """Row-heads of the call's output region."""
        return self.batch[0] * self.rows * self.heads[0]

    @property
    def kv_region_size(self) -> int:
        """Row-heads of the call's key/value gradient region."""
        return self.batch[0] * self.rows * self.kv_heads[0]


@dataclass(frozen=True)
class Flash4Plan:
    """Every call of some runs and the piece tables of their regions.

    Attributes:
        calls: in the order both passes make them.
        tables: ``(branch, rows)`` of each distinct run geometry (the block tables' key).
        region_size, kv_region_size: row-heads of all output (gradient) regions.
        q_pieces, kv_pieces: int64 ``(branches, rmax, batch, 2, 9)`` piece tables of the query
            (output, LSE, query gradient) and key/value regions, offsets in row-heads (fields
            0-4; the values' are multiplied by ``head_dim`` and the element size, the LSE's by 4,
            see [`Flash4Plan.piece_table`][dilated.sparse.flash4_plan.Flash4Plan.piece_table]).
        rmax: phases per branch in the tables.
    """

    calls: tuple[Flash4Call, ...]
    tables: tuple[tuple[int, int], ...]
    region_size: int
    kv_region_size: int
    q_pieces: torch.Tensor
    kv_pieces: torch.Tensor
    rmax: int

    def piece_table(self, kv: bool, head_dim: int, element_size: int, lse: bool) -> torch.Tensor:
        """The CPU piece table with offsets in bytes from the workspace's values (and, with
        ``lse``, from the start of its LSE) for ``head_dim`` and the values' element size."""
        table = (self.kv_pieces if kv else self.q_pieces).clone()
        value = head_dim * element_size
        table[..., 0] *= value
        table[..., 2:5] *= head_dim
        if lse:
            table[..., 1] *= 4
        else:
            table[..., 1] = 0
            table[..., 5:8] = 0
        return table


def _segments_merge(
    batch: int, count: int, w: int, strides: Sequence[tuple[int, int, int]]
) -> bool:
    """Whether batch rows and segments are one index dimension in every tensor."""
    return batch == 1 or count == 1 or all(s[0] == count * w * s[1] for s in strides)


def _run_calls(
    run: _Run, w: int, batch: int, strides: Sequence[tuple[int, int, int]]
) -> tuple[list[tuple[int, int, Coef, Coef]], tuple[int, Coef], tuple[int, Coef],
           tuple[int, Coef], bool, bool, bool]:  # fmt: skip
    """The loops of a run's calls: ``[(batch row, x, q loop coefficient, k loop
    coefficient)]``, the batch, head and key/value head axes, whether batch rows are looped,
    whether the heads are the phases, and whether the looped ``x`` is a head (else a phase)."""
    r = run.rate
    merged = _segments_merge(batch, run.count, w, strides)
    if merged:
        size = batch * run.count
        b_axis: tuple[int, Coef] = (size, (0, w, 0) if run.count > 1 else (1, 0, 0))
    else:
        b_axis = (run.count, (0, w, 0))
    phases, heads = run.phases, run.heads
    by_phase = phases > 1 and (heads == 1 or phases > heads)
    if by_phase:
        h_axis: tuple[int, Coef] = (phases, (0, 1, 1))
        kv_axis: tuple[int, Coef] = (phases, (0, 1, 1))
        loop = heads
        q_step, k_step = (0, 0, r), (0, 0, run.kv_step)
    else:
        h_axis = (heads, (0, 0, r))
        kv_axis = (run.kv_heads, (0, 0, run.kv_step))
        loop = phases
        q_step = k_step = (0, 1, 1)
    rows_loop = range(1 if merged else batch)
    calls = [
        (bi, x, _add((bi, 0, 0), q_step, x), _add((bi, 0, 0), k_step, x))
        for bi in rows_loop
        for x in range(loop)
    ]
    return calls, b_axis, h_axis, kv_axis, not merged, by_phase, by_phase and heads > 1


def plan_calls(
    runs: Sequence[_Run],
    segment_lengths: Sequence[int],
    shape: tuple[int, int, int],
    strides: Sequence[tuple[int, int, int]],
) -> Flash4Plan:
    """The calls of ``runs`` (no ``q_shift``, no gathered key/value heads) on tensors of these
    ``(batch, seq, head)`` strides, and their piece tables.

    Args:
        runs: every run of every branch ([`run_tables`][dilated.sparse.runs]).
        segment_lengths: ``w`` of each branch.
        shape: ``(batch, seq, heads)`` of the queries.
        strides: the ``(batch, seq, head)`` strides of every tensor the calls view.
    """
    batch, seq, heads = shape
    rates = {run.branch: run.rate for run in runs}
    rmax = max((min(r, heads) for r in rates.values()), default=1)
    branches = len(segment_lengths)
    q_pieces = torch.zeros(branches, rmax, batch, 2, ROW_FIELDS, dtype=torch.int64)
    kv_pieces = torch.zeros_like(q_pieces)
    tables: dict[tuple[int, int], int] = {}
    calls: list[Flash4Call] = []
    region = kv_region = 0
    for run in runs:
        if run.q_shift or run.kv_index is not None:
            raise ValueError("the flash-attn-4 path takes runs without q_shift or kv_index")
        w, r = segment_lengths[run.branch], run.rate
        table = tables.setdefault((run.branch, run.length), len(tables))
        loops, b_axis, h_axis, kv_axis, rows_looped, by_phase, head_loop = _run_calls(
            run, w, batch, strides
        )
        base_q: Coef = (0, run.phase0 + run.start * r, run.phase0)
        base_k: Coef = (0, run.phase0 + run.start * r, run.kv0)
        first = len(calls)
        for _, _, q_loop, k_loop in loops:
            call = Flash4Call(
                run, table, b_axis, h_axis, kv_axis, run.length, (0, r, 0),
                _add(base_q, q_loop), _add(base_k, k_loop), by_phase, region, kv_region,
            )  # fmt: skip
            calls.append(call)
            region += call.region_size
            kv_region += call.kv_region_size
        _pieces(
            q_pieces,
            kv_pieces,
            calls[first:],
            run,
            w,
            seq,
            batch,
            rows_looped,
            by_phase,
            head_loop,
        )
    return Flash4Plan(tuple(calls), tuple(tables), region, kv_region, q_pieces, kv_pieces, rmax)


def _pieces(
    q_pieces: torch.Tensor,
    kv_pieces: torch.Tensor,
    calls: Sequence[Flash4Call],
    run: _Run,
    w: int,
    seq: int,
    batch: int,
    rows_looped: bool,
    by_phase: bool,
    head_loop: bool,
) -> None:
    """Fill the piece rows of one run's ``calls`` (ordered batch row, then phase or head)."""
    r = run.rate
    first_segment = (run.start * r) // w
    # The short last segment's piece (``n // w``-th segment, or the only one when w > n).
    partial = int(run.start * r >= (seq // w) * w)
    loop = len(calls) // (batch if rows_looped else 1)
    for p in range(run.phases):
        for bi in range(batch):
            index = (bi * loop if rows_looped else 0) + (0 if by_phase else p)
            call = calls[index]
            h, hk, rows = call.heads[0], call.kv_heads[0], call.rows
            seg_in = 0 if rows_looped else bi * run.count
            at_phase = p if by_phase else 0
            for pieces, heads, size, base in (
                (q_pieces, h, call.region_size, call.region),
                (kv_pieces, hk, call.kv_region_size, call.kv_region),
            ):
                head_stride = size if head_loop else 1
                lse_head = size if head_loop else rows
                values = base + seg_in * rows * heads + at_phase
                lse = base + seg_in * heads * rows + at_phase * rows
                pieces[run.branch, run.phase0 + p, bi, partial] = torch.tensor(
                    [values, lse, rows * heads, heads, head_stride,
                     heads * rows, 1, lse_head, first_segment]
                )  # fmt: skip
