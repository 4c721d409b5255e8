"""A bounded, thread-safe pool of scratch tensors.

Ring send/receive buffers and kernel scratch (LSE, accumulators) have the same shapes step after
step; allocating them anew each time costs allocator calls and, on CUDA, fragmentation. The pool
keeps released buffers, keyed by ``(shape, dtype, device)``, and hands one back on the next
request of that key. Rules:

- a buffer is handed to one borrower at a time: it re-enters the pool only through
  :meth:`MemoryPool.release`, and releasing it twice or releasing a foreign tensor is an error;
- idle bytes stay under ``max_bytes`` and idle buffers per key under ``max_buffers_per_key``; the
  least recently released buffers are evicted first;
- on CUDA, a release records an event on the releasing stream and a later acquire waits for it on
  the acquiring stream, so a buffer still being read by queued kernels is not overwritten.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dilated.core.config import MemoryPoolConfig

__all__ = ["MemoryPool", "PoolStats", "get_default_pool"]

_Key = tuple[tuple[int, ...], torch.dtype, torch.device]


@dataclass(frozen=True)
class PoolStats:
    """Counters of a :class:`MemoryPool` at one moment.

    Attributes:
        hits: acquires served from an idle buffer.
        misses: acquires that allocated.
        evictions: idle buffers dropped to respect the bounds.
        bytes_held: bytes of idle buffers kept for reuse.
        bytes_in_use: bytes of buffers handed out and not yet released.
        buffers_in_use: number of such buffers.
    """

    hits: int
    misses: int
    evictions: int
    bytes_held: int
    bytes_in_use: int
    buffers_in_use: int


@dataclass
class _Idle:
    tensor: torch.Tensor
    event: torch.cuda.Event | None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryPool:
    """Reusable scratch tensors, bounded in bytes, safe to share between threads.

    Args:
        config: bounds; default :class:`~dilated.core.config.MemoryPoolConfig()` (1 GiB idle).

    Example:
        >>> pool = MemoryPool()
        >>> with pool.borrow((4, 8), torch.float32, "cpu") as buf:
        ...     buf.fill_(1.0).sum().item()
        32.0
    """

    def __init__(self, config: MemoryPoolConfig | None = None) -> None:
        self.config = config if config is not None else MemoryPoolConfig()
        self._lock = threading.Lock()
        # key -> idle buffers, and one LRU order over every idle buffer (by id).
        self._idle: dict[_Key, list[_Idle]] = {}
        self._lru: OrderedDict[int, _Key] = OrderedDict()
        self._in_use: dict[int, torch.Tensor] = {}
        self._hits = self._misses = self._evictions = 0
        self._bytes_held = self._bytes_in_use = 0

    @staticmethod
    def _key(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> _Key:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        dims = tuple(int(s) for s in shape)
        if any(s < 0 for s in dims):
            raise ValueError(f"shape must hold non-negative sizes, got {dims}")
        return dims, dtype, dev

    def acquire(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape``/``dtype``/``device`` with undefined contents.

        The caller owns it until :meth:`release`; no one else receives it meanwhile.
        """
        key = self._key(shape, dtype, device)
        idle: _Idle | None = None
        with self._lock:
            if self.config.enabled and self._idle.get(key):
                idle = self._idle[key].pop()
                del self._lru[id(idle.tensor)]
                self._bytes_held -= _nbytes(idle.tensor)
                self._hits += 1
            else:
                self._misses += 1
        if idle is not None:
            tensor = idle.tensor
            if idle.event is not None:
                torch.cuda.current_stream(tensor.device).wait_event(idle.event)
        else:
            tensor = torch.empty(key[0], dtype=dtype, device=key[2])
        with self._lock:
            self._in_use[id(tensor)] = tensor
            self._bytes_in_use += _nbytes(tensor)
        return tensor

    def release(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Give ``tensor`` (from :meth:`acquire`) back for reuse.

        Args:
            tensor: the very tensor object that :meth:`acquire` returned.
            stream: CUDA stream whose queued work still uses it (default: the current stream).
        """
        event = None
        if tensor.is_cuda:
            event = torch.cuda.Event()
            event.record(stream if stream is not None else torch.cuda.current_stream(tensor.device))
        with self._lock:
            if self._in_use.pop(id(tensor), None) is not tensor:
                raise ValueError("tensor was not acquired from this pool or was already released")
            size = _nbytes(tensor)
            self._bytes_in_use -= size
            if not self.config.enabled:
                return
            key = self._key(tensor.shape, tensor.dtype, tensor.device)
            bucket = self._idle.setdefault(key, [])
            bucket.append(_Idle(tensor, event))
            self._lru[id(tensor)] = key
            self._bytes_held += size
            while len(bucket) > self.config.max_buffers_per_key:
                self._evict_one(key)
            while self._bytes_held > self.config.max_bytes and self._lru:
                self._evict_one(None)

    def _evict_one(self, key: _Key | None) -> None:
        """Drop the least recently released idle buffer (of ``key`` if given). Lock held."""
        if key is None:
            victim_id, key = next(iter(self._lru.items()))
            bucket = self._idle[key]
            idx = next(i for i, b in enumerate(bucket) if id(b.tensor) == victim_id)
        else:
            bucket = self._idle[key]
            idx = 0  # buckets are in release order: the oldest first
        victim = bucket.pop(idx)
        del self._lru[id(victim.tensor)]
        if not bucket:
            del self._idle[key]
        self._bytes_held -= _nbytes(victim.tensor)
        self._evictions += 1

    @contextmanager
    def borrow(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """Context manager: :meth:`acquire` on entry, :meth:`release` on exit."""
        tensor = self.acquire(shape, dtype, device)
        try:
            yield tensor
        finally:
            self.release(tensor)

    def stats(self) -> PoolStats:
        """A snapshot of the counters."""
        with self._lock:
            return PoolStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes_held=self._bytes_held,
                bytes_in_use=self._bytes_in_use,
                buffers_in_use=len(self._in_use),
            )

    def clear(self) -> None:
        """Drop every idle buffer (buffers in use are unaffected)."""
        with self._lock:
            self._idle.clear()
            self._lru.clear()
            self._bytes_held = 0


_default_pool: MemoryPool | None = None
_default_lock = threading.Lock()


def get_default_pool() -> MemoryPool:
    """The process-wide pool that the ``dilated`` packages share (created on first use)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = MemoryPool()
        return _default_pool
