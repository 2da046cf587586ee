"""``serial``: every item in the calling thread, in order — for debugging.

A breakpoint inside the function stops in the caller's own thread, and an
exception keeps its original traceback. ``timeout=`` is not enforced: the
caller's thread cannot be interrupted from inside.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._protocol import Message
from .._worker import WorkerState
from .base import Backend, Worker, WorkerStart


class InlineWorker(Worker):
    """Runs each message as it is sent; its replies are ready at once."""

    def __init__(self) -> None:
        self._state = WorkerState()
        self._replies: list[Message] = []

    def send(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self._replies.extend(self._state.handle(message))

    def receive(self) -> list[Message]:
        replies, self._replies = self._replies, []
        return replies

    def kill(self) -> None:
        self._replies.clear()


class SerialBackend(Backend):
    name = "serial"
    serializer = "identity"
    processes = False
    start_methods = False
    killable = False
    reports_progress = False
    enforces_timeout = False
    keep_warm = False  # nothing to keep, and a nested call in a task must get its own inline worker
    max_queued = 1
    max_workers = 1

    def start_worker(self, start: WorkerStart) -> Worker:
        return InlineWorker()
