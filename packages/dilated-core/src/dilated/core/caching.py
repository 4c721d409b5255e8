"""The one cache of every plan in the ``dilated`` packages: bounded, least recently used, named.

A *plan* is what a call works out from its sizes alone, before touching a tensor element: the
sub-problems of a branch, the pieces of a ring rank, the tiles of a block layout, the engine
that takes a shape. Each is cached in one of two forms of the same cache:

- [`plan_cache`][dilated.core.caching.plan_cache], a decorator: a function of hashable
  arguments whose results are kept by those arguments (``functools.lru_cache`` underneath, so
  a hit costs what one costs there);
- [`PlanCache`][dilated.core.caching.PlanCache], a map with ``get``/``put``/``get_or_build``,
  for a key that is not simply the arguments of one function.

Both have a bounded size, ``maxsize`` entries, beyond which the least recently used entry is
dropped (an evicted plan is worked out again at its next use, never lost); a documented key (the
``key`` text says what identifies an entry); and a name in one registry:
[`plan_cache_info`][dilated.core.caching.plan_cache_info] reports the size, bound, hits and
misses of every live cache, and [`clear_plan_caches`][dilated.core.caching.clear_plan_caches]
empties them all (to free the device tensors a plan holds, or to measure a cold start).

[`LastStep`][dilated.core.caching.LastStep] is the other kind: one entry, the value of the last
key asked for, for what every layer of an eager decoding step works out again from the same
position (it holds tensors of that step, not a plan).

Every cache can be shared between threads: a lookup never fails or returns another key's entry
(a ``PlanCache`` counts its hits and misses without a lock, so under contention the counts are
approximate); a plan is built outside any lock (two threads missing one key at once both build
it, and either result is kept).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from dilated.core.checks import check_instance, check_positive_int

__all__ = [
    "CacheInfo",
    "LastStep",
    "PlanCache",
    "clear_plan_caches",
    "plan_cache",
    "plan_cache_info",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
R = TypeVar("R")


@dataclass(frozen=True)
class CacheInfo:
    """The state of one plan cache.

    Attributes:
        name: the cache's registered name (by convention the dotted name of what it caches).
        key: what identifies an entry, in words.
        size: entries held now.
        maxsize: entries held at most.
        hits, misses: lookups that found an entry, and those that did not, since the last clear.
    """

    name: str
    key: str
    size: int
    maxsize: int
    hits: int
    misses: int


class _Registered(Protocol):
    name: str

    def info(self) -> CacheInfo: ...

    def clear(self) -> None: ...


#: Every live cache by name; weak, so that a cache made and dropped (in a test) leaves no entry.
_caches: weakref.WeakValueDictionary[str, _Registered] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def _register(cache: _Registered, maxsize: int, key: str) -> None:
    check_instance("name", cache.name, str, "a str (the cache's dotted name)")
    check_instance("key", key, str, "a str (what identifies an entry)")
    check_positive_int("maxsize", maxsize)
    with _registry_lock:
        if cache.name in _caches:
            raise ValueError(f"a plan cache named {cache.name!r} already exists")
        _caches[cache.name] = cache


class LastStep(Generic[K, V]):
    """The value of the last key asked for (one entry).

    The key is extended by the grad modes, since a tensor made under ``torch.inference_mode``
    cannot be saved for a backward later. Nothing is kept while ``torch.compile`` traces, because a
    Python-side entry would be baked into the graph. A racing thread at worst rebuilds a value.
    """

    def __init__(self) -> None:
        self._entry: tuple[tuple[K, bool, bool], V] | None = None

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        """The value kept for ``key`` (in the current grad modes), else ``build()``, kept."""
        if torch.compiler.is_compiling():
            return build()
        full = (key, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        entry = self._entry
        if entry is not None and entry[0] == full:
            return entry[1]
        value = build()
        self._entry = (full, value)
        return value


class PlanCache(Generic[K, V]):
    """A bounded map from a plan's key to the plan, evicting the least recently used entry.

    Args:
        name: unique among live caches; by convention the dotted name of what it caches
            (``"dilated.kernels.engines.supporting_engines"``).
        maxsize: entries held at most (positive).
        key: what identifies an entry, in words (``"the call's SubproblemSpec"``), shown by
            [`plan_cache_info`][dilated.core.caching.plan_cache_info].

    Raises:
        ValueError: ``maxsize`` is not a positive integer, or a live cache has this ``name``.
        ArgumentTypeError: ``name`` or ``key`` is not a str.
    """

    def __init__(self, name: str, *, maxsize: int, key: str) -> None:
        self.name = name
        _register(self, maxsize, key)
        self.maxsize = maxsize
        self.key = key
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()  # for writes; a lookup is one atomic dict operation
        self._hits = 0
        self._misses = 0

    def get(self, key: K, default: V | None = None) -> V | None:
        """The entry of ``key`` (now the most recently used), or ``default``."""
        try:
            value = self._entries[key]
        except KeyError:
            self._misses += 1
            return default
        self._hits += 1
        self._touch(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key``, evicting the least recently used entry when full."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        """The entry of ``key``; on a miss, ``build()`` is stored and returned."""
        try:
            value = self._entries[key]
        except KeyError:
            self._misses += 1
            value = build()
            self.put(key, value)
            return value
        self._hits += 1
        self._touch(key)
        return value

    def _touch(self, key: K) -> None:
        # contextlib.suppress would cost more than the lookup it guards.
        try:  # noqa: SIM105
            self._entries.move_to_end(key)
        except KeyError:  # evicted by another thread since the lookup: the value stands
            pass

    def clear(self) -> None:
        """Drop every entry and reset the hit and miss counts."""
        with self._lock:
            self._entries.clear()
            self._hits = self._misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def info(self) -> CacheInfo:
        """Size, bound, key and counts of this cache."""
        return CacheInfo(
            self.name, self.key, len(self._entries), self.maxsize, self._hits, self._misses
        )

    def __repr__(self) -> str:
        return f"PlanCache({self.name!r}, size={len(self)}/{self.maxsize}, key={self.key!r})"


class _FunctionCache:
    """The registry's handle on a decorated function's ``functools.lru_cache``."""

    def __init__(self, name: str, key: str, function: Any) -> None:
        self.name, self.key, self._function = name, key, function

    def info(self) -> CacheInfo:
        i = self._function.cache_info()
        return CacheInfo(self.name, self.key, i.currsize, i.maxsize, i.hits, i.misses)

    def clear(self) -> None:
        self._function.cache_clear()


def plan_cache(
    name: str, *, maxsize: int, key: str = "the arguments"
) -> Callable[[Callable[..., R]], functools._lru_cache_wrapper[R]]:
    """Decorate a function of hashable arguments so that its results are cached by them.

    The function must depend on its arguments only (a plan of sizes), and callers must not
    modify its result: every call with equal arguments gets the same object. The decorated
    function has ``functools.lru_cache``'s ``cache_info()``, ``cache_clear()`` and
    ``__wrapped__`` (the function uncached, for arguments that cannot be hashed), and
    ``plan_cache``, its entry in the registry. Keyword arguments are part of the key by name.

    Args:
        name: the cache's name, unique among live caches (see
            [`PlanCache`][dilated.core.caching.PlanCache]).
        maxsize: entries held at most (positive).
        key: the key in words, when the arguments need explaining.

    Raises:
        ValueError, ArgumentTypeError: as [`PlanCache`][dilated.core.caching.PlanCache].
    """

    def decorate(function: Callable[..., R]) -> functools._lru_cache_wrapper[R]:
        cached = functools.lru_cache(maxsize=maxsize)(function)
        handle = _FunctionCache(name, key, cached)
        _register(handle, maxsize, key)
        # The function holds its handle: the weak registry keeps it as long as the function.
        cached.plan_cache = handle  # type: ignore[attr-defined]
        return cached

    return decorate


def plan_cache_info() -> dict[str, CacheInfo]:
    """The [`CacheInfo`][dilated.core.caching.CacheInfo] of every live plan cache, by name
    (the caches of packages not imported yet are not there)."""
    with _registry_lock:
        caches = list(_caches.values())
    return {c.name: c.info() for c in sorted(caches, key=lambda c: c.name)}


def clear_plan_caches() -> None:
    """Empty every live plan cache (each plan is worked out again at its next use)."""
    with _registry_lock:
        caches = list(_caches.values())
    for cache in caches:
        cache.clear()
