"""The ``"sdpa"`` backend: dense attention per branch and phase, merged by LSE with autograd.

The merge needs each branch's log-sum-exp and gradients through it. On CUDA, when no gradient
is needed and there is no dropout, each branch runs on the dense engine
[`choose_engine`][dilated.kernels.engines.choose_engine] picks (flash-attn-4, cuDNN, PyTorch's
flash kernels), which return the float32 LSE. Everywhere else (CPU, masks with dropout,
training) each branch runs the differentiable math of
[`dilated.core.reference.attention_with_lse`][dilated.core.reference.attention_with_lse], whose
LSE gradient is exact; the fused kernels' own autograd ignores a gradient on their LSE output,
so they cannot be used there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.core.branches import run_branches
from dilated.core.reference import compute_dtype, dense_segment_attention
from dilated.kernels.subproblem import subproblem_attention

__all__ = ["NAME", "available", "forward"]

NAME = "sdpa"


def available(device: torch.device) -> bool:
    """Runs on every device (the math path covers what the fused kernels do not)."""
    return True


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of dense problems ``(B, L, H, D)``: ``out`` ``(B, L, H, D)``, ``lse`` ``(B, H, L)``."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.is_cuda and dropout_p == 0.0 and not needs_grad:
        return subproblem_attention(q, k, v, scale=scale, is_causal=is_causal, key_mask=key_mask)
    dtype = compute_dtype(q.dtype)
    return dense_segment_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), key_mask, scale, is_causal, dropout_p
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on validated inputs ``(batch, seq, heads, head_dim)``; see the module."""
    return run_branches(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        dense=_dense,
    )
