"""Micro-benchmark: scratch buffers from MemoryPool against a fresh torch.empty each step.

Prints, per shape, the time per acquire+release against torch.empty, and the allocations the
pool saved over a simulated ring loop (one send and one receive buffer per step).
Run: ``uv run python benchmarks/memory_pool.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from dilated.core import MemoryPool


def _per_call_us(fn: object, iters: int, sync: bool) -> float:
    assert callable(fn)
    for _ in range(10):
        fn()
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=64, help="ring steps simulated per shape")
    args = parser.parse_args()
    sync = args.device.startswith("cuda")
    shapes = [(1, 4096, 16, 128), (1, 16384, 16, 128), (1, 65536, 4, 128)]
    rows = []
    for shape in shapes:
        pool = MemoryPool()

        def pooled(shape: tuple[int, ...] = shape, pool: MemoryPool = pool) -> None:
            pool.release(pool.acquire(shape, torch.bfloat16, args.device))

        def fresh(shape: tuple[int, ...] = shape) -> None:
            torch.empty(shape, dtype=torch.bfloat16, device=args.device)

        t_pool = _per_call_us(pooled, args.iters, sync)
        t_empty = _per_call_us(fresh, args.iters, sync)
        ring = MemoryPool()
        for _ in range(args.steps):
            send = ring.acquire(shape, torch.bfloat16, args.device)
            recv = ring.acquire(shape, torch.bfloat16, args.device)
            ring.release(send)
            ring.release(recv)
        s = ring.stats()
        rows.append((shape, t_pool, t_empty, s.misses, 2 * args.steps, s.hits))
    print(f"device: {args.device}, dtype bfloat16, {args.iters} iterations per timing")
    print(
        f"{'shape':<22} {'pool us':>9} {'empty us':>9} {'allocs with pool':>17} {'allocs without':>15} {'saved':>7}"
    )
    for shape, tp, te, misses, total, hits in rows:
        print(f"{shape!s:<22} {tp:9.2f} {te:9.2f} {misses:17d} {total:15d} {hits:7d}")


if __name__ == "__main__":
    main()
