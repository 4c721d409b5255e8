"""dilated-ring on CUDA at real sizes: a world of one, and rings of 2-4 ranks on one GPU.

The float64 dense judge holds ``seq^2`` scores, so it decides up to 8K tokens; beyond, the judge
is the core reference in float64 (linear memory, itself equal to the dense judge to 1e-15).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dilated.core import dilated_attention as core_dilated_attention
from dilated.core.testing import assert_close_to_reference, check_on_random_inputs, make_inputs
from dilated.ring import RingDilatedAttention, ring_dilated_attention, shard, unshard
from dilated.ring.loopback import run_ranks
from dilated.ring.ring import ring_passes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

WS, RS = (1024, 2048, 4096), (1, 2, 4)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_world_of_one_matches_dense_judge(
    strategy: str, dtype: torch.dtype, causal: bool, head_dim: int
) -> None:
    attention = functools.partial(ring_dilated_attention, strategy=strategy, return_lse=True)
    check_on_random_inputs(
        attention, 1, 8192, 4, head_dim, WS, RS, is_causal=causal, dtype=dtype, device="cuda",
        seed=head_dim,
    )  # fmt: skip


def _judge(
    x: list[torch.Tensor], ws: tuple[int, ...], rs: tuple[int, ...], causal: bool, g: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    ref_in = [t.detach().double().requires_grad_() for t in x]
    ref = core_dilated_attention(*ref_in, ws, rs, is_causal=causal)
    return ref, torch.autograd.grad(ref, ref_in, g.double())


@pytest.mark.parametrize("seq", [32768, 65536])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_world_of_one_long_matches_float64_reference(seq: int, strategy: str) -> None:
    x = make_inputs(1, seq, 4, 64, kv_heads=2, dtype=torch.bfloat16, device="cuda", seed=seq)
    q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
    g = torch.randn_like(q)
    out = ring_dilated_attention(q, k, v, WS, RS, is_causal=True, strategy=strategy)
    assert isinstance(out, torch.Tensor)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref, ref_grads = _judge([q, k, v], WS, RS, True, g)
    assert_close_to_reference(out, ref, torch.bfloat16)
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close_to_reference(a, e, torch.bfloat16, f"d{name}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize(
    ("mode", "kv_heads"), [("contiguous", 4), ("contiguous", 2), ("zigzag", 4)]
)
def test_rings_on_one_gpu_match_float64_reference(
    world: int, strategy: str, mode: str, kv_heads: int
) -> None:
    """Every rank of the ring in a thread of this process (loopback transport), so branches
    really span ranks and the per-segment kernel path of the spanning branches runs on CUDA."""
    n = 4096 * world
    ws, rs = (1024, 2 * 4096, n), (1, 2, 4)
    x = make_inputs(1, n, 4, 64, kv_heads=kv_heads, dtype=torch.bfloat16, device="cuda", seed=7)
    g = torch.randn_like(x.q)

    def rank_fn(rank: int, group: object) -> list[torch.Tensor]:
        # CUDA autograd runs every backward of a device on one engine thread, where the ranks'
        # backward passes would wait for each other: drive the two passes directly instead.
        q, k, v, d_out = (shard(t.detach(), rank, world, mode) for t in (x.q, x.k, x.v, g))
        return list(
            ring_passes(
                q, k, v, d_out, ws, rs, group=group, is_causal=True, load_balance=mode,
                strategy=strategy, timeout_s=120.0,
            )
        )  # fmt: skip

    results = run_ranks(rank_fn, world, timeout_s=300)
    got = [unshard([r[i] for r in results], mode) for i in range(4)]
    ref, ref_grads = _judge([x.q, x.k, x.v], ws, rs, True, g)
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, [ref, *ref_grads]):
        assert_close_to_reference(a, e, torch.bfloat16, f"{name} P={world} {strategy} {mode}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("mode", ["contiguous", "striped"])
def test_batched_ring_steps_on_one_gpu_match_float64_reference(
    world: int, strategy: str, mode: str
) -> None:
    """The batched steps of the dense block body on the CUDA engines and the fused merge and
    accumulate kernels: a batch of two, 16 heads of 128, grouped-query heads; a branch with
    ``r >= heads`` (its phases on the primitive's head axis, head stride ``seq_stride +
    head_stride``) and one with ``r < heads`` (its phases on the batch axis, looped per batch
    row); striped shards batch segments with the batch rows."""
    n = 2048 * world
    ws, rs = (512, 2048, n), (1, 4, 16)
    x = make_inputs(2, n, 16, 128, kv_heads=4, dtype=torch.bfloat16, device="cuda", seed=world)
    g = torch.randn_like(x.q)
    inputs = [x.q, x.k, x.v, g]

    def rank_fn(rank: int, group: object) -> list[torch.Tensor]:
        parts = [shard(t.detach(), rank, world, mode) for t in inputs]
        passes = functools.partial(ring_passes, group=group, load_balance=mode, timeout_s=120.0)
        return list(passes(*parts, ws, rs, is_causal=True, strategy=strategy))

    per_rank = run_ranks(rank_fn, world, timeout_s=300)
    ref, ref_grads = _judge([x.q, x.k, x.v], ws, rs, True, g)
    for i, (name, want) in enumerate(zip(["out", "dq", "dk", "dv"], [ref, *ref_grads])):
        got = unshard([r[i] for r in per_rank], mode)
        assert_close_to_reference(got, want, torch.bfloat16, f"{name} P={world} {strategy} {mode}")


def test_compiled_module_matches_eager() -> None:
    attn = RingDilatedAttention(list(WS), list(RS))
    x = make_inputs(1, 8192, 4, 64, dtype=torch.bfloat16, device="cuda", seed=1)
    q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
    eager = attn(q, k, v, is_causal=True)
    compiled = torch.compile(attn, fullgraph=True)(q, k, v, is_causal=True)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    want = torch.autograd.grad(eager, (q, k, v), g)
    got = torch.autograd.grad(
        torch.compile(attn, fullgraph=True)(q, k, v, is_causal=True), (q, k, v), g
    )
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
