"""Run a test body on several gloo ranks on 127.0.0.1, with a hard timeout (never hangs).

The one process harness of every package's distributed tests (CPU, gloo). Ranks start from a
fork server that imported torch and the ``dilated`` packages once: a spawned rank spent 2-3 s
importing them again, most of a test's time on 2 cores. The server forks before any test state
exists (no threads, no CUDA), which is what makes forking safe.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

__all__ = ["TIMEOUT_S", "run_distributed"]

#: Seconds a test's ranks may take, all together, before the test fails as a hang.
TIMEOUT_S = 120.0

# A module missing from the environment is skipped by the server.
_PRELOAD = ["torch", "torch.distributed", "dilated.core", "dilated.ring", "dilated.sparse"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., None], world: int, *args: Any, timeout: float = TIMEOUT_S
) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise the first failure.

    ``fn`` must be importable by name (a module-level function of an importable module).

    Raises:
        TimeoutError: the ranks did not all finish within ``timeout`` seconds.
    """
    mp.set_forkserver_preload(_PRELOAD)  # takes effect when the server first starts
    ctx = start_processes(
        _entry, args=(world, _free_port(), fn, args), nprocs=world, join=False,
        start_method="forkserver",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout} s (hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
