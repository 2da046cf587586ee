"""The backend contract: what a backend must provide, and nothing more.

A backend starts workers. That is its one required method,
:meth:`Backend.start_worker`. Everything else — argument checks, the
capability probe, chunking, ordering, timeouts, error translation, warm pools
— lives in the core (``engine.py``, ``pool.py``, ``probe.py``) and is written
once for every backend.

A :class:`Worker` is a handle the engine holds: it moves messages to and from
one worker (see ``_worker.py`` for the protocol) and tells when that worker
died. The capability flags on :class:`Backend` tell the core what it may
expect of a backend, so the core never asks a backend's name.
"""

from __future__ import annotations

import abc
import os
from typing import Any, ClassVar, Sequence

from .._worker import Message

__all__ = ("Backend", "Worker")


class Worker(abc.ABC):
    """One worker, as the engine sees it.

    ``waitable`` is a file descriptor, or an object with ``fileno()``, that
    becomes readable when replies arrive (``None``: replies are ready as soon
    as :meth:`send` returns).
    ``sentinel`` becomes ready when the worker dies (``None``: it cannot die).
    ``progress`` is the worker's ``[item index, start time]`` slot, written
    while a timed call runs.
    """

    waitable: Any = None
    sentinel: Any = None
    pid: int | None = None
    progress: Any = None
    adopted_call: int | None = None  # id of a call it inherited at fork

    @abc.abstractmethod
    def send(self, messages: Sequence[Message]) -> None:
        """Hand messages to the worker, in order. Raises ``OSError`` if it is gone."""

    @abc.abstractmethod
    def receive(self) -> list[Message]:
        """Every reply available now, without blocking. ``EOFError`` if the channel closed."""

    def exitcode(self) -> int | None:
        """The exit code once the worker has died (negative: a signal), else ``None``."""
        return None

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the worker now, whatever it is doing (threads: abandon it)."""

    @abc.abstractmethod
    def stop(self, grace: float) -> None:
        """Ask the worker to finish and exit; kill it after ``grace`` seconds."""


class Backend(abc.ABC):
    """A strategy for running workers. Subclasses set the flags and start workers."""

    #: Registry name, e.g. ``"stdlib"``.
    name: ClassVar[str]
    #: Name of the serializer (``serializers.py``) for the callable, items and results.
    serializer: ClassVar[str]
    #: Workers are separate processes: they can crash, and start methods apply.
    isolated: ClassVar[bool] = True
    #: ``timeout=`` is enforced (the engine can notice a stuck item).
    enforces_timeout: ClassVar[bool] = True
    #: A stuck worker can be killed; otherwise it is abandoned and the pool retired.
    killable: ClassVar[bool] = True
    #: Most workers this backend can use (``serial``: one, the caller's thread).
    max_workers: ClassVar[int | None] = None
    #: Keep idle workers for the next call (threads are cheap to start, and idle
    #: threads would make the process multi-threaded, ruling out fork).
    keep_warm: ClassVar[bool] = True
    #: How many chunks may wait in one worker's queue (pipelining hides latency).
    max_queued: ClassVar[int] = 2

    def default_workers(self) -> int:
        """Worker count when neither ``workers=`` nor ``PICKMAP_WORKERS`` says."""
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    @abc.abstractmethod
    def start_worker(self, start_method: str | None, idle_timeout: float, call: Any = None) -> Worker:
        """Start one worker and return its handle.

        ``call`` is the running call's ``(id, callable, (initializer, initargs)
        or None, star, collect, timed)``. A backend that can hand it over
        without serializing (fork) sets ``worker.adopted_call`` to its id;
        others ignore it and the worker gets a SETUP message.
        """

    def __repr__(self) -> str:
        return f"<pickmap backend {self.name!r}>"
