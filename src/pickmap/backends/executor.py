"""Any ``concurrent.futures.Executor`` as a backend: ``pmap(f, xs, backend=executor)``.

``ProcessPoolExecutor``, loky's reusable executor, ``mpi4py.futures``, a
``ThreadPoolExecutor``: the core chunks, orders, streams and words errors as
on every backend; each chunk is one ``submit(run_job, ...)``. Where the
executor pickles (anything but a thread pool), the callable and items are
serialized by cloudpickle first, so lambdas and ``__main__`` functions work
on a stdlib executor. pickmap never shuts down an executor it did not create,
and cannot kill a task inside it: ``timeout=`` waits only (the call raises,
the task is left to the executor's owner).
"""

from __future__ import annotations

import concurrent.futures

from ._futures import FuturesWorker
from .base import Backend, Worker, WorkerStart

__all__ = ("ExecutorBackend",)

# Executors known to run on this machine, so workers can open shared memory.
_LOCAL = ("concurrent.futures.process", "loky", "joblib.externals.loky")


class ExecutorBackend(Backend):
    sticky = False
    start_methods = False
    killable = False
    reports_progress = False
    keep_warm = False
    max_queued = 1  # the executor queues; pickmap keeps one task per slot in flight

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self.executor = executor
        threads = isinstance(executor, concurrent.futures.ThreadPoolExecutor)
        self.processes = not threads  # type: ignore[misc]
        self.serializer = "identity" if threads else "cloudpickle"
        self.shares_files = threads or type(executor).__module__.startswith(_LOCAL)  # type: ignore[misc]
        self.name = f"executor:{type(executor).__qualname__}@{id(executor):x}"
        self.max_workers = getattr(executor, "_max_workers", None)

    def default_workers(self) -> int:
        return self.max_workers or super().default_workers()

    def start_worker(self, start: WorkerStart) -> Worker:
        return FuturesWorker(self.executor.submit, blobs=self.processes)

    def __repr__(self) -> str:
        return f"<pickmap backend over {self.executor!r}>"
