"""Frozen, validated configs of the LongNet layers and models."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from dilated.core.checks import (
    check_bool,
    check_branches,
    check_dropout,
    check_optional_bool,
    check_positive_int,
    check_positive_number,
)

__all__ = ["ACTIVATIONS", "LONGNET_PRESETS", "LongNetConfig", "TransformerLayerConfig"]

#: Activation names accepted by ``activation``.
ACTIVATIONS = ("relu", "gelu", "silu", "swish")


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _check_activation(value: Any) -> None:
    if not (callable(value) or value in ACTIVATIONS):
        raise ValueError(f"activation must be one of {ACTIVATIONS} or a callable, got {value!r}")


def _check_heads(d_model: int, nhead: int, num_kv_heads: int | None) -> None:
    check_positive_int("d_model", d_model)
    check_positive_int("nhead", nhead)
    if d_model % nhead:
        raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
    if num_kv_heads is not None:
        check_positive_int("num_kv_heads", num_kv_heads)
        if nhead % num_kv_heads:
            raise ValueError(f"nhead ({nhead}) must be a multiple of num_kv_heads ({num_kv_heads})")


@dataclass(frozen=True)
class TransformerLayerConfig:
    """One dilated transformer layer.

    Attributes:
        d_model: model width; a multiple of ``nhead``.
        nhead: query heads.
        segment_lengths, dilation_rates: the dilated branches of the self-attention.
        dim_feedforward: hidden width of the feed-forward block.
        dropout: residual, feed-forward and attention dropout, in ``[0, 1)``.
        activation: ``"relu"``, ``"gelu"``, ``"silu"``/``"swish"`` or a callable.
        layer_norm_eps: epsilon of every LayerNorm.
        gamma_init: MAGNETO gain of the value/output/feed-forward init (see
            [`dilated.longnet.magneto_gain`][dilated.longnet.magneto.magneto_gain]).
        attention_type: the ``kind`` given to the core factory; ``"auto"`` (default) takes the
            fastest installed implementation for the device (``"improved"`` on CUDA with
            dilated-kernels, else ``"standard"``), or name one (``"standard"``, ``"ring"``...).
        num_kv_heads: key/value heads (grouped-query attention); None means ``nhead``.
        bias: biases in the linear layers.
        check_finite: NaN/Inf check of the attention inputs (None: the environment variable
            ``DILATED_CHECK_FINITE``, off when unset; see
            [`resolve_check_finite`][dilated.core.checks.resolve_check_finite]).
    """

    d_model: int
    nhead: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: Any = "relu"
    layer_norm_eps: float = 1e-5
    gamma_init: float = 1.0
    attention_type: str = "auto"
    num_kv_heads: int | None = None
    bias: bool = True
    check_finite: bool | None = None

    def __post_init__(self) -> None:
        check_bool("bias", self.bias)
        check_optional_bool("check_finite", self.check_finite)
        _check_heads(self.d_model, self.nhead, self.num_kv_heads)
        ws, rs = check_branches(self.segment_lengths, self.dilation_rates)
        _set(self, "segment_lengths", ws)
        _set(self, "dilation_rates", rs)
        check_positive_int("dim_feedforward", self.dim_feedforward)
        check_dropout("dropout", self.dropout)
        _check_activation(self.activation)
        check_positive_number("layer_norm_eps", self.layer_norm_eps)
        check_positive_number("gamma_init", self.gamma_init)
        if not isinstance(self.attention_type, str) or not self.attention_type:
            raise ValueError(f"attention_type must be a kind name, got {self.attention_type!r}")

    @property
    def head_dim(self) -> int:
        """``d_model // nhead``."""
        return self.d_model // self.nhead


@dataclass(frozen=True)
class LongNetConfig:
    """A LongNet model: [`LongNet`][dilated.longnet.models.LongNet] (encoder-decoder) or
    [`LongNetLM`][dilated.longnet.models.LongNetLM] (decoder-only, which needs ``num_encoder_layers == 0``).

    Attributes:
        num_tokens: vocabulary size (used by [`LongNetLM`][dilated.longnet.models.LongNetLM]; 0 for [`LongNet`][dilated.longnet.models.LongNet], which
            works on embeddings).
        d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, attention_type, num_kv_heads, bias: as in
            [`TransformerLayerConfig`][dilated.longnet.config.TransformerLayerConfig].
        num_encoder_layers, num_decoder_layers: stack depths (set the MAGNETO gains).
        segment_lengths, dilation_rates: the dilated branches of every self-attention.
        rotary: ``"rope"``, ``"xpos"`` or None (no position embedding).
        rotary_base: RoPE frequency base.
        xpos_scale_base: xPos decay base (used when ``rotary == "xpos"``).
        tie_weights: share the token embedding with the output head.
        gradient_checkpointing: recompute each layer in the backward pass while training.
        check_finite: as in [`TransformerLayerConfig`][dilated.longnet.config.TransformerLayerConfig], for every layer.
    """

    num_tokens: int
    d_model: int
    nhead: int
    num_encoder_layers: int
    num_decoder_layers: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: Any = "relu"
    layer_norm_eps: float = 1e-5
    attention_type: str = "auto"
    num_kv_heads: int | None = None
    bias: bool = True
    rotary: str | None = "rope"
    rotary_base: float = 10000.0
    xpos_scale_base: float = 512.0
    tie_weights: bool = True
    gradient_checkpointing: bool = False
    check_finite: bool | None = None

    def __post_init__(self) -> None:
        check_bool("tie_weights", self.tie_weights)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
            raise ValueError(f"num_tokens must be a non-negative int, got {self.num_tokens!r}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {self.num_tokens}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.num_encoder_layers + self.num_decoder_layers == 0:
            raise ValueError("a model needs at least one layer (num_encoder/decoder_layers)")
        # The branch lists first: layer_config() copies them, and a copy of a set would hide it.
        ws, rs = check_branches(self.segment_lengths, self.dilation_rates)
        _set(self, "segment_lengths", ws)
        _set(self, "dilation_rates", rs)
        # Validates everything the layers share, with the same messages.
        layer = self.layer_config()
        if self.rotary not in (None, "rope", "xpos"):
            raise ValueError(f"rotary must be 'rope', 'xpos' or None, got {self.rotary!r}")
        if self.rotary is not None and layer.head_dim % 2:
            raise ValueError(
                f"rotary={self.rotary!r} needs an even head_dim, got d_model // nhead = "
                f"{layer.head_dim}"
            )
        for name in ("rotary_base", "xpos_scale_base"):
            check_positive_number(name, getattr(self, name))

    def layer_config(self, gamma_init: float = 1.0) -> TransformerLayerConfig:
        """The [`TransformerLayerConfig`][dilated.longnet.config.TransformerLayerConfig] of every layer, with the given MAGNETO gain."""
        return TransformerLayerConfig(
            d_model=self.d_model,
            nhead=self.nhead,
            segment_lengths=tuple(self.segment_lengths),
            dilation_rates=tuple(self.dilation_rates),
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            gamma_init=gamma_init,
            attention_type=self.attention_type,
            num_kv_heads=self.num_kv_heads,
            bias=self.bias,
            check_finite=self.check_finite,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LongNetConfig:
        """The preset ``name`` of [`LONGNET_PRESETS`][dilated.longnet.config.LONGNET_PRESETS], with ``overrides`` applied."""
        if name not in LONGNET_PRESETS:
            raise ValueError(
                f"unknown LongNet preset {name!r}; choose one of {', '.join(sorted(LONGNET_PRESETS))}"
            )
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown LongNetConfig field(s) {bad}")
        return cls(**{**LONGNET_PRESETS[name], **overrides})


LONGNET_PRESETS: dict[str, dict[str, Any]] = {
    "longnet_tiny": {
        "num_tokens": 256,
        "d_model": 128,
        "nhead": 4,
        "num_encoder_layers": 0,
        "num_decoder_layers": 2,
        "dim_feedforward": 512,
        "segment_lengths": (32, 64, 128),
        "dilation_rates": (1, 2, 4),
        "dropout": 0.0,
    },
    "longnet_small": {
        "num_tokens": 256,
        "d_model": 512,
        "nhead": 8,
        "num_encoder_layers": 0,
        "num_decoder_layers": 8,
        "dim_feedforward": 2048,
        "segment_lengths": (512, 1024, 2048),
        "dilation_rates": (1, 2, 4),
        "dropout": 0.1,
    },
    "longnet_64k": {
        "num_tokens": 32000,
        "d_model": 768,
        "nhead": 12,
        "num_encoder_layers": 0,
        "num_decoder_layers": 12,
        "dim_feedforward": 3072,
        "segment_lengths": (2048, 8192, 32768, 65536),
        "dilation_rates": (1, 4, 16, 32),
        "dropout": 0.0,
    },
    "longnet_1m": {
        "num_tokens": 32000,
        "d_model": 1024,
        "nhead": 16,
        "num_encoder_layers": 0,
        "num_decoder_layers": 24,
        "dim_feedforward": 4096,
        "segment_lengths": (4096, 16384, 65536, 262144, 1048576),
        "dilation_rates": (1, 4, 16, 64, 256),
        "dropout": 0.0,
    },
}
"""Named decoder-only model sizes, ``LongNetConfig`` fields by name (``num_tokens`` is 256,
bytes, for the small ones). Parameter counts are on the dilated-longnet docs page."""
