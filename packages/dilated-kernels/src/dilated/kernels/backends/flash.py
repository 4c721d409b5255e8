"""The ``"flash"`` backend: flash-attn per branch and phase (flash-attn installed separately).

flash-attn returns each branch's float32 LSE but its backward pass ignores a gradient on it, so
this backend runs only without autograd, on CUDA, for float16/bfloat16 inputs without key padding
mask; it raises ``ValueError`` otherwise (the ``"sdpa"`` and ``"reference"`` backends cover those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.branches import run_branches
from dilated.kernels._capabilities import HAS_FLASH_ATTN

__all__ = ["NAME", "available", "forward", "unsupported_reason"]

NAME = "flash"


def _flash_attn_func() -> Any:
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise ValueError(
            "backend='flash' needs flash-attn, built against your torch: "
            "pip install flash-attn --no-build-isolation (needs the CUDA toolkit)"
        ) from exc
    return flash_attn_func


def available(device: torch.device) -> bool:
    """Whether flash-attn is installed and ``device`` is CUDA."""
    return device.type == "cuda" and HAS_FLASH_ATTN


def unsupported_reason(
    q: torch.Tensor, key_padding_mask: torch.Tensor | None, dropout_p: float
) -> str | None:
    """Why this backend cannot take the call, or None when it can."""
    if not q.is_cuda:
        return "it runs on CUDA only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, got {q.dtype}"
    if key_padding_mask is not None:
        return "it has no key_padding_mask"
    if dropout_p > 0.0:
        return "its per-branch dropout is not wired up"
    if torch.is_grad_enabled() and q.requires_grad:
        return "flash-attn's backward ignores the LSE gradient the branch merge needs"
    return None


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _flash_attn_func()
    out, lse, _ = fn(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        softmax_scale=scale,
        causal=is_causal,
        return_attn_probs=True,
    )
    return out, lse.float()


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
    """``(out, lse)`` on validated inputs; raises ``ValueError`` when flash-attn cannot run it."""
    _flash_attn_func()
    reason = unsupported_reason(q, key_padding_mask, dropout_p)
    if reason is not None:
        raise ValueError(
            f"backend='flash' cannot run this call: {reason}; use 'sdpa' or 'reference'"
        )
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
