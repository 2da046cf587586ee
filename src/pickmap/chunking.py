"""How the input is cut into chunks.

- Known length (``len()`` works on every iterable): at most
  ``ceil(n / (4 * workers))`` items a chunk, so each worker gets several
  chunks. Until a first result says how long an item takes, single items go
  out (four coarse chunks dispatched blind can hold half of a slow workload).
  After that, chunks are *guided*: each holds about a ``1 / (2 * workers)``
  share of what is left, so they start large (few messages) and shrink to
  single items at the end (no worker idles while another finishes a long
  chunk). Two bounds in seconds of work, from the measured time per item: a
  chunk is at least :data:`MIN_CHUNK_SECONDS` (a message costs ~0.1 ms, so 8
  trivial items go as 2 chunks, not 8) and at most
  :data:`LONGEST_CHUNK_SECONDS` (so ``imap`` results keep flowing). The time
  per item is remembered per function, so a second call skips the blind start.
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
from collections.abc import Iterator

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

TARGET_SECONDS = 0.02
MIN_CHUNK_SECONDS = 0.005
LONGEST_CHUNK_SECONDS = 0.1
GUIDED_SHARES = 2  # a guided chunk is 1 / (GUIDED_SHARES * workers) of what is left
PREFETCH_BELOW_SECONDS = 0.01
MAX_ADAPTIVE = 1 << 14

# function (weakly) -> seconds per item seen in its last call
_SECONDS_PER_ITEM: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _timing_key(func: Any) -> Any:
    return func.__func__ if isinstance(func, types.MethodType) else func


def _remembered(func: Any) -> float | None:
    try:
        return _SECONDS_PER_ITEM.get(_timing_key(func))
    except TypeError:  # not weak-referenceable or hashable
        return None


class Chunker:
    def __init__(
        self,
        items: Iterator[Any],
        length: int | None,
        workers: int,
        chunksize: int | None,
        func: Any = None,
        *,
        largest: int | None = None,
    ) -> None:
        self._items = items
        self._largest = largest  # max_tasks_per_worker: a chunk never outlives its worker
        self._length = length
        self._workers = workers
        self._next_start = 0
        self._func = func
        self._timed_items = 0
        self._timed_seconds = 0.0
        self._per_item = _remembered(func)  # seconds; None until measured
        self._fixed = chunksize is not None  # the caller's chunksize= is never changed
        self.adaptive = not self._fixed and length is None
        self.input_error: Exception | None = None  # what the input raised; nothing is read after it
        self._guided_for: tuple[int, float | None] | None = None  # (position, timing) of _guided
        self._guided = 1
        if chunksize is not None:
            self.size = chunksize
        elif length is not None:
            # The largest chunk of a known-length input.
            self.size = max(1, math.ceil(length / (4 * workers)))
            if self._per_item is not None:
                worth_a_message = math.ceil(MIN_CHUNK_SECONDS / max(self._per_item, 1e-9))
                self.size = max(self.size, min(math.ceil(length / workers), worth_a_message))
        else:
            self.size = 1

    def next_chunk(self, *, alone: bool = False) -> tuple[int, list[Any]] | None:
        """``(index of the first item, items)``, or ``None`` when the input is exhausted.

        ``alone``: no other worker will take a share of this call now (other
        calls wait for the pool's workers); if what is left of a known-length
        input is less than :data:`PREFETCH_BELOW_SECONDS` of work, it all goes
        in this chunk rather than in one chunk per worker queued on one worker.

        An exception raised by the input ends it: the items read before it
        still form a chunk, the exception is kept in :attr:`input_error`
        (for the engine to raise once their results are out, as ``map``
        would), and nothing more is read. ``KeyboardInterrupt`` and other
        non-``Exception`` errors propagate at once.
        """
        if self.input_error is not None:
            return None
        items: list[Any] = []
        size = self._rest_if_short() if alone else None
        try:
            # extend keeps what came before
            items.extend(itertools.islice(self._items, size or self._next_size()))
        except Exception as exc:
            self.input_error = exc
        if not items:
            return None
        start = self._next_start
        self._next_start += len(items)
        return start, items

    def wants_prefetch(self) -> bool:
        """Whether the next chunk may be queued behind a chunk a worker runs.

        Queuing hides the round trip between two chunks (~0.5 ms when the
        cores are busy), so it is the rule. The exception is the end of a
        known-length input when chunks take :data:`PREFETCH_BELOW_SECONDS` or
        more: a queued chunk is committed to its worker early, and one worker
        could still hold one while another has nothing left to do.
        """
        if self._per_item is None or self._length is None:
            return True
        size = self._next_size()
        if self._per_item * size < PREFETCH_BELOW_SECONDS:
            return True
        return self._length - self._next_start > GUIDED_SHARES * self._workers * size

    def _rest_if_short(self) -> int | None:
        if self._fixed or self._per_item is None or self._length is None:
            return None
        left = self._length - self._next_start
        if left <= 0 or self._per_item * left >= PREFETCH_BELOW_SECONDS:
            return None
        return left if self._largest is None else min(left, self._largest)

    def took_short_last(self, count: int) -> bool:
        """Whether the chunk of ``count`` items just taken was the input's last and takes
        less than :data:`PREFETCH_BELOW_SECONDS` (measured time per item).

        Such a chunk may wait behind the call's own running chunk even while
        other calls wait for a worker (``WorkerPool.pick``'s ``finishing``): it
        delays them by less than that, where a turn of its own would cost the
        call a round trip and them a hand-over.
        """
        if self._per_item is None or self._length is None:
            return False
        return self._next_start >= self._length and self._per_item * count < PREFETCH_BELOW_SECONDS

    def _next_size(self) -> int:
        size = self.size if self._fixed or self._length is None else self._guided_size()
        return size if self._largest is None else min(size, self._largest)

    def _guided_size(self) -> int:
        # Asked several times per chunk (prefetch, size, last-chunk checks): computed once
        # per position and timing.
        key = (self._next_start, self._per_item)
        if key != self._guided_for:
            self._guided_for, self._guided = key, self._compute_guided_size()
        return self._guided

    def _compute_guided_size(self) -> int:
        assert self._length is not None
        if self._per_item is None:
            return 1  # blind: wait for a first timing
        per_item = max(self._per_item, 1e-9)
        left = self._length - self._next_start
        guided = math.ceil(left / (GUIDED_SHARES * self._workers))
        # 1e-6: float noise at exact ratios
        longest = max(1, int(LONGEST_CHUNK_SECONDS / per_item + 1e-6))
        worth_a_message = math.ceil(MIN_CHUNK_SECONDS / per_item)
        return max(1, min(self.size, max(min(guided, longest), worth_a_message)))

    def observe(self, count: int, seconds: float) -> None:
        """A worker ran ``count`` items in ``seconds``: steer the chunk size."""
        if count <= 0:
            return
        self._timed_items += count
        self._timed_seconds += seconds
        self._per_item = self._timed_seconds / self._timed_items
        if self._func is not None:
            try:
                _SECONDS_PER_ITEM[_timing_key(self._func)] = self._per_item
            except TypeError:
                pass
        if self.adaptive:
            wanted = int(TARGET_SECONDS / max(seconds / count, 1e-7))
            self.size = max(1, min(wanted, self.size * 2, MAX_ADAPTIVE))


def input_length(iterables: tuple[Any, ...]) -> int | None:
    """The number of items ``zip(*iterables)`` yields, when every iterable has a length."""
    try:
        return min(len(it) for it in iterables)
    except TypeError:
        return None
