"""dilated.core.caching: the bounded, named plan caches and their registry."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dilated.core.caching import (
    CacheInfo,
    LastStep,
    PlanCache,
    clear_plan_caches,
    plan_cache,
    plan_cache_info,
)
from dilated.core.checks import ArgumentTypeError


def test_least_recently_used_entry_is_evicted_at_the_bound() -> None:
    cache: PlanCache[str, int] = PlanCache("test.lru", maxsize=2, key="a letter")
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    cache.put("a", 10)  # replacing an entry keeps the size and makes it the most recent
    cache.put("d", 4)
    assert "c" not in cache and "a" in cache and "d" in cache and len(cache) == 2
    assert cache.get("a") == 10 and cache.get("missing", -1) == -1


def test_get_or_build_builds_once_and_counts() -> None:
    cache: PlanCache[int, list[int]] = PlanCache("test.build", maxsize=8, key="n")
    built: list[int] = []

    def build(n: int) -> list[int]:
        built.append(n)
        return list(range(n))

    first = cache.get_or_build(3, lambda: build(3))
    assert cache.get_or_build(3, lambda: build(3)) is first
    cache.get_or_build(4, lambda: build(4))
    assert built == [3, 4]
    assert cache.info() == CacheInfo("test.build", "n", size=2, maxsize=8, hits=1, misses=2)
    cache.clear()
    assert cache.info() == CacheInfo("test.build", "n", size=0, maxsize=8, hits=0, misses=0)
    assert "test.build" in repr(cache) and "size=0/8" in repr(cache)


def test_decorated_function_caches_by_its_arguments() -> None:
    calls: list[tuple[int, int]] = []

    @plan_cache("test.decorated", maxsize=4, key="(a, b)")
    def plan(a: int, b: int = 0) -> tuple[int, ...]:
        """Docstring kept."""
        calls.append((a, b))
        return (a, b)

    assert plan(1, 2) is plan(1, 2)
    assert plan(1, b=2) == (1, 2)  # keywords are another key (as functools.lru_cache)
    assert calls == [(1, 2), (1, 2)]
    assert plan.__doc__ == "Docstring kept." and plan.__name__ == "plan"
    assert plan.__wrapped__(5, 6) == (5, 6) and plan.cache_info().currsize == 2  # uncached
    info = plan_cache_info()["test.decorated"]
    assert info == CacheInfo("test.decorated", "(a, b)", size=2, maxsize=4, hits=1, misses=2)
    with pytest.raises(TypeError, match="unhashable"):
        plan([1], 2)  # type: ignore[arg-type]
    for n in range(10):
        plan(n)
    assert plan_cache_info()["test.decorated"].size == 4  # the bound
    plan.cache_clear()
    assert plan_cache_info()["test.decorated"].size == 0


def test_bad_caches_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="maxsize must be a positive integer, got 0"):
        PlanCache("test.zero", maxsize=0, key="k")
    with pytest.raises(ArgumentTypeError, match="name must be a str"):
        PlanCache(3, maxsize=1, key="k")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="key must be a str"):
        PlanCache("test.nokey", maxsize=1, key=None)  # type: ignore[arg-type]
    kept = PlanCache("test.twice", maxsize=1, key="k")
    with pytest.raises(ValueError, match=r"a plan cache named 'test\.twice' already exists"):
        PlanCache("test.twice", maxsize=1, key="k")
    with pytest.raises(ValueError, match=r"a plan cache named 'test\.twice' already exists"):
        plan_cache("test.twice", maxsize=1)(lambda: 0)
    with pytest.raises(ValueError, match="maxsize must be a positive integer"):
        plan_cache("test.decorated_zero", maxsize=-1)(lambda: 0)
    del kept


def test_registry_reports_and_clears_every_live_cache() -> None:
    # dilated-core alone (its CI session installs no other package): its own caches.
    from dilated.core.branches import head_index

    assert "dilated.core.branches.head_index" in set(plan_cache_info())
    index = head_index([0, 2, 3], torch.device("cpu"))  # not a progression: a cached tensor
    assert isinstance(index, torch.Tensor)
    assert head_index([0, 2, 3], torch.device("cpu")) is index
    assert plan_cache_info()["dilated.core.branches.head_index"].size >= 1
    local: PlanCache[int, int] = PlanCache("test.registry", maxsize=3, key="n")
    local.put(1, 1)
    clear_plan_caches()
    assert all(info.size == 0 for info in plan_cache_info().values())
    assert len(local) == 0
    again = head_index([0, 2, 3], torch.device("cpu"))
    assert torch.equal(again, index) and again is not index
    del local
    gc.collect()
    assert "test.registry" not in plan_cache_info()  # a dropped cache leaves no entry


def test_concurrent_use_stays_within_the_bound() -> None:
    cache: PlanCache[int, int] = PlanCache("test.threads", maxsize=16, key="n")

    def work(offset: int) -> int:
        for i in range(2000):
            n = (i * 7 + offset) % 64
            assert cache.get_or_build(n, lambda n=n: n * n) == n * n  # type: ignore[misc]
        return offset

    with ThreadPoolExecutor(4) as pool:  # a failed lookup re-raises here
        assert list(pool.map(work, range(4))) == [0, 1, 2, 3]
    assert len(cache) <= 16


def test_last_step_keeps_one_value_per_key_and_grad_mode() -> None:
    built: list[int] = []
    last: LastStep[int, list[int]] = LastStep()

    def get(key: int) -> list[int]:
        return last.get_or_build(key, lambda: built.append(key) or [key])

    first = get(1)
    assert get(1) is first and built == [1]
    assert get(2) == [2] and built == [1, 2]
    assert get(1) is not first and built == [1, 2, 1]  # one entry: 2 replaced 1
    with torch.no_grad():
        get(1)
    with torch.inference_mode():
        get(1)
    assert built == [1, 2, 1, 1, 1]  # each grad mode its own entry
