"""How the input is cut into chunks.

- Known length (``len()`` works on every iterable): ``ceil(n / (4 * workers))``
  items a chunk, so each worker gets about four chunks — enough to balance
  uneven items without paying per-item messages. When an earlier call of the
  same function showed how long an item takes, a chunk is also made at least
  :data:`MIN_CHUNK_SECONDS` of work (but never fewer chunks than workers):
  a message costs ~0.1 ms, so 8 trivial items go as 2 chunks, not 8.
- Unknown length (generators): adaptive. Chunks start at one item and grow,
  at most doubling each time, toward :data:`TARGET_SECONDS` of work per chunk,
  measured by the workers; capped at :data:`MAX_ADAPTIVE` items so memory
  stays bounded for endless inputs.
- ``chunksize=`` overrides both.

The chunker only pulls items from the input when the engine asks for a chunk,
so an endless generator is read as fast as results are consumed.
"""

from __future__ import annotations

import itertools
import math
import types
import weakref
from typing import Any, Iterator

TARGET_SECONDS = 0.02
MIN_CHUNK_SECONDS = 0.005
MAX_ADAPTIVE = 1 << 14

# function (weakly) -> seconds per item seen in its last call
_SECONDS_PER_ITEM: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def _timing_key(func: Any) -> Any:
    return func.__func__ if isinstance(func, types.MethodType) else func


def _remembered(func: Any) -> float | None:
    try:
        return _SECONDS_PER_ITEM.get(_timing_key(func))
    except TypeError:  # not weak-referenceable or hashable
        return None


class Chunker:
    def __init__(
        self, items: Iterator[Any], length: int | None, workers: int, chunksize: int | None, func: Any = None
    ) -> None:
        self._items = items
        self._next_start = 0
        self._func = func
        self._timed_items = 0
        self._timed_seconds = 0.0
        self.adaptive = chunksize is None and length is None
        self._fixed = chunksize is not None  # the caller's chunksize= is never changed
        # Until a first chunk reports how long an item takes, send single items:
        # four coarse chunks dispatched blind can hold half of a slow workload.
        self._blind = chunksize is None and length is not None and _remembered(func) is None
        if chunksize is not None:
            self.size = chunksize
        elif length is not None:
            self.size = max(1, math.ceil(length / (4 * workers)))
            per_item = _remembered(func)
            if per_item is not None:
                worth_a_message = math.ceil(MIN_CHUNK_SECONDS / max(per_item, 1e-9))
                self.size = max(self.size, min(math.ceil(length / workers), worth_a_message))
        else:
            self.size = 1

    def next_chunk(self) -> tuple[int, list[Any]] | None:
        """``(index of the first item, items)``, or ``None`` when the input is exhausted."""
        items = list(itertools.islice(self._items, 1 if self._blind else self.size))
        if not items:
            return None
        start = self._next_start
        self._next_start += len(items)
        return start, items

    def observe(self, count: int, seconds: float) -> None:
        """A worker ran ``count`` items in ``seconds``: steer the adaptive size."""
        if count <= 0:
            return
        self._timed_items += count
        self._timed_seconds += seconds
        self._blind = False
        if self._timed_items and self._func is not None:
            try:
                _SECONDS_PER_ITEM[_timing_key(self._func)] = self._timed_seconds / self._timed_items
            except TypeError:
                pass
        if not self.adaptive:
            # Known length: slow items make big chunks an unbalanced tail, so
            # shrink (never grow) toward TARGET_SECONDS of work a chunk.
            per_item = self._timed_seconds / self._timed_items
            if per_item * self.size > 2 * TARGET_SECONDS and not self._fixed:
                self.size = max(1, min(self.size, int(TARGET_SECONDS / per_item)))
            return
        per_item = max(seconds / count, 1e-7)
        wanted = int(TARGET_SECONDS / per_item)
        self.size = max(1, min(wanted, self.size * 2, MAX_ADAPTIVE))


def input_length(iterables: tuple[Any, ...]) -> int | None:
    """The number of items ``zip(*iterables)`` yields, when every iterable has a length."""
    try:
        return min(len(it) for it in iterables)
    except TypeError:
        return None
