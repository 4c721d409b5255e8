"""LongNet models: [`LongNet`][dilated.longnet.models.LongNet] (encoder-decoder over embeddings) and [`LongNetLM`][dilated.longnet.models.LongNetLM]
(decoder-only language model over token ids)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dilated.core.checks import check_bool, check_positive_int, resolve_check_finite
from dilated.longnet.checks import check_cache, check_layer_input, check_token_ids
from dilated.longnet.compat import (
    MODEL_POSITIONAL,
    model_config_from_args,
    model_defaults,
    warn_old_call,
)
from dilated.longnet.config import LongNetConfig
from dilated.longnet.kv_cache import KVCache, LayerKVCache
from dilated.longnet.layers import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer
from dilated.longnet.magneto import magneto_gain
from dilated.longnet.rotary import RotaryEmbedding

__all__ = ["LongNet", "LongNetLM"]


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

    Construct from a [`LongNetConfig`][dilated.longnet.config.LongNetConfig] (``num_tokens``
    is unused), or as in dilated-attention-pytorch 0.2.0 from its fields, positionally in 0.2.0's
    order (``d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
    segment_lengths, dilation_rates, dropout, activation, layer_norm_eps, device, dtype``) or as
    keywords. Fields left out take 0.2.0's base sizes: ``d_model=768, nhead=12``, 12 encoder and
    12 decoder layers, ``dim_feedforward=3072``, ``dropout=0.0``, and the branches of the
    ``longnet_32k`` preset (0.2.0's own branches are not valid here: its rates do not divide its
    segments).

    Args:
        config: a ``LongNetConfig``, or ``d_model`` as the first of the positional fields.
        *args: the rest of the positional fields.
        device, dtype: where and in what dtype parameters are created.
        **kwargs: fields of ``LongNetConfig``.
    """

    def __init__(
        self,
        config: LongNetConfig | int | None = None,
        *args: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(config, LongNetConfig):
            kwargs.setdefault("num_tokens", 0)
        c, factory = model_config_from_args(
            config,
            args,
            kwargs,
            names=MODEL_POSITIONAL,
            defaults=model_defaults(num_encoder_layers=12),
            device=device,
            dtype=dtype,
        )
        self.config = c
        device, dtype = factory.get("device"), factory.get("dtype")
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
        self,
        src: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Encoder output ``(batch, src_seq, d_model)`` of ``src`` ``(batch, src_seq, d_model)``;
        ``is_causal`` makes the encoder's self-attention causal."""
        x = src
        for layer in self.encoder:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(
                    layer,
                    x,
                    is_causal,
                    src_key_padding_mask,
                    rotary=self.rotary,
                    use_reentrant=False,
                )
            else:
                x = layer(x, is_causal, src_key_padding_mask, rotary=self.rotary)
        result: torch.Tensor = self.encoder_norm(x)
        return result

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        *,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        """Encode ``src`` and decode ``tgt`` (default: ``src``, as in dilated-attention-pytorch).

        Args:
            src: ``(batch, src_seq, d_model)``.
            tgt: ``(batch, tgt_seq, d_model)`` or None. A bool here is 0.2.0's positional
                ``is_causal`` (deprecated: pass it by keyword).
            src_key_padding_mask, tgt_key_padding_mask: ``(batch, seq)``, PyTorch's
                convention: bool True (or float ``-inf``) at the padding, which is ignored.
            is_causal: None (default): a bidirectional encoder, a causal decoder and dense
                cross-attention. True: 0.2.0's meaning, causal everywhere (encoder, decoder, and
                cross-attention from position ``i`` to memory positions ``<= i``; needs
                ``tgt_seq == src_seq``), so that output ``i`` depends on inputs ``<= i`` only.
                False: nothing causal.

        Returns:
            ``(batch, tgt_seq, d_model)``.

        Raises:
            ValueError: ``src`` and ``tgt`` of different batch sizes or widths.
        """
        if isinstance(tgt, bool):
            warn_old_call(
                "LongNet(...)(x, is_causal) with is_causal as the second positional argument is "
                "dilated-attention-pytorch 0.2.0's call; pass is_causal= by keyword (the second "
                "positional argument is tgt)"
            )
            tgt, is_causal = None, tgt
        d = self.config.d_model
        check_layer_input("src", src, d)
        if tgt is not None:
            check_layer_input("tgt", tgt, d, ("src", src.shape[0]))
        everywhere = False if is_causal is None else check_bool("is_causal", is_causal)
        memory = self.encode(src, src_key_padding_mask, is_causal=everywhere)
        x = src if tgt is None else tgt
        self_causal = True if is_causal is None else is_causal
        for layer in self.decoder:
            args = (x, memory, self_causal, tgt_key_padding_mask, src_key_padding_mask)
            kw: dict[str, Any] = {"rotary": self.rotary, "memory_is_causal": everywhere}
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False, **kw)
            else:
                x = layer(*args, **kw)
        result: torch.Tensor = self.decoder_norm(x)
        return result


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model: token embedding, causal dilated layers with rotary
    q/k, final norm and an output head tied to the embedding (``tie_weights``).

    Construct from a [`LongNetConfig`][dilated.longnet.config.LongNetConfig] with
    ``num_encoder_layers == 0``, or from its fields: positionally in dilated-attention-pytorch
    0.2.0's order (``num_tokens``, then the order of [`LongNet`][dilated.longnet.models.LongNet])
    or as keywords, e.g. ``LongNetLM(num_tokens=256, d_model=128, nhead=4, num_decoder_layers=2,
    segment_lengths=[32, 64], dilation_rates=[1, 2])``. Fields left out take the defaults of
    ``LongNet`` with no encoder: ``LongNetLM(num_tokens=1000)`` is a 12-layer, 768-wide model.

    Args:
        config: a ``LongNetConfig``, or ``num_tokens`` as the first of the positional fields.
        *args: the rest of the positional fields.
        device, dtype: where and in what dtype parameters are created.
        **kwargs: fields of ``LongNetConfig``.
    """

    def __init__(
        self,
        config: LongNetConfig | int | None = None,
        *args: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        c, factory = model_config_from_args(
            config,
            args,
            kwargs,
            names=("num_tokens", *MODEL_POSITIONAL),
            defaults=model_defaults(num_encoder_layers=0),
            device=device,
            dtype=dtype,
        )
        self.config = c
        device, dtype = factory.get("device"), factory.get("dtype")
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
        """Build the preset ``name`` of [`dilated.longnet.LONGNET_PRESETS`][dilated.longnet.config.LONGNET_PRESETS]."""
        return cls(LongNetConfig.from_preset(name, **overrides), device=device, dtype=dtype)

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty [`KVCache`][dilated.longnet.kv_cache.KVCache] for ``batch`` sequences of up to ``max_length`` tokens.

        Raises:
            ValueError: ``batch`` or ``max_length`` is not a positive int (``2.5``, ``-1``,
                ``True``).
        """
        check_positive_int("batch", batch)
        check_positive_int("max_length", max_length)
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
        is_causal: bool | None = None,
        check_ids: bool | None = None,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: int64 ``(batch, seq)``, ids in ``[0, num_tokens)``.
            key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool True (or float
                ``-inf``) at the padding, which is ignored (not with ``cache``).
                A bool here is 0.2.0's positional ``is_causal``.
            cache: a [`KVCache`][dilated.longnet.kv_cache.KVCache] from [`new_cache`][dilated.longnet.models.LongNetLM.new_cache]; the tokens are taken to follow the
                ``cache.length`` tokens already in it, and are appended to it.
            is_causal: accepted for 0.2.0's calls (deprecated): the model is always causal, so
                True changes nothing and False raises ``ValueError``.
            check_ids: raise ``ValueError`` for an id outside ``[0, num_tokens)``. None
                (default): on CPU inputs always (free), on CUDA only when
                ``DILATED_CHECK_FINITE`` asks for value checks, since it reads ``input_ids``
                back (a device sync); an out-of-range id on CUDA is otherwise a device-side
                assert. [`generate`][dilated.longnet.generate] checks the prompt once and turns
                it off for the tokens it samples itself.

        Returns:
            float logits ``(batch, seq, num_tokens)``.

        Raises:
            ValueError: ``input_ids`` of the wrong shape, dtype or range, or a ``cache`` made
                for another batch size or model.
        """
        if isinstance(key_padding_mask, bool):
            is_causal, key_padding_mask = key_padding_mask, None
        if is_causal is not None:
            if not is_causal:
                raise ValueError(
                    "LongNetLM is a decoder-only language model and always causal; "
                    "is_causal=False is not supported (use LongNet for bidirectional encoding)"
                )
            warn_old_call(
                "LongNetLM(...)(x, is_causal=True): the model is always causal; drop the argument"
            )
        if check_ids is None:
            on_cpu = isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu"
            check_ids = on_cpu or resolve_check_finite(None)
        self._check_ids(input_ids, check_bool("check_ids", check_ids))
        if cache is None:
            return self._logits(input_ids, key_padding_mask, None, 0)
        check_cache(cache, len(self.layers), input_ids.shape[0])
        logits = self._logits(input_ids, key_padding_mask, cache, cache.length)
        cache.length += input_ids.shape[1]
        return logits

    def decode_at(
        self, input_ids: torch.Tensor, cache: KVCache, position: torch.Tensor
    ) -> torch.Tensor:
        """Logits of one token per sequence at a device-side position, with static shapes.

        The step that [`StaticDecoder`][dilated.longnet.static_decoder.StaticDecoder] captures
        in a CUDA graph: no host synchronisation and nothing that depends on the position's
        value on the host, so one capture (or one ``torch.compile`` graph) serves every
        position. It checks nothing that needs the device, and neither reads nor advances
        ``cache.length``.

        Args:
            input_ids: int64 ``(batch, 1)``, ids in ``[0, num_tokens)`` (not checked).
            cache: a [`KVCache`][dilated.longnet.kv_cache.KVCache] of this model holding the
                positions before ``position``; the token's keys and values are written at it.
            position: 0-d int64 tensor on the model's device, in ``[0, capacity)`` (not
                checked: keep it in range on the host).

        Returns:
            float logits ``(batch, 1, num_tokens)``: those of
            [`forward`][dilated.longnet.models.LongNetLM.forward] with ``cache`` at
            ``cache.length == position``.

        Raises:
            ValueError / TypeError: ``input_ids`` that is not ``(batch, 1)`` integer ids, a
                ``cache`` of another model or batch.
        """
        self._check_ids(input_ids, check_range=False)
        if input_ids.shape[1] != 1:
            raise ValueError(f"decode_at takes one token per sequence, got {input_ids.shape[1]}")
        check_cache(cache, len(self.layers), input_ids.shape[0])
        return self._logits(input_ids, None, cache, position)

    def _logits(
        self,
        input_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        cache: KVCache | None,
        offset: int | torch.Tensor,
    ) -> torch.Tensor:
        x = self.embedding(input_ids)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(
                    layer, x, None, True, key_padding_mask, rotary=self.rotary, use_reentrant=False
                )
            else:
                lc = None if cache is None else cache.layers[i]
                x = layer(
                    x, None, True, key_padding_mask, rotary=self.rotary, cache=lc, offset=offset
                )
        result: torch.Tensor = self.head(self.norm(x))
        return result

    def _check_ids(self, input_ids: object, check_range: bool) -> None:
        check_token_ids(input_ids, self.config.num_tokens, check_range)

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
