"""``serial``: every item in the calling thread, in order — for debugging.

A breakpoint inside the function stops in the caller's own thread, and an
exception keeps its original traceback. ``timeout=`` is not enforced: the
caller's thread cannot be interrupted from inside.
"""

from __future__ import annotations

from typing import Any, Sequence

from .._worker import Message, WorkerState
from ..serializers import get_serializer
from .base import Backend, Worker


class InlineWorker(Worker):
    """Runs each message as it is sent; its replies are ready at once."""

    def __init__(self) -> None:
        self._state = WorkerState(get_serializer("identity"))
        self._replies: list[Message] = []

    def send(self, messages: Sequence[Message]) -> None:
        for header, payloads in messages:
            self._replies.extend(self._state.handle(header, payloads))

    def receive(self) -> list[Message]:
        replies, self._replies = self._replies, []
        return replies

    def kill(self) -> None:
        self._replies.clear()

    def stop(self, grace: float) -> None:
        self._replies.clear()


class SerialBackend(Backend):
    name = "serial"
    serializer = "identity"
    isolated = False
    enforces_timeout = False
    killable = False
    max_queued = 1
    max_workers = 1

    def start_worker(self, start_method: str | None, idle_timeout: float, call: Any = None) -> Worker:
        return InlineWorker()
