"""The modules of dilated-kernels, registered as the ``"improved"`` implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.base import BaseDilatedAttention, BaseMultiheadDilatedAttention
from dilated.core.config import DilatedAttentionConfig
from dilated.core.registry import Implementation
from dilated.kernels.backends import BACKEND_NAMES, available_backends
from dilated.kernels.functional import dilated_attention

__all__ = ["IMPLEMENTATION", "ImprovedDilatedAttention", "ImprovedMultiheadDilatedAttention"]


class ImprovedDilatedAttention(BaseDilatedAttention):
    """Dilated attention on the fastest backend of [`dilated.kernels.dilated_attention`][dilated.kernels.functional.dilated_attention].

    Input and output ``(batch, seq, heads, head_dim)``; see
    [`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention]. ``backend`` (keyword, default ``"auto"``)
    pins one backend.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | DilatedAttentionConfig,
        dilation_rates: Sequence[int] | None = None,
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        op: Any = None,
        *,
        is_causal: bool = False,
        check_finite: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            softmax_scale,
            attention_dropout,
            op,
            is_causal=is_causal,
            check_finite=check_finite,
        )
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
        self.backend = backend

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
        return self._attention_packed(
            q, k, v, (), is_causal=is_causal, key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
        )  # fmt: skip

    def _attention_packed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bounds: Sequence[int],
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        # The functional op takes the packed batch whole (one op on the strided backend).
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
            backend=self.backend,
            check_finite=self.check_finite,
            cu_seqlens=list(bounds) if bounds else None,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class ImprovedMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head dilated attention whose inner attention is [`ImprovedDilatedAttention`][dilated.kernels.modules.ImprovedDilatedAttention].

    Input ``(batch, seq, embed_dim)``, returns ``(out, None)``; see
    [`BaseMultiheadDilatedAttention`][dilated.core.base.BaseMultiheadDilatedAttention].
    ``backend`` (keyword, default ``"auto"``) is the inner attention's.
    """

    attention_class = ImprovedDilatedAttention


IMPLEMENTATION = Implementation(
    name="improved",
    attention=ImprovedDilatedAttention,
    multihead=ImprovedMultiheadDilatedAttention,
    package="dilated-kernels",
    description="cuDNN attention per sub-problem + one Triton merge (16-bit); fused Triton kernel otherwise",
    priority=10,
    # On CPU every backend is the reference math, so "auto" keeps "standard" there.
    devices=("cuda",),
    backends=available_backends,
)
