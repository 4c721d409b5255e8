"""Configs: frozen, normalised to tuples, every bad field named in its error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dilated.core import (
    DilatedAttentionConfig,
    DistributedConfig,
    MemoryPoolConfig,
    MultiheadConfig,
    RingAttentionConfig,
    RingDistributedConfig,
    SparseAttentionConfig,
)


def test_dilated_config_normalises_and_freezes() -> None:
    c = DilatedAttentionConfig([2048, 4096], [1, 2])
    assert c.segment_lengths == (2048, 4096) and c.dilation_rates == (1, 2)
    assert c.num_branches == 2 and c.max_segment_length == 4096
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dropout = 0.5  # type: ignore[misc]
    assert hash(c) == hash(DilatedAttentionConfig((2048, 4096), (1, 2)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segment_lengths": [8], "dilation_rates": [3]}, "multiple of"),
        ({"segment_lengths": [8], "dilation_rates": [1], "dropout": 1.5}, "dropout must be"),
        ({"segment_lengths": [8], "dilation_rates": [1], "scale": -1.0}, "scale must be"),
        (
            {"segment_lengths": [8], "dilation_rates": [1], "is_causal": 1},
            "is_causal must be a bool",
        ),
    ],
)
def test_dilated_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DilatedAttentionConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"embed_dim": 100, "num_heads": 3},
            r"embed_dim \(100\) must be divisible by num_heads \(3\)",
        ),
        ({"embed_dim": 0, "num_heads": 1}, "embed_dim must be a positive integer"),
        ({"embed_dim": 64, "num_heads": 8, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"embed_dim": 64, "num_heads": 8, "gamma_init": 0.0}, "gamma_init must be"),
        ({"embed_dim": 64, "num_heads": 8, "layer_norm_eps": -1.0}, "layer_norm_eps must be"),
        ({"embed_dim": 64, "num_heads": 8, "dtype": torch.int32}, "dtype must be a floating"),
    ],
)
def test_multihead_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiheadConfig(**kwargs)  # type: ignore[arg-type]


def test_multihead_derived() -> None:
    c = MultiheadConfig(embed_dim=768, num_heads=12, num_kv_heads=4)
    assert c.head_dim == 64 and c.kv_heads == 4
    assert MultiheadConfig(embed_dim=64, num_heads=8).kv_heads == 8


def test_other_configs() -> None:
    assert RingAttentionConfig(segment_lengths=[2048, 4096, 8192]).dilation_rates == (1, 1, 1)
    assert RingAttentionConfig([8, 16], [1, 2]).dilation_rates == (1, 2)
    with pytest.raises(ValueError, match="load_balance"):
        RingAttentionConfig([8], [1], load_balance="spiral")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strategy"):
        DistributedConfig(strategy="tree")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="world_size"):
        DistributedConfig(world_size=0)
    with pytest.raises(ValueError, match="timeout_s"):
        DistributedConfig(timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryPoolConfig(max_bytes=-1)
    with pytest.raises(ValueError, match="block_size"):
        SparseAttentionConfig(block_size=0)
    with pytest.raises(ValueError, match="sparsity_ratio"):
        SparseAttentionConfig(sparsity_ratio=0.0)
    composed = RingDistributedConfig(
        multihead_config=MultiheadConfig(embed_dim=768, num_heads=12),
        ring_config=RingAttentionConfig(segment_lengths=[2048, 4096, 8192]),
        distributed_config=DistributedConfig(world_size=4),
    )
    assert composed.distributed_config.world_size == 4
    with pytest.raises(ValueError, match="ring_config must be a RingAttentionConfig"):
        RingDistributedConfig(MultiheadConfig(64, 8), DilatedAttentionConfig([8], [1]))  # type: ignore[arg-type]
