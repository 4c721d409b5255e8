"""Rank bodies of the gloo tests (importable by name in spawned processes) and their harness."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dilated.core import SparsePatternConfig
from dilated.core.sparsity import resolve_layouts
from dilated.core.testing import assert_close_to_reference, make_inputs
from dilated.ring.comm import RingComm
from dilated.sparse import (
    DistributedBlockSparseDilatedAttention,
    block_sparse_dilated_attention,
)
from dilated.sparse.distributed import comm_bytes

SEGMENTS, RATES, SEQ = [8, 32, 64], [1, 2, 4], 64


def equivalence(rank: int, world: int, pattern: str, is_causal: bool) -> None:
    """This rank's output and gradients equal its rows of the single-process op; bytes as modelled."""
    cfg = SparsePatternConfig(pattern, block_size=2)
    x = make_inputs(1, SEQ, 4, 8, kv_heads=2, dtype=torch.float64, seed=7)
    grad = torch.randn(
        1, SEQ, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    size = SEQ // world
    rows = slice(rank * size, (rank + 1) * size)
    q, k, v = (t[:, rows].clone().requires_grad_() for t in (x.q, x.k, x.v))
    module = DistributedBlockSparseDilatedAttention(
        SEGMENTS, RATES, sparse_config=cfg, is_causal=is_causal, timeout_s=60.0
    )
    RingComm.reset_counters()
    out = module(q, k, v)
    out.backward(grad[:, rows])
    fq, fk, fv = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    ref = block_sparse_dilated_attention(
        fq, fk, fv, SEGMENTS, RATES, sparse_config=cfg, is_causal=is_causal
    )
    ref.backward(grad)
    for what, got, want in (
        ("out", out, ref),
        ("dq", q.grad, fq.grad),
        ("dk", k.grad, fk.grad),
        ("dv", v.grad, fv.grad),
    ):
        assert got is not None and want is not None
        assert_close_to_reference(got, want[:, rows], torch.float64, f"rank {rank} {what}")
    model = comm_bytes(
        resolve_layouts(cfg, SEGMENTS, RATES), 2, world_size=world, rank=rank, shard=size,
        batch=1, heads=4, kv_heads=2, head_dim=8, is_causal=is_causal, dtype=torch.float64,
    )  # fmt: skip
    assert RingComm.bytes_sent == model["forward"] + model["backward"], (RingComm.bytes_sent, model)


def _entry(rank: int, world: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        equivalence(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(world: int, *args: Any, timeout: float = 180.0) -> None:
    """Run :func:`equivalence` on ``world`` spawned gloo ranks; re-raise the first failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ctx = mp.start_processes(
        _entry, args=(world, port, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gloo ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
