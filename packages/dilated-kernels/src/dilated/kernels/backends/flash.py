"""The ``"flash"`` backend: the strided sub-problem backend on the flash-attn-4 engine.

The same computation as ``"cudnn"`` (see [`dilated.kernels.backends.cudnn`][dilated.kernels.backends.cudnn])
with every sub-problem run by flash-attn-4 (``pip install "dilated-kernels[flash]"``): no
per-shape plan, forward on SM80 and newer, backward on SM90 and newer, float16/bfloat16, causal
and grouped-query heads. A key padding mask or dropout raises ``ValueError`` naming the reason
(``"cudnn"`` and ``"auto"`` take them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.kernels.backends import cudnn
from dilated.kernels.engines import flash4

__all__ = ["NAME", "available", "forward", "unsupported_reason"]

NAME = "flash"


def available(device: torch.device) -> bool:
    """Whether flash-attn-4 is installed and ``device`` is a CUDA GPU it runs on."""
    return flash4.available(device) and cudnn.available(device)


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, dropout_p: float
) -> str | None:
    """Why this backend cannot take the call, or None when it can."""
    return cudnn.unsupported_reason(q, k, key_padding_mask, dropout_p, flash4.NAME)


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
    sequence_bounds: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on validated inputs; ``ValueError`` when flash-attn-4 cannot run the call
    (not installed: the message says how to install it). ``sequence_bounds``: as in
    [`cudnn.forward`][dilated.kernels.backends.cudnn.forward]."""
    return cudnn.forward(
        q, k, v, segment_lengths, dilation_rates, scale=scale, is_causal=is_causal,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p, engine=flash4.NAME,
        sequence_bounds=sequence_bounds,
    )  # fmt: skip
