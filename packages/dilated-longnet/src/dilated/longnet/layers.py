"""Dilated transformer layers with MAGNETO sub-layer norms (batch first, ``(batch, seq, d_model)``).

Every sub-layer is ``x + dropout(f(LN(x)))`` with an extra LayerNorm inside ``f`` (Sub-LN, arXiv
2210.06423): before the attention output projection (the core multi-head module's own norm) and
before the second feed-forward projection. The self-attention is the multi-head module of the
core factory, ``create_multihead_dilated_attention(attention_type, ...)``; the layer calls its
projections and its inner attention module itself so that rotary embeddings can rotate q and k in
between, and so that a KV cache can be filled and read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dilated.core.base import BaseMultiheadDilatedAttention
from dilated.core.registry import create_multihead_dilated_attention
from dilated.longnet.config import TransformerLayerConfig
from dilated.longnet.kv_cache import LayerKVCache, cached_dilated_attention
from dilated.longnet.rotary import RotaryEmbedding

__all__ = [
    "CrossAttention",
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


def _layer_config(
    config: TransformerLayerConfig | int,
    nhead: int | None,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    **kwargs: Any,
) -> TransformerLayerConfig:
    if isinstance(config, TransformerLayerConfig):
        if nhead is not None or segment_lengths is not None or dilation_rates is not None:
            raise ValueError("pass either a TransformerLayerConfig or the layer's keywords")
        return config
    if nhead is None or segment_lengths is None or dilation_rates is None:
        raise ValueError("d_model, nhead, segment_lengths and dilation_rates are required")
    return TransformerLayerConfig(
        d_model=config,
        nhead=nhead,
        segment_lengths=tuple(segment_lengths),
        dilation_rates=tuple(dilation_rates),
        **kwargs,
    )


def _dilated_self_attention(
    mha: BaseMultiheadDilatedAttention,
    x: torch.Tensor,
    *,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    rotary: RotaryEmbedding | None,
    cache: LayerKVCache | None,
    offset: int,
) -> torch.Tensor:
    """Project, rotate, (cache,) attend, Sub-LN and project back; ``x`` ``(batch, n, d_model)``."""
    mc = mha.multihead_config
    b, n, _ = x.shape
    q = mha.q_proj(x).view(b, n, mc.num_heads, mc.head_dim)
    k = mha.k_proj(x).view(b, n, mc.kv_heads, mc.head_dim)
    v = mha.v_proj(x).view(b, n, mc.kv_heads, mc.head_dim)
    if rotary is not None:
        q, k = rotary(q, k, offset=offset)
    if cache is not None:
        if not mha.attention.computes_dilated_attention:
            raise ValueError(
                f"a KV cache reproduces plain dilated attention; {type(mha.attention).__name__} "
                "computes another function (e.g. a block-sparse layout): generate without a cache"
            )
        if not is_causal:
            raise ValueError("a KV cache needs causal self-attention (is_causal=True)")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported together with a KV cache")
        cache.write(offset, k, v)
    if cache is not None and offset > 0:
        ac = mha.attention_config
        rows = [
            cached_dilated_attention(
                q[:, i : i + 1], cache, offset + i, ac.segment_lengths, ac.dilation_rates, ac.scale
            )
            for i in range(n)
        ]
        out = torch.cat(rows, dim=1)
    else:
        out = mha.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)
    out = out.reshape(b, n, mc.embed_dim)
    if mha.norm is not None:
        out = mha.norm(out)
    projected: torch.Tensor = mha.out_proj(out)
    return projected


class CrossAttention(nn.Module):
    """Dense multi-head attention of ``(batch, n, d_model)`` queries over a memory
    ``(batch, m, d_model)`` of any length, through ``torch.nn.functional.scaled_dot_product_attention``.

    Dilated attention is defined for queries and keys of one shared sequence, so cross-attention
    is plain (non-dilated) attention; it carries the same MAGNETO sub-layer norm and init.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        *,
        dropout: float,
        bias: bool,
        layer_norm_eps: float,
        gamma_init: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.nhead, self.dropout = nhead, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **fk)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **fk)
        for proj, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, gamma_init),
            (self.out_proj, gamma_init),
        ):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` ``(batch, n, d_model)``, ``memory`` ``(batch, m, d_model)``, mask ``(batch, m)``
        True for real memory tokens; returns ``(batch, n, d_model)``."""
        b, n, d = x.shape
        m = memory.shape[1]
        h = self.nhead
        q = self.q_proj(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.k_proj(memory).view(b, m, h, d // h).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, h, d // h).transpose(1, 2)
        mask = None
        if memory_key_padding_mask is not None:
            if (
                memory_key_padding_mask.shape != (b, m)
                or memory_key_padding_mask.dtype != torch.bool
            ):
                raise ValueError(
                    f"memory_key_padding_mask must be bool (batch, memory_seq) = {(b, m)}, got "
                    f"{memory_key_padding_mask.dtype} {tuple(memory_key_padding_mask.shape)}"
                )
            mask = memory_key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, n, d)
        projected: torch.Tensor = self.out_proj(self.norm(out))
        return projected


class DilatedTransformerEncoderLayer(nn.Module):
    """Dilated self-attention and feed-forward, MAGNETO style.

    Construct as in dilated-attention-pytorch 0.2.0 / ``torch.nn.TransformerEncoderLayer``
    (``d_model, nhead, segment_lengths, dilation_rates, dim_feedforward=2048, dropout=0.1,
    activation="relu", layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None``, plus
    keyword-only ``attention_type="standard"``, ``num_kv_heads``, ``bias``) or from a
    :class:`TransformerLayerConfig`.

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
        attention_type: str = "standard",
        num_kv_heads: int | None = None,
        bias: bool = True,
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
            }
        c = self.config = _layer_config(d_model, nhead, segment_lengths, dilation_rates, **kw)
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
        offset: int,
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
        rotary: RotaryEmbedding | None = None,
        cache: LayerKVCache | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Apply the layer.

        Args:
            src: ``(batch, seq, d_model)``.
            is_causal: causal dilated self-attention.
            src_key_padding_mask: bool ``(batch, seq)``, True for real tokens.
            rotary: rotate q and k with this embedding (positions ``offset..offset+seq``).
            cache: fill (``offset == 0``) or extend and read (``offset > 0``) this KV cache;
                needs ``is_causal=True``.
            offset: absolute position of ``src[:, 0]``.

        Returns:
            ``(batch, seq, d_model)``.
        """
        x = self._self_block(src, is_causal, src_key_padding_mask, rotary, cache, offset)
        return x + self._ff(self.norm2(x))


class DilatedTransformerDecoderLayer(DilatedTransformerEncoderLayer):
    """Causal dilated self-attention, dense cross-attention over the encoder output, feed-forward.

    Same constructor as :class:`DilatedTransformerEncoderLayer`, plus keyword-only
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
        attention_type: str = "standard",
        num_kv_heads: int | None = None,
        bias: bool = True,
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
        )
        c = self.config
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
        tgt_is_causal: bool = True,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        *,
        rotary: RotaryEmbedding | None = None,
        cache: LayerKVCache | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Apply the layer.

        Args:
            tgt: ``(batch, seq, d_model)``.
            memory: encoder output ``(batch, memory_seq, d_model)``; required with
                cross-attention, must be None without.
            tgt_is_causal: causal dilated self-attention (default True).
            tgt_key_padding_mask: bool ``(batch, seq)``, True for real tokens.
            memory_key_padding_mask: bool ``(batch, memory_seq)``, True for real tokens.
            rotary, cache, offset: as in :meth:`DilatedTransformerEncoderLayer.forward`.

        Returns:
            ``(batch, seq, d_model)``.
        """
        x = self._self_block(tgt, tgt_is_causal, tgt_key_padding_mask, rotary, cache, offset)
        if self.cross_attn is not None and self.norm_cross is not None:
            if memory is None:
                raise ValueError("memory is required by a decoder layer with cross-attention")
            x = x + self.dropout(
                self.cross_attn(self.norm_cross(x), memory, memory_key_padding_mask)
            )
        elif memory is not None:
            raise ValueError("memory was given to a decoder layer built with cross_attention=False")
        return x + self._ff(self.norm2(x))


def create_encoder_layer(
    attention_type: str = "standard", **kwargs: Any
) -> DilatedTransformerEncoderLayer:
    """A :class:`DilatedTransformerEncoderLayer` whose self-attention is the core factory's
    ``attention_type`` (``"standard"``, ``"improved"``, ``"ring"``, ...); ``kwargs`` are the
    layer's keywords (``d_model``, ``nhead``, ``segment_lengths``, ``dilation_rates``, ...)."""
    return DilatedTransformerEncoderLayer(attention_type=attention_type, **kwargs)


def create_decoder_layer(
    attention_type: str = "standard", **kwargs: Any
) -> DilatedTransformerDecoderLayer:
    """A :class:`DilatedTransformerDecoderLayer` built like :func:`create_encoder_layer`."""
    return DilatedTransformerDecoderLayer(attention_type=attention_type, **kwargs)
