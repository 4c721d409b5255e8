"""MemoryPool: reuse, bounds, LRU eviction, misuse errors and thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from dilated.core import MemoryPool, MemoryPoolConfig, get_default_pool

F32 = torch.float32


def test_reuse_counts_hits_and_misses() -> None:
    pool = MemoryPool()
    a = pool.acquire((4, 8), F32)
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.acquire((4, 8), F32)
    assert b.data_ptr() == ptr  # the same storage came back
    c = pool.acquire((4, 8), F32)  # b is in use: a fresh one
    assert c.data_ptr() != b.data_ptr()
    other = pool.acquire((4, 8), torch.float64)  # another dtype is another key
    s = pool.stats()
    assert (s.hits, s.misses, s.buffers_in_use) == (1, 3, 3)
    assert s.bytes_in_use == 2 * 4 * 8 * 4 + 4 * 8 * 8
    for t in (b, c, other):
        pool.release(t)
    assert pool.stats().bytes_held == 2 * 128 + 256 and pool.stats().bytes_in_use == 0


def test_byte_bound_evicts_least_recently_released() -> None:
    pool = MemoryPool(MemoryPoolConfig(max_bytes=3 * 400))
    bufs = [pool.acquire((100,), F32, "cpu") for _ in range(2)] + [
        pool.acquire((50,), torch.float64) for _ in range(2)
    ]
    ptrs = [b.data_ptr() for b in bufs]
    for b in bufs:  # released in order 0, 1, 2, 3: 4 x 400 bytes > 1200
        pool.release(b)
    s = pool.stats()
    assert s.evictions == 1 and s.bytes_held == 1200
    again = pool.acquire((100,), F32)  # buffer 0 was evicted: buffer 1 comes back
    assert again.data_ptr() == ptrs[1]
    assert pool.acquire((100,), F32).data_ptr() not in ptrs[:2]


def test_per_key_bound() -> None:
    pool = MemoryPool(MemoryPoolConfig(max_buffers_per_key=2))
    bufs = [pool.acquire((8,), F32) for _ in range(5)]
    for b in bufs:
        pool.release(b)
    assert pool.stats().evictions == 3 and pool.stats().bytes_held == 2 * 32


def test_zero_bound_and_disabled_pool_keep_nothing() -> None:
    for cfg in (MemoryPoolConfig(max_bytes=0), MemoryPoolConfig(enabled=False)):
        pool = MemoryPool(cfg)
        pool.release(pool.acquire((16,), F32))
        assert pool.stats().bytes_held == 0
        pool.acquire((16,), F32)
        assert pool.stats().hits == 0 and pool.stats().misses == 2


def test_misuse_is_an_error() -> None:
    pool = MemoryPool()
    t = pool.acquire((2,), F32)
    pool.release(t)
    with pytest.raises(ValueError, match="already released"):
        pool.release(t)
    with pytest.raises(ValueError, match="not acquired from this pool"):
        pool.release(torch.empty(2))
    with pytest.raises(ValueError, match="non-negative sizes"):
        pool.acquire((-1,), F32)


def test_borrow_and_clear() -> None:
    pool = MemoryPool()
    with pool.borrow((3, 3), F32) as buf:
        assert buf.shape == (3, 3) and pool.stats().buffers_in_use == 1
    assert pool.stats().buffers_in_use == 0 and pool.stats().bytes_held == 36
    pool.clear()
    assert pool.stats().bytes_held == 0
    assert get_default_pool() is get_default_pool()


def test_threads_never_share_a_live_buffer() -> None:
    pool = MemoryPool(MemoryPoolConfig(max_bytes=64 * 1024, max_buffers_per_key=3))
    errors: list[str] = []
    live: set[int] = set()
    live_lock = threading.Lock()

    def worker(ident: int) -> None:
        for step in range(300):
            shape = (16 + (step % 3) * 16,)
            buf = pool.acquire(shape, F32)
            with live_lock:
                if buf.data_ptr() in live:
                    errors.append(f"thread {ident}: buffer handed out twice")
                live.add(buf.data_ptr())
            buf.fill_(float(ident))
            if not bool((buf == ident).all()):
                errors.append(f"thread {ident}: buffer overwritten while borrowed")
            with live_lock:
                live.discard(buf.data_ptr())
            pool.release(buf)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = pool.stats()
    assert s.hits + s.misses == 8 * 300
    assert s.buffers_in_use == 0 and s.bytes_in_use == 0
    assert s.hits > s.misses  # reuse actually happened
    assert s.bytes_held <= 64 * 1024
