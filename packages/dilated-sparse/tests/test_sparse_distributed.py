"""The distributed block-sparse op on 1, 2 and 4 in-process ranks (dilated.ring's loopback).

Each rank's output and q/k/v gradients must be its rows of the single-process op on the whole
sequence (float64, tolerance 1e-4 relative as everywhere), and the bytes each rank sends must be
those of the cost model, fewer than the dense layout needs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dilated.core import DilatedAttentionConfig, SparsePatternConfig
from dilated.core.sparsity import resolve_layouts
from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    dense_block_sparse_attention,
    make_inputs,
)
from dilated.kernels import flash4_block_sparse
from dilated.ring.loopback import LoopbackGroup, run_ranks
from dilated.sparse import (
    DistributedBlockSparseDilatedAttention,
    block_sparse_dilated_attention,
    block_sparse_ring_dilated_attention,
)
from dilated.sparse.block_body import Flash4SparseBody
from dilated.sparse.distributed import check_sharding, comm_bytes, sparse_ring_passes

SEQ = 64
# w=8 local on every world size here; w=32 spans 2 or 4 ranks; w=64 >= the whole sequence.
SEGMENTS, RATES = [8, 32, 64], [1, 2, 4]
CONFIGS = {
    "local_window": SparsePatternConfig("local_window", local_window_size=2, block_size=2),
    "global_local": SparsePatternConfig(
        "global_local", local_window_size=0, global_tokens=2, block_size=2
    ),
    "dilated_sparse": SparsePatternConfig("dilated_sparse", block_size=2),
    "custom": SparsePatternConfig("custom", block_size=2, layout=lambda a, b: (a + 2 * b) % 3 == 0),
    "dense": SparsePatternConfig("dense", block_size=2),
}


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = x.shape[1] // world
    return x[:, rank * size : (rank + 1) * size]


def _run(
    cfg: SparsePatternConfig, world: int, is_causal: bool, kv_heads: int, padding: bool = False,
    judge: bool = False,
) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...], list[tuple[int, int]]]:  # fmt: skip
    """Every rank's output and gradients, the single-process op's (``judge``: the dense float64
    judge's) and the bytes each rank sent forward and backward."""
    x = make_inputs(
        2, SEQ, 4, 8, kv_heads=kv_heads, dtype=torch.float64, seed=world, padding=padding
    )
    mask = x.key_padding_mask
    grad = torch.randn(
        2, SEQ, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, ...]:
        q, k, v = (_shard(t, rank, world).clone().requires_grad_() for t in (x.q, x.k, x.v))
        out = block_sparse_ring_dilated_attention(
            q, k, v, SEGMENTS, RATES, sparse_config=cfg, is_causal=is_causal, group=group,
            key_padding_mask=None if mask is None else _shard(mask, rank, world),
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        sent_forward = group.hub.bytes_sent[rank]
        out.backward(_shard(grad, rank, world))
        sent_total = group.hub.bytes_sent[rank]
        assert q.grad is not None and k.grad is not None and v.grad is not None
        counts = torch.tensor([sent_forward, sent_total - sent_forward])
        return out.detach(), q.grad, k.grad, v.grad, counts

    results = run_ranks(rank_fn, world, timeout_s=120.0)
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    if judge:
        ref, _ = dense_block_sparse_attention(
            q, k, v, SEGMENTS, RATES, sparse_config=cfg, is_causal=is_causal,
            key_padding_mask=mask,
        )  # fmt: skip
    else:
        ref = block_sparse_dilated_attention(
            q, k, v, SEGMENTS, RATES, sparse_config=cfg, is_causal=is_causal, key_padding_mask=mask
        )
    ref.backward(grad)
    assert q.grad is not None and k.grad is not None and v.grad is not None
    counts = [(int(r[4][0]), int(r[4][1])) for r in results]
    return [r[:4] for r in results], (ref.detach(), q.grad, k.grad, v.grad), counts


def _check_rows(
    ranks: list[tuple[torch.Tensor, ...]], want: tuple[torch.Tensor, ...], world: int
) -> None:
    """Each rank's output and gradients are its rows of ``want``'s."""
    for rank, got in enumerate(ranks):
        for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close_to_reference(
                g, _shard(w, rank, world), torch.float64, f"rank {rank} {what}"
            )


def _check_bytes(
    counts: list[tuple[int, int]], cfg: SparsePatternConfig, world: int, is_causal: bool,
    padding: bool,
) -> None:  # fmt: skip
    """Each rank sent the bytes of the cost model, forward and backward."""
    layouts = resolve_layouts(cfg, SEGMENTS, RATES)
    for rank, (fwd, bwd) in enumerate(counts):
        model = comm_bytes(
            layouts, cfg.block_size, world_size=world, rank=rank, shard=SEQ // world, batch=2,
            heads=4, kv_heads=2, head_dim=8, is_causal=is_causal, dtype=torch.float64,
            key_padding_mask=padding,
        )  # fmt: skip
        assert (fwd, bwd) == (model["forward"], model["backward"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize(("is_causal", "padding"), [(False, False), (True, False), (True, True)])
def test_shards_equal_the_single_process_op(
    name: str, world: int, is_causal: bool, padding: bool
) -> None:
    cfg = CONFIGS[name]
    ranks, want, counts = _run(cfg, world, is_causal, kv_heads=2, padding=padding)
    _check_rows(ranks, want, world)
    _check_bytes(counts, cfg, world, is_causal, padding)


@pytest.mark.usefixtures("emulated_flash4")
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("is_causal", "padding"), [(False, False), (True, True)])
def test_the_flash4_body_equals_the_judge(
    monkeypatch: pytest.MonkeyPatch, name: str, world: int, is_causal: bool, padding: bool
) -> None:
    """On the flash4 path (its flash-attn-4 calls run by the CPU stand-in, kernel blocks of 4
    rows against layout blocks of 2): the local branches on the shard and the spanning ones
    through the flash4 body give each rank its rows of the dense judge, forward and backward,
    with the bytes of the cost model (the same transfers as the tiles body)."""
    monkeypatch.setattr(flash4_block_sparse, "BLOCK", (4, 4))
    bodies: list[int] = []
    real = Flash4SparseBody.forward

    def counted(self: Flash4SparseBody, held: object) -> None:
        bodies.append(self.index)
        real(self, held)  # type: ignore[arg-type]

    monkeypatch.setattr(Flash4SparseBody, "forward", counted)
    cfg = CONFIGS[name]
    ranks, want, counts = _run(cfg, world, is_causal, kv_heads=2, padding=padding, judge=True)
    _check_rows(ranks, want, world)
    # Every rank runs the body once per spanning branch (w=64 always, w=32 on 4 ranks).
    spanning = [i for i, w in enumerate(SEGMENTS) if (SEQ // world) % w]
    assert sorted(bodies) == sorted(spanning * world), bodies
    _check_bytes(counts, cfg, world, is_causal, padding)


@pytest.mark.parametrize("world", [1, 4])
def test_passes_without_autograd_equal_the_op(world: int) -> None:
    """``sparse_ring_passes`` (both passes driven directly, for loopback ranks on CUDA) gives
    each rank what the op and autograd give it."""
    cfg = CONFIGS["global_local"]
    x = make_inputs(1, SEQ, 4, 8, kv_heads=2, dtype=torch.float64, seed=2, padding=True)
    grad = torch.randn(x.q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = x.key_padding_mask
    assert mask is not None

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, ...]:
        q, k, v, g, m = (_shard(t, rank, world) for t in (x.q, x.k, x.v, grad, mask))
        return sparse_ring_passes(
            q, k, v, g, SEGMENTS, RATES, sparse_config=cfg, is_causal=True,
            key_padding_mask=m, group=group, timeout_s=60.0,
        )  # fmt: skip

    got = [torch.cat(p, dim=1) for p in zip(*run_ranks(rank_fn, world, timeout_s=120.0))]
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    want, _ = dense_block_sparse_attention(
        q, k, v, SEGMENTS, RATES, sparse_config=cfg, is_causal=True, key_padding_mask=mask
    )
    want.backward(grad)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, (want, q.grad, k.grad, v.grad)):
        assert w is not None
        assert_close_to_reference(g, w, torch.float64, what)


def test_sparse_layouts_send_fewer_bytes_than_dense() -> None:
    def total(cfg: SparsePatternConfig) -> int:
        layouts = resolve_layouts(cfg, SEGMENTS, RATES)
        return sum(
            comm_bytes(
                layouts, 2, world_size=4, rank=rank, shard=SEQ // 4, batch=1, heads=4,
                kv_heads=4, head_dim=8, is_causal=False, dtype=torch.bfloat16,
            )["forward"]
            for rank in range(4)
        )  # fmt: skip

    dense = total(CONFIGS["dense"])
    assert 0 < total(CONFIGS["local_window"]) < dense
    assert total(CONFIGS["global_local"]) < dense
    # A diagonal layout needs no key of another rank at all.
    diagonal = SparsePatternConfig("local_window", local_window_size=0, block_size=2)
    assert total(diagonal) == 0


def test_module_and_bad_sharding() -> None:
    cfg = CONFIGS["local_window"]
    module = DistributedBlockSparseDilatedAttention(SEGMENTS, RATES, sparse_config=cfg)
    x = make_inputs(1, SEQ, 4, 8, seed=0)
    # A world of one (torch.distributed not initialised) is the single-process op.
    single = block_sparse_dilated_attention(x.q, x.k, x.v, SEGMENTS, RATES, sparse_config=cfg)
    assert torch.equal(module(x.q, x.k, x.v), single)
    layouts = resolve_layouts(cfg, [24], [1])
    with pytest.raises(ValueError, match=r"segment_lengths\[0\]=24"):
        check_sharding(layouts, 16, 4, 2)
    coarse = resolve_layouts(SparsePatternConfig("dense", block_size=16), [64], [2])
    with pytest.raises(ValueError, match="rate \\* block_size = 32"):
        check_sharding(coarse, 16, 4, 16)

    def dropped(rank: int, group: LoopbackGroup) -> torch.Tensor:
        q, k, v = (_shard(t, rank, 2).clone().requires_grad_() for t in (x.q, x.k, x.v))
        out = block_sparse_ring_dilated_attention(
            q, k, v, SEGMENTS, RATES, sparse_config=cfg, group=group, dropout_p=0.5
        )
        assert isinstance(out, torch.Tensor)
        out.square().sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
        return out.detach()

    with_dropout = torch.cat(run_ranks(dropped, 2, timeout_s=60.0), dim=1)
    assert not torch.allclose(with_dropout, single)


def test_layer_built_from_a_ring_distributed_config() -> None:
    from dilated.core import (
        DistributedConfig,
        MultiheadConfig,
        RingAttentionConfig,
        RingDistributedConfig,
    )
    from dilated.sparse import (
        BlockSparseRingDistributedDilatedAttention,
        BlockSparseRingMultiheadDilatedAttention,
    )

    cfg = CONFIGS["global_local"]
    config = RingDistributedConfig(
        MultiheadConfig(embed_dim=32, num_heads=4),
        RingAttentionConfig(SEGMENTS, RATES, is_causal=True, checkpoint=True),
        DistributedConfig(world_size=4),
    )
    single = BlockSparseRingMultiheadDilatedAttention(
        config.multihead_config,
        DilatedAttentionConfig(SEGMENTS, RATES, is_causal=True),
        sparse_config=cfg,
    )
    x = torch.randn(2, SEQ, 32)
    want = single(x, x, x)[0]

    def rank_fn(rank: int, group: LoopbackGroup) -> torch.Tensor:
        layer = BlockSparseRingDistributedDilatedAttention(config, group, sparse_config=cfg)
        layer.layer.load_state_dict(single.state_dict())
        part = _shard(x, rank, 4).clone().requires_grad_()
        out, weights = layer(part, part, part)
        assert weights is None
        out.sum().backward()  # through the checkpoint
        assert part.grad is not None and torch.isfinite(part.grad).all()
        return out.detach()

    got = torch.cat(run_ranks(rank_fn, 4, timeout_s=120.0), dim=1)
    assert_close_to_reference(got, want.detach(), torch.float32)
    with pytest.raises(ValueError, match="load_balance"):
        BlockSparseRingDistributedDilatedAttention(
            RingDistributedConfig(
                config.multihead_config, RingAttentionConfig(SEGMENTS, RATES, load_balance="zigzag")
            )
        )


@pytest.mark.parametrize("bad", ["config", "shape"])
def test_every_rank_raises_when_one_disagrees(bad: str) -> None:
    """One rank with another layout or a wrong shape: every rank raises a ValueError naming it
    (none is left waiting in a transfer)."""
    x = make_inputs(1, SEQ, 4, 8, seed=3)
    other = SparsePatternConfig("local_window", local_window_size=4, block_size=2)

    def rank_fn(rank: int, group: LoopbackGroup) -> str:
        q, k, v = (_shard(t, rank, 2) for t in (x.q, x.k, x.v))
        cfg = other if bad == "config" and rank == 1 else CONFIGS["local_window"]
        if bad == "shape" and rank == 1:
            q = q[..., :4]
        with pytest.raises(ValueError) as caught:
            block_sparse_ring_dilated_attention(
                q, k, v, SEGMENTS, RATES, sparse_config=cfg, group=group, timeout_s=30
            )
        return str(caught.value)

    messages = run_ranks(rank_fn, 2)
    if bad == "config":
        assert all("sparse_config" in m for m in messages), messages
    else:
        assert "rank(s) [1]" in messages[0] and "head_dim" in messages[1], messages


def test_world_of_one_takes_any_length() -> None:
    """Without a process group the distributed op is the single-process op, checked the same
    way: short last segments and segments longer than the sequence are fine."""
    cfg = CONFIGS["custom"]
    op = functools.partial(block_sparse_ring_dilated_attention, sparse_config=cfg, return_lse=True)
    judge = functools.partial(dense_block_sparse_attention, sparse_config=cfg)
    check_on_random_inputs(
        op, 2, 37, 4, 8, [8, 16, 64], [1, 2, 4], kv_heads=2, is_causal=True, padding=True,
        dtype=torch.float64, reference=judge,
    )  # fmt: skip
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="timeout_s must be None or a finite positive"):
        block_sparse_ring_dilated_attention(q, q, q, [8], [1], sparse_config=cfg, timeout_s=-1)
