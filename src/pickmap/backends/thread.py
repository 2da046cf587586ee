"""``thread``: worker threads in this process; nothing is serialized.

The fallback when nothing can be serialized (objects holding generators,
sockets, locks...). Threads share the GIL, so CPU-bound pure-Python work does
not run in parallel; I/O and GIL-releasing C code do.

A thread cannot be killed: on a timeout it is told to stop after its current
item and abandoned.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence

from .._protocol import Message, Stop, Task
from .._worker import WorkerState, serve
from ._mailbox import Mailbox
from .base import Backend, Worker, WorkerStart


class ThreadWorker(Worker):
    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[Sequence[Message]] = queue.SimpleQueue()
        self._mailbox = Mailbox()
        self._abandoned = False
        self._told_to_stop = False
        self.progress = [0.0, 0.0]
        self.waitable = self._mailbox
        self._thread = threading.Thread(target=self._run, name="pickmap-worker", daemon=True)
        self._thread._pickmap_worker = True  # type: ignore[attr-defined] # nested calls run in place
        self._thread.start()

    def exitcode(self) -> int | None:
        """1 once the thread has ended without being told to (its loop raised): seen as a death."""
        return 1 if not self._told_to_stop and not self._thread.is_alive() else None

    def _run(self) -> None:
        def recv() -> list[Message]:
            # An abandoned worker (timed out) skips queued tasks, keeps Stop.
            return [m for m in self._inbox.get() if not (self._abandoned and isinstance(m, Task))]

        serve(recv, self._mailbox.post, WorkerState(self.progress))

    def send(self, messages: Sequence[Message]) -> None:
        self._inbox.put(messages)

    def receive(self) -> list[Message]:
        return self._mailbox.take()

    def kill(self) -> None:
        self._told_to_stop = self._abandoned = True
        self._inbox.put([Stop()])
        self._mailbox.close()

    def stop(self, grace: float) -> None:
        self._told_to_stop = True
        self._inbox.put([Stop()])
        self._thread.join(grace)
        self._abandoned = True
        self._mailbox.close()
        # join() returns before the kernel has reaped the thread; the next
        # call counts threads to decide whether fork is safe, so wait for it.
        task = f"/proc/self/task/{self._thread.native_id}"
        deadline = time.monotonic() + 0.1
        while not self._thread.is_alive() and os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.0005)


class ThreadBackend(Backend):
    name = "thread"
    serializer = "identity"
    processes = False
    start_methods = False
    killable = False
    keep_warm = False

    def default_workers(self) -> int:
        # Same default as ThreadPoolExecutor: threads mostly wait on I/O.
        return min(32, (os.cpu_count() or 1) + 4)

    def start_worker(self, start: WorkerStart) -> Worker:
        return ThreadWorker()
