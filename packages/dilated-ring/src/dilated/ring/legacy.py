"""dilated-attention-pytorch's keyword form of ``RingDistributedDilatedAttention``, as a config.

[`config_from_keywords`][dilated.ring.legacy.config_from_keywords] maps the keywords of
dilated-attention-pytorch's layer onto a [`RingDistributedConfig`][dilated.core.config.RingDistributedConfig]:
renamed ones to their fields, and those with no counterpart here accepted with a
``DeprecationWarning`` that says why they have no effect.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from dilated.core.config import (
    DistributedConfig,
    MultiheadConfig,
    RingAttentionConfig,
    RingDistributedConfig,
)
from dilated.core.presets import DEFAULT_PRESET, PRESETS

__all__ = ["config_from_keywords"]

#: Keywords of dilated-attention-pytorch's ``RingDistributedDilatedAttention`` that have no
#: counterpart here, with the reason; each is accepted with a ``DeprecationWarning`` and ignored.
_IGNORED_KEYWORDS = {
    "block_size": "the ring works on whole segments and phase rows; there is no block size",
    "enable_deepspeed": "DeepSpeed needs no switch in the layer (see dilated.ring.deepspeed)",
    "use_deepspeed": "DeepSpeed needs no switch in the layer (see dilated.ring.deepspeed)",
    "zero_stage": "ZeRO is configured in the DeepSpeed engine, not in the layer",
    "cpu_offload": "offloading is configured in the DeepSpeed engine, not in the layer",
    "use_flash_attention": "the attention backend is chosen per call (dilated-kernels)",
    "use_tf32": "float32 products are never rounded to tf32",
    "sequence_parallel": "the layer is always sequence parallel",
    "enable_monitoring": "there is no monitoring layer",
}
#: Renamed keywords: old name -> (config, field).
_RENAMED_KEYWORDS = {
    "ring_size": ("distributed_config", "world_size"),
    "use_checkpointing": ("ring_config", "checkpoint"),
    "activation_checkpointing": ("ring_config", "checkpoint"),
}


def config_from_keywords(
    embed_dim: int,
    num_heads: int,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    legacy: dict[str, Any],
) -> RingDistributedConfig:
    """The config of dilated-attention-pytorch's keyword form (see
    [`RingDistributedDilatedAttention`][dilated.ring.modules.RingDistributedDilatedAttention])."""
    if segment_lengths is None and dilation_rates is None:
        preset = PRESETS[DEFAULT_PRESET]
        segment_lengths, dilation_rates = preset.segment_lengths, preset.dilation_rates
    elif segment_lengths is None or dilation_rates is None:
        raise ValueError("give segment_lengths and dilation_rates together (or neither)")
    parts: dict[str, dict[str, Any]] = {"ring_config": {}, "distributed_config": {}}
    for name in [n for n in legacy if n in _IGNORED_KEYWORDS]:
        legacy.pop(name)
        warnings.warn(
            f"RingDistributedDilatedAttention({name}=...) has no effect: {_IGNORED_KEYWORDS[name]}",
            DeprecationWarning,
            stacklevel=3,
        )
    for name in [n for n in legacy if n in _RENAMED_KEYWORDS]:
        part, field = _RENAMED_KEYWORDS[name]
        parts[part][field] = legacy.pop(name)
        cls = "DistributedConfig" if part == "distributed_config" else "RingAttentionConfig"
        warnings.warn(
            f"RingDistributedDilatedAttention({name}=...) is {cls}({field}=...) here",
            DeprecationWarning,
            stacklevel=3,
        )
    multihead_fields = {"dropout", "bias", "layer_norm", "layer_norm_eps", "gamma_init"}
    multihead_fields |= {"device", "dtype", "num_kv_heads"}
    unknown = sorted(set(legacy) - multihead_fields)
    if unknown:
        raise TypeError(f"RingDistributedDilatedAttention got unexpected keyword(s) {unknown}")
    dropout = legacy.pop("dropout", 0.0)
    return RingDistributedConfig(
        multihead_config=MultiheadConfig(embed_dim=embed_dim, num_heads=num_heads, **legacy),
        ring_config=RingAttentionConfig(
            segment_lengths=segment_lengths,  # type: ignore[arg-type]  # the config checks it
            dilation_rates=dilation_rates,  # type: ignore[arg-type]
            dropout=dropout,
            **parts["ring_config"],
        ),
        distributed_config=DistributedConfig(**parts["distributed_config"]),
    )
