"""dilated-ring in one process (no process group): sharding, cost model, modules, registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.config import RingAttentionConfig
from dilated.core.registry import create_multihead_dilated_attention, get_implementation
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.ring import (
    RingDilatedAttention,
    comm_cost,
    create_ring_distributed_attention,
    positions,
    ring_dilated_attention,
    shard,
    unshard,
)


@pytest.mark.parametrize("mode", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_unshard_round_trip(mode: str, world: int) -> None:
    x = torch.arange(2 * 32).view(2, 32)
    parts = [shard(x, r, world, mode) for r in range(world)]
    assert all(p.shape == (2, 32 // world) for p in parts)
    assert torch.equal(unshard(parts, mode), x)
    allpos = torch.cat([positions(32, r, world, mode) for r in range(world)])
    assert sorted(allpos.tolist()) == list(range(32))


def test_zigzag_positions_balance_causal_work() -> None:
    # rank 0 holds the first and the last chunk of 2P chunks.
    assert positions(16, 0, 2, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert positions(8, 1, 4, "striped").tolist() == [1, 5]


def test_world_size_must_divide_sequence() -> None:
    with pytest.raises(ValueError, match="divisible by 3"):
        shard(torch.zeros(1, 10), 0, 3)
    with pytest.raises(ValueError, match="2 \\* world_size"):
        positions(12, 0, 4, "zigzag")


def test_cost_model_closed_form() -> None:
    # n=64, P=4 (s=16), h=4, d=8, bf16; branch (32, 2) spans G=2 ranks, (8, 1) is local.
    cost = comm_cost(64, 4, 4, 8, [8, 32], [1, 2], torch.bfloat16)
    e_rows = 2 * (16 // 2) * 4 * 8  # K and V phase rows: 2 * s/r * h * d elements
    assert cost.forward_bytes == 1 * e_rows * 2
    assert cost.backward_bytes == 1 * e_rows * 2 + 2 * e_rows * 4
    ag = comm_cost(64, 4, 4, 8, [8, 32], [1, 2], torch.bfloat16, strategy="allgather")
    assert ag.backward_bytes == e_rows * 2 + e_rows * 4
    assert comm_cost(64, 1, 4, 8, [8, 64], [1, 2]).total_bytes == 0


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from([([4, 8], [1, 2]), ([16], [4]), ([2, 8, 16], [1, 2, 8])]),
    st.booleans(),
    st.sampled_from([(4, 4), (4, 2), (2, 1)]),
    st.integers(0, 100),
)
def test_world_of_one_matches_reference(
    branches: tuple[list[int], list[int]], causal: bool, heads: tuple[int, int], seed: int
) -> None:
    ws, rs = branches
    x = make_inputs(2, 16, heads[0], 8, kv_heads=heads[1], requires_grad=True, seed=seed)
    out = ring_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=causal)
    assert isinstance(out, torch.Tensor)
    ref, _ = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=causal)
    g = torch.randn_like(out)
    assert_close_to_reference(out, ref, torch.float32)
    for name, a, e in zip(
        "qkv",
        torch.autograd.grad(out, (x.q, x.k, x.v), g),
        torch.autograd.grad(ref, (x.q, x.k, x.v), g.double()),
    ):
        assert_close_to_reference(a, e, torch.float32, f"d{name}")


def test_bad_arguments_are_rejected() -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ring_dilated_attention(
            q, q, q, [4], [1], key_padding_mask=torch.ones(1, 8, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="dropout_p"):
        ring_dilated_attention(q, q, q, [4], [1], dropout_p=0.1)
    with pytest.raises(ValueError, match="strategy"):
        ring_dilated_attention(q, q, q, [4], [1], strategy="ulysses")
    with pytest.raises(ValueError, match="ulysses"):
        create_ring_distributed_attention(8, 2, [4], [1], strategy="ulysses")


def test_modules_and_registry() -> None:
    for kind in ("ring", "distributed", "ring_distributed"):
        impl = get_implementation(kind)
        assert impl.distributed and impl.package == "dilated-ring"
        layer = create_multihead_dilated_attention(
            kind, embed_dim=16, num_heads=2, dilation_rates=[1, 2], segment_lengths=[4, 8]
        )
        x = torch.randn(1, 16, 16)
        assert layer(x, x, x)[0].shape == x.shape
    attn = RingDilatedAttention(RingAttentionConfig(segment_lengths=(4, 8), load_balance="zigzag"))
    assert attn.load_balance == "zigzag" and attn.dilation_rates == (1, 1)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ring_distributed_layer_gradients(checkpoint: bool) -> None:
    torch.manual_seed(0)
    layer = create_ring_distributed_attention(16, 4, [4, 8], [1, 2], checkpoint=checkpoint)
    x = torch.randn(2, 16, 16, requires_grad=True)
    out, _ = layer(x, x, x, is_causal=True)
    out.square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    # Same parameters, reference attention.
    from dilated.core.modules import MultiheadDilatedAttention

    ref = MultiheadDilatedAttention(16, 4, [1, 2], [4, 8])
    ref.load_state_dict(layer.layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    out2, _ = ref(x2, x2, x2, is_causal=True)
    out2.square().sum().backward()
    assert_close_to_reference(out, out2, torch.float32)
    assert x2.grad is not None
    assert_close_to_reference(x.grad, x2.grad, torch.float32, "dx")
