"""Warm worker pools: started once, shared by concurrent calls, reused across calls, retired when idle or broken.

There is one pool per ``(backend, start method, worker count)``. Calls from
many threads at once share it: a worker serves one call at a time — a call
*claims* a free worker for a chunk and hands it back as soon as its queue is
empty — so the configured worker count is never exceeded in total, calls take
turns worker by worker, and each call sees only its own results and errors. A
call that finds every worker claimed waits on the pool's wake-up pipe, which a
release writes to. Workers start lazily, one when a chunk needs it, so an
8-item call on a 64-core box starts only what it uses.

Idle workers exit on their own after ``PICKMAP_IDLE_TIMEOUT`` seconds (default
300) with a ``Bye``; the caller has no background thread, which keeps fork
safe. :func:`shutdown` stops every pool and runs at interpreter exit.

What a call leaves behind is decided in :meth:`WorkerPool.end_call`, for the
workers it holds:

- a worker still busy with this call's work (error, timeout, abandoned
  ``imap``, Ctrl-C) is killed: nothing keeps running after the call returns;
- a worker that ran an ``initializer`` is retired, so it cannot leak into a
  later call;
- a worker that died is replaced by the next call that needs one.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading

from .backends.base import Backend, Inheritance, Worker, WorkerStart

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ("Slot", "WorkerPool", "acquire", "release", "shutdown")

_GRACE = 2.0  # seconds a stopping worker gets before it is killed


class Slot:
    """A worker plus the engine's bookkeeping about it."""

    __slots__ = (
        "call_id",
        "eof",
        "handed_at",
        "items_run",
        "owner",
        "queued",
        "ready",
        "retiring",
        "said_bye",
        "tainted",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.queued: collections.deque[Any] = collections.deque()  # chunks sent, unanswered
        self.call_id: int | None = None  # the call whose Setup it holds
        self.owner: int | None = None  # the call that holds it now (None: free)
        self.tainted = False  # ran an initializer
        self.said_bye = False  # exited after its idle timeout
        self.eof = False  # its channel closed: dead or dying
        self.ready = False  # a process worker said Ready: it started
        # when its oldest queued chunk was handed over (for timeouts without progress)
        self.handed_at = 0.0
        self.items_run = 0  # over its whole life (max_tasks_per_worker)
        self.retiring = False  # has run its share of items: gets no more chunks

    @property
    def usable(self) -> bool:
        return not (self.said_bye or self.eof or self.retiring)


def _free_but_unusable(slot: Slot) -> bool:
    """Held by no call, and can serve none (said Bye, pipe closed)."""
    return slot.owner is None and (slot.said_bye or slot.eof)


class WorkerPool:
    def __init__(
        self, backend: Backend, start_method: str | None, size: int, idle_timeout: float
    ) -> None:
        self.backend = backend
        self.start_method = start_method
        self.size = size
        self.idle_timeout = idle_timeout
        self.slots: list[Slot] = []
        self.lock = threading.RLock()
        self.users = 0  # calls running on it now
        self.broken = False  # a worker crashed or a call was interrupted: no new calls
        self.retired = False  # out of the table: the last user closes it
        # Calls that found no worker free, first come first served; each has a pipe
        # that is written when a worker is handed back to it.
        self._waiting: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        # calls whose consumer holds them at a yield (an imap not iterated now)
        self._paused: set[int] = set()
        self._spare_pipes: list[tuple[int, int]] = []  # wake-up pipes no call waits on now
        # Wake-ups and pipe drains are decided under the lock and done after it
        # (_unlocked_io): a system call under the lock lets another caller thread take the
        # GIL and then block on the lock. Deques: taken from without the lock.
        self._wakes: collections.deque[int] = collections.deque()  # write ends to wake
        self._draining: collections.deque[tuple[int, int]] = collections.deque()

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.backend.name, self.start_method, self.size)

    # ------------------------------------------------------------------ claiming workers
    # The lock-free reads below take one atomic snapshot (a list copy, a dict or set
    # lookup): a call's own slots and its own place in line change only by its own hand.
    def held_by(self, call_id: int) -> list[Slot]:
        return [s for s in self.slots.copy() if s.owner == call_id]

    def pick(
        self,
        call_id: int,
        inheritance: Inheritance | None = None,
        depth: int | None = None,
        *,
        finishing: bool = False,
    ) -> Slot | None:
        """A worker for the call's next chunk: one it holds that is idle, a free one, a new one,
        or one it holds with room in its queue — the last only while no other call waits,
        or when ``finishing``.

        ``inheritance`` is handed to a worker started now (see ``Backend.start_worker``).
        ``depth`` caps the chunks a worker may hold (never above ``max_queued``).
        ``finishing``: this chunk ends the call and what is left is a few milliseconds of
        work, so it may queue behind the call's running chunk even while others wait (it
        delays them by that much, and saves the call a round trip and a second turn).
        """
        depth = self.backend.max_queued if depth is None else min(depth, self.backend.max_queued)
        if any(_free_but_unusable(s) for s in self.slots.copy()):
            self._reap_unusable()
        try:
            return self._pick(call_id, inheritance, depth, finishing)
        finally:
            self._unlocked_io()

    def _pick(
        self, call_id: int, inheritance: Inheritance | None, depth: int, finishing: bool
    ) -> Slot | None:
        with self.lock:
            mine = [s for s in self.slots if s.owner == call_id and s.usable]
            idle_mine = next((s for s in mine if not s.queued), None)
            if idle_mine is not None:
                return idle_mine
            my_turn = not self._waiting or next(iter(self._waiting)) == call_id
            if my_turn:
                free = next((s for s in self.slots if s.owner is None and s.usable), None)
                if free is None and (
                    len(self.slots) < self.size or self._held_only_by_paused(call_id)
                ):
                    free = self._start_slot(inheritance)
                if free is not None:
                    free.owner = call_id
                    self._stop_waiting(call_id)
                    if len(self.slots) < self.size or any(
                        s.owner is None and s.usable for s in self.slots
                    ):
                        self._wake_next()  # more room than this call took: the next in line may go
                    return free
            others_wait = any(waiter != call_id for waiter in self._waiting)
            best = min(mine, key=lambda s: len(s.queued), default=None)
            if best is not None and (finishing or not others_wait) and len(best.queued) < depth:
                return best
            if not mine:
                self._wait_turn(call_id)
            return None

    def others_wait(self, call_id: int) -> bool:
        """Whether another call waits for a worker now (this one will get no second worker)."""
        return len(self._waiting) > (call_id in self._waiting)

    def _held_only_by_paused(self, call_id: int) -> bool:
        """Every worker is held by calls paused at a yield (two ``imap`` zipped, an
        iterator put aside): one more worker, or this call would wait for them forever."""
        holders = {s.owner for s in self.slots if s.owner is not None}
        return bool(holders) and call_id not in holders and holders <= self._paused

    def pause(self, call_id: int) -> None:
        """The call yields results and may not run again for a while: it leaves the line,
        and a call waiting for its workers may go past the size (see ``_held_only_by_paused``)."""
        self.leave_line(call_id)
        with self.lock:
            self._paused.add(call_id)
            self._wake_next()
        self._unlocked_io()

    def resume(self, call_id: int) -> None:
        self._paused.discard(call_id)

    def _reap_unusable(self) -> None:
        """Remove free workers that can serve no call (said Bye, pipe closed): they count against the size."""
        with self.lock:
            dead = [s for s in self.slots if _free_but_unusable(s)]
            for slot in dead:
                self.slots.remove(slot)
            if dead:
                self._wake_next()  # room to start a worker, for the call first in line
        for slot in dead:
            slot.worker.kill()

    def leave_line(self, call_id: int) -> None:
        """The call stops waiting for a worker (it is about to yield results, or it ends).

        A call waits in line only while it is blocked in its own wait: a
        paused ``imap`` at the head of the line would hold every other call.
        A wake-up it was given passes to the next in line.
        """
        if call_id not in self._waiting:
            return
        with self.lock:
            was_head = next(iter(self._waiting)) == call_id
            self._stop_waiting(call_id)
            if was_head:
                self._wake_next()
        self._unlocked_io()

    def drain_turn(self, call_id: int) -> None:
        """Read the wake-ups on the call's pipe (it polls it level-triggered)."""
        pipe = self._waiting.get(call_id)
        if pipe is not None:
            try:
                os.read(pipe[0], 1 << 12)
            except OSError:
                pass

    def _start_slot(self, inheritance: Inheritance | None) -> Slot:
        start = WorkerStart(self.start_method, self.idle_timeout, inheritance, self.size)
        slot = Slot(self.backend.start_worker(start))
        if slot.worker.adopted_call is not None and inheritance is not None:
            slot.call_id = slot.worker.adopted_call
            slot.tainted = inheritance.setup is not None  # it ran the call's initializer
        self.slots.append(slot)
        return slot

    def _wait_turn(self, call_id: int) -> None:
        if call_id not in self._waiting:
            if self._spare_pipes:
                pipe = self._spare_pipes.pop()
            else:
                pipe = os.pipe()
                os.set_blocking(pipe[0], False)
                os.set_blocking(pipe[1], False)
            self._waiting[call_id] = pipe

    def _stop_waiting(self, call_id: int) -> None:
        pipe = self._waiting.pop(call_id, None)
        if pipe is not None:
            # Kept for the next call that waits, emptied first (a wake-up it did not read is
            # not for the next one): one read instead of making and closing a pipe each
            # time — with many callers, every system call is a chance to lose the GIL.
            self._draining.append(pipe)

    def turn_fd(self, call_id: int) -> int | None:
        """For a call that holds no worker: readable once one may be free for it."""
        pipe = self._waiting.get(call_id)
        return pipe[0] if pipe is not None else None

    def _wake_next(self) -> None:
        """Wake the call first in line, once the lock is released (``_unlocked_io``)."""
        for _read, write in list(self._waiting.values())[:1]:
            self._wakes.append(write)

    def _unlocked_io(self) -> None:
        """The wake-ups and pipe drains decided under the lock, done after it (call it with
        the lock released). A pipe is never closed while the pool lives, so a late wake-up
        reaches at worst the next call to wait on it, which looks again and waits again."""
        while self._wakes:
            try:
                write = self._wakes.popleft()
            except IndexError:  # another thread took the last one
                break
            try:
                os.write(write, b"\0")
            except OSError:
                pass
        while self._draining:
            try:
                pipe = self._draining.popleft()
            except IndexError:
                break
            try:
                while os.read(pipe[0], 1 << 12):
                    pass
            except OSError:  # BlockingIOError: empty
                pass
            finally:
                self._spare_pipes.append(pipe)  # even after a Ctrl-C here: never lost

    def hand_back(self, slot: Slot) -> None:
        """The call has nothing queued on this worker: free it, and wake the call waiting longest."""
        if not slot.queued and slot.owner is not None and len(self.slots) > self.size:
            slot.retiring = True  # started past the size while calls were paused: not kept
        if slot.retiring and not slot.queued:
            self.remove(slot, kill=False)  # its lifespan is over: replaced on demand
            return
        with self.lock:
            if slot.queued or slot.owner is None or slot.tainted:
                return  # a worker that ran this call's initializer never serves another call
            slot.owner = None
            self._wake_next()
        self._unlocked_io()

    # ------------------------------------------------------------------ removing workers
    def remove(self, slot: Slot, *, kill: bool) -> None:
        # Stopped before it leaves the list: a Ctrl-C in between leaves it to
        # be stopped again (see end_call), never forgotten while it runs.
        if kill:
            slot.worker.kill()
        else:
            slot.worker.stop(_GRACE)
        with self.lock:
            if slot in self.slots:
                self.slots.remove(slot)
            self._wake_next()  # room to start a worker
        self._unlocked_io()

    def prune_dead(self) -> None:
        """Drop free workers that exited while idle (idle timeout, or killed from outside)."""
        with self.lock:
            # out of the list while still free, so no call claims one in between
            dead = [s for s in self.slots if s.owner is None and s.worker.exitcode() is not None]
            for slot in dead:
                self.slots.remove(slot)
            if dead:
                self._wake_next()  # room to start a worker
        for slot in dead:
            slot.worker.kill()
        self._unlocked_io()

    def end_call(self, call_id: int, *, interrupted: bool) -> None:
        """Clean up after a call; finishes even when Ctrl-C arrives during it, then re-raises that."""
        late: KeyboardInterrupt | None = None
        while True:
            try:
                try:
                    self._end_call(call_id, interrupted=interrupted or late is not None)
                finally:
                    self.backend.call_ended(call_id)  # idempotent: safe to repeat after a Ctrl-C
                break
            except KeyboardInterrupt as caught:
                late = caught
        if late is not None:
            raise late

    def _end_call(self, call_id: int, *, interrupted: bool) -> None:
        self.leave_line(call_id)
        self.resume(call_id)
        for slot in self.held_by(call_id):
            if interrupted or slot.queued or slot.said_bye or slot.eof:
                self.remove(slot, kill=True)
            elif slot.tainted or slot.retiring:
                self.remove(slot, kill=False)
            slot.queued.clear()
            with self.lock:
                slot.owner = None
                self._wake_next()
            self._unlocked_io()  # now: the next slot's removal may wait out a grace

    def close(self, *, kill: bool = False) -> None:
        """Stop every worker: all are told at once, then each gets what is left of the grace."""
        with self.lock:
            slots = list(self.slots)
        if not kill:
            for slot in slots:
                slot.worker.announce_stop()
        for slot in slots:
            self.remove(slot, kill=kill)
        with self.lock:  # after the removals: they may have given a pipe back
            pipes = [*self._spare_pipes, *self._draining, *self._waiting.values()]
            self._spare_pipes = []
            self._draining.clear()
            self._wakes.clear()
            self._waiting.clear()
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)


_POOLS: dict[tuple[str, str | None, int], WorkerPool] = {}
_LOCK = threading.Lock()


def acquire(
    backend: Backend, start_method: str | None, size: int, idle_timeout: float
) -> WorkerPool:
    """The pool for this key, shared with any call running on it now."""
    key = (backend.name, start_method, size)
    replaced = None
    with _LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.broken or not backend.keep_warm or pool.backend is not backend:
            if pool is not None and backend.keep_warm and not pool.broken:
                # Another instance of the backend under the same name: the old pool goes,
                # now if idle, else with its last user.
                pool.retired = True
                replaced = pool if pool.users == 0 else None
            pool = WorkerPool(backend, start_method, size, idle_timeout)
            if backend.keep_warm:
                _POOLS[key] = pool
        pool.users += 1
        first = pool.users == 1
    if replaced is not None:
        replaced.close()
    if first:
        pool.prune_dead()
    return pool


def release(pool: WorkerPool) -> None:
    """The call is over. A broken pool (a crash, Ctrl-C) takes no new calls and closes with its last user."""
    broken = pool.broken
    with _LOCK:
        pool.users -= 1
        if broken or not pool.backend.keep_warm:
            pool.retired = True
            if _POOLS.get(pool.key) is pool:
                del _POOLS[pool.key]
        # Decided under the lock: acquire() retires a replaced pool and closes it itself
        # when it finds no user, so exactly one of the two closes it.
        close = pool.users == 0 and pool.retired
    if close:
        pool.close(kill=broken)


def shutdown() -> None:
    """Stop every idle worker pickmap keeps warm, and the executors it owns. Safe to call at any time."""
    from .registry import loaded_backends

    with _LOCK:
        idle = [pool for pool in _POOLS.values() if pool.users == 0]
        for pool in idle:
            del _POOLS[pool.key]
    for pool in idle:
        pool.close()
    for backend in loaded_backends():
        backend.shutdown()


def idle_pool_count() -> int:
    """How many warm pools wait for a call (for tests and diagnostics)."""
    with _LOCK:
        return sum(1 for pool in _POOLS.values() if pool.users == 0)


atexit.register(shutdown)
