"""One launch that merges (or sums) every piece of a dilated computation into ``(batch, seq, ...)``.

A dilated computation produces one piece per (branch, phase, batch row, full or short last
segment): a strided set of output rows of the phase's heads, with its LSE. The Triton kernel
``gather_pieces`` (``dilated.kernels.triton_kernels.gather_kernels``) reads every piece of a
block of output rows in one pass and writes the LSE-merged output and LSE
([`merge_pieces`][dilated.kernels.piece_gather.merge_pieces]) or the plain float32 sum of
gradients ([`sum_pieces`][dilated.kernels.piece_gather.sum_pieces]) once. Where each piece lives
is a table of int64 rows ``(branch, phase, batch, partial, field)``:

| field | holds |
|---|---|
| 0 | byte address of the piece's values at its first row, head and segment |
| 1 | byte address of its LSE (float32), 0 for sums |
| 2, 3, 4 | element strides of the values: per segment, per row, per head of the phase |
| 5, 6, 7 | element strides of the LSE: per segment, per row, per head |
| 8 | the segment index of the piece's first segment |

The strided backend ([`dilated.kernels.strided_run`][dilated.kernels.strided_run]) builds such
a table per call; dilated-sparse's flash-attn-4 path caches
one per geometry as offsets from one workspace and adds its address
(``ADDRESS_FIELDS``) on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dilated.kernels.strided_plan import gather_launches
from dilated.kernels.triton_kernels import interpreter_lock

__all__ = ["ADDRESS_FIELDS", "ROW_FIELDS", "merge_pieces", "sum_pieces"]

#: int64 fields per table row.
ROW_FIELDS = 9

#: The fields of a row that hold byte addresses (values, LSE).
ADDRESS_FIELDS = (0, 1)


def _check(table: torch.Tensor, ws: Sequence[int], rmax: int, batch: int) -> None:
    want = (len(ws), rmax, batch, 2, ROW_FIELDS)
    if table.numel() != math.prod(want) or table.dtype != torch.int64 or not table.is_contiguous():
        raise ValueError(
            f"table must be contiguous int64 holding (branches, rmax, batch, 2, {ROW_FIELDS}) = "
            f"{want} rows, got {table.dtype} {tuple(table.shape)}"
        )


def merge_pieces(
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    ws: Sequence[int],
    rs: Sequence[int],
    rmax: int,
    rows: tuple[int, int] | None = None,
) -> None:
    """Write the LSE merge of every piece of ``table`` into ``out`` and ``lse``, in place.

    Args:
        table: int64 ``(branches, rmax, batch, 2, 9)`` (or those entries flat), contiguous, on
            the device of ``out`` (see the module).
        out: ``(batch, seq, heads, head_dim)``, unit ``head_dim`` stride; the pieces' values
            have its dtype.
        lse: float32 ``(batch, heads, seq)``, unit ``seq`` stride. Rows no piece covers get
            ``out = 0`` and ``lse = -inf``.
        ws, rs: the branches ``(w_i, r_i)``.
        rmax: phases per branch in the table, ``max(min(r_i, heads))``.
        rows: ``[t0, t1)``, the rows to write (default all; ``t0`` a multiple of every
            ``w_i``).
    """
    from dilated.kernels.triton_kernels.gather_kernels import gather_pieces

    b, n, h, d = out.shape
    _check(table, ws, rmax, b)
    t0, t1 = rows or (0, n)
    for opts in gather_launches(ws, rs, rmax, t0, t1, b, h, d):
        with interpreter_lock():
            gather_pieces[opts.pop("grid")](
                table, out, lse, n=n, B=b, H=h,
                sob=out.stride(0), son=out.stride(1), soh=out.stride(2),
                slb=lse.stride(0), slh=lse.stride(1), MERGE=True, **opts,
            )  # fmt: skip


def sum_pieces(
    table: torch.Tensor,
    grad: torch.Tensor,
    ws: Sequence[int],
    rs: Sequence[int],
    rmax: int,
    kv_group: int = 0,
    rows: tuple[int, int] | None = None,
    accumulate: bool = False,
) -> None:
    """Write the float32 sum of every piece of ``table`` into ``grad`` (rounded to its dtype),
    or with ``accumulate`` add it to what ``grad`` holds (the sum taken in float32, then
    rounded once).

    Args:
        table: as in [`merge_pieces`][dilated.kernels.piece_gather.merge_pieces] (LSE fields
            unused).
        grad: ``(batch, seq, heads, head_dim)``, unit ``head_dim`` stride; 0 where no piece
            reaches.
        ws, rs, rmax: as in [`merge_pieces`][dilated.kernels.piece_gather.merge_pieces].
        kv_group: 0 when ``grad``'s heads are query heads (or key/value heads read one per
            query head); else the query heads sharing each key/value head, every rate dividing
            or divided by it (each phase reads a strided set of key/value heads).
        rows: as in [`merge_pieces`][dilated.kernels.piece_gather.merge_pieces].
        accumulate: add to ``grad`` instead of overwriting it.
    """
    from dilated.kernels.triton_kernels.gather_kernels import gather_pieces

    b, n, h, d = grad.shape
    _check(table, ws, rmax, b)
    t0, t1 = rows or (0, n)
    for opts in gather_launches(ws, rs, rmax, t0, t1, b, h, d, kv_group=kv_group):
        with interpreter_lock():
            gather_pieces[opts.pop("grid")](
                table, grad, grad, n=n, B=b, H=h,
                sob=grad.stride(0), son=grad.stride(1), soh=grad.stride(2),
                slb=0, slh=0, MERGE=False, ACCUMULATE=accumulate, **opts,
            )  # fmt: skip
