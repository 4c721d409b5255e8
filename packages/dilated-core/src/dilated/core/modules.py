"""The reference modules of dilated-core, registered as the ``"standard"`` implementation."""

from __future__ import annotations

import torch

from dilated.core.base import BaseDilatedAttention, BaseMultiheadDilatedAttention
from dilated.core.functional import dilated_attention
from dilated.core.registry import Implementation

__all__ = ["IMPLEMENTATION", "DilatedAttention", "MultiheadDilatedAttention"]


class DilatedAttention(BaseDilatedAttention):
    """Dilated attention computed by the plain-PyTorch reference ([`dilated.core.dilated_attention`][dilated.core.functional.dilated_attention]).

    Input and output ``(batch, seq, heads, head_dim)``; see [`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention].
    """

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        return dilated_attention(
            q,
            k,
            v,
            self.config.segment_lengths,
            self.config.dilation_rates,
            scale=self.config.scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            check_finite=self.check_finite,
        )


class MultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head dilated attention on the reference implementation.

    Input ``(batch, seq, embed_dim)``, returns ``(out, None)``; see
    [`BaseMultiheadDilatedAttention`][dilated.core.base.BaseMultiheadDilatedAttention].
    """

    attention_class = DilatedAttention


IMPLEMENTATION = Implementation(
    name="standard",
    attention=DilatedAttention,
    multihead=MultiheadDilatedAttention,
    package="dilated-core",
    description="plain-PyTorch reference: strided views, dense sub-problems, LSE merge",
    priority=0,
)
