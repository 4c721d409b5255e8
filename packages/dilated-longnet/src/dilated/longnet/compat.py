"""The construction and call forms of dilated-attention-pytorch 0.2.0 that the layers and models
still accept: their positional arguments turned into the frozen configs, and the warning that
points at a deprecated call."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from dilated.core.presets import DEFAULT_PRESET, PRESETS
from dilated.longnet.config import LongNetConfig, TransformerLayerConfig

__all__ = [
    "MODEL_POSITIONAL",
    "NOT_GIVEN",
    "layer_config_from_args",
    "model_config_from_args",
    "model_defaults",
    "warn_old_call",
]

#: Default of ``tgt_mask``/``memory_mask``: tells a call of ``torch.nn.TransformerDecoder``
#: (which always passes them) from a direct call.
NOT_GIVEN: Any = object()

#: The positional order of ``LongNet`` in dilated-attention-pytorch 0.2.0 (``LongNetLM`` put
#: ``num_tokens`` first). ``device`` and ``dtype`` came last.
MODEL_POSITIONAL = (
    "d_model",
    "nhead",
    "num_encoder_layers",
    "num_decoder_layers",
    "dim_feedforward",
    "segment_lengths",
    "dilation_rates",
    "dropout",
    "activation",
    "layer_norm_eps",
    "device",
    "dtype",
)


def warn_old_call(message: str) -> None:
    """A ``DeprecationWarning`` about a dilated-attention-pytorch 0.2.0 call shape, pointing at
    the code that called a module's ``forward`` (past ``nn.Module.__call__``)."""
    warnings.warn(message, DeprecationWarning, stacklevel=5)


def layer_config_from_args(
    config: TransformerLayerConfig | int,
    nhead: int | None,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    **kwargs: Any,
) -> TransformerLayerConfig:
    """A layer's config: ``config`` itself, or one built from ``d_model`` (in its place) and the
    layer's keywords."""
    if isinstance(config, TransformerLayerConfig):
        if nhead is not None or segment_lengths is not None or dilation_rates is not None:
            raise ValueError("pass either a TransformerLayerConfig or the layer's keywords")
        return config
    if nhead is None or segment_lengths is None or dilation_rates is None:
        raise ValueError("d_model, nhead, segment_lengths and dilation_rates are required")
    # Handed over as given: the config refuses sets, ints and generators by name.
    return TransformerLayerConfig(
        d_model=config,
        nhead=nhead,
        segment_lengths=segment_lengths,  # type: ignore[arg-type]
        dilation_rates=dilation_rates,  # type: ignore[arg-type]
        **kwargs,
    )


def model_defaults(num_encoder_layers: int) -> dict[str, Any]:
    """What 0.2.0 filled in for the keywords left out: its base sizes (768 wide, 12 heads,
    12 layers, 3072 feed-forward, no dropout), with the branches of the default preset."""
    preset = PRESETS[DEFAULT_PRESET]
    return {
        "d_model": preset.embed_dim,
        "nhead": preset.num_heads,
        "num_encoder_layers": num_encoder_layers,
        "num_decoder_layers": 12,
        "dim_feedforward": 3072,
        "segment_lengths": preset.segment_lengths,
        "dilation_rates": preset.dilation_rates,
        "dropout": 0.0,
    }


def model_config_from_args(
    config: LongNetConfig | int | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    names: tuple[str, ...],
    defaults: dict[str, Any],
    device: Any = None,
    dtype: Any = None,
) -> tuple[LongNetConfig, dict[str, Any]]:
    """The model's config and its ``device``/``dtype``, from a config or from 0.2.0-style
    positional and keyword arguments (``names`` gives the positional order; ``device`` and
    ``dtype`` are the model's keywords, None when not given)."""
    kwargs = {
        **kwargs,
        **{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None},
    }
    factory: dict[str, Any] = {k: kwargs.pop(k) for k in ("device", "dtype") if k in kwargs}
    if isinstance(config, LongNetConfig):
        if args or kwargs:
            raise ValueError(
                "pass either a LongNetConfig or the model's arguments, not both (got "
                f"{len(args)} positional and {sorted(kwargs)})"
            )
        return config, factory
    if config is not None and (isinstance(config, bool) or not isinstance(config, int)):
        raise TypeError(
            f"the first argument must be a LongNetConfig or {names[0]} (an int), got "
            f"{type(config).__name__}"
        )
    if config is None and args:
        raise TypeError(f"the first positional argument ({names[0]}) must not be None")
    given = () if config is None else (config, *args)
    if len(given) > len(names):
        raise TypeError(f"at most {len(names)} positional arguments ({', '.join(names)})")
    for name, value in zip(names, given):
        if name in kwargs or name in factory:
            raise TypeError(f"{name} given both positionally and as a keyword")
        (factory if name in ("device", "dtype") else kwargs)[name] = value
    return LongNetConfig(**{**defaults, **kwargs}), factory
