"""MemoryPool: reuse, bounds, LRU eviction, misuse errors and thread safety."""

from __future__ import annotations

import threading
import time

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


def test_lru_eviction_crosses_keys_in_release_order() -> None:
    # Five 256-byte buffers of three keys, released interleaved; room for three.
    pool = MemoryPool(MemoryPoolConfig(max_bytes=3 * 256))
    keys = [
        ((64,), F32),
        ((32,), torch.float64),
        ((64,), F32),
        ((128,), torch.float16),
        ((64,), F32),
    ]
    bufs = [pool.acquire(shape, dtype) for shape, dtype in keys]
    for b in bufs:
        pool.release(b)
    # The two oldest (buffer 0, a float32, then buffer 1, the only float64) are gone.
    s = pool.stats()
    assert s.evictions == 2 and s.bytes_held == 3 * 256
    assert pool.acquire((32,), torch.float64).data_ptr() != bufs[1].data_ptr()
    kept = {pool.acquire((64,), F32).data_ptr() for _ in range(2)}
    assert kept == {bufs[2].data_ptr(), bufs[4].data_ptr()}
    assert pool.acquire((128,), torch.float16).data_ptr() == bufs[3].data_ptr()
    assert pool.stats().hits == 3


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
    with pytest.raises(ValueError, match="non-negative integer sizes"):
        pool.acquire((-1,), F32)
    with pytest.raises(ValueError, match="non-negative integer sizes"):
        pool.acquire((2.5,), F32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dtype must be a torch\.dtype"):
        pool.acquire((2,), "float32")  # type: ignore[arg-type]
    other = MemoryPool()
    u = other.acquire((2,), F32)
    with pytest.raises(ValueError, match="not acquired from this pool"):
        pool.release(u)  # another pool's buffer
    other.release(u)


def test_borrower_state_does_not_leak() -> None:
    pool = MemoryPool()
    t = pool.acquire((4,), F32)
    t.requires_grad_(True)
    t.sum().backward()
    pool.release(t)
    again = pool.acquire((4,), F32)
    # The same storage, in a new tensor object that carries none of the last borrower's state.
    assert again is not t and again.data_ptr() == t.data_ptr()
    assert not again.requires_grad and again.grad is None
    again.resize_(8)  # reshaped in place: dropped on release, never handed out as (4,)
    pool.release(again)
    s = pool.stats()
    assert s.bytes_held == 0 and s.bytes_in_use == 0 and s.buffers_in_use == 0
    assert pool.stats().hits == 1


def test_release_is_matched_to_its_loan_not_to_its_storage() -> None:
    """The bug of issue 14: a stale release must not end someone else's loan of the same storage."""
    pool = MemoryPool()
    a = pool.acquire((8,), F32)
    pool.release(a)
    b = pool.acquire((8,), F32)
    assert b.data_ptr() == a.data_ptr() and b is not a  # same storage, another loan
    with pytest.raises(ValueError, match=r"already released \(double release\)|lent \(loan #2\)"):
        pool.release(a)
    c = pool.acquire((8,), F32)  # b still holds its storage: c must get another one
    assert c.data_ptr() != b.data_ptr()
    with pytest.raises(ValueError, match="view of a borrowed tensor"):
        pool.release(b[:4])
    pool.release(b)
    pool.release(c)
    with pytest.raises(ValueError, match="already released"):
        pool.release(b)
    with pytest.raises(ValueError, match="release takes the tensor that acquire returned"):
        pool.release(None)  # type: ignore[arg-type]
    s = pool.stats()
    assert s.buffers_in_use == 0 and s.bytes_in_use == 0


def test_threads_with_stale_releases_never_share_a_live_buffer() -> None:
    """Every thread releases each buffer once, then tries to release it again later, while other
    threads borrow the same storage. Matching a release by storage (or by a tensor object that
    the pool hands out again) would accept a stale release and lend a live buffer twice."""
    pool = MemoryPool(MemoryPoolConfig(max_buffers_per_key=2))
    errors: list[str] = []
    accepted_stale: list[int] = []

    def worker(ident: int) -> None:
        stale: torch.Tensor | None = None
        for _ in range(200):
            buf = pool.acquire((32,), F32)
            buf.fill_(float(ident))
            if stale is not None:
                try:
                    pool.release(stale)  # released already: must be refused
                    accepted_stale.append(ident)
                except ValueError:
                    pass
            time.sleep(0)  # let other threads acquire while this one holds ``buf``
            if not bool((buf == ident).all()):
                errors.append(f"thread {ident}: buffer overwritten while borrowed")
            pool.release(buf)
            stale = buf

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert accepted_stale == [] and errors == []
    s = pool.stats()
    assert s.buffers_in_use == 0 and s.bytes_in_use == 0 and s.hits > 0


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
            time.sleep(0)  # let the other threads run while this one holds the buffer
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA stream ordering needs a GPU")
def test_cuda_acquire_on_another_stream_waits_for_the_release() -> None:
    pool = MemoryPool()
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    buf = pool.acquire((1 << 20,), F32, "cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(200_000_000)  # keep the producer's late write queued for a while
        buf.fill_(1.0)
    pool.release(buf, stream=producer)
    with torch.cuda.stream(consumer):
        again = pool.acquire((1 << 20,), F32, "cuda")
        assert again.data_ptr() == buf.data_ptr()
        again.fill_(2.0)  # without the event wait this would run before the producer's fill
    torch.cuda.synchronize()
    assert bool((again == 2.0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA stream ordering needs a GPU")
def test_cuda_eviction_keeps_memory_until_the_last_stream_is_done() -> None:
    # max_bytes=0: the buffer is dropped at once while the producer still has a write queued.
    pool = MemoryPool(MemoryPoolConfig(max_bytes=0))
    producer = torch.cuda.Stream()
    buf = pool.acquire((1 << 20,), F32, "cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(200_000_000)
        buf.fill_(1.0)
    pool.release(buf, stream=producer)
    ptr = buf.data_ptr()
    del buf
    # The allocator must not give the same memory to new work on the default stream yet.
    fresh = torch.full((1 << 20,), 2.0, device="cuda")
    torch.cuda.synchronize()
    assert fresh.data_ptr() != ptr or bool((fresh == 2.0).all())
    assert pool.stats().evictions == 1


@pytest.mark.parametrize("config", [{"max_bytes": 1024}, 1024, "default", MemoryPoolConfig])
def test_config_of_the_wrong_type_is_refused_at_construction(config: object) -> None:
    with pytest.raises(TypeError, match=r"config must be a MemoryPoolConfig or None"):
        MemoryPool(config=config)  # type: ignore[arg-type]
    pool = MemoryPool(config=MemoryPoolConfig(**{"max_bytes": 1024}))
    pool.release(pool.acquire((2,), F32))
    assert pool.stats().bytes_held == 8
