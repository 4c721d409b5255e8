"""dilated-ring in one process (no process group): sharding, cost model, modules, registry."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.config import RingAttentionConfig
from dilated.core.registry import create_multihead_dilated_attention, get_implementation
from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    dense_dilated_attention,
    make_inputs,
)
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
    # Ulysses: q, k, v and out each send (P - 1)/P of their (b, s, heads, d) shard.
    ul = comm_cost(64, 4, 4, 8, [8, 32], [1, 2], torch.bfloat16, kv_heads=4, strategy="ulysses")
    shard_elems = 16 * 8  # s * d per head
    assert ul.forward_bytes == ul.backward_bytes == 4 * (16 * 4 * 8) * 3 // 4 * 2
    # kv heads 2 do not split over 4 ranks: they travel repeated to 4 heads (same bytes)...
    assert comm_cost(64, 4, 4, 8, [8], [1], kv_heads=2, strategy="ulysses") == ul
    # ...but 2 kv heads over 2 ranks split: q and out (4 heads) + k, v (2 heads) per pass.
    ul2 = comm_cost(64, 2, 4, 8, [8], [1], torch.float32, kv_heads=2, strategy="ulysses")
    assert ul2.forward_bytes == (2 * 4 + 2 * 2) * (32 * 8) // 2 * 4
    assert shard_elems == 128
    # A key padding mask: one byte per token of the shard to each of the P - 1 peers, forward.
    masked = comm_cost(64, 4, 4, 8, [8, 32], [1, 2], torch.bfloat16, key_padding_mask=True)
    assert masked.forward_bytes == cost.forward_bytes + 3 * 16
    assert masked.backward_bytes == cost.backward_bytes


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from([([4, 8], [1, 2]), ([16], [4]), ([2, 8, 16], [1, 2, 8])]),
    st.booleans(),
    st.sampled_from([(4, 4), (4, 2), (2, 1)]),
    st.integers(0, 100),
    st.sampled_from(["ring", "allgather", "ulysses"]),
    st.booleans(),
)
def test_world_of_one_matches_reference(
    branches: tuple[list[int], list[int]],
    causal: bool,
    heads: tuple[int, int],
    seed: int,
    strategy: str,
    masked: bool,
) -> None:
    ws, rs = branches
    x = make_inputs(2, 16, heads[0], 8, kv_heads=heads[1], requires_grad=True, seed=seed)
    mask = (
        torch.rand(2, 16, generator=torch.Generator().manual_seed(seed)) > 0.3 if masked else None
    )
    out = ring_dilated_attention(
        x.q, x.k, x.v, ws, rs, is_causal=causal, strategy=strategy, key_padding_mask=mask
    )
    assert isinstance(out, torch.Tensor)
    ref, _ = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=causal, key_padding_mask=mask)
    g = torch.randn_like(out)
    assert_close_to_reference(out, ref, torch.float32)
    for name, a, e in zip(
        "qkv",
        torch.autograd.grad(out, (x.q, x.k, x.v), g),
        torch.autograd.grad(ref, (x.q, x.k, x.v), g.double()),
    ):
        assert_close_to_reference(a, e, torch.float32, f"d{name}")


@pytest.mark.parametrize(
    ("heads", "kv_heads", "world"), [(8, 4, 4), (6, 3, 3), (8, 8, 2), (4, 2, 4), (6, 6, 2)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_ulysses_head_slices_use_global_phases(
    heads: int, kv_heads: int, world: int, causal: bool
) -> None:
    """What each Ulysses rank computes (its heads, whole sequence, global phases) equals those
    heads of the reference, forward and backward; rates 3 and 4 make local != global phases."""
    from dilated.ring.ulysses import global_phase_attention, ulysses_kv_heads

    ws, rs = [6, 12, 24], [1, 3, 4]
    x = make_inputs(2, 24, heads, 8, kv_heads=kv_heads, dtype=torch.float64, requires_grad=True)
    # global_phase_attention takes the internal form (True = a key that may be attended); the
    # judge, like every public op, PyTorch's (True = padding).
    mask = torch.rand(2, 24, generator=torch.Generator().manual_seed(3)) > 0.3
    ref, ref_lse = dense_dilated_attention(
        x.q, x.k, x.v, ws, rs, is_causal=causal, key_padding_mask=~mask
    )
    hl = heads // world
    sent = ulysses_kv_heads(heads, kv_heads, world)
    k, v = (t.repeat_interleave(sent // kv_heads, dim=2) for t in (x.k, x.v))
    outs = []
    for rank in range(world):
        kv = slice(rank * sent // world, (rank + 1) * sent // world)
        q_h = x.q[:, :, rank * hl : (rank + 1) * hl]
        out, lse = global_phase_attention(
            q_h,
            k[:, :, kv],
            v[:, :, kv],
            tuple(ws),
            tuple(rs),
            rank * hl,
            scale=8**-0.5,
            is_causal=causal,
            key_padding_mask=mask,
            dropout_p=0.0,
        )
        # -inf (a query with no key) must match too, which a relative error cannot judge.
        torch.testing.assert_close(lse, ref_lse[:, rank * hl : (rank + 1) * hl].to(lse.dtype))
        outs.append(out)
    out = torch.cat(outs, dim=2)
    assert_close_to_reference(out, ref, torch.float64)
    g = torch.randn_like(ref)
    for name, a, e in zip(
        "qkv",
        torch.autograd.grad(out, (x.q, x.k, x.v), g),
        torch.autograd.grad(ref, (x.q, x.k, x.v), g),
    ):
        assert_close_to_reference(a, e, torch.float64, f"d{name}")


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_dropout_is_seeded_and_its_gradient_is_the_derivative(strategy: str) -> None:
    """Dropout on every strategy: reproducible under ``torch.manual_seed``, really dropping,
    and the backward pass replays the forward's masks (central difference of the same draw)."""
    x = make_inputs(1, 16, 4, 8, kv_heads=2, dtype=torch.float64, seed=5)
    ins = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
    direction = [torch.randn_like(t) for t in ins]
    g = torch.randn_like(x.q)

    def value(eps: float) -> torch.Tensor:
        torch.manual_seed(11)
        moved = [t + eps * d for t, d in zip(ins, direction)]
        out = ring_dilated_attention(
            *moved, [4, 16], [1, 2], is_causal=True, dropout_p=0.4, strategy=strategy
        )
        assert isinstance(out, torch.Tensor)
        return (out * g).sum()

    base = value(0.0)
    assert torch.equal(base, value(0.0))
    no_drop = ring_dilated_attention(*ins, [4, 16], [1, 2], is_causal=True, strategy=strategy)
    assert isinstance(no_drop, torch.Tensor)
    assert not torch.allclose(base, (no_drop * g).sum())
    grads = torch.autograd.grad(base, ins)
    eps = 1e-6
    numeric = (value(eps) - value(-eps)).item() / (2 * eps)
    analytic = sum((gr * d).sum().item() for gr, d in zip(grads, direction))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_bad_arguments_are_rejected() -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ring_dilated_attention(
            q, q, q, [4], [1], key_padding_mask=torch.ones(1, 9, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="strategy"):
        ring_dilated_attention(q, q, q, [4], [1], strategy="tree")
    for bad in (0, -1.0, float("inf"), float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout_s"):
            ring_dilated_attention(q, q, q, [4], [1], timeout_s=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strategy"):
        create_ring_distributed_attention(8, 2, [4], [1], strategy="tree")
    with pytest.raises(ValueError, match="timeout_s"):
        create_ring_distributed_attention(8, 2, [4], [1], timeout_s=-1.0)


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


@pytest.mark.parametrize(
    ("checkpoint", "strategy"), [(False, "ring"), (True, "ring"), (True, "ulysses")]
)
def test_ring_distributed_layer_gradients(checkpoint: bool, strategy: str) -> None:
    torch.manual_seed(0)
    layer = create_ring_distributed_attention(
        16, 4, [4, 8], [1, 2], checkpoint=checkpoint, strategy=strategy, timeout_s=30.0
    )
    inner = layer.layer.attention
    assert isinstance(inner, RingDilatedAttention)
    assert (inner.strategy, inner.timeout_s) == (strategy, 30.0)
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


@pytest.mark.parametrize("causal", [False, True])
def test_checkpointed_attention_matches_the_layer(causal: bool) -> None:
    from dilated.ring import RingMultiheadDilatedAttention
    from dilated.ring.deepspeed import CheckpointedAttention

    torch.manual_seed(0)
    layer = RingMultiheadDilatedAttention(16, 4, [1, 2], [4, 8])
    wrapped = CheckpointedAttention(layer, use_deepspeed=False)
    x = torch.randn(2, 16, 16, requires_grad=True)
    out, none = wrapped(x, x, x, is_causal=causal)
    assert none is None
    ref, _ = layer(x, x, x, is_causal=causal)
    assert_close_to_reference(out, ref, torch.float32)
    g = torch.randn_like(out)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close_to_reference(a, e, torch.float32, f"grad {i}")
    with torch.no_grad():
        assert_close_to_reference(wrapped(x, x, x, is_causal=causal)[0], ref, torch.float32)


def test_sequence_parallel_groups_need_a_process_group() -> None:
    from dilated.ring.deepspeed import sequence_parallel_groups

    with pytest.raises(ValueError, match="initialised default process group"):
        sequence_parallel_groups(2)


def test_distributed_config_world_size_is_checked() -> None:
    from dilated.core.config import (
        DistributedConfig,
        MultiheadConfig,
        RingAttentionConfig,
        RingDistributedConfig,
    )
    from dilated.ring import RingDistributedDilatedAttention

    config = RingDistributedConfig(
        MultiheadConfig(embed_dim=8, num_heads=2),
        RingAttentionConfig(segment_lengths=(4,)),
        DistributedConfig(world_size=2),
    )
    layer = RingDistributedDilatedAttention(config)
    x = torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="world_size=2 but the process group has 1"):
        layer(x, x, x)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize(("seq", "ws", "rs"), [(96, [64, 128], [1, 2]), (77, [16, 40], [1, 4])])
def test_world_of_one_takes_any_length(
    strategy: str, seq: int, ws: list[int], rs: list[int]
) -> None:
    """A world of one holds the whole sequence: short last segments and segments longer than the
    sequence are fine, exactly as in the single-process op."""
    check_on_random_inputs(
        functools.partial(ring_dilated_attention, strategy=strategy, return_lse=True),
        2, seq, 4, 8, ws, rs, kv_heads=2, is_causal=True, padding=True, dtype=torch.float64,
    )  # fmt: skip


def test_every_module_takes_check_finite() -> None:
    """``check_finite`` (documented on every module) reaches the functional's NaN/Inf check."""
    from dilated.core.config import DistributedConfig, MultiheadConfig, RingDistributedConfig
    from dilated.core.testing.invalid import assert_honours_check_finite
    from dilated.ring import (
        DistributedImprovedDilatedAttention,
        RingDistributedDilatedAttention,
        RingMultiheadDilatedAttention,
    )

    q = torch.randn(1, 8, 2, 4)
    bad = q.clone()
    bad[0, 3, 1, 2] = float("nan")
    config = RingDistributedConfig(
        MultiheadConfig(embed_dim=8, num_heads=2),
        RingAttentionConfig(segment_lengths=(4,)),
        DistributedConfig(),
    )
    x = torch.randn(1, 8, 8)
    x_bad = x.clone()
    x_bad[0, 2, 5] = float("nan")  # the projections carry it into q, k and v
    for attention in (RingDilatedAttention, DistributedImprovedDilatedAttention):
        assert_honours_check_finite(
            lambda flag, cls=attention: cls([4], [1], check_finite=flag), (q, q, q), (bad, q, q)
        )
    for build in (
        lambda flag: RingMultiheadDilatedAttention(8, 2, [1], [4], check_finite=flag),
        lambda flag: RingDistributedDilatedAttention(config, check_finite=flag),
        lambda flag: create_ring_distributed_attention(8, 2, [4], [1], check_finite=flag),
    ):
        assert_honours_check_finite(build, (x, x, x), (x_bad, x, x))


def test_ring_modules_refuse_a_packed_batch() -> None:
    from dilated.ring import RingDilatedAttention

    x = make_inputs(1, 16, 2, 8, seed=0)
    with pytest.raises(ValueError, match="shards the sequence across ranks, so cu_seqlens"):
        RingDilatedAttention([8], [1])(x.q, x.k, x.v, cu_seqlens=[0, 8, 16])
