"""Equivalence of ring dilated attention with the reference under torchrun, one process per GPU.

Run: ``torchrun --nproc-per-node P packages/dilated-ring/tests/multigpu_equivalence.py``
(NCCL on CUDA, gloo without it; any P, including 1). Every rank checks its output and q/k/v
gradients against its rows of the float64 single-device reference, for every strategy (ring,
allgather, ulysses), every sharding, causal and not, grouped-query attention, key padding masks,
float32 and bfloat16; exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import random
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from workers import check_equivalence, random_config, ulysses_config


def main() -> None:
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python multigpu_equivalence.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    rng = random.Random(1234 + world)
    checked = 0
    try:
        for strategy in ("ring", "allgather"):
            for mode in ("contiguous", "zigzag", "striped"):
                for i in range(4):
                    cfg = random_config(rng, world, mode)
                    dtype = (torch.float32, torch.bfloat16)[i % 2]
                    check_equivalence(
                        rank, world, cfg, mode, dtype, 100 + i, strategy=strategy, device=device
                    )
                    checked += 1
        for i in range(6):
            cfg = ulysses_config(rng, world)
            mode = ("contiguous", "zigzag", "striped")[i % 3]
            dtype = (torch.float32, torch.bfloat16)[i % 2]
            check_equivalence(
                rank,
                world,
                cfg,
                mode,
                dtype,
                200 + i,
                strategy="ulysses",
                device=device,
                masked=i % 2 == 1,
            )
            checked += 1
    finally:
        dist.barrier()
    if rank == 0:
        print(f"multigpu equivalence: {checked} configurations OK on {world} rank(s) ({device})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
