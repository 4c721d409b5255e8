"""Dilated transformer layers with MAGNETO sub-layer norms (batch first, ``(batch, seq, d_model)``).

Every sub-layer is ``x + dropout(f(LN(x)))`` with an extra LayerNorm inside ``f`` (Sub-LN, arXiv
2210.06423): before the attention output projection (the core multi-head module's own norm) and
before the second feed-forward projection. The self-attention is the multi-head module of the
core factory, ``create_multihead_dilated_attention(attention_type, ...)``, which the layer holds
as ``self_attn``: the layer runs its input projections
([`project_inputs`][dilated.core.base.BaseMultiheadDilatedAttention.project_inputs]), its inner
attention and its output projection
([`project_output`][dilated.core.base.BaseMultiheadDilatedAttention.project_output]), and adds
only what goes around them: rotary embeddings on q and k, and the KV cache
([`attend_with_cache`][dilated.longnet.kv_cache.attend_with_cache]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dilated.core.base import BaseMultiheadDilatedAttention
from dilated.core.checks import check_bool
from dilated.core.registry import create_multihead_dilated_attention
from dilated.longnet.checks import check_layer_input, check_no_attn_mask
from dilated.longnet.compat import NOT_GIVEN, layer_config_from_args, warn_old_call
from dilated.longnet.config import TransformerLayerConfig
from dilated.longnet.cross_attention import CrossAttention
from dilated.longnet.kv_cache import LayerKVCache, attend_with_cache
from dilated.longnet.rotary import RotaryEmbedding

__all__ = [
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "create_decoder_layer",
    "create_encoder_layer",
]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
}


def _dilated_self_attention(
    mha: BaseMultiheadDilatedAttention,
    x: torch.Tensor,
    *,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    rotary: RotaryEmbedding | None,
    cache: LayerKVCache | None,
    offset: int | torch.Tensor,
) -> torch.Tensor:
    """``mha``'s forward on ``x`` ``(batch, n, d_model)`` with q and k rotated (positions from
    ``offset``) between its projections and its attention, through ``cache`` when given."""
    q, k, v = mha.project_inputs(x, x, x)
    if rotary is not None:
        q, k = rotary(q, k, offset=offset)
    if cache is None:
        out = mha.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)
    else:
        out = attend_with_cache(
            mha.attention, q, k, v, cache, offset, is_causal=is_causal,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip
    return mha.project_output(out)


class DilatedTransformerEncoderLayer(nn.Module):
    """Dilated self-attention and feed-forward, MAGNETO style.

    Construct as in dilated-attention-pytorch 0.2.0 / ``torch.nn.TransformerEncoderLayer``
    (``d_model, nhead, segment_lengths, dilation_rates, dim_feedforward=2048, dropout=0.1,
    activation="relu", layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None``, plus
    keyword-only ``attention_type="auto"``, ``num_kv_heads``, ``bias``, ``check_finite``)
    or from a [`TransformerLayerConfig`][dilated.longnet.config.TransformerLayerConfig].

    Input and output ``(batch, seq, d_model)``.
    """

    def __init__(
        self,
        d_model: int | TransformerLayerConfig,
        nhead: int | None = None,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        attention_type: str = "auto",
        num_kv_heads: int | None = None,
        bias: bool = True,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {}
        if not isinstance(d_model, TransformerLayerConfig):
            kw = {
                "dim_feedforward": dim_feedforward,
                "dropout": dropout,
                "activation": activation,
                "layer_norm_eps": layer_norm_eps,
                "gamma_init": gamma_init,
                "attention_type": attention_type,
                "num_kv_heads": num_kv_heads,
                "bias": bias,
                "check_finite": check_finite,
            }
        c = self.config = layer_config_from_args(
            d_model, nhead, segment_lengths, dilation_rates, **kw
        )
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.self_attn = create_multihead_dilated_attention(
            c.attention_type,
            embed_dim=c.d_model,
            num_heads=c.nhead,
            dilation_rates=list(c.dilation_rates),
            segment_lengths=list(c.segment_lengths),
            dropout=c.dropout,
            bias=c.bias,
            layer_norm=True,
            layer_norm_eps=c.layer_norm_eps,
            gamma_init=c.gamma_init,
            num_kv_heads=c.num_kv_heads,
            check_finite=c.check_finite,
            **fk,
        )
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk)
        self.linear1 = nn.Linear(c.d_model, c.dim_feedforward, bias=c.bias, **fk)
        self.ffn_norm = nn.LayerNorm(c.dim_feedforward, eps=c.layer_norm_eps, **fk)
        self.linear2 = nn.Linear(c.dim_feedforward, c.d_model, bias=c.bias, **fk)
        self.dropout = nn.Dropout(c.dropout)
        act = c.activation
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            _ACTIVATIONS[act] if isinstance(act, str) else act
        )
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_normal_(lin.weight, gain=c.gamma_init)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn_norm(self.dropout(self.activation(self.linear1(x))))
        out: torch.Tensor = self.dropout(self.linear2(h))
        return out

    def _self_block(
        self,
        x: torch.Tensor,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        rotary: RotaryEmbedding | None,
        cache: LayerKVCache | None,
        offset: int | torch.Tensor,
    ) -> torch.Tensor:
        out = _dilated_self_attention(
            self.self_attn,
            self.norm1(x),
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            rotary=rotary,
            cache=cache,
            offset=offset,
        )
        dropped: torch.Tensor = self.dropout(out)
        return x + dropped

    def forward(
        self,
        src: torch.Tensor,
        is_causal: bool = False,
        src_key_padding_mask: torch.Tensor | None = None,
        *,
        src_mask: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
        cache: LayerKVCache | None = None,
        offset: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Apply the layer (also as a layer of ``torch.nn.TransformerEncoder``).

        Args:
            src: ``(batch, seq, d_model)``.
            is_causal: causal dilated self-attention.
            src_key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool with True at
                the padding (ignored keys), or the float form (``-inf`` = ignored, 0 = attended)
                that ``torch.nn.TransformerEncoder`` passes.
            src_mask: None, or a causal mask together with ``is_causal=True`` (what
                ``torch.nn.TransformerEncoder`` passes); other masks raise ``ValueError``.
            rotary: rotate q and k with this embedding (positions ``offset..offset+seq``).
            cache: fill (``offset == 0``) or extend and read (``offset > 0``) this KV cache;
                needs ``is_causal=True``.
            offset: absolute position of ``src[:, 0]``: an int, or with ``cache`` and one
                token a 0-d int64 tensor on the device (the static decoding step: no host
                synchronisation, see [`StaticDecoder`][dilated.longnet.static_decoder.StaticDecoder]).

        Returns:
            ``(batch, seq, d_model)``.
        """
        check_layer_input("src", src, self.config.d_model)
        check_bool("is_causal", is_causal)
        check_no_attn_mask(src_mask, "src_mask", is_causal, "is_causal", NOT_GIVEN)
        # The attention op reads the mask (PyTorch's convention) in dilated.core.checks.
        x = self._self_block(src, is_causal, src_key_padding_mask, rotary, cache, offset)
        return x + self._ff(self.norm2(x))


class DilatedTransformerDecoderLayer(DilatedTransformerEncoderLayer):
    """Causal dilated self-attention, dense cross-attention over the encoder output, feed-forward.

    Same constructor as [`DilatedTransformerEncoderLayer`][dilated.longnet.layers.DilatedTransformerEncoderLayer], plus keyword-only
    ``cross_attention=True`` (False gives the layer of a decoder-only model, whose ``memory``
    must then be None). Input ``tgt`` ``(batch, seq, d_model)``, ``memory``
    ``(batch, memory_seq, d_model)``; output ``(batch, seq, d_model)``.
    """

    def __init__(
        self,
        d_model: int | TransformerLayerConfig,
        nhead: int | None = None,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        attention_type: str = "auto",
        num_kv_heads: int | None = None,
        bias: bool = True,
        check_finite: bool | None = None,
        cross_attention: bool = True,
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            segment_lengths,
            dilation_rates,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            gamma_init,
            device,
            dtype,
            attention_type=attention_type,
            num_kv_heads=num_kv_heads,
            bias=bias,
            check_finite=check_finite,
        )
        c = self.config
        check_bool("cross_attention", cross_attention)
        self.cross_attn: CrossAttention | None = None
        self.norm_cross: nn.LayerNorm | None = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(
                c.d_model, eps=c.layer_norm_eps, device=device, dtype=dtype
            )
            self.cross_attn = CrossAttention(
                c.d_model,
                c.nhead,
                dropout=c.dropout,
                bias=c.bias,
                layer_norm_eps=c.layer_norm_eps,
                gamma_init=c.gamma_init,
                device=device,
                dtype=dtype,
            )

    def forward(  # type: ignore[override]
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None = None,
        tgt_is_causal: bool | None = True,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        *,
        memory_is_causal: bool = False,
        tgt_mask: torch.Tensor | None = NOT_GIVEN,
        memory_mask: torch.Tensor | None = NOT_GIVEN,
        rotary: RotaryEmbedding | None = None,
        cache: LayerKVCache | None = None,
        offset: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Apply the layer (also as a layer of ``torch.nn.TransformerDecoder``).

        Args:
            tgt: ``(batch, seq, d_model)``.
            memory: encoder output ``(batch, memory_seq, d_model)``; required with
                cross-attention, must be None without.
            tgt_is_causal: causal dilated self-attention (default True; None means True).
            tgt_key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool True (or float
                ``-inf``) at the padding, which is ignored. A Python bool in this place is
                0.2.0's positional ``memory_is_causal`` (deprecated: pass it by keyword).
            memory_key_padding_mask: ``(batch, memory_seq)``, like ``tgt_key_padding_mask``.
            memory_is_causal: cross-attention from position ``i`` to memory positions ``<= i``
                only (0.2.0's causal cross-attention; needs ``memory_seq == seq``).
            tgt_mask, memory_mask: what ``torch.nn.TransformerDecoder`` passes: None, or a
                causal mask together with ``tgt_is_causal``/``memory_is_causal``.
            rotary, cache, offset: as in [`DilatedTransformerEncoderLayer.forward`][dilated.longnet.layers.DilatedTransformerEncoderLayer.forward].

        Returns:
            ``(batch, seq, d_model)``.
        """
        check_layer_input("tgt", tgt, self.config.d_model)
        if isinstance(tgt_key_padding_mask, bool):
            warn_old_call(
                "layer(tgt, memory, tgt_is_causal, memory_is_causal) is dilated-attention-pytorch "
                "0.2.0's positional call; pass memory_is_causal= by keyword (the fourth "
                "positional argument is tgt_key_padding_mask)"
            )
            memory_is_causal, tgt_key_padding_mask = tgt_key_padding_mask, None
        causal = True if tgt_is_causal is None else check_bool("tgt_is_causal", tgt_is_causal)
        check_no_attn_mask(tgt_mask, "tgt_mask", causal, "tgt_is_causal", NOT_GIVEN)
        check_no_attn_mask(
            memory_mask, "memory_mask", memory_is_causal, "memory_is_causal", NOT_GIVEN
        )
        x = self._self_block(tgt, causal, tgt_key_padding_mask, rotary, cache, offset)
        if self.cross_attn is not None and self.norm_cross is not None:
            if memory is None:
                raise ValueError("memory is required by a decoder layer with cross-attention")
            x = x + self.dropout(
                self.cross_attn(
                    self.norm_cross(x), memory, memory_key_padding_mask, memory_is_causal
                )
            )
        elif memory is not None:
            raise ValueError("memory was given to a decoder layer built with cross_attention=False")
        elif memory_is_causal:
            raise ValueError("memory_is_causal=True needs a decoder layer with cross-attention")
        return x + self._ff(self.norm2(x))


def create_encoder_layer(
    attention_type: str = "auto", **kwargs: Any
) -> DilatedTransformerEncoderLayer:
    """A [`DilatedTransformerEncoderLayer`][dilated.longnet.layers.DilatedTransformerEncoderLayer] whose self-attention is the core factory's
    ``attention_type`` (``"standard"``, ``"improved"``, ``"ring"``, ...); ``kwargs`` are the
    layer's keywords (``d_model``, ``nhead``, ``segment_lengths``, ``dilation_rates``, ...)."""
    return DilatedTransformerEncoderLayer(attention_type=attention_type, **kwargs)


def create_decoder_layer(
    attention_type: str = "auto", **kwargs: Any
) -> DilatedTransformerDecoderLayer:
    """A [`DilatedTransformerDecoderLayer`][dilated.longnet.layers.DilatedTransformerDecoderLayer] built like [`create_encoder_layer`][dilated.longnet.layers.create_encoder_layer]."""
    return DilatedTransformerDecoderLayer(attention_type=attention_type, **kwargs)
