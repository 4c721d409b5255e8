"""Weak scaling of ring dilated attention: P ranks on n*P tokens against one rank on n tokens.

Prints, per world size reachable here (1 and the launched P), the time of one forward+backward
step, the efficiency ``t(1, n) / t(P, n*P)`` and the bytes each rank sent against the cost model
(:func:`dilated.ring.comm_cost`). bf16, 16 heads of 128 on CUDA; float32 and a small shape on CPU.

Run: ``torchrun --nproc-per-node P benchmarks/ring.py [--tokens-per-rank N] [--strategy ring]``;
also runs as plain ``python benchmarks/ring.py`` (a world of one).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dilated.ring import comm_cost, ring_dilated_attention
from dilated.ring.comm import RingComm


def _step_time(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ws: list[int],
    rs: list[int],
    strategy: str,
    group: dist.ProcessGroup | None,
    iters: int,
) -> tuple[float, int]:
    def step() -> None:
        out = ring_dilated_attention(
            q, k, v, ws, rs, is_causal=True, strategy=strategy, group=group, check_finite=False
        )
        assert isinstance(out, torch.Tensor)
        out.backward(torch.ones_like(out))

    step()
    RingComm.reset_counters()
    step()
    sent = RingComm.bytes_sent
    if q.is_cuda:
        torch.cuda.synchronize()
    dist.barrier(group)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if q.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=None)
    parser.add_argument("--strategy", default="ring", choices=["ring", "allgather"])
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29518")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, head_dim = (16, 128) if cuda else (4, 32)
    n = args.tokens_per_rank or (8192 if cuda else 512)
    rows = []
    for p in sorted({1, world}):
        # A group of the first p ranks; ranks outside it wait at the barrier.
        group = dist.new_group(list(range(p))) if p < world else None
        seq = n * p
        # One local branch and one that spans every rank of the group.
        ws, rs = [n // 2, seq], [1, 4]
        if rank < p:
            q, k, v = (
                torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                for _ in range(3)
            )
            t, sent = _step_time(q, k, v, ws, rs, args.strategy, group, args.iters)
            model = comm_cost(seq, p, heads, head_dim, ws, rs, dtype, strategy=args.strategy)
            rows.append((p, seq, t, sent, model.total_bytes))
        dist.barrier()
    if rank == 0:
        base = rows[0][2]
        print(f"{args.strategy} | {device} {dtype} | heads={heads} head_dim={head_dim} | causal")
        print(
            f"{'P':>3} {'tokens':>8} {'ms/step':>9} {'efficiency':>10} {'MiB sent':>9} {'model':>9}"
        )
        for p, seq, t, sent, model in rows:
            print(
                f"{p:>3} {seq:>8} {t * 1e3:>9.2f} {base / t:>10.2f} "
                f"{sent / 2**20:>9.2f} {model / 2**20:>9.2f}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
