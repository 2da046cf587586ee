"""A backend in one file: pmap on a ``multiprocessing.Pool``, without touching pickmap's core.

Registered by conftest.py as ``"test-mp-pool"``, so the whole conformance
suite runs on it; docs/how-to/write-a-backend.md shows this file as its
example (a test checks they are the same).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.pool
from collections.abc import Callable
from typing import Any

from pickmap.backends._futures import FuturesWorker
from pickmap.backends.base import Backend, Worker, WorkerStart

_POOLS: dict[tuple[str | None, int], multiprocessing.pool.Pool] = {}


def _submit_to(pool: multiprocessing.pool.Pool) -> Callable[..., concurrent.futures.Future[Any]]:
    """``submit(fn, arg)`` over ``apply_async``: what the futures adapter needs."""

    def submit(fn: Callable[[Any], Any], arg: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        pool.apply_async(
            fn, (arg,), callback=future.set_result, error_callback=future.set_exception
        )
        return future

    return submit


class PoolBackend(Backend):
    serializer = "cloudpickle"  # Pool pickles with the stdlib: wrap the callable first
    sticky = False  # each chunk is a self-contained task
    killable = False  # Pool cannot kill one task: timeout= waits only
    reports_progress = False
    keep_warm = False
    max_queued = 1

    def start_worker(self, start: WorkerStart) -> Worker:
        key = (start.start_method, start.workers)
        if key not in _POOLS:
            _POOLS[key] = multiprocessing.get_context(start.start_method).Pool(start.workers)
        return FuturesWorker(_submit_to(_POOLS[key]), blobs=True)

    def shutdown(self) -> None:
        while _POOLS:
            _, pool = _POOLS.popitem()
            pool.terminate()
            pool.join()
