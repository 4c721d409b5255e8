"""dilated-ring's modules receive every setting in their constructor, and the layers built from a
``RingDistributedConfig`` (``DistributedLayer``) hand the config's settings to their attention."""

from __future__ import annotations

import pytest
import torch

from dilated.core.base import attention_settings
from dilated.core.config import (
    DistributedConfig,
    MultiheadConfig,
    RingAttentionConfig,
    RingDistributedConfig,
)
from dilated.core.registry import create_multihead_dilated_attention
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.ring import (
    DistributedImprovedDilatedAttention,
    DistributedImprovedMultiheadDilatedAttention,
    RingDilatedAttention,
    RingDistributedDilatedAttention,
    RingMultiheadDilatedAttention,
    shard,
    unshard,
)
from dilated.ring.loopback import LoopbackGroup, run_ranks
from dilated.ring.modules import DistributedLayer

RING_SETTINGS = ("group", "load_balance", "strategy", "timeout_s", "check_finite")


def test_the_settings_of_the_ring_attentions() -> None:
    assert attention_settings(RingDilatedAttention) == RING_SETTINGS
    assert attention_settings(DistributedImprovedDilatedAttention) == RING_SETTINGS


@pytest.mark.parametrize(
    ("cls", "default_strategy"),
    [
        (RingMultiheadDilatedAttention, "ring"),
        (DistributedImprovedMultiheadDilatedAttention, "allgather"),
    ],
)
def test_multihead_layers_build_their_attention_with_the_settings(
    cls: type[RingMultiheadDilatedAttention], default_strategy: str
) -> None:
    plain = cls(16, 2, [1, 2], [4, 8])
    inner = plain.attention
    assert isinstance(inner, RingDilatedAttention)
    assert (inner.group, inner.load_balance, inner.strategy, inner.timeout_s) == (
        None, "contiguous", default_strategy, None,
    )  # fmt: skip
    hub_group = run_ranks(lambda rank, group: group, 1)[0]
    layer = cls(
        16, 2, [1, 2], [4, 8],
        group=hub_group, load_balance="zigzag", strategy="ulysses", timeout_s=5.0,
        check_finite=True,
    )  # fmt: skip
    inner = layer.attention
    assert isinstance(inner, RingDilatedAttention)
    assert (inner.group, inner.load_balance, inner.strategy, inner.timeout_s) == (
        hub_group, "zigzag", "ulysses", 5.0,
    )  # fmt: skip
    assert inner.check_finite is True


def test_ring_multihead_reads_and_overrides_the_config_load_balance() -> None:
    mc = MultiheadConfig(embed_dim=16, num_heads=2)
    from_config = RingMultiheadDilatedAttention(
        mc, RingAttentionConfig(segment_lengths=(4, 8), load_balance="striped")
    )
    assert from_config.load_balance == "striped" and from_config.group is None
    given = RingMultiheadDilatedAttention(
        mc, RingAttentionConfig(segment_lengths=(4, 8)), load_balance="zigzag"
    )
    assert given.load_balance == "zigzag"


def test_ring_multihead_refuses_an_unknown_setting() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) stratgy; .*strategy"):
        RingMultiheadDilatedAttention(16, 2, [1], [4], stratgy="ring")
    with pytest.raises(TypeError, match="backend"):
        create_multihead_dilated_attention(
            "ring", embed_dim=16, num_heads=2, segment_lengths=[4], dilation_rates=[1], backend="x"
        )


def test_the_factory_hands_settings_through() -> None:
    layer = create_multihead_dilated_attention(
        "ring", embed_dim=16, num_heads=2, segment_lengths=[4], dilation_rates=[1],
        strategy="allgather", timeout_s=7.0,
    )  # fmt: skip
    inner = layer.attention
    assert isinstance(inner, RingDilatedAttention)
    assert (inner.strategy, inner.timeout_s) == ("allgather", 7.0)


def _config(strategy: str, mode: str, checkpoint: bool = False) -> RingDistributedConfig:
    ring = RingAttentionConfig((8, 16), (1, 2), load_balance=mode, checkpoint=checkpoint)  # type: ignore[arg-type]
    return RingDistributedConfig(
        MultiheadConfig(embed_dim=16, num_heads=4, num_kv_heads=2, dtype=torch.float64),
        ring,
        DistributedConfig(strategy=strategy, timeout_s=60.0),  # type: ignore[arg-type]
    )


def test_ring_distributed_layer_is_a_distributed_layer_with_the_config_settings() -> None:
    layer = RingDistributedDilatedAttention(_config("allgather", "zigzag"), check_finite=False)
    assert isinstance(layer, DistributedLayer)
    inner = layer.layer.attention
    assert isinstance(inner, RingDilatedAttention)
    assert (inner.group, inner.load_balance, inner.strategy, inner.timeout_s) == (
        None, "zigzag", "allgather", 60.0,
    )  # fmt: skip
    assert inner.check_finite is False
    with pytest.raises(ValueError, match="config must be a RingDistributedConfig, got dict"):
        RingDistributedDilatedAttention({})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("strategy", "mode", "causal", "padding", "checkpoint"),
    [
        ("ring", "contiguous", True, False, False),
        ("allgather", "zigzag", True, True, True),
        ("ulysses", "striped", False, True, False),
        ("ring", "striped", False, False, True),
    ],
)
def test_ring_distributed_layer_over_two_ranks_matches_the_judge(
    strategy: str, mode: str, causal: bool, padding: bool, checkpoint: bool
) -> None:
    """Each rank's layer gets the group in its constructor; the shards put together equal the
    dense float64 judge on the whole sequence (output and input gradient)."""
    world, seq = 2, 32
    config = _config(strategy, mode, checkpoint=checkpoint)
    torch.manual_seed(0)
    reference = RingDistributedDilatedAttention(config)
    state = reference.state_dict()
    x = torch.randn(2, seq, 16, dtype=torch.float64)
    mask = make_inputs(2, seq, 1, 1, padding=True, seed=3).key_padding_mask if padding else None
    grad = torch.randn(2, seq, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, torch.Tensor]:
        layer = RingDistributedDilatedAttention(config, group=group)
        layer.load_state_dict(state)
        xs = shard(x, rank, world, mode).requires_grad_()
        ms = None if mask is None else shard(mask, rank, world, mode)
        out, none = layer(xs, xs, xs, is_causal=causal, key_padding_mask=ms)
        assert none is None
        out.backward(shard(grad, rank, world, mode))
        assert xs.grad is not None
        return out.detach(), xs.grad

    results = run_ranks(rank_fn, world, timeout_s=120.0)
    out = unshard([r[0] for r in results], mode)
    dx = unshard([r[1] for r in results], mode)

    mha = reference.layer
    xr = x.clone().requires_grad_()
    q, k, v = mha.project_inputs(xr, xr, xr)
    heads, _ = dense_dilated_attention(
        q, k, v, [8, 16], [1, 2], is_causal=causal, key_padding_mask=mask
    )
    want = mha.project_output(heads)
    want.backward(grad)
    assert xr.grad is not None
    assert_close_to_reference(out, want.detach(), torch.float64, "out")
    assert_close_to_reference(dx, xr.grad, torch.float64, "dx")
