"""LongNet models: :class:`LongNet` (encoder-decoder over embeddings) and :class:`LongNetLM`
(decoder-only language model over token ids)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dilated.core.checks import ArgumentTypeError, check_bool
from dilated.longnet.config import LongNetConfig
from dilated.longnet.kv_cache import KVCache, LayerKVCache
from dilated.longnet.layers import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    check_layer_input,
)
from dilated.longnet.magneto import magneto_gain
from dilated.longnet.rotary import RotaryEmbedding

__all__ = ["LongNet", "LongNetLM"]


def _config(config: LongNetConfig | None, kwargs: dict[str, Any]) -> LongNetConfig:
    if config is None:
        return LongNetConfig(**kwargs)
    if kwargs:
        raise ValueError(
            f"pass either a LongNetConfig or keywords, not both (got {sorted(kwargs)})"
        )
    if not isinstance(config, LongNetConfig):
        raise ValueError(f"config must be a LongNetConfig, got {type(config).__name__}")
    return config


def _rotary(c: LongNetConfig, device: Any) -> RotaryEmbedding | None:
    if c.rotary is None:
        return None
    rot = RotaryEmbedding(
        c.d_model // c.nhead,
        base=c.rotary_base,
        xpos_scale_base=c.xpos_scale_base if c.rotary == "xpos" else None,
    )
    return rot.to(device) if device is not None else rot


class LongNet(nn.Module):
    """Encoder-decoder LongNet over embeddings ``(batch, seq, d_model)``.

    The encoder's dilated self-attention is bidirectional, the decoder's causal; the decoder
    cross-attends densely to the encoder output. MAGNETO gains follow the encoder-decoder formula.

    Args:
        config: a :class:`LongNetConfig` (``num_tokens`` is unused), or its fields as keywords.
        device, dtype: where and in what dtype parameters are created.
    """

    def __init__(
        self,
        config: LongNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        c = self.config = _config(config, {"num_tokens": 0, **kwargs} if config is None else kwargs)
        n, m = c.num_encoder_layers, c.num_decoder_layers
        if n == 0 or m == 0:
            raise ValueError(
                "LongNet is encoder-decoder and needs num_encoder_layers > 0 and "
                f"num_decoder_layers > 0, got {n} and {m} (use LongNetLM for decoder-only)"
            )
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        enc = c.layer_config(magneto_gain(n, m, part="encoder"))
        dec = c.layer_config(magneto_gain(n, m, part="decoder"))
        self.encoder = nn.ModuleList(DilatedTransformerEncoderLayer(enc, **fk) for _ in range(n))
        self.decoder = nn.ModuleList(DilatedTransformerDecoderLayer(dec, **fk) for _ in range(m))
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk)
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk)
        self.rotary = _rotary(c, device)
        self.gradient_checkpointing = c.gradient_checkpointing

    def encode(
        self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output ``(batch, src_seq, d_model)`` of ``src`` ``(batch, src_seq, d_model)``."""
        x = src
        for layer in self.encoder:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(
                    layer, x, False, src_key_padding_mask, rotary=self.rotary, use_reentrant=False
                )
            else:
                x = layer(x, False, src_key_padding_mask, rotary=self.rotary)
        result: torch.Tensor = self.encoder_norm(x)
        return result

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode ``src`` and decode ``tgt`` (default: ``src``, as in dilated-attention-pytorch).

        Args:
            src: ``(batch, src_seq, d_model)``.
            tgt: ``(batch, tgt_seq, d_model)`` or None.
            src_key_padding_mask, tgt_key_padding_mask: bool, True for real tokens.

        Returns:
            ``(batch, tgt_seq, d_model)``.

        Raises:
            ValueError: ``src`` and ``tgt`` of different batch sizes or widths.
        """
        d = self.config.d_model
        check_layer_input("src", src, d)
        if tgt is not None:
            check_layer_input("tgt", tgt, d, ("src", src.shape[0]))
        memory = self.encode(src, src_key_padding_mask)
        x = src if tgt is None else tgt
        for layer in self.decoder:
            args = (x, memory, True, tgt_key_padding_mask, src_key_padding_mask)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, rotary=self.rotary, use_reentrant=False)
            else:
                x = layer(*args, rotary=self.rotary)
        result: torch.Tensor = self.decoder_norm(x)
        return result


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model: token embedding, causal dilated layers with rotary
    q/k, final norm and an output head tied to the embedding (``tie_weights``).

    Args:
        config: a :class:`LongNetConfig` with ``num_encoder_layers == 0``, or its fields as
            keywords (e.g. ``LongNetLM(num_tokens=256, d_model=128, nhead=4,
            num_encoder_layers=0, num_decoder_layers=2, segment_lengths=[32, 64],
            dilation_rates=[1, 2])``).
        device, dtype: where and in what dtype parameters are created.
    """

    def __init__(
        self,
        config: LongNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        c = self.config = _config(config, kwargs)
        if c.num_encoder_layers != 0:
            raise ValueError(
                f"LongNetLM is decoder-only: num_encoder_layers must be 0, got "
                f"{c.num_encoder_layers} (use LongNet for an encoder-decoder model)"
            )
        if c.num_tokens < 1:
            raise ValueError(f"LongNetLM needs num_tokens >= 1, got {c.num_tokens}")
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        layer = c.layer_config(magneto_gain(0, c.num_decoder_layers))
        self.embedding = nn.Embedding(c.num_tokens, c.d_model, **fk)
        self.layers = nn.ModuleList(
            DilatedTransformerDecoderLayer(layer, cross_attention=False, **fk)
            for _ in range(c.num_decoder_layers)
        )
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk)
        self.head = nn.Linear(c.d_model, c.num_tokens, bias=False, **fk)
        nn.init.normal_(self.embedding.weight, std=c.d_model**-0.5)
        if c.tie_weights:
            self.head.weight = self.embedding.weight
        self.rotary = _rotary(c, device)
        self.gradient_checkpointing = c.gradient_checkpointing

    @classmethod
    def from_preset(
        cls, name: str, *, device: Any = None, dtype: Any = None, **overrides: Any
    ) -> LongNetLM:
        """Build the preset ``name`` of :data:`dilated.longnet.LONGNET_PRESETS`."""
        return cls(LongNetConfig.from_preset(name, **overrides), device=device, dtype=dtype)

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_length`` tokens."""
        p, c = self.embedding.weight, self.config
        return KVCache(
            [
                LayerKVCache(
                    batch,
                    max_length,
                    c.nhead if c.num_kv_heads is None else c.num_kv_heads,
                    c.d_model // c.nhead,
                    dtype=p.dtype,
                    device=p.device,
                )
                for _ in self.layers
            ]
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: int64 ``(batch, seq)``, ids in ``[0, num_tokens)``.
            key_padding_mask: bool ``(batch, seq)``, True for real tokens (not with ``cache``).
            cache: a :class:`KVCache` from :meth:`new_cache`, for this batch size; the tokens
                are taken to follow the ``cache.length`` tokens already in it, and are appended
                to it.
            check_ids: raise ``ValueError`` for an id outside ``[0, num_tokens)`` (one read of
                ``input_ids``, a device sync on CUDA, where an out-of-range id would otherwise
                be a device-side assert that ends the process's CUDA context).
                [`generate`][dilated.longnet.generate] checks the prompt and turns it off for
                the tokens it samples itself.

        Returns:
            float logits ``(batch, seq, num_tokens)``.

        Raises:
            ValueError: ``input_ids`` of the wrong shape, dtype or range, or a ``cache`` made
                for another batch size or model.
        """
        self._check_ids(input_ids, check_bool("check_ids", check_ids))
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        offset = 0 if cache is None else cache.length
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            lc = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(
                    layer, x, None, True, key_padding_mask, rotary=self.rotary, use_reentrant=False
                )
            else:
                x = layer(
                    x, None, True, key_padding_mask, rotary=self.rotary, cache=lc, offset=offset
                )
        if cache is not None:
            cache.length += input_ids.shape[1]
        result: torch.Tensor = self.head(self.norm(x))
        return result

    def _check_ids(self, input_ids: object, check_range: bool) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise ArgumentTypeError(
                f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
            )
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token per sequence (seq >= 1)")
        if not check_range or input_ids.device.type == "meta" or torch.compiler.is_compiling():
            return
        vocab = self.config.num_tokens
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bool(bad.any()):
            first, count = input_ids[bad][0].item(), int(bad.sum())
            more = f" ({count - 1} more ids out of range)" if count > 1 else ""
            raise ValueError(f"input_ids must lie in [0, num_tokens={vocab}), got id {first}{more}")

    def _check_cache(self, cache: object, batch: int) -> None:
        if not isinstance(cache, KVCache):
            raise ArgumentTypeError(
                f"cache must be a KVCache from new_cache(), got {type(cache).__name__}"
            )
        if len(cache.layers) != len(self.layers):
            raise ValueError(
                f"cache has {len(cache.layers)} layer(s) but the model has {len(self.layers)}: "
                "create it with this model's new_cache()"
            )
        cached = cache.layers[0].k.shape[0]
        if cached != batch:
            raise ValueError(
                f"cache was created for batch {cached}, got input_ids of batch {batch}; "
                "create it with new_cache(batch=...) of this batch size"
            )

    def loss(self, input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of ``input_ids`` ``(batch, seq)`` (predicts tokens
        ``1..seq-1`` from their prefixes); a float scalar."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(
                f"loss needs input_ids of shape (batch, seq >= 2), got {tuple(input_ids.shape)}"
            )
        self._check_ids(input_ids, check_range=True)  # the targets too, not only the inputs
        logits = self(input_ids[:, :-1], check_ids=False)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            input_ids[:, 1:].reshape(-1),
            ignore_index=ignore_index,
        )
