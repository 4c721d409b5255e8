"""Every strategy with up to 8 ranks in one process (``dilated.ring.loopback``), against the judge.

The loopback transport runs each rank in a thread and hands blocks over in memory, so these tests
cover many ranks, shardings and options in seconds; the gloo tests (``distributed`` marker) check
the same code over real process groups.
"""

from __future__ import annotations

import random

import pytest
import torch

from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.ring import ring_dilated_attention, shard, unshard
from dilated.ring.layout import phase_layouts
from dilated.ring.loopback import LoopbackGroup, LoopbackHub, run_ranks


def _run(
    world: int,
    ws: list[int],
    rs: list[int],
    *,
    seq: int,
    heads: int = 4,
    kv_heads: int = 4,
    causal: bool,
    mode: str = "contiguous",
    strategy: str = "ring",
    masked: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Whole-sequence output and grads from every rank, and the judge's (float64)."""
    x = make_inputs(2, seq, heads, 8, kv_heads=kv_heads, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(2, seq, generator=gen) > 0.25 if masked else None
    g = torch.randn(2, seq, heads, 8, generator=gen, dtype=torch.float64)

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, ...]:
        q, k, v = (shard(t.detach(), rank, world, mode).requires_grad_() for t in (x.q, x.k, x.v))
        out = ring_dilated_attention(
            q, k, v, ws, rs, is_causal=causal, group=group, load_balance=mode,
            strategy=strategy, key_padding_mask=None if mask is None else shard(mask, rank, world, mode),
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        grads = torch.autograd.grad(out, (q, k, v), shard(g, rank, world, mode).to(dtype))
        return (out.detach(), *grads)

    results = run_ranks(rank_fn, world, timeout_s=120)
    out = unshard([r[0] for r in results], mode)
    grads = [unshard([r[i] for r in results], mode) for i in (1, 2, 3)]
    q, k, v = (t.detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    ref, _ = dense_dilated_attention(q, k, v, ws, rs, is_causal=causal, key_padding_mask=mask)
    return out, grads, ref, list(torch.autograd.grad(ref, (q, k, v), g))


def _check(world: int, ws: list[int], rs: list[int], **kw: object) -> None:
    dtype = kw.get("dtype", torch.float32)
    out, grads, ref, ref_grads = _run(world, ws, rs, **kw)  # type: ignore[arg-type]
    what = f"P={world} {ws} {rs} {kw}"
    assert_close_to_reference(out, ref, dtype, f"out {what}")  # type: ignore[arg-type]
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close_to_reference(a, e, dtype, f"d{name} {what}")  # type: ignore[arg-type]


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("causal", [False, True])
def test_spanning_and_local_branches(world: int, strategy: str, causal: bool) -> None:
    s = 8
    n = s * world
    # A local branch, one spanning two ranks, one spanning all (rate 4 > heads/2).
    _check(world, [4, 2 * s, n], [1, 2, 4], seq=n, causal=causal, strategy=strategy, kv_heads=2)


@pytest.mark.parametrize("mode", ["zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_load_balanced_shardings(mode: str, world: int) -> None:
    n = 12 * world
    # Segments that straddle chunk boundaries, rates that do not divide the chunks.
    _check(world, [6, 9, n], [2, 3, 4], seq=n, causal=True, mode=mode, masked=True, seed=world)


def test_random_configurations() -> None:
    rng = random.Random(7)
    for i in range(12):
        world = rng.choice([2, 3, 4, 6, 8])
        mode = rng.choice(["contiguous", "zigzag", "striped"])
        s = rng.choice([6, 8, 12]) if mode != "zigzag" else rng.choice([8, 12])
        n = s * world
        if mode == "contiguous":
            pool = [w for w in (2, 3, 4, s // 2, s, 2 * s, n, 2 * n) if s % w == 0 or w % s == 0]
            if world % 2:
                pool = [w for w in pool if w <= s or w % n == 0]
        else:
            pool = [2, 3, 4, 5, 6, 9, s, n]
        ws = sorted(rng.sample(sorted(set(pool)), rng.choice([1, 2, 3])))
        rs = [rng.choice([r for r in (1, 2, 3, 4) if w % r == 0]) for w in ws]
        heads, kv = rng.choice([(4, 4), (4, 2), (6, 3), (4, 1)])
        _check(
            world, ws, rs, seq=n, heads=heads, kv_heads=kv, causal=rng.random() < 0.5,
            mode=mode, strategy=rng.choice(["ring", "allgather"]), masked=rng.random() < 0.5,
            dtype=(torch.float32, torch.float64)[i % 2], seed=i,
        )  # fmt: skip


def test_bf16_error_does_not_grow_with_ranks() -> None:
    """Partial results merge in float32: a bf16 ring is as close to the float64 judge on 8 ranks
    as on 1 (a ring that merged in bf16 would round once per step)."""
    errors = []
    for world in (1, 2, 4, 8):
        n = 64
        out, _, ref, _ = _run(
            world, [8, n], [1, 4], seq=n, causal=True, dtype=torch.bfloat16, kv_heads=2
        )
        errors.append(((out.double() - ref).abs().max() / ref.abs().max()).item())
    assert max(errors) < 2e-2, errors
    assert errors[-1] <= 1.25 * errors[0] + 1e-3, errors


def test_dropout_gradient_is_the_derivative_of_the_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dropout on the ring (masks drawn per call from a seed): the backward pass replays the
    forward's masks, so the gradient matches a central difference of the same function."""
    import threading

    from dilated.ring import op

    # Each rank draws its seed from torch's generator; threads would race for it, so every
    # evaluation here gives each rank a fixed seed instead.
    local = threading.local()
    monkeypatch.setattr(
        op, "draw_dropout_seed", lambda p: torch.tensor([1000 + local.rank]) if p > 0 else None
    )
    world, n = 2, 16
    x = make_inputs(1, n, 4, 8, kv_heads=2, dtype=torch.float64, seed=3)
    direction = [torch.randn_like(t) for t in (x.q, x.k, x.v)]
    g = torch.randn(1, n, 4, 8, dtype=torch.float64)

    def loss(eps: float, grad: bool) -> tuple[float, list[torch.Tensor]]:
        def rank_fn(rank: int, group: LoopbackGroup) -> tuple[float, list[torch.Tensor]]:
            local.rank = rank
            ins = [
                shard((t + eps * dt).detach(), rank, world).requires_grad_()
                for t, dt in zip((x.q, x.k, x.v), direction)
            ]
            out = ring_dilated_attention(
                *ins, [4, n], [1, 2], is_causal=True, dropout_p=0.3, group=group
            )
            assert isinstance(out, torch.Tensor)
            value = (out * shard(g, rank, world)).sum()
            grads = list(torch.autograd.grad(value, ins)) if grad else []
            return value.item(), grads

        results = run_ranks(rank_fn, world, timeout_s=60)
        total = sum(r[0] for r in results)
        grads = [unshard([r[1][i] for r in results]) for i in range(3)] if grad else []
        return total, grads

    base, grads = loss(0.0, True)
    eps = 1e-5
    numeric = (loss(eps, False)[0] - loss(-eps, False)[0]) / (2 * eps)
    analytic = sum((gr * dt).sum().item() for gr, dt in zip(grads, direction))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)
    no_drop, _ = loss(0.0, False)
    assert base == no_drop  # deterministic under the same seed


def test_a_failing_rank_makes_every_rank_raise() -> None:
    """One rank passes a bad argument: every rank raises the same kind of clear error at once."""

    def rank_fn(rank: int, group: LoopbackGroup) -> str:
        q = torch.randn(1, 8, 2, 4)
        segs: object = [4] if rank else 8  # rank 0 passes an int, not a list
        with pytest.raises(ValueError) as info:
            ring_dilated_attention(q, q, q, segs, [1], group=group, timeout_s=10)  # type: ignore[arg-type]
        return str(info.value)

    messages = run_ranks(rank_fn, 3, timeout_s=30)
    assert "segment_lengths" in messages[0]
    # The other ranks name the failing rank and its argument (its message travels with the
    # agreement), not only the rank.
    assert all("rank(s) [0]; rank 0: segment_lengths must be" in m for m in messages[1:]), messages


def test_option_mismatch_names_the_option() -> None:
    def rank_fn(rank: int, group: LoopbackGroup) -> str:
        q = torch.randn(1, 8, 2, 4)
        with pytest.raises(ValueError, match="is_causal") as info:
            ring_dilated_attention(q, q, q, [4], [1], is_causal=rank == 1, group=group)
        return str(info.value)

    run_ranks(rank_fn, 2, timeout_s=30)


def test_blocks_hold_only_phase_rows() -> None:
    """What travels for a branch of rate r is 1/r of each rank's K/V rows (per phase)."""
    hub = LoopbackHub(4)
    assert hub.group(3).rank == 3
    layouts = phase_layouts(64, 4, "contiguous", 1, 32, 4, 4, 4)
    assert [ph.rows for ph in layouts] == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="rank"):
        hub.group(4)


@pytest.mark.parametrize(
    "fault",
    [
        "raises_before",
        "bad_argument",
        "bad_timeout",
        "crash_in_checks",
        "raises_forward",
        "raises_backward",
    ],
)
def test_fault_injection_every_rank_raises_in_time(
    fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of 3 fails before, inside or after the cross-rank agreement, or in either pass:
    every other rank raises too, within ``timeout_s`` plus a small margin (measured)."""
    import time

    from dilated.ring import op

    timeout_s, world = 1.5, 3
    real_forward, real_backward = op.ring_forward, op.ring_backward

    def faulty(real: object) -> object:
        def call(plan: object, *args: object, **kw: object) -> object:
            if plan.rank == 1:  # type: ignore[attr-defined]
                raise RuntimeError("injected fault")
            return real(plan, *args, **kw)  # type: ignore[operator]

        return call

    if fault == "raises_forward":
        monkeypatch.setattr(op, "ring_forward", faulty(real_forward))
    if fault == "raises_backward":
        monkeypatch.setattr(op, "ring_backward", faulty(real_backward))

    class Exploding(torch.Tensor):
        """A tensor whose shape cannot be read: the rank's checks crash unexpectedly."""

        @property  # type: ignore[misc]
        def shape(self) -> torch.Size:
            raise RuntimeError("shape unavailable")

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[str, float]:
        n = 8 * world
        q = shard(torch.randn(1, n, 2, 4), rank, world).requires_grad_()
        start = time.monotonic()
        try:
            if rank == 1 and fault == "raises_before":
                raise RuntimeError("injected fault")
            bad: object = q
            if rank == 1 and fault == "bad_argument":
                bad = None
            if rank == 1 and fault == "crash_in_checks":
                bad = q.detach().as_subclass(Exploding)
            wait = -1.0 if rank == 1 and fault == "bad_timeout" else timeout_s
            out = ring_dilated_attention(
                bad,
                q,
                q,
                [8, n],
                [1, 2],
                is_causal=True,
                group=group,
                timeout_s=wait,  # type: ignore[arg-type]
            )
            assert isinstance(out, torch.Tensor)
            out.sum().backward()
        except Exception as exc:
            return type(exc).__name__, time.monotonic() - start
        return "no error", time.monotonic() - start

    # The first custom-op call imports torch's compiler stack (seconds): not part of any wait.
    warm = torch.randn(1, 8, 2, 4, requires_grad=True)
    ring_dilated_attention(warm, warm, warm, [8], [1]).sum().backward()  # type: ignore[union-attr]
    results = run_ranks(rank_fn, world, timeout_s=60)
    assert all(kind != "no error" for kind, _ in results), results
    margin = 3.0
    for rank, (kind, waited) in enumerate(results):
        assert waited < timeout_s + margin, (fault, rank, kind, waited)
    if fault in ("bad_argument", "bad_timeout", "crash_in_checks"):
        # Caught inside the agreement: every rank knows at once, nobody waits for a timeout.
        assert all(waited < timeout_s for _, waited in results), results
        kinds = [kind for kind, _ in results]
        assert kinds[0] == kinds[2] == "ValueError", results
        # The failing rank raises its own error: a TypeError (naming q) or the crash itself.
        own = {
            "bad_argument": ("TypeError", "ArgumentTypeError"),
            "bad_timeout": ("ValueError",),
            "crash_in_checks": ("RuntimeError",),
        }
        assert kinds[1] in own[fault], results
    else:
        assert [kind for kind, _ in results][::2] == ["TimeoutError", "TimeoutError"], results


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_ring_passes_without_autograd_match_the_judge(strategy: str) -> None:
    """``ring_passes`` (what loopback rings on CUDA use instead of autograd) gives the judge's
    output and gradients."""
    from dilated.ring.ring import ring_passes

    world, n = 4, 32
    x = make_inputs(1, n, 4, 8, kv_heads=2, dtype=torch.float64, seed=4)
    g = torch.randn(1, n, 4, 8, dtype=torch.float64)

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, ...]:
        q, k, v, d_out = (shard(t.detach(), rank, world) for t in (x.q, x.k, x.v, g))
        return ring_passes(
            q, k, v, d_out, [8, n], [1, 2], group=group, is_causal=True, strategy=strategy
        )

    results = run_ranks(rank_fn, world, timeout_s=60)
    got = [unshard([r[i] for r in results]) for i in range(4)]
    q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
    ref, _ = dense_dilated_attention(q, k, v, [8, n], [1, 2], is_causal=True)
    want = [ref, *torch.autograd.grad(ref, (q, k, v), g)]
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, want):
        assert_close_to_reference(a, e, torch.float64, name)


@pytest.mark.parametrize(
    ("world", "seq", "ws", "rs", "kv_heads", "strategy"),
    [
        (2, 16, [8, 32], [8, 4], 2, "ring"),  # rate > heads, a rank's rows start mid-stride
        (4, 32, [4, 32], [1, 8], 4, "allgather"),
        (3, 24, [6, 24], [2, 3], 2, "ring"),
    ],
)
def test_zigzag_phase_batching(
    world: int, seq: int, ws: list[int], rs: list[int], kv_heads: int, strategy: str
) -> None:
    """Zigzag shards whose second run starts off a multiple of the rate: the phases of such a
    rank are not the phase views' rows, and must not be batched as if they were."""
    _check(world, ws, rs, seq=seq, kv_heads=kv_heads, causal=True, mode="zigzag", strategy=strategy)
