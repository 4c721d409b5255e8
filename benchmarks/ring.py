"""dilated-ring against the single-GPU op: a world of one, simulated rings, real rings.

Three modes, each printing a table (last) and optionally writing JSON (``--out``):

* default: a world of one. Every strategy (ring, allgather, ulysses), forward and
  forward+backward, against ``dilated.kernels.dilated_attention`` on the same tokens in the same
  run: median time and peak memory above the inputs.
* ``--simulate P [P ...]``: the P ranks of a ring on one device through
  [`dilated.ring.loopback`][dilated.ring.loopback]. For each rank alone (its peers *phantom*:
  what it sends is counted and dropped, what it receives is a random block of the right shape)
  the real per-rank compute time and bytes at ``n * P`` tokens; then the projected step time
  ``max over ranks of max(compute, bytes / link bandwidth)``, against the single-GPU op on the
  whole ``n * P`` tokens divided by P (the same work with no communication: "work-normalised")
  and against one GPU on ``n`` tokens (the literal weak-scaling ratio). Per ring step (one
  round of a schedule, forward or backward) it also reports the calls of the shared primitive
  and the host time of the dense block body (the Python and launch time of the step's calls,
  without the waits for transfers). A run with every rank live checks the simulated ring's
  output and gradients against the single-GPU op.
* ``--distributed`` under ``torchrun --nproc-per-node P``: the real ring over NCCL/gloo.

bf16, batch 1, 16 heads of 128, causal on CUDA; float32 and small shapes on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dilated.core.presets import PRESETS
from dilated.kernels import dilated_attention
from dilated.ring import comm_cost, dense_block, ring_dilated_attention, shard, unshard
from dilated.ring.loopback import LoopbackHub, run_ranks
from dilated.ring.ring import ring_passes

STRATEGIES = ("ring", "allgather", "ulysses")
PLAIN = ([2048, 4096, 8192], [1, 2, 4])


def timed(fn: Callable[[], object], cuda: bool, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_above(fn: Callable[[], object], cuda: bool) -> float:
    """GiB allocated at the peak of one call of ``fn`` above what was allocated before it."""
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def inputs(
    seq: int, heads: int, d: int, dtype: torch.dtype, device: str, seed: int = 0
) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(1, seq, heads, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        for _ in range(3)
    ]


def step(attn: Callable[..., Any], qkv: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    def run() -> None:
        if backward:
            out = attn(*qkv)
            out.backward(torch.ones_like(out))
            for t in qkv:
                t.grad = None
        else:
            with torch.no_grad():
                attn(*qkv)

    return run


@contextmanager
def step_probe() -> Iterator[list[tuple[int, float]]]:
    """``(primitive calls, host seconds)`` of every ring step (a round of the dense block body,
    forward or backward) run inside the block. On CUDA the host time is what the step's Python
    and launches take (no synchronisation is added); it excludes the waits for transfers, which
    the schedule makes outside the body."""
    steps: list[tuple[int, float]] = []
    local = threading.local()
    saved = {}

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            local.calls += 1
            return real(*args, **kw)

        return call

    def timed_round(real: Callable[..., None]) -> Callable[..., None]:
        def body(self: Any, held: Any) -> None:
            local.calls = 0
            start = time.perf_counter()
            real(self, held)
            steps.append((local.calls, time.perf_counter() - start))

        return body

    for name in ("subproblem_attention", "subproblem_attention_backward"):
        saved[(dense_block, name)] = getattr(dense_block, name)
        setattr(dense_block, name, counted(getattr(dense_block, name)))
    for name in ("forward", "backward"):
        saved[(dense_block.DenseBlockBody, name)] = getattr(dense_block.DenseBlockBody, name)
        setattr(
            dense_block.DenseBlockBody, name, timed_round(getattr(dense_block.DenseBlockBody, name))
        )
    try:
        yield steps
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def world_of_one(args: argparse.Namespace, cuda: bool, device: str) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, d = (16, 128) if cuda else (4, 32)
    ws, rs = PLAIN if cuda else ([256, 512], [1, 2])
    rows = []
    for seq in args.seqs or ([65536, 262144] if cuda else [2048]):
        qkv = inputs(seq, heads, d, dtype, device)
        calls: dict[str, Callable[..., Any]] = {
            "single-GPU op": lambda q, k, v: dilated_attention(
                q, k, v, ws, rs, is_causal=True, check_finite=False
            ),
        }
        for strategy in STRATEGIES:
            calls[strategy] = lambda q, k, v, s=strategy: ring_dilated_attention(
                q, k, v, ws, rs, is_causal=True, strategy=s
            )
        for backward in (False, True):
            base = None
            for name, attn in calls.items():
                fn = step(attn, qkv, backward)
                ms = timed(fn, cuda, args.iters)
                gib = peak_above(fn, cuda)
                base = ms if base is None else base
                rows.append(
                    {"seq": seq, "pass": "fwd+bwd" if backward else "fwd", "impl": name,
                     "ms": ms, "peak_gib": gib, "vs_single": base / ms}
                )  # fmt: skip
        del qkv
    print(f"\nworld of one | {device} {dtype} | b=1 h={heads} d={d} | w={ws} r={rs} | causal")
    print(f"{'seq':>8} {'pass':>8} {'impl':>14} {'ms':>9} {'peak GiB':>9} {'vs single':>9}")
    for r in rows:
        print(
            f"{r['seq']:>8} {r['pass']:>8} {r['impl']:>14} {r['ms']:>9.2f} "
            f"{r['peak_gib']:>9.2f} {r['vs_single']:>9.2f}"
        )
    return rows


def _branches(seq: int, preset: str) -> tuple[list[int], list[int]]:
    p = PRESETS[preset]
    pairs = [(w, r) for w, r in zip(p.segment_lengths, p.dilation_rates) if w <= seq]
    return [w for w, _ in pairs], [r for _, r in pairs]


def simulate(args: argparse.Namespace, cuda: bool, device: str) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, d = (16, 128) if cuda else (4, 32)
    per_rank = args.tokens_per_rank or ([8192, 32768, 131072] if cuda else [1024])
    preset = args.preset
    mode = args.load_balance
    rows = []
    for n in per_rank:
        for world in args.simulate:
            seq = n * world
            ws, rs = _branches(seq, preset) if cuda else ([256, seq], [1, 4])

            def attn_fn(group: Any, ws: list[int] = ws, rs: list[int] = rs) -> Callable[..., Any]:
                return lambda q, k, v: ring_dilated_attention(
                    q, k, v, ws, rs, is_causal=True, group=group, strategy=args.strategy,
                    load_balance=mode,
                )  # fmt: skip

            def single(q: Any, k: Any, v: Any, ws: list[int] = ws, rs: list[int] = rs) -> Any:
                return dilated_attention(q, k, v, ws, rs, is_causal=True, check_finite=False)

            whole = inputs(seq, heads, d, dtype, device)
            t_whole = timed(step(single, whole, True), cuda, args.iters)
            err = float("nan")
            if args.check and n <= args.check_max_tokens:
                err = _check_live(whole, world, mode, args.strategy, ws, rs, single)
            del whole
            small = inputs(n, heads, d, dtype, device)
            t_one = timed(step(single, small, True), cuda, args.iters)
            del small
            computes, sent = [], []
            steps: list[tuple[int, float]] = []
            for rank in range(world):
                hub = LoopbackHub(world, live=[rank])
                mine = [
                    shard(t.detach(), rank, world, mode).requires_grad_()
                    for t in inputs(seq, heads, d, dtype, device)
                ]
                computes.append(timed(step(attn_fn(hub.group(rank)), mine, True), cuda, args.iters))
                if args.profile and rank == world - 1:
                    _profile(
                        step(attn_fn(hub.group(rank)), mine, True), f"n={n} P={world} rank {rank}"
                    )
                hub.bytes_sent[rank] = 0
                with step_probe() as probed:
                    step(attn_fn(hub.group(rank)), mine, True)()
                sent.append(hub.bytes_sent[rank])
                steps += [s for s in probed if s[0]]
                del mine
            model = comm_cost(
                seq, world, heads, d, ws, rs, dtype, strategy=args.strategy, load_balance=mode
            )
            link = args.link_gbps * 1e9
            projected = max(max(c, b / link * 1e3) for c, b in zip(computes, sent))
            rows.append(
                {"tokens_per_rank": n, "P": world, "seq": seq, "branches": [ws, rs],
                 "single_whole_ms": t_whole, "single_n_ms": t_one,
                 "compute_ms_max": max(computes), "compute_ms_mean": statistics.mean(computes),
                 "bytes_max": max(sent), "model_bytes": model.total_bytes,
                 "comm_ms": max(sent) / link * 1e3, "projected_ms": projected,
                 "efficiency_work": t_whole / world / projected,
                 "efficiency_n": t_one / projected, "rel_err": err,
                 "calls_per_step_mean": statistics.mean(c for c, _ in steps) if steps else 0.0,
                 "calls_per_step_max": max((c for c, _ in steps), default=0),
                 "host_us_per_step": statistics.mean(t for _, t in steps) * 1e6 if steps else 0.0}
            )  # fmt: skip
            print("row", json.dumps(rows[-1]), flush=True)
    print(
        f"\nsimulated ring ({args.strategy}, {mode}) | {device} {dtype} | b=1 h={heads} d={d} | "
        f"causal fwd+bwd | {preset} branches <= seq | link {args.link_gbps} GB/s"
    )
    print(
        f"{'n/rank':>7} {'P':>2} {'1GPU nP/P':>9} {'1GPU n':>8} {'rank max':>8} {'mean':>7} "
        f"{'MiB sent':>9} {'model':>9} {'comm ms':>7} {'proj ms':>8} {'eff(work)':>9} "
        f"{'eff(n)':>6} {'err':>8} {'calls/step':>10} {'host us/step':>12}"
    )
    for r in rows:
        print(
            f"{r['tokens_per_rank']:>7} {r['P']:>2} {r['single_whole_ms'] / r['P']:>9.2f} "
            f"{r['single_n_ms']:>8.2f} {r['compute_ms_max']:>8.2f} {r['compute_ms_mean']:>7.2f} "
            f"{r['bytes_max'] / 2**20:>9.1f} {r['model_bytes'] / 2**20:>9.1f} "
            f"{r['comm_ms']:>7.2f} {r['projected_ms']:>8.2f} {r['efficiency_work']:>9.2f} "
            f"{r['efficiency_n']:>6.2f} {r['rel_err']:>8.1e} "
            f"{r['calls_per_step_mean']:>5.2f}/{r['calls_per_step_max']:<4} "
            f"{r['host_us_per_step']:>12.0f}"
        )
    return rows


def _profile(fn: Callable[[], None], what: str) -> None:
    """Device-busy time against wall time of one call, and its costliest device ops."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profile {what}: wall {wall:.2f} ms, device busy {busy:.2f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def _check_live(
    whole: list[torch.Tensor],
    world: int,
    mode: str,
    strategy: str,
    ws: list[int],
    rs: list[int],
    single: Callable[..., Any],
) -> float:
    """Largest relative error of a fully live simulated ring (out, dq, dk, dv) against the
    single-GPU op on the same tokens."""
    g = torch.randn_like(whole[0])
    ref = single(*whole)
    ref_grads = torch.autograd.grad(ref, whole, g)

    def rank_fn(rank: int, group: Any) -> list[torch.Tensor]:
        # CUDA autograd runs every backward of a device on one engine thread, where the ranks'
        # backward passes would wait for each other: drive the two passes directly instead.
        q, k, v, d_out = (shard(t.detach(), rank, world, mode) for t in (*whole, g))
        return list(
            ring_passes(
                q, k, v, d_out, ws, rs, group=group, is_causal=True, load_balance=mode,
                strategy=strategy, timeout_s=600.0,
            )
        )  # fmt: skip

    results = run_ranks(rank_fn, world, timeout_s=600)
    got = [unshard([r[i] for r in results], mode) for i in range(4)]
    errs = [
        ((a.float() - e.float()).abs().max() / e.float().abs().max()).item()
        for a, e in zip(got, [ref.detach(), *ref_grads])
    ]
    return max(errs)


def distributed(args: argparse.Namespace, cuda: bool) -> list[dict[str, Any]]:
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29518")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, d = (16, 128) if cuda else (4, 32)
    n = (args.tokens_per_rank or [8192 if cuda else 512])[0]
    seq = n * world
    ws, rs = _branches(seq, args.preset) if cuda else ([n // 2, seq], [1, 4])
    mine = [
        shard(t.detach(), rank, world).requires_grad_()
        for t in inputs(seq, heads, d, dtype, device)
    ]
    attn = lambda q, k, v: ring_dilated_attention(
        q, k, v, ws, rs, is_causal=True, strategy=args.strategy
    )
    ms = timed(step(attn, mine, True), cuda, args.iters)
    rows = [{"P": world, "tokens_per_rank": n, "ms": ms}]
    if rank == 0:
        print(f"\nreal ring ({args.strategy}) P={world} n/rank={n} w={ws} r={rs}: {ms:.2f} ms/step")
    dist.destroy_process_group()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="*", default=None)
    parser.add_argument("--simulate", type=int, nargs="*", default=None, metavar="P")
    parser.add_argument("--tokens-per-rank", type=int, nargs="*", default=None)
    parser.add_argument("--preset", default="longnet_1m", choices=sorted(PRESETS))
    parser.add_argument("--strategy", default="ring", choices=["ring", "allgather"])
    parser.add_argument("--load-balance", default="contiguous", choices=["contiguous", "zigzag"])
    parser.add_argument("--link-gbps", type=float, default=450.0, help="GB/s per direction")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--check-max-tokens", type=int, default=32768)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile the last rank's step")
    parser.add_argument("--skip-world-of-one", action="store_true")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.distributed:
        result["distributed"] = distributed(args, cuda)
    else:
        if not args.skip_world_of_one:
            result["world_of_one"] = world_of_one(args, cuda, device)
            _write(args.out, result)
        if args.simulate:
            result["simulate"] = simulate(args, cuda, device)
    _write(args.out, result)


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
