"""Waiting: one ``poll(2)`` over every worker's replies, deaths and unwritten output.

The engine has no background thread, so this is where it sleeps — and where
Ctrl-C, a death, a reply, a writable pipe or the next deadline wakes it.
"""

from __future__ import annotations

import math
import select
import time

from .pool import Slot

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ("Wakeup", "next_deadline", "wait_for")

_THREAD_POLL = 1.0  # seconds; threads have no sentinel, so look at them this often


class Wakeup:
    """What one wait found: slots with replies, slots whose sentinel fired, and whether it timed out."""

    def __init__(self) -> None:
        self.replies: list[Slot] = []
        self.deaths: list[Slot] = []
        self.timed_out = False


def _fd(waitable: Any) -> int:
    return waitable if isinstance(waitable, int) else waitable.fileno()


def wait_for(slots: list[Slot], timeout: float | None, *, also: int | None = None) -> Wakeup:
    """Flush what can be written, then wait at most ``timeout`` seconds for anything to happen
    (``also``: one more descriptor to wake on — the pool's signal that a worker is free)."""
    poller = select.poll()
    if also is not None:
        poller.register(also, select.POLLIN)
    readers: dict[int, Slot] = {}
    sentinels: dict[int, Slot] = {}
    wake = Wakeup()
    immediate = False
    for slot in slots:
        worker = slot.worker
        if worker.outbox is not None and worker.outbox.pending:
            try:
                worker.outbox.flush()
            except OSError:
                slot.eof = True
        if worker.waitable is None:
            immediate = immediate or bool(slot.queued)  # inline: replies are ready already
            continue
        if not slot.eof:
            fd = _fd(worker.waitable)
            readers[fd] = slot
            wanted = select.POLLIN
            if worker.outbox is not None and worker.outbox.pending:
                wanted |= select.POLLOUT
            poller.register(fd, wanted)
        if worker.sentinel is not None:
            fd = _fd(worker.sentinel)
            sentinels[fd] = slot
            poller.register(fd, select.POLLIN)
    if immediate:
        timeout = 0.0
    if readers or sentinels or also is not None:
        events: list[tuple[int, int]] = poller.poll(
            None if timeout is None else math.ceil(max(timeout, 0.0) * 1000)
        )
    else:
        events = []
    for fd, mask in events:
        if fd in readers and mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
            wake.replies.append(readers[fd])
        if fd in sentinels:
            wake.deaths.append(sentinels[fd])
    wake.replies.extend(s for s in slots if s.worker.waitable is None)
    wake.timed_out = not events and timeout is not None
    return wake


def next_deadline(
    slots: list[Slot], *, timeout: float | None, busy: bool, started: Any
) -> float | None:
    """How long the next wait may last: until the earliest item deadline, a thread check, or forever.

    ``started(slot)`` gives the time the slot's current item started (0: none).
    """
    timeouts = [] if busy else [0.05]  # only dead slots to reap: look again soon
    if any(
        slot.worker.sentinel is None and slot.worker.waitable is not None and slot.queued
        for slot in slots
    ):
        timeouts.append(_THREAD_POLL)
    if timeout is not None:
        now = time.monotonic()
        timeouts.append(timeout / 4)
        for slot in slots:
            began = started(slot)
            if slot.queued and began > 0:
                timeouts.append(began + timeout - now)
    return max(0.001, min(timeouts)) if timeouts else None
