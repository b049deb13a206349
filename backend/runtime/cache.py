"""One caching layer for every public analysis, and one registry of bounded caches.

Every analysis that runs the model goes through ``cached(cache, handle, analysis, parts,
compute)``: the key is (analysis, the model's ``cache_key``, the parts), so a key means the
same thing everywhere. Caches are LRU-bounded and thread-safe; a value is stored only when
``compute`` returns, so a cancelled or failed computation caches nothing. Two requests for
the same key at once compute it once: the second waits for the first (and computes itself
if the first fails).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from backend.runtime.models import ModelHandle

V = TypeVar("V")


class BoundedCache:
    def __init__(self, name: str, max_entries: int) -> None:
        self.name = name
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self._in_flight: dict[Hashable, threading.Lock] = {}

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value for ``key``, computing (outside the cache lock) on a miss."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]  # type: ignore[return-value]
                flight = self._in_flight.get(key)
                if flight is None:
                    flight = self._in_flight[key] = threading.Lock()
                    flight.acquire()
                    break
            with flight:  # another request computes this key: wait for it, then look again
                pass
        try:
            value = compute()
            self.put(key, value)
            return value
        finally:
            with self._lock:
                del self._in_flight[key]
            flight.release()

    def peek(self, key: Hashable) -> object | None:
        """The cached value for ``key``, or None (no computing)."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def values(self) -> list:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_registry: dict[str, BoundedCache] = {}


def cache_named(name: str, max_entries: int) -> BoundedCache:
    """The process-wide cache ``name`` (created on first use with ``max_entries``)."""
    if name not in _registry:
        _registry[name] = BoundedCache(name, max_entries)
    return _registry[name]


def all_caches() -> dict[str, BoundedCache]:
    return dict(_registry)


def clear_all() -> None:
    for cache in _registry.values():
        cache.clear()


results_cache = cache_named("results", 64)  # computed results of every analysis


def cached(handle: ModelHandle, analysis: str, parts: tuple, compute: Callable[[], V],
           cache: BoundedCache = results_cache) -> V:
    """``compute()`` for (analysis, model, parts), from ``cache`` when already computed."""
    return cache.get_or_compute((analysis, handle.cache_key, *parts), compute)


def is_cached(handle: ModelHandle, analysis: str, parts: tuple, cache: BoundedCache = results_cache) -> bool:
    """Whether ``cached`` with these arguments would return at once (nothing to compute)."""
    return cache.peek((analysis, handle.cache_key, *parts)) is not None
