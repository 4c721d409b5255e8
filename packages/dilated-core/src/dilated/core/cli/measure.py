"""Timing (median and spread, by ``torch.utils.benchmark``) and CUDA peak memory of one call."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "peak_bytes", "timed"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the timed blocks: median, first and third quartile."""

    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.q1:.2f}-{self.q3:.2f})"


def _benchmark() -> Any:
    # Its import reaches torch.utils.cpp_extension, which logs a warning about CUDA_HOME on a
    # machine without the CUDA toolkit: irrelevant to timing Python calls.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torch.utils.benchmark as benchmark
    finally:
        quiet.setLevel(level)
    return benchmark


def timed(fn: Callable[[], Any], warmup: int, min_time: float, min_blocks: int) -> Timing:
    """Time ``fn()`` with ``torch.utils.benchmark.Timer`` (it synchronises CUDA).

    ``warmup`` untimed calls first; then ``blocked_autorange`` runs blocks of calls for at least
    ``min_time`` seconds, and more blocks until there are ``min_blocks``; the quartiles are
    over the blocks' per-call times, so one slow call (a compile, the OS) shows as spread.
    """
    for _ in range(warmup):
        fn()
    timer = _benchmark().Timer(stmt="fn()", globals={"fn": fn})
    measured = timer.blocked_autorange(min_run_time=min_time)
    times = list(measured.times)
    while len(times) < min_blocks:
        times.extend(timer.timeit(measured.number_per_run).times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times) * 1e3, q1 * 1e3, q3 * 1e3)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes one call allocates beyond what existed before it, on CUDA
    (``torch.cuda.max_memory_allocated`` over the call minus what was allocated before it);
    None elsewhere: PyTorch keeps no CPU allocator statistics, and counting tensors at the
    dispatcher misses what a custom op allocates inside."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - base, 0)
