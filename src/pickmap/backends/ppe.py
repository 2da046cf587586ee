"""``ppe``: a pickmap-owned, reused ``ProcessPoolExecutor`` with cloudpickle-wrapped callables.

The strategy the design started from, kept for comparison and for code that
wants the standard library's executor underneath. It is on the registry and
in ``explain``, not on the probe's ladder: the ``cloudpickle`` backend carries
the same callables on pickmap's own workers, which keep the callable loaded
per call and report per-item progress (see docs/performance.md for the cost).

One executor per (start method, worker count), created on first use and shut
down by ``pickmap.shutdown()`` or at exit. A timed-out task cannot be killed
alone: its executor is discarded (its processes killed) and the next call
starts a fresh one.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import threading
from typing import Any
from ._futures import FuturesWorker
from .base import Backend, Worker, WorkerStart

_EXECUTORS: dict[tuple[str | None, int], concurrent.futures.ProcessPoolExecutor] = {}
_LOCK = threading.Lock()


def _executor(start_method: str | None, workers: int) -> concurrent.futures.ProcessPoolExecutor:
    with _LOCK:
        executor = _EXECUTORS.get((start_method, workers))
        if executor is None or getattr(executor, "_broken", False):
            context = multiprocessing.get_context(start_method)
            executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
            _EXECUTORS[(start_method, workers)] = executor
        return executor


def _discard(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    with _LOCK:
        for key, known in list(_EXECUTORS.items()):
            if known is executor:
                del _EXECUTORS[key]
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
        process.join(5)


def shutdown_executors() -> None:
    with _LOCK:
        executors = list(_EXECUTORS.values())
        _EXECUTORS.clear()
    for executor in executors:
        executor.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_executors)


class _OwnedExecutorWorker(FuturesWorker):
    def __init__(self, start_method: str | None, workers: int) -> None:
        # The executor is looked up at each submit: one broken by a death is replaced.
        super().__init__(self._submit_now, blobs=True, shares_files=True)
        self._key = (start_method, workers)
        self._executor = _executor(*self._key)

    def _submit_now(self, fn: Any, arg: Any) -> concurrent.futures.Future[Any]:
        self._executor = _executor(*self._key)
        return self._executor.submit(fn, arg)

    def kill(self) -> None:
        # pickmap owns this executor: a task that must stop takes the executor with it.
        busy = bool(self._futures)
        super().kill()
        if busy:
            _discard(self._executor)


class PPEBackend(Backend):
    name = "ppe"
    serializer = "cloudpickle"
    sticky = False
    reports_progress = False
    keep_warm = False
    max_queued = 1

    def shutdown(self) -> None:
        shutdown_executors()

    def start_worker(self, start: WorkerStart) -> Worker:
        return _OwnedExecutorWorker(start.start_method, start.workers)
