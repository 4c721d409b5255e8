"""Adding the gradients of dense calls into float32 accumulators (strided views).

[`add_into`][dilated.kernels.accumulate.add_into] adds one call's gradient into its view of the
accumulator; [`add_windows`][dilated.kernels.accumulate.add_windows] adds the gradients of a
stack of calls whose key windows overlap (a band of blocks: each query block reads the
``2W + 1`` key blocks around it), so that the key rows they share receive the sum. On CUDA
float32 accumulators each is one Triton launch that reads and writes every accumulator row
once along contiguous ``head_dim`` columns (the layouts of a call's gradient and of its
accumulator view differ, where PyTorch's element-wise add takes a slow indexed path);
elsewhere plain tensor adds. The setting [`fused_accumulate`][dilated.core.settings.Settings]
(``DILATED_FUSED_ACCUMULATE``) forces either.
"""

from __future__ import annotations

import torch

from dilated.core.settings import alias_module_switches, get_settings
from dilated.kernels._capabilities import fused_float32_kernel

__all__ = ["add_into", "add_windows"]


def _fused(acc: torch.Tensor) -> bool:
    return fused_float32_kernel(get_settings().fused_accumulate, acc)


def add_into(acc: torch.Tensor, grad: torch.Tensor) -> None:
    """``acc += grad`` in place (no autograd).

    Args:
        acc: ``(batch, rows, heads, head_dim)`` view, any non-overlapping strides with a unit
            ``head_dim`` stride.
        grad: shaped like ``acc``, any float dtype and strides with a unit ``head_dim`` stride.
    """
    if acc.shape != grad.shape:
        raise ValueError(
            f"grad must be shaped like acc {tuple(acc.shape)}, got {tuple(grad.shape)}"
        )
    if _fused(acc) and acc.stride(3) == 1 and grad.stride(3) == 1:
        from dilated.kernels.triton_kernels.accumulate_kernel import fused_add_into

        fused_add_into(acc, grad)
        return
    acc += grad


def add_windows(acc: torch.Tensor, grad: torch.Tensor, stack_dim: int, step_rows: int) -> None:
    """Add ``grad`` into the windows of ``acc`` they overlap, in place (no autograd).

    Args:
        acc: ``(d0, rows, d2, head_dim)`` view whose dimension ``stack_dim`` (0 or 2) steps
            ``step_rows`` rows: ``acc.stride(stack_dim) == step_rows * acc.stride(1)``, so
            window ``e`` covers accumulator rows ``[e * step_rows, e * step_rows + rows)`` and
            consecutive windows may overlap. The other of dimensions 0 and 2 indexes disjoint
            accumulators. Unit ``head_dim`` stride.
        grad: one gradient per window, shaped like ``acc``, any float dtype and strides with a
            unit ``head_dim`` stride.
        stack_dim: the dimension of ``acc`` and ``grad`` that indexes the windows.
        step_rows: rows between the starts of consecutive windows (at least 1).
    """
    if stack_dim not in (0, 2):
        raise ValueError(f"stack_dim must be 0 or 2, got {stack_dim}")
    if step_rows < 1 or acc.stride(stack_dim) != step_rows * acc.stride(1):
        raise ValueError(
            f"acc.stride({stack_dim}) must be step_rows * acc.stride(1) with step_rows >= 1, "
            f"got {acc.stride(stack_dim)}, step_rows={step_rows}, acc.stride(1)={acc.stride(1)}"
        )
    if acc.shape != grad.shape:
        raise ValueError(
            f"grad must be shaped like acc {tuple(acc.shape)}, got {tuple(grad.shape)}"
        )
    if _fused(acc):
        from dilated.kernels.triton_kernels.accumulate_kernel import fused_add_windows

        fused_add_windows(acc, grad, stack_dim, step_rows)
        return
    rows = acc.shape[1]
    # Windows are disjoint within one residue class of the window index when the step is at
    # least as long as the window; otherwise add one key-row slab at a time.
    if step_rows >= rows:
        acc += grad
        return
    for r0 in range(0, rows, step_rows):
        r1 = min(rows, r0 + step_rows)
        acc[:, r0:r1] += grad[:, r0:r1]


# ``accumulate.FUSED`` was this switch before the settings: it reads and writes the setting.
alias_module_switches(__name__, {"FUSED": "fused_accumulate"})
