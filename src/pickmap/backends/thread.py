"""``thread``: worker threads in this process; nothing is serialized.

The fallback when nothing can be serialized (objects holding generators,
sockets, locks...). Threads share the GIL, so CPU-bound pure-Python work does
not run in parallel; I/O and GIL-releasing C code do.

Replies go into a deque, and one byte per reply into a pipe so the engine can
wait on threads and processes alike. A thread cannot be killed: on a timeout
it is told to stop after its current item and abandoned.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from typing import Any, Sequence

from .._worker import CHUNK, STOP, Message, WorkerState, serve
from ..serializers import get_serializer
from .base import Backend, Worker


class ThreadWorker(Worker):
    def __init__(self, idle_timeout: float) -> None:
        self._inbox: queue.SimpleQueue[Sequence[Message]] = queue.SimpleQueue()
        self._replies: collections.deque[Message] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._abandoned = False
        self.progress = [0.0, 0.0]
        self.waitable = self._wake_read
        self._thread = threading.Thread(target=self._run, name="pickmap-worker", daemon=True)
        self._thread._pickmap_worker = True  # type: ignore[attr-defined] # nested calls run in place
        self._thread.start()

    def _run(self) -> None:
        state = WorkerState(get_serializer("identity"), self.progress)

        def recv() -> list[Message]:
            # An abandoned worker (timed out) skips queued chunks, keeps STOP.
            return [m for m in self._inbox.get() if not (self._abandoned and m[0][0] == CHUNK)]

        def reply(replies: list[Message]) -> None:
            self._replies.extend(replies)
            os.write(self._wake_write, b"\0")

        try:
            serve(recv, reply, state)
        finally:
            # Closed by the thread itself, so the descriptors are never reused
            # while it could still write to them.
            os.close(self._wake_write)
            os.close(self._wake_read)

    def send(self, messages: Sequence[Message]) -> None:
        self._inbox.put(messages)

    def receive(self) -> list[Message]:
        try:
            os.read(self._wake_read, 1 << 16)
        except BlockingIOError:
            pass
        messages = []
        while self._replies:
            messages.append(self._replies.popleft())
        return messages

    def kill(self) -> None:
        self._abandoned = True
        self._inbox.put([((STOP,), ())])

    def stop(self, grace: float) -> None:
        self._inbox.put([((STOP,), ())])
        self._thread.join(grace)
        self._abandoned = True
        # join() returns before the kernel has reaped the thread; the next
        # call counts threads to decide whether fork is safe, so wait for it.
        task = f"/proc/self/task/{self._thread.native_id}"
        deadline = time.monotonic() + 0.1
        while not self._thread.is_alive() and os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.0005)


class ThreadBackend(Backend):
    name = "thread"
    serializer = "identity"
    isolated = False
    killable = False
    keep_warm = False

    def default_workers(self) -> int:
        # Same default as ThreadPoolExecutor: threads mostly wait on I/O.
        return min(32, (os.cpu_count() or 1) + 4)

    def start_worker(self, start_method: str | None, idle_timeout: float, call: Any = None) -> Worker:
        return ThreadWorker(idle_timeout)
