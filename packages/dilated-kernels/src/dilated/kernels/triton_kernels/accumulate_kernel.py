# Triton kernels take upper-case pointer names and untyped JIT arguments by convention.
# ruff: noqa: N803
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""[`add_into`][dilated.kernels.accumulate.add_into] and
[`add_windows`][dilated.kernels.accumulate.add_windows] as one Triton launch each.

Each program owns ``BLOCK_R`` rows of the accumulator for one index of the other dimensions,
reads its ``head_dim`` columns contiguously whatever the row and head strides (PyTorch's
element-wise kernels fall back to a slow indexed path when the two layouts differ), and, for
overlapping windows, sums every window's contribution in float32 registers before writing
once, so an accumulator row that ``k`` windows overlap is read and written once, not ``k`` times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dilated.kernels.triton_kernels import interpreter_lock

__all__ = ["fused_add_into", "fused_add_windows"]


@triton.jit
def _add_rows(
    Acc,
    Grad,
    R,
    H,
    D,
    row_blocks,
    sa_b,
    sa_r,
    sa_h,
    sg_b,
    sg_r,
    sg_h,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rb = pid % row_blocks
    bh = pid // row_blocks
    h = bh % H
    b = bh // H
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    both = (rows < R)[:, None] & (d[None, :] < D)
    grad = tl.load(
        Grad + b * sg_b + h * sg_h + rows[:, None] * sg_r + d[None, :], mask=both, other=0.0
    )
    acc_at = Acc + b * sa_b + h * sa_h + rows[:, None] * sa_r + d[None, :]
    tl.store(acc_at, tl.load(acc_at, mask=both, other=0.0) + grad.to(tl.float32), mask=both)


def fused_add_into(acc: torch.Tensor, grad: torch.Tensor) -> None:
    """[`add_into`][dilated.kernels.accumulate.add_into] in one launch (same arguments)."""
    b, r, h, d = acc.shape
    if acc.numel() == 0:
        return
    block_r = 32
    row_blocks = triton.cdiv(r, block_r)
    with interpreter_lock():
        _add_rows[(b * h * row_blocks,)](
            acc, grad, r, h, d, row_blocks,
            acc.stride(0), acc.stride(1), acc.stride(2),
            grad.stride(0), grad.stride(1), grad.stride(2),
            BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip


@triton.jit
def _add_windows(
    Acc,
    Grad,
    total_rows,
    windows,
    window_rows,
    step_rows,
    D,
    row_blocks,
    sa_x,
    sa_r,
    sg_x,
    sg_e,
    sg_r,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One flat grid: a second grid dimension would cap the rows at 65535 blocks.
    pid = tl.program_id(0).to(tl.int64)
    x = pid // row_blocks
    r0 = (pid % row_blocks) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cols = d[None, :] < D
    live = rows < total_rows
    # Windows e with e * step_rows <= row < e * step_rows + window_rows, for any row of the tile.
    e_lo = tl.maximum(r0 - window_rows + 1, 0)
    e_lo = (e_lo + step_rows - 1) // step_rows
    e_hi = tl.minimum((r0 + BLOCK_R - 1) // step_rows, windows - 1)
    total = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for e in range(e_lo, e_hi + 1):
        j = rows - e * step_rows
        inside = live & (j >= 0) & (j < window_rows)
        at = Grad + x * sg_x + e * sg_e + j[:, None] * sg_r + d[None, :]
        total += tl.load(at, mask=inside[:, None] & cols, other=0.0).to(tl.float32)
    acc_at = Acc + x * sa_x + rows[:, None] * sa_r + d[None, :]
    both = live[:, None] & cols
    tl.store(acc_at, tl.load(acc_at, mask=both, other=0.0) + total, mask=both)


def fused_add_windows(
    acc: torch.Tensor, grad: torch.Tensor, stack_dim: int, step_rows: int
) -> None:
    """[`add_windows`][dilated.kernels.accumulate.add_windows] in one launch (same arguments)."""
    other = 2 - stack_dim
    windows, window_rows, d = grad.shape[stack_dim], grad.shape[1], grad.shape[3]
    if grad.numel() == 0:
        return
    total_rows = (windows - 1) * step_rows + window_rows
    block_r = 32
    row_blocks = triton.cdiv(total_rows, block_r)
    with interpreter_lock():
        _add_windows[(grad.shape[other] * row_blocks,)](
            acc, grad, total_rows, windows, window_rows, step_rows, d, row_blocks,
            acc.stride(other), acc.stride(1),
            grad.stride(other), grad.stride(stack_dim), grad.stride(1),
            BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
