"""The plan of the strided sub-problem backend: which dense calls one dilated call makes, the
strided views of ``(batch, seq, heads, head_dim)`` they read, and the table through which the
gather kernels find their results.

A branch ``(w, r)`` of a run of ``count`` segments is ``min(r, heads)`` dense problems per
segment, one per phase ``p``: rows ``s * w + p + r * i`` of query heads ``p, p + r, ...``. The
plan puts as many of them into ONE engine call as the strides allow:

- segments (and batch rows, where ``count * w`` is the whole sequence or ``count`` is 1) share
  the call's batch axis;
- the phases of a branch share the call's batch axis when it holds a single problem otherwise
  (one batch row and one segment: short sequences, and segments longer than the sequence), the
  step from phase ``p`` to ``p + 1`` being one row and one head (``seq_stride + head_stride``);
- otherwise, when every phase has exactly one query head (``r >= heads``), the phases share the
  call's head axis with that same step.

A call at 4K tokens with branches ``(2048, 1), (4096, 2), (8192, 4)`` is 3 engine calls instead
of 7; a branch whose segment is longer than the sequence costs what the same branch cut to the
sequence costs. Plans are cached per shape; a call at a known shape only makes the views, runs
the engines and fills the table's addresses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dilated.core.caching import plan_cache

__all__ = [
    "CHUNK_ELEMENTS",
    "DenseCall",
    "chunks",
    "gather_launches",
    "gather_table",
    "kv_heads",
    "kv_layout",
    "lse_view",
    "mask_view",
    "plan",
    "view",
]

#: Elements (``batch * tokens * heads * head_dim``) one chunk may hold; its pieces' buffers take
#: about 2 bytes x 1.75 of that for rates (1, 2, 4), three times that in backward.
CHUNK_ELEMENTS = 1 << 28

#: Rows per program of the gather kernels, and the largest block the per-program table lookup
#: may use (when every ``w_i`` is a multiple of it).
_BLOCK_T = 32
_BLOCK_T_SCALAR = 64

#: CUDA's limit on the second grid dimension (row blocks); longer ranges take several launches.
_MAX_GRID_Y = 65535

#: Plans kept per process (one per shape, branches and chunk; a few hundred bytes each).
_PLAN_CACHE_SIZE = 1024

#: Where a call puts the phases it holds: one phase (``"none"``), or several on its batch or
#: head axis.
PhaseAxis = Literal["none", "batch", "heads"]


def kv_layout(h: int, hkv: int, rs: Sequence[int]) -> str:
    """How the key/value heads of each phase are read: ``"mha"``; ``"grouped"`` (every rate
    divides or is divided by the group ``h / hkv``: each phase reads a strided set of key/value
    heads, the engines group the query heads natively); ``"expand"`` (other groupings: key/value
    heads are repeated once to ``h`` and the gradients summed back)."""
    g = h // hkv
    if g == 1:
        return "mha"
    if all(g % r == 0 or r % g == 0 for r in rs):
        return "grouped"
    return "expand"


def kv_heads(phase: int, r: int, h: int, g: int) -> tuple[int, int, int]:
    """``(first, step, count)`` of the key/value heads phase ``phase`` of rate ``r`` reads.

    The phase's query heads are ``phase + r m``; head ``j`` reads key/value head ``j // g``.
    With ``g % r == 0`` those are all key/value heads, ``g / r`` query heads each; with
    ``r % g == 0`` they are ``phase // g + (r / g) m``, one query head each.
    """
    if g % r == 0:
        return 0, 1, h // g
    return phase // g, r // g, len(range(phase, h, r))


@dataclass(frozen=True)
class DenseCall:
    """One engine call: phases ``phase .. phase + phases - 1`` of ``count`` segments of branch
    ``branch`` starting at token ``start``, for batch rows ``batch0 .. batch0 + batches - 1``.

    The call's batch axis holds ``batches * count`` problems (one stride: ``count`` is 1, or the
    segments tile the whole sequence), times ``phases`` when ``phase_axis == "batch"`` (then
    ``batches * count == 1``); with ``phase_axis == "heads"`` its head axis holds the phases,
    one query head each. Every phase of the call has ``rows`` query rows and ``heads`` query
    heads.
    """

    branch: int
    w: int
    r: int
    phase: int
    phases: int
    phase_axis: str
    start: int
    count: int
    rows: int
    heads: int
    partial: bool
    batch0: int
    batches: int


def _phase_runs(
    h: int, r: int, rows_of: Sequence[int], batch_free: bool, group: int, masked: bool
) -> list[tuple[int, int, str]]:
    """``(first phase, phases, axis)`` of each call of one run of segments of a branch.

    Consecutive phases with the same rows and heads share a call where the strides allow:
    the step from one phase to the next is one row and one head for the query (and the
    key/value heads of a call whose group is a multiple of ``r`` do not move at all).
    """
    heads_of = [len(range(p, h, r)) for p in range(len(rows_of))]
    kv_moves = group == 0 or group % r == 0
    runs: list[tuple[int, int, str]] = []
    p = 0
    while p < len(rows_of):
        if rows_of[p] == 0:
            p += 1
            continue
        end = p + 1
        while end < len(rows_of) and (rows_of[end], heads_of[end]) == (rows_of[p], heads_of[p]):
            end += 1
        if end - p > 1 and batch_free and kv_moves:
            runs.append((p, end - p, "batch"))
        elif end - p > 1 and heads_of[p] == 1 and group == 0 and not masked:
            runs.append((p, end - p, "heads"))
        else:
            runs.extend((q, 1, "none") for q in range(p, end))
        p = end
    return runs


@plan_cache(
    "dilated.kernels.strided_plan.plan",
    maxsize=_PLAN_CACHE_SIZE,
    key="(batch, seq, heads, ws, rs, chunk, kv group, masked, rows_span_batch)",
)
def plan(
    b: int,
    n: int,
    h: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    t0: int,
    t1: int,
    group: int = 0,
    masked: bool = False,
    rows_span_batch: bool = True,
) -> tuple[DenseCall, ...]:
    """Every engine call of the chunk ``[t0, t1)`` (``t0`` a multiple of every ``w_i``).

    ``group``: query heads per key/value head as the calls read them (0: one each); ``masked``:
    a key mask is given (it is per batch row and key, so phases never share a head axis then);
    ``rows_span_batch``: every tensor read has its batch stride equal to ``seq`` rows (a
    ``(batch, seq, ...)`` layout, not ``(batch, heads, seq, ...)`` transposed), so that the
    segments of consecutive batch rows are one stride apart.
    """
    calls: list[DenseCall] = []
    for i, (w, r) in enumerate(zip(ws, rs)):
        full_stop = min(t1, (n // w) * w)
        count = max(0, (full_stop - t0) // w)
        tail = n - (n // w) * w if t1 == n else 0
        phases = min(r, h)
        if count:
            one_stride = b == 1 or count == 1 or (count * w == n and rows_span_batch)
            for b0 in [0] if one_stride else range(b):
                batches = b if one_stride else 1
                rows = [w // r] * phases
                free = batches * count == 1
                for p, m, axis in _phase_runs(h, r, rows, free, group, masked):
                    calls.append(
                        DenseCall(
                            i, w, r, p, m, axis, t0, count, w // r, len(range(p, h, r)), False,
                            b0, batches,
                        )
                    )  # fmt: skip
        if tail:
            rows = [len(range(p, tail, r)) for p in range(phases)]
            for p, m, axis in _phase_runs(h, r, rows, b == 1, group, masked):
                calls.append(
                    DenseCall(
                        i, w, r, p, m, axis, n - tail, 1, rows[p], len(range(p, h, r)), True,
                        0, b,
                    )
                )  # fmt: skip
    return tuple(calls)


def _heads_read(call: DenseCall, h: int, group: int) -> tuple[int, int, int, int]:
    """``(first, step, count, shift)`` of the heads ``call``'s first phase reads from a tensor
    of ``h`` query heads (``group`` 0) or of key/value heads shared by ``group`` query heads;
    ``shift``: heads the first one moves by from one phase to the next."""
    if group == 0:
        return call.phase, call.r, call.heads, 1
    first, step, count = kv_heads(call.phase, call.r, h, group)
    return first, step, count, 0


def view(x: torch.Tensor, call: DenseCall, h: int | None = None, group: int = 0) -> torch.Tensor:
    """The ``(problems, rows, heads, head_dim)`` strided view of contiguous ``x``
    ``(batch, seq, heads, head_dim)`` that ``call`` reads.

    ``group`` > 0: ``x`` holds key/value heads shared by ``group`` of the ``h`` query heads.
    """
    sb, sn, sh, _ = x.stride()
    first, step, count, shift = _heads_read(call, h or x.shape[2], group)
    batch_stride = sb if call.count == 1 else call.w * sn
    phase_stride = sn + shift * sh
    problems = call.batches * call.count
    if call.phase_axis == "batch":
        size, strides = (call.phases, call.rows, count), (phase_stride, call.r * sn, step * sh)
    elif call.phase_axis == "heads":
        size, strides = (
            (problems, call.rows, call.phases),
            (batch_stride, call.r * sn, phase_stride),
        )
    else:
        size, strides = (problems, call.rows, count), (batch_stride, call.r * sn, step * sh)
    return x.as_strided(
        (*size, x.shape[3]),
        (*strides, 1),
        x.storage_offset() + call.batch0 * sb + (call.start + call.phase) * sn + first * sh,
    )


def mask_view(mask: torch.Tensor | None, call: DenseCall) -> torch.Tensor | None:
    """The key rows of contiguous ``mask`` ``(batch, seq)`` that ``call`` reads,
    ``(problems, rows)``."""
    if mask is None:
        return None
    sb, sn = mask.stride()
    if call.phase_axis == "batch":
        size, strides = (call.phases, call.rows), (sn, call.r * sn)
    else:
        stride = sb if call.count == 1 else call.w * sn
        size, strides = (call.batches * call.count, call.rows), (stride, call.r * sn)
    return mask.as_strided(
        size, strides, mask.storage_offset() + call.batch0 * sb + (call.start + call.phase) * sn
    )


def lse_view(lse: torch.Tensor, call: DenseCall) -> torch.Tensor:
    """The rows of the merged ``lse`` ``(batch, heads, seq)`` that ``call`` reads, as
    ``(problems, heads, rows)``."""
    sb, sh, sn = lse.stride()
    offset = (
        lse.storage_offset() + call.batch0 * sb + call.phase * sh + (call.start + call.phase) * sn
    )
    step = sh + sn  # the next phase: one head and one row on
    if call.phase_axis == "batch":
        return lse.as_strided(
            (call.phases, call.heads, call.rows), (step, call.r * sh, call.r * sn), offset
        )
    if call.phase_axis == "heads":
        heads, head_stride = call.phases, step
    else:
        heads, head_stride = call.heads, call.r * sh
    # (batch row, segment) is not one stride here (the LSE's heads sit between them): a view
    # when either is single, one copy of these rows otherwise.
    part = lse.as_strided(
        (call.batches, call.count, heads, call.rows),
        (sb, call.w * sn, head_stride, call.r * sn),
        offset,
    )
    return part.reshape(call.batches * call.count, heads, call.rows)


def gather_table(
    calls: Sequence[DenseCall],
    values: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor] | None,
    b: int,
    n_branches: int,
    rmax: int,
) -> torch.Tensor:
    """Rows of the gather kernels, on the host: where each (branch, phase, batch row, full or
    partial segment) of the calls' results ``values`` (and ``lses``) lives.

    One int64 row of ``ROW_FIELDS`` per slot: the byte addresses of the phase's values and LSE,
    their element strides (segment, row, head) and the index of the call's first segment.
    Copy it to the device with ``dilated.kernels._tables.upload`` (one copy for several
    tables: stack them first).
    """
    from dilated.kernels.triton_kernels.gather_kernels import ROW_FIELDS

    fields = int(ROW_FIELDS)
    flat = [0] * (n_branches * rmax * b * 2 * fields)
    for k, (call, val) in enumerate(zip(calls, values)):
        lse = None if lses is None else lses[k]
        vs, ls = val.stride(), (0, 0, 0) if lse is None else lse.stride()
        v_ptr, l_ptr = val.data_ptr(), 0 if lse is None else lse.data_ptr()
        v_size = val.element_size()
        # The phase step: one problem on (batch axis) or one head on (head axis).
        axis = 0 if call.phase_axis == "batch" else 2
        v_phase, l_phase = vs[axis], ls[0 if axis == 0 else 1]
        for m in range(call.phases):
            for bi in range(call.batch0, call.batch0 + call.batches):
                skip = (bi - call.batch0) * call.count
                slot = ((call.branch * rmax + call.phase + m) * b + bi) * 2 + int(call.partial)
                flat[slot * fields : (slot + 1) * fields] = [
                    v_ptr + (skip * vs[0] + m * v_phase) * v_size,
                    0 if lse is None else l_ptr + (skip * ls[0] + m * l_phase) * 4,
                    vs[0],
                    vs[1],
                    vs[2],
                    ls[0],
                    ls[2],
                    ls[1],
                    call.start // call.w,
                ]
    return torch.tensor(flat, dtype=torch.int64)


def _chunk_length(b: int, n: int, h: int, d: int, ws: Sequence[int]) -> int:
    """Tokens per chunk: a multiple of every ``w_i`` (segments never straddle two chunks)."""
    step = math.lcm(*ws)
    if step >= n:
        return n
    chunk = step * max(1, CHUNK_ELEMENTS // (step * b * h * d))
    return min(chunk, n)


def chunks(b: int, n: int, h: int, d: int, ws: Sequence[int]) -> list[tuple[int, int]]:
    """``[t0, t1)`` of each chunk of whole segments of every branch."""
    step = _chunk_length(b, n, h, d, ws)
    return [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]


def gather_launches(
    ws: Sequence[int],
    rs: Sequence[int],
    rmax: int,
    t0: int,
    t1: int,
    b: int,
    h: int,
    d: int,
    kv_group: int = 0,
) -> list[dict[str, Any]]:
    """Grid, row range and block options of each gather-kernel launch for ``[t0, t1)``.

    ``h`` heads are written; ``kv_group`` > 0: they are key/value heads shared by that many
    query heads (gradients of k and v), 0: query heads.
    """
    block = math.gcd(*ws, _BLOCK_T_SCALAR)
    scalar = block >= 16
    block = block if scalar else _BLOCK_T
    span = block * _MAX_GRID_Y
    return [
        {
            "grid": (b * h, -(-(min(t1, s + span) - s) // block)),
            "t_start": s,
            "t_stop": min(t1, s + span),
            "SCALAR": scalar,
            "BLOCK_T": block,
            "D": d,
            "BLOCK_D": max(16, 1 << (d - 1).bit_length()),
            "RMAX": rmax,
            "WS": tuple(ws),
            "RS": tuple(rs),
            "KV_GROUP": kv_group,
        }
        for s in range(t0, t1, span)
    ]
