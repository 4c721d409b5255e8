"""The ``"reference"`` backend: dilated-core's plain-PyTorch implementation (any device, dropout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.core.reference import dilated_attention_reference

__all__ = ["NAME", "available", "forward"]

NAME = "reference"


def available(device: torch.device) -> bool:
    """Runs everywhere PyTorch does."""
    return True


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
    """``(out, lse)`` of [`dilated.core.reference.dilated_attention_reference`][dilated.core.reference.dilated_attention_reference]."""
    return dilated_attention_reference(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
    )
