"""Bodies of the multi-process tests, run inside every spawned rank (importable by spawn)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.ring.functional import ring_dilated_attention
from dilated.ring.sharding import shard


def random_config(rng: random.Random, world: int, mode: str) -> dict[str, object]:
    """A random valid configuration for ``world`` ranks (shard lengths 8 or 16)."""
    s = rng.choice([8, 16])
    n = s * world
    chunk = {"contiguous": s, "zigzag": s // 2, "striped": 1}[mode]
    candidates = sorted({max(1, chunk // 2), chunk, s, 2 * s, 4 * s, n, 2 * n})
    if mode == "contiguous":
        candidates = [w for w in candidates if s % w == 0 or w % s == 0]
    m = rng.choice([1, 2, 3])
    ws = sorted(rng.sample(candidates, min(m, len(candidates))))
    rs = [rng.choice([r for r in (1, 2, 4, 8) if w % r == 0]) for w in ws]
    heads = rng.choice([2, 4])
    kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
    return {
        "seq": n,
        "segment_lengths": ws,
        "dilation_rates": rs,
        "heads": heads,
        "kv_heads": kv_heads,
        "is_causal": rng.random() < 0.5,
        "batch": rng.choice([1, 2]),
    }


def check_equivalence(
    rank: int,
    world: int,
    cfg: dict[str, object],
    mode: str,
    dtype: torch.dtype,
    seed: int,
    strategy: str = "ring",
    device: str = "cpu",
) -> None:
    """This rank's output and q/k/v gradients equal its rows of the whole-sequence reference."""
    n, h, hkv = int(cfg["seq"]), int(cfg["heads"]), int(cfg["kv_heads"])  # type: ignore[call-overload]
    ws, rs = cfg["segment_lengths"], cfg["dilation_rates"]
    causal = bool(cfg["is_causal"])
    x = make_inputs(
        int(cfg["batch"]),
        n,
        h,
        8,
        kv_heads=hkv,
        dtype=dtype,
        requires_grad=True,
        seed=seed,
        device=device,  # type: ignore[call-overload]
    )
    ref, _ = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=causal)  # type: ignore[arg-type]
    g = torch.randn(
        ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    ).to(device)
    ref_grads = torch.autograd.grad(ref, (x.q, x.k, x.v), g)
    q, k, v = (shard(t.detach(), rank, world, mode).requires_grad_() for t in (x.q, x.k, x.v))
    out = ring_dilated_attention(
        q,
        k,
        v,
        ws,
        rs,
        is_causal=causal,
        load_balance=mode,
        strategy=strategy,  # type: ignore[arg-type]
    )
    assert isinstance(out, torch.Tensor)
    grads = torch.autograd.grad(out, (q, k, v), shard(g, rank, world, mode).to(dtype))
    what = f"rank {rank}/{world} {strategy} {mode} {cfg}"
    assert_close_to_reference(out, shard(ref, rank, world, mode), dtype, f"out {what}")
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close_to_reference(a, shard(e, rank, world, mode), dtype, f"d{name} {what}")


def sweep(rank: int, world: int, mode: str, count: int, seed: int) -> None:
    rng = random.Random(seed * 1000 + world)
    for i in range(count):
        cfg = random_config(rng, world, mode)
        dtype = torch.float64 if i % 2 else torch.float32
        check_equivalence(rank, world, cfg, mode, dtype, seed + i)


def fixed_cases(rank: int, world: int) -> None:
    """Named cases: local-only, spanning 2 and all ranks, GQA, causal, every sharding."""
    s = 8
    n = s * world
    cases = [
        ({"segment_lengths": [4, 8], "dilation_rates": [1, 2]}, "contiguous"),
        ({"segment_lengths": [8, 2 * s], "dilation_rates": [1, 2]}, "contiguous"),
        ({"segment_lengths": [s, n], "dilation_rates": [2, 4]}, "contiguous"),
        ({"segment_lengths": [4, n], "dilation_rates": [1, 4]}, "zigzag"),
        ({"segment_lengths": [2, n], "dilation_rates": [1, 2]}, "striped"),
    ]
    for i, (branches, mode) in enumerate(cases):
        for causal in (False, True):
            cfg = {"seq": n, "heads": 4, "kv_heads": 2, "is_causal": causal, "batch": 2, **branches}
            check_equivalence(rank, world, cfg, mode, torch.float32, 10 + i)


def bad_inputs(rank: int, world: int) -> None:
    """Bad input raises ValueError on every rank (and the ranks stay usable afterwards)."""
    s = 8

    def expect(match: str, **kw: object) -> None:
        q = kw.pop("q", torch.randn(1, s, 2, 4))
        k = kw.pop("k", torch.randn(1, s, 2, 4))
        segs = kw.pop("segs", [4])
        with pytest.raises(ValueError, match=match):
            ring_dilated_attention(q, k, k, segs, [1] * len(segs), **kw)  # type: ignore[arg-type]

    long = torch.randn(1, s + 4 * rank, 2, 4)
    expect("shard_len|seq", q=long, k=long)
    wide = torch.randn(1, s, 2, 4 + 4 * rank)
    expect("head_dim|rank", q=wide, k=wide)
    half = torch.randn(1, s, 2, 4, dtype=torch.float64 if rank == 0 else torch.float32)
    expect("dtype|rank", q=half, k=half)
    expect("does not split evenly", segs=[12])
    expect("key_padding_mask", key_padding_mask=torch.ones(1, s, dtype=torch.bool))
    # Only one rank is wrong: every rank still raises.
    nan_q = torch.randn(1, s, 2, 4)
    if rank == world - 1:
        nan_q[0, 0, 0, 0] = float("nan")
    expect("NaN|rank", q=nan_q)
    expect("segment_lengths|branch|rank", segs=[4 if rank == 0 else 8])
    dist.barrier()
    # Still in step: a good call works after the errors.
    q = torch.randn(1, s, 2, 4)
    out = ring_dilated_attention(q, q, q, [4], [1])
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def equivalence(rank: int, world: int) -> None:
    """The named cases, then a seeded random sweep over every sharding."""
    fixed_cases(rank, world)
    if world > 1:
        for mode in ("contiguous", "zigzag", "striped"):
            sweep(rank, world, mode, 4, 7)


def allgather_equivalence(rank: int, world: int) -> None:
    """The all-gather strategy gives the same results as the reference."""
    rng = random.Random(99 + world)
    for i in range(6):
        mode = ("contiguous", "zigzag")[i % 2]
        cfg = random_config(rng, world, mode)
        check_equivalence(rank, world, cfg, mode, torch.float64, 50 + i, strategy="allgather")


def bytes_match_cost_model(rank: int, world: int) -> None:
    """Bytes actually sent by each strategy equal :func:`dilated.ring.costs.comm_cost`."""
    from dilated.ring.comm import RingComm
    from dilated.ring.costs import comm_cost

    s, heads, kv_heads, d, b = 16, 4, 2, 8, 2
    n = s * world
    cases = [
        ([8, 2 * s, n], [1, 2, 4], "contiguous"),
        ([s, n], [2, 8], "contiguous"),
        ([4, n], [1, 2], "zigzag"),
    ]
    for strategy in ("ring", "allgather"):
        for ws, rs, mode in cases:
            for dtype in (torch.float32, torch.bfloat16):
                q = torch.randn(b, s, heads, d, dtype=dtype, requires_grad=True)
                k = torch.randn(b, s, kv_heads, d, dtype=dtype, requires_grad=True)
                v = torch.randn(b, s, kv_heads, d, dtype=dtype, requires_grad=True)
                RingComm.reset_counters()
                out = ring_dilated_attention(q, k, v, ws, rs, load_balance=mode, strategy=strategy)
                assert isinstance(out, torch.Tensor)
                fwd = RingComm.bytes_sent
                out.sum().backward()
                bwd = RingComm.bytes_sent - fwd
                want = comm_cost(
                    n,
                    world,
                    heads,
                    d,
                    ws,
                    rs,
                    dtype,
                    batch=b,
                    kv_heads=kv_heads,
                    strategy=strategy,
                    load_balance=mode,
                )
                got = (fwd, bwd)
                assert got == (want.forward_bytes, want.backward_bytes), (
                    f"rank {rank} {strategy} {mode} {ws} {rs} {dtype}: sent {got}, model {want}"
                )
                if world > 1 and n > 8:
                    assert fwd > 0


def deepspeed_training(rank: int, world: int) -> None:
    """Train 3 steps with DeepSpeed ZeRO-2 on shards; compare losses with plain training."""
    import copy
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed reads the launcher's variables; the process group already exists.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    from dilated.core.modules import MultiheadDilatedAttention
    from dilated.ring import RingMultiheadDilatedAttention

    torch.manual_seed(0)
    n, dim, heads = 16 * world, 16, 2

    class Model(torch.nn.Module):
        def __init__(self, attn: torch.nn.Module) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(dim, dim)
            self.attn = attn
            self.out = torch.nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            a, _ = self.attn(h, h, h, is_causal=True)
            return self.out(a + h).squeeze(-1)

    segs, rates = [8, n], [1, 2]
    plain = Model(MultiheadDilatedAttention(dim, heads, rates, segs))
    ring = Model(RingMultiheadDilatedAttention(dim, heads, rates, segs))
    ring.load_state_dict(copy.deepcopy(plain.state_dict()))
    data = [
        (torch.randn(2, n, dim, generator=g), torch.randn(2, n, generator=g))
        for g in [torch.Generator().manual_seed(s) for s in range(3)]
    ]
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain_losses = []
    for x, y in data:
        loss = torch.nn.functional.mse_loss(plain(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        plain_losses.append(loss.item())

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed clips gradients to norm 1.0 unless told otherwise; plain SGD does not.
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(
        model=ring,
        optimizer=torch.optim.SGD(ring.parameters(), lr=0.1),
        config=config,
    )
    ds_losses = []
    for x, y in data:
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        loss = torch.nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        ds_losses.append(total.item() / world)
    for step, (a, b) in enumerate(zip(ds_losses, plain_losses)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: deepspeed {a} vs plain {b}"
