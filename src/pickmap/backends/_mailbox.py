"""A mailbox the engine can wait on: replies posted from any thread, one byte each in a pipe.

Threads and futures callbacks have no descriptor of their own; the engine
waits with ``poll(2)`` on descriptors only. Every backend whose workers answer
from another thread posts here, instead of keeping its own self-pipe.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence

from .._protocol import Message

__all__ = ("Mailbox",)


class Mailbox:
    def __init__(self) -> None:
        self._replies: collections.deque[Message] = collections.deque()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def post(self, replies: Sequence[Message]) -> None:
        """Called from the worker's thread (or a future's callback)."""
        self._replies.extend(replies)
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the engine will look

    def take(self) -> list[Message]:
        try:
            os.read(self._read, 1 << 16)
        except (BlockingIOError, OSError):
            pass
        taken = []
        while self._replies:
            taken.append(self._replies.popleft())
        return taken

    def close(self) -> None:
        """Close the descriptors; later posts are dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._write)
            os.close(self._read)
