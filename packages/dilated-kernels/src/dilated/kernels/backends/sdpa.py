"""The ``"sdpa"`` backend: PyTorch's fused attention per branch and phase, merged by LSE.

The merge needs each branch's log-sum-exp and gradients through it. On CUDA, for 16-bit inputs
without a key padding mask or dropout and when no gradient is needed, the cuDNN kernel
(``aten._scaled_dot_product_cudnn_attention``, which returns the float32 LSE) computes each
branch. Everywhere else (CPU, float32/64, masks, dropout, training) each branch runs the
differentiable math of [`dilated.core.reference.attention_with_lse`][dilated.core.reference.attention_with_lse], whose LSE gradient is
exact; the fused kernels' backward passes ignore a gradient on their LSE output, so they cannot
be used there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.core.branches import run_branches
from dilated.core.reference import compute_dtype, dense_segment_attention

__all__ = ["NAME", "available", "forward"]

NAME = "sdpa"


def available(device: torch.device) -> bool:
    """Runs on every device (the math path covers what the fused kernels do not)."""
    return True


def _cudnn_ok(q: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and key_mask is None
        and dropout_p == 0.0
        and q.shape[-1] <= 128
        and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        and not (torch.is_grad_enabled() and q.requires_grad)
    )


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
    if _cudnn_ok(q, key_mask, dropout_p):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qt.contiguous(),
                kt.contiguous(),
                vt.contiguous(),
                None,
                True,
                0.0,
                is_causal,
                False,
                scale=scale,
            )
            out, lse = res[0], res[1]
            return out.transpose(1, 2), lse.reshape(qt.shape[:-1]).float()
        except RuntimeError:  # cuDNN refuses some shapes; the math path takes them
            pass
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
