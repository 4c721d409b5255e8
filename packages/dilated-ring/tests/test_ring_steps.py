"""Fewer, larger dense calls per ring step, and the same result as the judge.

The dense block body batches the phases of a branch (and the segments of striped shards) into
one call of the shared primitive where the strides allow (``dilated.ring.dense_calls``). These
tests count the primitive's calls in every round of a schedule (a ring step) on loopback ranks
and hold them to the bound that design guarantees, then check output and gradients against the
float64 judge for the same configurations (the gloo version is in
``test_ring_distributed.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dilated.core.caching import plan_cache_info
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.ring import dense_block, shard, unshard
from dilated.ring.loopback import LoopbackGroup, run_ranks
from dilated.ring.ring import ring_passes

# (world, segment_lengths, dilation_rates, batch, heads, kv_heads, causal, masked, load_balance,
#  strategy, calls per round at most). Contiguous shards with phases of equal heads: one call per
# round when the batch is one, or when r >= heads (the phases on the head axis) without a key
# mask; min(batch, phases) otherwise. Causal contiguous rounds are one call each (keys before
# the diagonal, or the diagonal); striped segments of a round share the call's batch axis; the
# all-gather's one round joins the members' blocks into one key range (keys before this rank's
# rows, and the diagonal: two calls).
CASES = [
    (4, [64], [4], 1, 4, 4, True, False, "contiguous", "ring", 1),
    (4, [64], [8], 2, 4, 4, True, False, "contiguous", "ring", 1),
    (4, [64], [16], 2, 4, 2, False, False, "contiguous", "ring", 1),
    (4, [64], [8], 2, 4, 4, False, True, "contiguous", "ring", 2),
    (4, [64], [2], 2, 8, 8, False, False, "contiguous", "ring", 2),
    (4, [16, 64], [1, 4], 1, 8, 2, True, True, "contiguous", "ring", 1),
    (2, [8, 32], [1, 2], 2, 4, 4, False, False, "striped", "ring", 1),
    (4, [64], [4], 1, 4, 4, True, False, "contiguous", "allgather", 2),
    (4, [32, 64], [2, 8], 1, 4, 4, True, False, "contiguous", "allgather", 2),
]
IDS = [f"P{c[0]}-w{c[1]}-r{c[2]}-b{c[3]}-h{c[4]}/{c[5]}-{c[8]}-{c[9]}" for c in CASES]


def _inputs(
    seq: int, batch: int, heads: int, kv_heads: int, masked: bool, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    x = make_inputs(batch, seq, heads, 8, kv_heads=kv_heads, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(batch, seq, heads, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, seq, generator=gen) > 0.25 if masked else None
    return [x.q, x.k, x.v], g, mask


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[int]]:
    """Count the primitive's calls (forward and backward) in every round of every rank."""
    rounds: dict[int, list[int]] = {}
    local = threading.local()

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(dense_block, name)

        def call(*args: Any, **kw: Any) -> Any:
            rounds[local.rank][-1] += 1
            return real(*args, **kw)

        return call

    def per_round(name: str) -> Callable[..., Any]:
        real = getattr(dense_block.DenseBlockBody, name)

        def body(self: dense_block.DenseBlockBody, held: Any) -> None:
            local.rank = self.rank
            rounds.setdefault(self.rank, []).append(0)
            real(self, held)

        return body

    for name in ("subproblem_attention", "subproblem_attention_backward"):
        monkeypatch.setattr(dense_block, name, counted(name))
    for name in ("forward", "backward"):
        monkeypatch.setattr(dense_block.DenseBlockBody, name, per_round(name))
    return rounds


def _passes(
    world: int, ws: list[int], rs: list[int], batch: int, heads: int, kv_heads: int,
    causal: bool, masked: bool, mode: str, strategy: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """``(out, dq, dk, dv)`` of the whole sequence from every rank, and the judge's."""
    seq = 16 * world
    (q, k, v), g, mask = _inputs(seq, batch, heads, kv_heads, masked)

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, ...]:
        parts = [shard(t, rank, world, mode) for t in (q, k, v, g)]
        if mask is None:
            return ring_passes(
                *parts, ws, rs, group=group, is_causal=causal, load_balance=mode,
                strategy=strategy,
            )  # fmt: skip
        # ring_passes takes no mask: the autograd path of the functional op does.
        from dilated.ring import ring_dilated_attention

        qs, ks, vs, gs = (p.requires_grad_() if i < 3 else p for i, p in enumerate(parts))
        out = ring_dilated_attention(
            qs, ks, vs, ws, rs, is_causal=causal, group=group, load_balance=mode,
            strategy=strategy, key_padding_mask=shard(mask, rank, world, mode),
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return (out.detach(), *torch.autograd.grad(out, (qs, ks, vs), gs))

    results = run_ranks(rank_fn, world, timeout_s=120)
    got = [unshard([r[i] for r in results], mode) for i in range(4)]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref, _ = dense_dilated_attention(*leaves, ws, rs, is_causal=causal, key_padding_mask=mask)
    return got, [ref, *torch.autograd.grad(ref, leaves, g)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_calls_per_ring_step_are_bounded(
    case: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every round (ring step, or the all-gather's one round) of every spanning branch makes at
    most the bound's calls of the primitive, forward and backward; a body that called it once
    per phase (or per batch row) would make up to ``min(r, heads)`` times as many."""
    *args, bound = case
    rounds = _counting(monkeypatch)
    _passes(*args)
    assert set(rounds) == set(range(args[0])), rounds
    for rank, counts in rounds.items():
        assert max(counts) <= bound, (rank, counts)
        assert sum(counts) > 0, (rank, counts)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batched_steps_match_the_judge(case: tuple[Any, ...]) -> None:
    """The same configurations give the float64 judge's output and gradients."""
    got, want = _passes(*case[:-1])
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, want):
        assert_close_to_reference(a, e, torch.float64, f"{name} {case}")


def test_step_plans_are_cached() -> None:
    """A second call of the same shape plans nothing: the call and copy plans of the ring's
    steps are worked out once per (geometry, branch, block owner, batch, mask) and found in the
    cache after that."""
    case = CASES[4]
    _passes(*case[:-1])
    before = {name: info.misses for name, info in plan_cache_info().items()}
    _passes(*case[:-1])
    after = {name: info.misses for name, info in plan_cache_info().items()}
    for name in (
        "dilated.ring.dense_calls.block_calls",
        "dilated.ring.dense_calls.pack_copies",
        "dilated.ring.plan.spanning_branch",
    ):
        assert after[name] == before[name], name
    assert plan_cache_info()["dilated.ring.dense_calls.block_calls"].hits > 0
