"""Many short dense calls of one run of sub-problems as one Triton launch.

A block layout's band has edge rows whose key windows all differ in length: through the shared
sub-problem primitive each is its own call (cuDNN's dispatch costs about 100 us of host time a
call, so a layer of such calls waits on the host). [`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into]
computes any number of such (query rows, key-row runs) pieces of a run of sub-problems in one
launch, reading the ``(batch, seq, heads, head_dim)`` inputs in place, and merges each result
into float32 accumulators by log-sum-exp in its epilogue (what
[`merge_into`][dilated.kernels.merge.merge_into] does after a primitive call). dilated-sparse
uses it for the forward pass of the rows that no dense rectangle covers.

It runs where Triton runs (CUDA, or the CPU under ``TRITON_INTERPRET=1`` in float16/float32:
the interpreter's bfloat16 ``tl.dot`` is wrong), ``head_dim`` at most 128, without dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dilated.kernels._tables import upload
from dilated.kernels.backends import triton as triton_backend

__all__ = [
    "CUDA_LAUNCH",
    "RowsGeometry",
    "RowsTable",
    "block_m",
    "rows_forward_into",
    "rows_supported",
]


@dataclass(frozen=True)
class RowsGeometry:
    """Where a run of sub-problems lies in ``(batch, seq, heads, head_dim)`` tensors.

    ``count`` segments of ``length`` rows; folded phase ``p < phases`` and head ``c <
    heads`` of it is query head ``phase0 + p + c * rate`` at positions ``phase0 + p + rate *
    (start + s * length + i)`` (segment ``s``, row ``i``), reading key/value head
    ``kv0 + p + (c // kv_group) * kv_step``.
    """

    rate: int
    phase0: int
    phases: int
    heads: int
    kv0: int
    kv_step: int
    kv_group: int
    start: int
    count: int
    length: int


@dataclass(frozen=True)
class RowsTable:
    """The pieces of one launch: ``entries`` ``(q_lo, q_hi, run_lo, run_hi, first)`` (query rows
    ``[q_lo, q_hi)`` of every segment, at most ``block_m`` of them, attend the key rows of runs
    ``[run_lo, run_hi)``; ``first``: no earlier call wrote those rows) and ``runs`` ``(k_lo,
    k_hi)`` key rows. Rows and keys past ``length`` are cut. The device copies are made once."""

    entries: tuple[tuple[int, int, int, int, int], ...]
    runs: tuple[tuple[int, int], ...]
    block_m: int
    _device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(entries, runs)`` as int32 tensors on ``device``, uploaded asynchronously and kept
        (except when uploaded during CUDA-graph capture: those copies are the graph's)."""
        hit = self._device.get(device)
        if hit is not None:
            return hit
        entries, runs = (
            upload(torch.tensor(rows, dtype=torch.int32).flatten(), device)
            for rows in (self.entries, self.runs)
        )
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self._device[device] = (entries, runs)
        return entries, runs


#: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` on CUDA for ``head_dim <= 64`` and above.
CUDA_LAUNCH: dict[bool, tuple[int, int, int, int]] = {True: (128, 64, 4, 3), False: (128, 64, 8, 3)}


def _launch(head_dim: int) -> tuple[int, int, dict[str, int]]:
    if triton_backend.interpreting():
        return 16, 16, {}
    bm, bn, warps, stages = CUDA_LAUNCH[head_dim <= 64]
    return bm, bn, {"num_warps": warps, "num_stages": stages}


def block_m(head_dim: int) -> int:
    """Query rows per entry (and per program) for ``head_dim``."""
    return _launch(head_dim)[0]


def rows_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether [`rows_forward_into`][dilated.kernels.block_rows.rows_forward_into] takes these
    inputs: the ``"triton"`` backend's rules, unit ``head_dim`` strides, ``k`` and ``v`` with
    the same strides."""
    return (
        triton_backend.unsupported_reason(q, dropout_p) is None
        and q.stride(3) == 1
        and k.stride() == v.stride()
        and k.stride(3) == 1
    )


def rows_forward_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    acc: torch.Tensor,
    acc_lse: torch.Tensor,
    geometry: RowsGeometry,
    table: RowsTable,
    *,
    scale: float,
) -> None:
    """Merge the attention of ``table``'s pieces into ``acc`` and ``acc_lse`` in place.

    Args:
        q: ``(batch, seq, heads, head_dim)`` with a unit ``head_dim`` stride.
        k, v: ``(batch, seq, kv_heads, head_dim)`` with the strides of each other.
        key_mask: int8 ``(batch, seq)`` contiguous, 1 = key allowed, or None.
        acc: float32 ``(batch, seq, heads, head_dim)`` (unit ``head_dim`` stride).
        acc_lse: float32 ``(batch, seq, heads, 1)``, ``-inf`` where nothing was merged yet
            (rows of an entry with ``first`` set are not read).
        geometry: the run's positions and heads.
        table: its pieces (entries of at most [`block_m`][dilated.kernels.block_rows.block_m]
            rows for this ``head_dim``).
        scale: softmax scale.
    """
    from dilated.kernels.triton_kernels.block_rows_kernel import rows_forward

    if not table.entries:
        return
    d = q.shape[3]
    bm, bn, options = _launch(d)
    bd = triton_backend.forward_blocks(d)[2]
    if table.block_m != bm:
        raise ValueError(f"table entries hold {table.block_m} rows, this head_dim needs {bm}")
    entries, runs = table.on(q.device)
    g = geometry
    b = q.shape[0]
    mask_arg = q if key_mask is None else key_mask
    for grid, seg0, bh0 in triton_backend.launch_grids(
        len(table.entries), g.count, b * g.phases * g.heads
    ):
        with triton_backend.interpreter_lock():
            rows_forward[grid](
                q, k, v, mask_arg, acc, acc_lse, entries, runs,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                acc.stride(0), acc.stride(1), acc.stride(2),
                acc_lse.stride(0), acc_lse.stride(1), acc_lse.stride(2),
                q.shape[1], g.rate, g.phase0, g.phases, g.heads, g.kv0, g.kv_step, g.kv_group,
                g.start, g.length, scale, seg0, bh0,
                HAS_MASK=key_mask is not None, DOT_PREC=triton_backend.dot_precision(q), D=d,
                BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, **options,
            )  # fmt: skip
