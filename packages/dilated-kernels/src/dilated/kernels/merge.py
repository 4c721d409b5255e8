"""The online log-sum-exp merge on the device: one launch instead of a dozen.

[`merge_into`][dilated.kernels.merge.merge_into] is
[`dilated.core.merge.merge_into`][dilated.core.merge.merge_into] (same arguments, same result),
run as one Triton kernel on strided views for CUDA float32 accumulators and as the core's
plain-PyTorch formula everywhere else; the setting
[`fused_merge`][dilated.core.settings.Settings] (``DILATED_FUSED_MERGE``) forces either. The ring's spanning branches and dilated-sparse's tiles
merge every dense call into float32 accumulators; with many calls per layer, the dozen
element-wise launches of the plain formula, not the GPU, would set the pace.
"""

from __future__ import annotations

import torch

from dilated.core.merge import merge_into as merge_into_reference
from dilated.core.settings import alias_module_switches, get_settings
from dilated.kernels._capabilities import fused_float32_kernel

__all__ = ["merge_into"]


def _fused(acc_out: torch.Tensor) -> bool:
    return fused_float32_kernel(get_settings().fused_merge, acc_out)


def merge_into(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    first: bool = False,
) -> None:
    """Merge one partial result into running float32 accumulators, in place (no autograd).

    Args:
        acc_out: ``(batch, rows, heads, head_dim)`` float32, any strides with a unit
            ``head_dim`` stride.
        acc_lse: ``(batch, heads, rows)`` float32, ``-inf`` where nothing was merged yet.
        out: the part's output, shaped like ``acc_out``, any float dtype.
        lse: the part's log-sum-exp, shaped like ``acc_lse``, ``-inf`` for rows it does not
            cover.
        first: nothing was merged into these rows yet, whatever the accumulators hold: the
            part is written into them (a part's output is 0 where its LSE is ``-inf``).
    """
    if not _fused(acc_out):
        if first:
            acc_out.copy_(out)
            acc_lse.copy_(lse)
            return
        merge_into_reference(acc_out, acc_lse, out, lse)
        return
    from dilated.kernels.triton_kernels.merge_kernel import fused_merge_into

    fused_merge_into(acc_out, acc_lse, out, lse, first)


# ``merge.FUSED`` was this switch before the settings: it reads and writes the setting.
alias_module_switches(__name__, {"FUSED": "fused_merge"})
