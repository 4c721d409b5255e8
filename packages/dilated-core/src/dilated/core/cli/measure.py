"""Timing and peak-memory measurement of one call, on CPU or CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


class _LiveStorageBytes(TorchDispatchMode):
    """Peak total bytes of the live storages that the ops run under it created.

    A storage an op returns counts from then until it is freed (a weak reference tells when).
    Storages that existed before (the inputs, parameters) are not counted, even when an op
    returns a view of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.external: dict[int, StorageWeakRef] = {}
        self.peak = 0

    def _alive(self, ptr: int) -> bool:
        """Whether ``ptr`` is the address of a storage already known (counted or external)."""
        known = self.live.get(ptr)
        if known is not None and not known[0].expired():
            return True
        outside = self.external.get(ptr)
        return outside is not None and not outside.expired()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and not self._alive(ptr):
                    self.external[ptr] = StorageWeakRef(storage)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if not ptr or self._alive(ptr):
                    continue
                self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {p: e for p, e in self.live.items() if not e[0].expired()}
        self.external = {p: w for p, w in self.external.items() if not w.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes the call allocates beyond what existed before it.

    On CUDA this is ``torch.cuda.max_memory_allocated`` over the call minus the memory allocated
    before it. On CPU, where PyTorch keeps no allocator statistics, it is the peak total size of
    the live storages that the call's operators created, tracked with a dispatch mode (so it
    counts tensors, not allocator caching or fragmentation).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - base, 0)
    tracker = _LiveStorageBytes()
    with tracker:
        fn()
    return tracker.peak
