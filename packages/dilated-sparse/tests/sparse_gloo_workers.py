"""Rank bodies of the gloo tests (importable by name in spawned processes) and their harness."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dilated.core import SparsePatternConfig
from dilated.core.sparsity import resolve_layouts
from dilated.core.testing import assert_close_to_reference, make_inputs
from dilated.core.testing.distributed import run_distributed
from dilated.ring.comm import RingComm
from dilated.sparse import (
    DistributedBlockSparseDilatedAttention,
    block_sparse_dilated_attention,
    block_sparse_ring_dilated_attention,
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


#: Seconds within which every rank must raise for a bad or disagreeing call: far below the
#: call's timeout_s, so a rank that waited for its peer instead would fail the test.
PROMPT_S = 10.0


def disagreements(rank: int, world: int) -> None:
    """One rank's argument differs or is bad: every rank raises at once, naming it, through the
    agreement of dilated-ring; the ranks stay in step (a good call works afterwards)."""
    cfg = SparsePatternConfig("local_window", local_window_size=2, block_size=2)
    x = make_inputs(1, SEQ, 4, 8, seed=11)
    size = SEQ // world
    q, k, v = (t[:, rank * size : (rank + 1) * size] for t in (x.q, x.k, x.v))

    def expect(match: str, **kw: Any) -> None:
        args = {"segment_lengths": SEGMENTS, "sparse_config": cfg, "timeout_s": 60.0, **kw}
        query = args.pop("q", q)
        segments = args.pop("segment_lengths")
        start = time.monotonic()
        with pytest.raises(ValueError, match=match):
            block_sparse_ring_dilated_attention(query, k, v, segments, RATES, **args)
        waited = time.monotonic() - start
        assert waited < PROMPT_S, f"rank {rank} waited {waited:.1f} s for {match!r}"

    # Different custom layouts (tables or functions) that agree on every other field.
    mine = SparsePatternConfig(
        "custom", block_size=2, layout=lambda a, b: (a - b).abs() <= (1 if rank == 0 else 2)
    )
    expect(r"option 'sparse_config \(resolved layout\)' differs", sparse_config=mine)
    table = torch.eye(16, dtype=torch.bool)
    table[rank, rank + 1] = True
    tables = SparsePatternConfig("custom", block_size=2, layout=table)
    expect(r"option 'sparse_config \(resolved layout\)' differs", sparse_config=tables)
    # An int where the branch list goes, on the last rank: every rank names the argument.
    last = world - 1
    expect(
        rf"(rank\(s\) \[{last}\]; )?rank {last}: segment_lengths must be a sequence",
        segment_lengths=8 if rank == last else SEGMENTS,
    )
    # A bad timeout_s on rank 0 only: refused before any wait, on every rank.
    expect(
        r"rank 0: timeout_s must be None or a finite positive", timeout_s=-1 if rank == 0 else 60.0
    )
    # DILATED_CHECK_FINITE=1 is read (check_finite left None): a NaN on the last rank only.
    nan_q = q.clone()
    if rank == last:
        nan_q[0, 0, 0, 0] = float("nan")
    os.environ["DILATED_CHECK_FINITE"] = "1"
    try:
        expect(rf"rank {last}: q holds NaN", q=nan_q)
    finally:
        del os.environ["DILATED_CHECK_FINITE"]
    # Strict booleans, as in the single-process op.
    expect(r"is_causal must be a bool", is_causal=1)
    expect(r"return_lse must be a bool", return_lse="no")
    dist.barrier()
    out = block_sparse_ring_dilated_attention(q, k, v, SEGMENTS, RATES, sparse_config=cfg)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def run_gloo(
    world: int, *args: Any, body: Callable[..., None] = equivalence, timeout: float = 180.0
) -> None:
    """Run ``body(rank, world, *args)`` (default :func:`equivalence`) on ``world`` gloo ranks
    with dilated-core's process harness; re-raise the first failure."""
    run_distributed(body, world, *args, timeout=timeout)
