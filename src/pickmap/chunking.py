"""How the input is cut into chunks.

- Known length (``len()`` works on every iterable): ``ceil(n / (4 * workers))``
  items a chunk, so each worker gets about four chunks — enough to balance
  uneven items without paying per-item messages.
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
from typing import Any, Iterator

TARGET_SECONDS = 0.02
MAX_ADAPTIVE = 1 << 14


class Chunker:
    def __init__(self, items: Iterator[Any], length: int | None, workers: int, chunksize: int | None) -> None:
        self._items = items
        self._next_start = 0
        self.adaptive = chunksize is None and length is None
        if chunksize is not None:
            self.size = chunksize
        elif length is not None:
            self.size = max(1, math.ceil(length / (4 * workers)))
        else:
            self.size = 1

    def next_chunk(self) -> tuple[int, list[Any]] | None:
        """``(index of the first item, items)``, or ``None`` when the input is exhausted."""
        items = list(itertools.islice(self._items, self.size))
        if not items:
            return None
        start = self._next_start
        self._next_start += len(items)
        return start, items

    def observe(self, count: int, seconds: float) -> None:
        """A worker ran ``count`` items in ``seconds``: steer the adaptive size."""
        if not self.adaptive or count <= 0:
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
