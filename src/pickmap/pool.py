"""Warm worker pools: started once, reused across calls, retired when idle or broken.

A pool is keyed by ``(backend, start method, worker count)``. A call checks a
pool out (:func:`acquire`), so two threads calling ``pmap`` at once never
share workers, and checks it back in (:func:`release`) when it ends. Workers
start lazily, one when a chunk needs it, so an 8-item call on a 64-core box
starts only what it uses.

Idle workers exit on their own after ``PICKMAP_IDLE_TIMEOUT`` seconds (default
300) with a ``BYE`` message; the caller has no background thread, which keeps
fork safe. :func:`shutdown` stops every idle pool and runs at interpreter exit.

What a call leaves behind is decided in :meth:`WorkerPool.end_call`:

- a worker still busy with this call's work (error, timeout, abandoned
  ``imap``) is killed: nothing keeps running after the call returns;
- a worker that ran an ``initializer`` is retired, so it cannot leak into a
  later call;
- a crash or Ctrl-C discards the whole pool.
"""

from __future__ import annotations

import atexit
import collections
import threading
from typing import Any

from .backends.base import Backend, Inheritance, Worker, WorkerStart

__all__ = ("WorkerPool", "Slot", "acquire", "release", "shutdown")

_GRACE = 2.0  # seconds a stopping worker gets before it is killed


class Slot:
    """A worker plus the engine's bookkeeping about it."""

    __slots__ = ("worker", "queued", "call_id", "tainted", "said_bye", "eof", "ready", "handed_at")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.queued: collections.deque[Any] = collections.deque()  # chunks sent, unanswered
        self.call_id: int | None = None  # the call whose SETUP it holds
        self.tainted = False  # ran an initializer
        self.said_bye = False  # exited after its idle timeout
        self.eof = False  # its channel closed: dead or dying
        self.ready = False  # a process worker said Ready: it started
        self.handed_at = 0.0  # when its oldest queued chunk was handed over (for timeouts without progress)

    @property
    def usable(self) -> bool:
        return not (self.said_bye or self.eof)


class WorkerPool:
    def __init__(self, backend: Backend, start_method: str | None, size: int, idle_timeout: float) -> None:
        self.backend = backend
        self.start_method = start_method
        self.size = size
        self.idle_timeout = idle_timeout
        self.slots: list[Slot] = []
        self.broken = False

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.backend.name, self.start_method, self.size)

    def start_slot(self, inheritance: Inheritance | None = None) -> Slot:
        start = WorkerStart(self.start_method, self.idle_timeout, inheritance, self.size)
        slot = Slot(self.backend.start_worker(start))
        if slot.worker.adopted_call is not None and inheritance is not None:
            slot.call_id = slot.worker.adopted_call
            slot.tainted = inheritance.setup is not None  # it ran the call's initializer
        self.slots.append(slot)
        return slot

    def pick(self, inheritance: Inheritance | None = None, depth: int | None = None) -> Slot | None:
        """The least busy worker with room in its queue, starting one if all are busy.

        ``inheritance`` is handed to a worker started now (see ``Backend.start_worker``).
        ``depth`` caps the chunks a worker may hold (never above the backend's
        ``max_queued``).
        """
        depth = self.backend.max_queued if depth is None else min(depth, self.backend.max_queued)
        best = min((s for s in self.slots if s.usable), key=lambda s: len(s.queued), default=None)
        if (best is None or best.queued) and len(self.slots) < self.size:
            return self.start_slot(inheritance)
        if best is None or len(best.queued) >= depth:
            return None
        return best

    def remove(self, slot: Slot, *, kill: bool) -> None:
        # Stopped before it leaves the list: a Ctrl-C in between leaves it to
        # be stopped again (see end_call), never forgotten while it runs.
        if kill:
            slot.worker.kill()
        else:
            slot.worker.stop(_GRACE)
        if slot in self.slots:
            self.slots.remove(slot)

    def prune_dead(self) -> None:
        """Drop workers that exited while idle (idle timeout, or killed from outside)."""
        for slot in list(self.slots):
            if slot.worker.exitcode() is not None:
                self.remove(slot, kill=True)

    def end_call(self, *, interrupted: bool) -> None:
        """Clean up after a call; finishes even when Ctrl-C arrives during it, then re-raises that."""
        late: KeyboardInterrupt | None = None
        while True:
            try:
                self._end_call(interrupted=interrupted or late is not None)
                break
            except KeyboardInterrupt as caught:
                late = caught
        if late is not None:
            raise late

    def _end_call(self, *, interrupted: bool) -> None:
        if interrupted:
            self.broken = True
        for slot in list(self.slots):
            busy = bool(slot.queued)
            if self.broken or busy or slot.said_bye:
                self.remove(slot, kill=True)
            elif slot.tainted:
                self.remove(slot, kill=False)
            slot.queued.clear()
        if self.broken:
            self.close()

    def close(self, *, kill: bool = False) -> None:
        for slot in list(self.slots):
            self.remove(slot, kill=kill)


_IDLE: dict[tuple[str, str | None, int], list[WorkerPool]] = {}
_LOCK = threading.Lock()


def acquire(backend: Backend, start_method: str | None, size: int, idle_timeout: float) -> WorkerPool:
    key = (backend.name, start_method, size)
    with _LOCK:
        pools = _IDLE.get(key)
        pool = pools.pop() if pools else None
    if pool is None:
        return WorkerPool(backend, start_method, size, idle_timeout)
    pool.prune_dead()
    return pool


def release(pool: WorkerPool) -> None:
    if pool.broken:
        return
    if not pool.backend.keep_warm:
        pool.close()
        return
    with _LOCK:
        _IDLE.setdefault(pool.key, []).append(pool)


def shutdown() -> None:
    """Stop every idle worker pickmap keeps warm, and the executors it owns. Safe to call at any time."""
    from .registry import loaded_backends

    with _LOCK:
        pools = [pool for pools in _IDLE.values() for pool in pools]
        _IDLE.clear()
    for pool in pools:
        pool.close()
    for backend in loaded_backends():
        backend.shutdown()


def idle_pool_count() -> int:
    """How many warm pools are parked (for tests and diagnostics)."""
    with _LOCK:
        return sum(len(p) for p in _IDLE.values())


atexit.register(shutdown)
