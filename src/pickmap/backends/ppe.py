"""``ppe``: pickmap-owned, reused ``ProcessPoolExecutor``s with cloudpickle-wrapped callables.

The strategy the design started from, kept for comparison and for code that
wants the standard library's executor underneath. It is on the registry and
in ``explain``, not on the probe's ladder: the ``cloudpickle`` backend carries
the same callables on pickmap's own workers, which keep the callable loaded
per call and report per-item progress (see docs/explanation/performance.md for the cost).

Each worker of a ppe pool is a single-process ``ProcessPoolExecutor`` of its
own, kept warm with the pool across calls. That is what lets a stuck or
abandoned task be killed (``killable``): its executor's one process is killed
and the executor discarded, and no other call — pools are shared by
concurrent callers — loses a task with it. An executor broken by a death is
replaced at the next submit.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing

from ._futures import FuturesWorker
from .base import Backend, Worker, WorkerStart

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any


class _OwnedExecutorWorker(FuturesWorker):
    def __init__(self, start_method: str | None) -> None:
        super().__init__(self._submit_now, blobs=True)
        self._context = multiprocessing.get_context(start_method)
        self._executor = self._new_executor()

    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(1, mp_context=self._context)

    def _submit_now(self, fn: Any, arg: Any) -> concurrent.futures.Future[Any]:
        if getattr(self._executor, "_broken", False):  # its process died: a fresh one
            self._executor = self._new_executor()
        return self._executor.submit(fn, arg)

    def kill(self) -> None:
        busy = bool(self._futures)
        super().kill()
        processes = (
            list((getattr(self._executor, "_processes", None) or {}).values()) if busy else []
        )
        self._executor.shutdown(wait=not busy, cancel_futures=True)
        for process in processes:  # a task that must stop takes its executor's process with it
            process.kill()
            process.join(5)

    def stop(self, grace: float) -> None:
        self.kill()


class PPEBackend(Backend):
    name = "ppe"
    serializer = "cloudpickle"
    sticky = False
    reports_progress = False
    max_queued = 1

    def start_worker(self, start: WorkerStart) -> Worker:
        return _OwnedExecutorWorker(start.start_method)
