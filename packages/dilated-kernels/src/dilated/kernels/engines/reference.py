"""The ``"reference"`` engine: dilated-core's plain-PyTorch dense attention
([`dense_segment_attention`][dilated.core.reference.dense_segment_attention]).

It runs every call on every device (any dtype, key masks, dropout from a seeded generator),
computed in float32 for 16-bit inputs; it materialises each call's score matrix, so the other
engines take every call they support and this one backs them up.
"""

from __future__ import annotations

import torch

from dilated.core.reference import (
    compute_dtype,
    dense_segment_attention,
    dense_segment_attention_backward,
)
from dilated.kernels.engines.spec import SubproblemSpec

__all__ = [
    "FALLBACK",
    "HEAVY_HOST_PATH",
    "NAME",
    "PLANS_PER_SHAPE",
    "available",
    "backward",
    "forward",
    "unsupported_reason",
]

NAME = "reference"
PLANS_PER_SHAPE = False
FALLBACK = True
HEAVY_HOST_PATH = True


def available(device: torch.device) -> bool:
    """Runs wherever PyTorch does."""
    return True


def unsupported_reason(spec: SubproblemSpec) -> str | None:
    """None: every call runs here."""
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: see [`Engine.forward`][dilated.kernels.engines.spec.Engine.forward]."""
    work = compute_dtype(q.dtype)
    out, lse = dense_segment_attention(
        q.to(work), k.to(work), v.to(work), key_mask, scale, is_causal, dropout_p, dropout_seed
    )
    return out.to(q.dtype), lse.to(work)


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``: see [`Engine.backward`][dilated.kernels.engines.spec.Engine.backward]."""
    work = compute_dtype(q.dtype)
    dq, dk, dv = dense_segment_attention_backward(
        grad_out.to(work), q.to(work), k.to(work), v.to(work), out.to(work), lse, key_mask,
        scale, is_causal, dropout_p, dropout_seed,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
