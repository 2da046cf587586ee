"""Death and timeout policy: what happens to a worker that died or overran, and what the caller is told.

- A worker that dies while it holds work ends the call with
  ``WorkerCrashedError`` naming what it held, and the pool is discarded.
- An item that overruns ``timeout=`` ends the call with ``TaskTimeoutError``:
  its worker is killed where the backend can kill; otherwise (threads, a
  user's executor) the call *waits only* — it raises now and the task is left
  running, to be abandoned (threads) or to its executor's owner.
"""

from __future__ import annotations

import time

from . import errors
from ._replies import describe_indices
from .errors import TaskTimeoutError
from .pool import Slot, WorkerPool

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

    from .engine import Call


__all__ = ("Attempts", "check_timeouts", "item_started", "on_death")


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        import signal  # only once a worker died: signal.py brings enum, ~1.5 ms of a first call

        try:
            return f"signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            pass
    return f"exit code {code}"


def item_started(slot: Slot) -> tuple[int, float]:
    """``(index, monotonic start)`` of what the slot's worker runs now; start 0: nothing timed runs.

    From the worker's progress slot where it reports one; otherwise the
    hand-off time of its one queued single-item chunk.
    """
    progress = slot.worker.progress
    if progress is not None:
        return int(progress[0]), progress[1]
    if slot.queued:
        return slot.queued[0].start, slot.handed_at
    return -2, 0.0


class Attempts:
    """``retries=``: each chunk's lost attempts (exit statuses), and whether it may run again.

    Only lost workers are retried (a crash, a signal, the OOM killer, a lost
    executor task), never an exception raised by the function, and never a
    timeout.
    """

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self._statuses: dict[int, list[str]] = {}

    def again(self, seq: int, status: str) -> bool:
        statuses = self._statuses.setdefault(seq, [])
        statuses.append(status)
        return len(statuses) <= self.retries

    def history(self, seq: int) -> str:
        statuses = self._statuses.get(seq, [])
        if len(statuses) <= 1:
            return ""
        return f" (every attempt: {'; '.join(statuses)})"


def on_death(
    pool: WorkerPool, call: Call, slot: Slot, attempts: Attempts
) -> tuple[errors.WorkerCrashedError | None, list[Any]]:
    """Remove a dead worker: the error for the caller if it held this call's work,
    and the chunks to run again on another worker (``retries=``)."""
    code = slot.worker.exitcode()
    pid = slot.worker.pid
    if slot.said_bye or not slot.queued:
        pool.remove(slot, kill=True)
        return None, []
    index, started = item_started(slot)
    timed = call.timed and slot.worker.progress is not None and started > 0
    head = slot.queued[0]
    if slot.ready and attempts.again(head.seq, f"{_describe_exit(code)} (pid {pid})"):
        again = list(slot.queued)  # the head ran and is retried; the rest never started
        slot.queued.clear()
        pool.remove(slot, kill=True)
        return None, again
    if not slot.ready:
        where, indices = "while starting, before it ran anything", list[int]()
        advice = (
            "its interpreter failed before pickmap's code ran (a broken sitecustomize or .pth file, "
            "a missing module, the OOM killer); the worker's own error is printed above"
        )
    else:
        advice = "the pool was discarded and the next call starts fresh workers" + attempts.history(
            head.seq
        )
        if timed and index < 0:
            where, indices = f"while loading {call.label}", []
        elif timed:
            where, indices = f"while running item {index} of {call.label}", [index]
        else:
            where = f"while running {describe_indices(head.start, head.size)} of {call.label}"
            indices = list(range(head.start, head.start + head.size))
    pool.remove(slot, kill=True)
    pool.broken = True
    error = errors.WorkerCrashedError(
        f"a {call.backend.name!r} worker (pid {pid}) exited with {_describe_exit(code)} {where}; {advice}",
        exitcode=code,
        indices=indices,
    )
    return error, []


def check_timeouts(pool: WorkerPool, call: Call) -> TaskTimeoutError | None:
    """The error for the first item over its time, after acting on its worker."""
    if not call.timed:
        return None
    timeout = call.timeout
    assert timeout is not None
    now = time.monotonic()
    for slot in pool.held_by(call.id):
        index, started = item_started(slot)
        if not slot.queued or started <= 0 or now - started <= timeout:
            continue
        what = f"item {index}" if index >= 0 else "loading the callable"
        backend = call.backend
        if backend.killable:
            who = (
                f"its worker (pid {slot.worker.pid})"
                if slot.worker.pid is not None
                else "its executor's process"
            )
            action = f"{who} was killed and will be replaced"
            pool.remove(slot, kill=True)
        elif backend.processes:
            action = "this backend cannot kill a task: it was left to its executor, which keeps running it"
            pool.remove(slot, kill=True)
        else:
            action = "its thread cannot be killed: it was abandoned and the pool retired"
            pool.broken = True
        return TaskTimeoutError(
            f"{what} of {call.label} ran longer than timeout={timeout:g}s on the {backend.name!r} backend; {action}",
            index=index if index >= 0 else None,
            timeout=timeout,
        )
    return None
