"""Progress for ``pmap``/``imap``: a tqdm bar that counts items (not chunks), or your own callback.

``progress=True`` (or ``PICKMAP_PROGRESS=1``) shows ``tqdm.auto``'s bar on
stderr — a notebook widget in Jupyter — with the input's length as its total
when it has one; it is closed when the call ends. ``progress=`` also takes a
tqdm bar you made (pickmap updates it and leaves it open) or any callable,
called with the number of items that have just finished. Counting happens
when a chunk's results arrive, so a chunk of 500 items moves the bar by 500.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ("ENV_PROGRESS", "Progress", "resolve_progress")

ENV_PROGRESS = "PICKMAP_PROGRESS"


class Progress:
    """What the engine calls: ``advance(n)`` per finished chunk, ``close()`` at the end."""

    def __init__(
        self, advance: Callable[[int], Any], close: Callable[[], Any] | None = None
    ) -> None:
        self.advance = advance
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()


def _bar(total: int | None) -> Progress:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True (or PICKMAP_PROGRESS) needs tqdm, which is not installed; install it with: "
            "pip install 'pickmap[progress]' (or pip install tqdm)"
        ) from None
    bar = tqdm(total=total, unit="item", file=sys.stderr, dynamic_ncols=True)
    return Progress(bar.update, bar.close)


def resolve_progress(argument: Any, total: int | None) -> Progress | None:
    """The progress sink for a call, checked before any worker starts."""
    if argument is None:
        raw = os.environ.get(ENV_PROGRESS, "").strip().lower()
        if raw in ("", "0", "false", "no", "off"):
            return None
        if raw not in ("1", "true", "yes", "on"):
            raise ValueError(f"the environment variable {ENV_PROGRESS} must be 1 or 0, not {raw!r}")
        argument = True
    if argument is False:
        return None
    if argument is True:
        return _bar(total)
    update = getattr(argument, "update", None)
    if callable(update) and hasattr(argument, "n"):  # a tqdm bar of yours: updated, left open
        return Progress(update)
    if callable(argument):
        return Progress(argument)
    raise TypeError(
        f"progress must be True, False, a tqdm bar or a callable taking a count of items, "
        f"not {type(argument).__name__}"
    )
