"""A thread-safe LRU cache bounded in bytes and entries, computing each key once.

The server keeps the image embedding (and the pixels) of recent model windows here: a click on
a window already embedded costs only the decoder. A key being computed (by the background
prefetcher or another request) is waited for, not computed twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any


def nbytes(value: Any) -> int:
    """Approximate memory held by arrays/tensors in ``value`` (nested containers and objects)."""
    seen: set[int] = set()

    def size(v, depth=0) -> int:
        if v is None or depth > 6 or id(v) in seen:
            return 0
        seen.add(id(v))
        if hasattr(v, "nbytes") and not isinstance(v, type):
            try:
                return int(v.nbytes)
            except (TypeError, ValueError):
                return 0
        if hasattr(v, "element_size") and hasattr(v, "nelement"):  # torch tensors
            return int(v.element_size() * v.nelement())
        if isinstance(v, dict):
            return sum(size(x, depth + 1) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(size(x, depth + 1) for x in v)
        if hasattr(v, "__dict__"):
            return sum(size(x, depth + 1) for x in vars(v).values())
        return 0

    return size(value)


class LRUCache:
    """At most ``max_items`` values and ``max_bytes`` bytes (the newest entry always stays)."""

    def __init__(self, max_bytes: int | None = None, max_items: int = 64,
                 size: Callable[[Any], int] = nbytes):
        self.max_bytes = max_bytes
        self.max_items = max(1, int(max_items))
        self._size = size
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def get(self, key, default=None):
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return default
            self._data.move_to_end(key)
            return item[0]

    def get_or_compute(self, key, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, computed_here)``: the cached value, or ``compute()`` run once per key."""
        with self._lock:
            item = self._data.get(key)
            if item is not None:
                self._data.move_to_end(key)
                self.hits += 1
                return item[0], False
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
                self.misses += 1
            else:
                self.hits += 1
        if not owner:
            return future.result(), False
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            future.set_exception(exc)
            raise
        self.put(key, value)
        with self._lock:
            self._inflight.pop(key, None)
        future.set_result(value)
        return value, True

    def put(self, key, value) -> None:
        n = self._size(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, n)
            self.bytes += n
            while len(self._data) > 1 and (
                    len(self._data) > self.max_items
                    or (self.max_bytes is not None and self.bytes > self.max_bytes)):
                _, (_, m) = self._data.popitem(last=False)
                self.bytes -= m

    def pending(self, key) -> bool:
        """Whether ``key`` is being computed now."""
        with self._lock:
            return key in self._inflight

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._data), "bytes": self.bytes, "hits": self.hits,
                    "misses": self.misses, "max_bytes": self.max_bytes,
                    "max_entries": self.max_items}
