"""A bounded, thread-safe pool of scratch tensors.

Ring send/receive buffers and kernel scratch (LSE, accumulators) have the same shapes step after
step; allocating them anew each time costs allocator calls and, on CUDA, fragmentation. The pool
keeps released buffers, keyed by ``(shape, dtype, device)``, and hands one back on the next
request of that key. Rules:

- a buffer is handed to one borrower at a time. Every [`MemoryPool.acquire`][dilated.core.memory_pool.MemoryPool.acquire] is one loan
  and returns a new tensor object (a fresh alias of the pooled storage), so the tensor *is* the
  loan's token: [`MemoryPool.release`][dilated.core.memory_pool.MemoryPool.release] accepts exactly the object one open loan returned,
  once. Releasing a tensor twice raises ``ValueError`` even after its storage has been lent to
  someone else (whose tensor is another object), and so does releasing a foreign tensor, a view
  of a borrowed tensor, or another pool's buffer;
- idle bytes stay under ``max_bytes`` and idle buffers per key under ``max_buffers_per_key``; the
  least recently released buffers are evicted first;
- on CUDA, [`MemoryPool.release`][dilated.core.memory_pool.MemoryPool.release] records an event on the releasing stream (the current one
  unless ``stream`` is given) and the [`MemoryPool.acquire`][dilated.core.memory_pool.MemoryPool.acquire] that hands the buffer out again
  makes the acquiring stream wait for that event, so kernels queued on the new stream cannot
  overwrite the buffer while kernels queued earlier on the old stream still read or write it.
  The wait is queued on the device; the host never blocks, and it is left out when both streams
  are the same (stream order already holds). A CUDA buffer the pool drops (eviction, ``clear``)
  is marked with ``record_stream`` for its last stream, so that PyTorch's allocator does not
  reuse its memory before that stream's work is done. On CPU every op runs synchronously
  when it is called, so no event is needed and none is recorded.

The pool does not zero buffers: an acquired tensor holds whatever its last borrower wrote.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dilated.core.checks import check_instance
from dilated.core.config import MemoryPoolConfig

__all__ = ["MemoryPool", "PoolStats", "get_default_pool"]

_Key = tuple[tuple[int, ...], torch.dtype, torch.device]


@dataclass(frozen=True)
class PoolStats:
    """Counters of a [`MemoryPool`][dilated.core.memory_pool.MemoryPool] at one moment.

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
    tensor: torch.Tensor  # the pool's own reference to the storage, never handed out
    event: torch.cuda.Event | None
    stream: torch.cuda.Stream | None  # where ``event`` was recorded


@dataclass
class _Loan:
    """One open borrow: ``handle`` is what the borrower holds, ``base`` the pool's reference."""

    handle: torch.Tensor
    base: torch.Tensor
    key: _Key
    size: int  # bytes as handed out: a borrower may resize ``handle`` in place meanwhile
    number: int  # the loan's serial number, for error messages


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _forget(tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
    """Prepare a buffer the pool drops: its memory goes back to PyTorch's allocator.

    That allocator only knows the stream the memory was allocated on; if queued work on another
    stream still uses the buffer, it must not reuse the memory before that work is done.
    """
    if tensor.is_cuda:
        tensor.record_stream(stream if stream is not None else torch.cuda.current_stream())


class MemoryPool:
    """Reusable scratch tensors, bounded in bytes, safe to share between threads.

    Args:
        config: bounds; default [`MemoryPoolConfig`][dilated.core.config.MemoryPoolConfig] (1 GiB idle).

    Raises:
        ArgumentTypeError: ``config`` is not a ``MemoryPoolConfig`` or None (a dict of its
            fields included: build ``MemoryPoolConfig(**fields)``, which checks them).

    Example:
        >>> pool = MemoryPool()
        >>> with pool.borrow((4, 8), torch.float32, "cpu") as buf:
        ...     buf.fill_(1.0).sum().item()
        32.0
    """

    def __init__(self, config: MemoryPoolConfig | None = None) -> None:
        if config is not None:
            # Read at every acquire and release: anything else would fail there, not here.
            what = "a MemoryPoolConfig or None (for a dict of fields: MemoryPoolConfig(**fields))"
            check_instance("config", config, MemoryPoolConfig, what)
        self.config = config if config is not None else MemoryPoolConfig()
        self._lock = threading.Lock()
        # key -> idle buffers, and one LRU order over every idle buffer (by id).
        self._idle: dict[_Key, list[_Idle]] = {}
        self._lru: OrderedDict[int, _Key] = OrderedDict()
        # id(handle) -> loan; the loan keeps the handle alive, so no id is reused while open.
        self._in_use: dict[int, _Loan] = {}
        self._loans = 0
        # Spare CUDA events: creating one per release costs more than the allocation it saves.
        # An event belongs to the device it was first recorded on: one free list per device.
        self._events: dict[torch.device, list[torch.cuda.Event]] = {}
        self._hits = self._misses = self._evictions = 0
        self._bytes_held = self._bytes_in_use = 0

    @staticmethod
    def _key(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> _Key:
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        try:
            # operator.index rejects floats, so a size of 2.5 never silently becomes 2.
            dims = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise ValueError(f"shape must hold non-negative integer sizes, got {shape!r}") from None
        if any(s < 0 for s in dims):
            raise ValueError(f"shape must hold non-negative integer sizes, got {dims}")
        return dims, dtype, dev

    def acquire(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        stream: torch.cuda.Stream | None = None,
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape``/``dtype``/``device`` with undefined contents.

        The caller owns it until [`release`][dilated.core.memory_pool.MemoryPool.release]; no one else receives it meanwhile.

        Args:
            shape: sizes, e.g. ``(batch, seq, heads, head_dim)``.
            dtype: element type.
            device: where it lives; ``"cuda"`` means the current CUDA device.
            stream: CUDA stream that will use the buffer (default: the current stream of its
                device); a reused buffer is made safe for this stream. Ignored on CPU.

        Returns:
            A tensor that requires no grad, owned by the caller until released: a new tensor
            object per call (the token of this loan), possibly over reused storage.
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
                user = stream if stream is not None else torch.cuda.current_stream(tensor.device)
                if user != idle.stream:  # on the releasing stream, stream order already holds
                    user.wait_event(idle.event)
                with self._lock:  # the wait is queued: the event may be recorded anew
                    self._events.setdefault(key[2], []).append(idle.event)
        else:
            tensor = torch.empty(key[0], dtype=dtype, device=key[2])
        # A new object per loan: a stale reference from an earlier loan of this storage is
        # never the current borrower's tensor, so releasing it cannot end the current loan.
        handle = tensor.detach()
        with self._lock:
            self._loans += 1
            self._in_use[id(handle)] = _Loan(handle, tensor, key, _nbytes(tensor), self._loans)
            self._bytes_in_use += _nbytes(tensor)
        return handle

    def release(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Give ``tensor`` (from [`acquire`][dilated.core.memory_pool.MemoryPool.acquire]) back for reuse; the caller must not touch it again.

        Args:
            tensor: the very tensor object that [`acquire`][dilated.core.memory_pool.MemoryPool.acquire] returned.
            stream: CUDA stream whose queued work is the last to use it (default: the current
                stream of its device). The next acquire waits for that work. Ignored on CPU.

        Raises:
            ValueError: ``tensor`` is not the tensor of an open loan of this pool: released
                already (its storage may be lent to another borrower by now), a view
                of a borrowed tensor, or a tensor this pool never handed out.
        """
        with self._lock:
            loan = self._in_use.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if loan is None or loan.handle is not tensor:
                raise ValueError(self._release_error(tensor))
            del self._in_use[id(tensor)]
            key, size, base = loan.key, loan.size, loan.base
            self._bytes_in_use -= size
            if not self.config.enabled:
                return
            # The borrower's autograd flags and .grad live on its handle, which the pool drops:
            # the next loan gets a fresh handle of ``base``, untouched by them.
            if (
                _nbytes(tensor) != size
                or tuple(tensor.shape) != key[0]
                or not tensor.is_contiguous()
                or tensor.data_ptr() != base.data_ptr()
                or tuple(base.shape) != key[0]
                or _nbytes(base) != size
            ):
                # Reshaped or re-pointed in place by its borrower: no longer what its key
                # promises, dropped.
                _forget(base, stream)
                return
            tensor = base
            event, last = None, None
            if tensor.is_cuda:
                spare = self._events.get(key[2])
                event = spare.pop() if spare else torch.cuda.Event()
                last = stream if stream is not None else torch.cuda.current_stream(tensor.device)
                event.record(last)
            bucket = self._idle.setdefault(key, [])
            bucket.append(_Idle(tensor, event, last))
            self._lru[id(tensor)] = key
            self._bytes_held += size
            while len(bucket) > self.config.max_buffers_per_key:
                self._evict_one(key)
            while self._bytes_held > self.config.max_bytes and self._lru:
                self._evict_one(None)

    def _release_error(self, tensor: object) -> str:
        """Why ``tensor`` cannot be released (lock held)."""
        if not isinstance(tensor, torch.Tensor):
            return f"release takes the tensor that acquire returned, got {type(tensor).__name__}"
        ptr = tensor.untyped_storage().data_ptr()
        for loan in self._in_use.values():
            if loan.base.untyped_storage().data_ptr() == ptr:
                return (
                    f"tensor is not the one an open loan of this pool returned: its storage is "
                    f"lent (loan #{loan.number}) to the holder of another tensor object, so it "
                    "was already released (double release), or it is a view of a "
                    "borrowed tensor; release exactly the tensor acquire returned, once"
                )
        for bucket in self._idle.values():
            if any(idle.tensor.untyped_storage().data_ptr() == ptr for idle in bucket):
                return "tensor was already released to this pool (double release)"
        return (
            "tensor was not acquired from this pool or was already released (release exactly "
            "the tensor acquire returned, once)"
        )

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
        _forget(victim.tensor, victim.stream)
        if victim.event is not None:
            # Nobody will wait on it, so it can be recorded anew.
            self._events.setdefault(victim.tensor.device, []).append(victim.event)
        del self._lru[id(victim.tensor)]
        if not bucket:
            del self._idle[key]
        self._bytes_held -= _nbytes(victim.tensor)
        self._evictions += 1

    @contextmanager
    def borrow(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """Context manager: [`acquire`][dilated.core.memory_pool.MemoryPool.acquire] on entry, [`release`][dilated.core.memory_pool.MemoryPool.release] on exit."""
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
        """Drop every idle buffer (buffers in use are unaffected; not counted as evictions)."""
        with self._lock:
            for bucket in self._idle.values():
                for idle in bucket:
                    _forget(idle.tensor, idle.stream)
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
