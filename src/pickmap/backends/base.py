"""The backend contract (v2): what a backend provides, and nothing more.

A backend starts or finds workers, moves messages, and reports results and
deaths. Its one required method is :meth:`Backend.start_worker`. Argument
checks, the probe, chunking, ordering, streaming, timeouts, error wording and
warm pools live in the core and are written once for every backend.

The capability flags tell the core what to expect, so the core never asks a
backend's name:

============== ================================================================
``sticky``      a worker keeps state between messages: it gets the call's
                Setup once, then Tasks. Otherwise every task is a
                self-contained Job (executors, clusters).
``processes``   workers are other processes: they can die, and their
                tracebacks come back as text (``RemoteTraceback``).
``start_methods`` fork / spawn / forkserver apply.
``shares_files`` workers can open the caller's shared-memory segments (same
                machine): large buffers cross without the pipe.
``killable``    a stuck task can be killed; otherwise ``timeout=`` *waits
                only*: the call raises and the task is left to its owner.
``enforces_timeout`` ``timeout=`` is watched at all (``serial`` runs in the
                caller's own thread, which nothing can interrupt).
``reports_progress`` the worker reports which item runs since when (a shared
                slot), so ``timeout=`` is per item; otherwise it is measured
                from when a one-item task was handed over.
============== ================================================================

A :class:`Worker` is the handle the engine holds for one worker.
``waitable`` is a file descriptor (or has ``fileno()``) that becomes readable
when replies arrive; ``sentinel`` one that becomes ready when the worker dies;
``outbox`` a ``_wire.Outbox`` when writes may be partial (the engine flushes it
when the descriptor is writable). Backends whose workers answer through
callbacks use :class:`~pickmap.backends._mailbox.Mailbox` for ``waitable``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from .._protocol import CallSpec, Message
from .._settings import usable_cpus

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, ClassVar, NamedTuple
else:
    from .._records import NamedTuple

__all__ = ("Backend", "Inheritance", "Worker", "WorkerStart")


class Inheritance(NamedTuple):
    """What a worker forked during a call can take from memory instead of a Setup."""

    spec: CallSpec
    func: Callable[..., Any]
    setup: Any  # (initializer, initargs) objects, or None


class WorkerStart(NamedTuple):
    """Everything :meth:`Backend.start_worker` is told."""

    start_method: str | None  # None unless the backend's ``start_methods`` flag is set
    idle_timeout: float  # seconds an idle worker waits before it exits (Bye)
    inheritance: Inheritance | None  # the running call, for a backend that can fork it in
    workers: int  # the size of the pool this worker joins


class Worker(abc.ABC):
    """One worker, as the engine sees it."""

    waitable: Any = None
    sentinel: Any = None
    outbox: Any = None
    pid: int | None = None
    progress: Any = None  # [item index, start time] slot, written while a timed call runs
    adopted_call: int | None = None  # id of a call it inherited at fork

    @abc.abstractmethod
    def send(self, messages: Sequence[Message]) -> None:
        """Hand messages over, in order, without blocking. ``OSError`` if the worker is gone."""

    @abc.abstractmethod
    def receive(self) -> list[Message]:
        """Every reply available now, without blocking. ``EOFError`` if the channel closed."""

    def exitcode(self) -> int | None:
        """The exit code once the worker has died (negative: a signal), else ``None``."""
        return None

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the worker now, whatever it is doing (when it cannot be killed: abandon it)."""

    def announce_stop(self) -> None:
        """Tell the worker to finish and exit, without waiting (a pool tells all, then waits for each)."""

    def stop(self, grace: float) -> None:
        """Ask the worker to finish and exit; kill it after ``grace`` seconds."""
        self.kill()


class Backend(abc.ABC):
    """A strategy for running workers. Subclasses set the flags and start workers."""

    #: Registry name, e.g. ``"stdlib"``.
    name: str
    #: Serializer (``serializers.py``) for the callable, items and results.
    serializer: str
    sticky: ClassVar[bool] = True
    processes: ClassVar[bool] = True
    start_methods: ClassVar[bool] = True
    shares_files: ClassVar[bool] = True
    killable: ClassVar[bool] = True
    reports_progress: ClassVar[bool] = True
    enforces_timeout: ClassVar[bool] = True
    #: Most workers this backend can use (``serial``: one, the caller's thread).
    max_workers: int | None = None
    #: Keep idle workers for the next call (threads are cheap to start, and idle
    #: threads would make the process multi-threaded, ruling out fork).
    keep_warm: ClassVar[bool] = True
    #: How many chunks may wait in one worker's queue (pipelining hides latency).
    max_queued: ClassVar[int] = 2

    def default_workers(self) -> int:
        """Worker count when neither ``workers=`` nor ``PICKMAP_WORKERS`` says."""
        return usable_cpus()

    @abc.abstractmethod
    def start_worker(self, start: WorkerStart) -> Worker:
        """Start (or find) one worker and return its handle.

        A backend that can hand ``start.inheritance`` over without serializing
        (fork) sets ``worker.adopted_call`` to its call id; others ignore it
        and the worker gets a Setup.
        """

    def describe(self) -> str | None:
        """Where the work would run, in one line, when that is more than this machine
        (a cluster's address and size), for ``explain`` and ``doctor``; ``None`` otherwise."""
        return None

    def call_ended(self, call_id: int) -> None:
        """The call ``call_id`` on this backend ended (whatever its outcome): undo what starting its workers
        changed in the caller for the duration of the call (process backends: the BLAS pool cap)."""

    def shutdown(self) -> None:
        """Release what the backend itself owns (``pickmap.shutdown()``); workers are the pools' business."""

    def capabilities(self) -> dict[str, bool]:
        """The flags, by name (for ``explain``, ``doctor`` and the docs)."""
        flags = (
            "sticky",
            "processes",
            "start_methods",
            "shares_files",
            "killable",
            "reports_progress",
            "enforces_timeout",
        )
        return {flag: bool(getattr(self, flag)) for flag in flags}

    def __repr__(self) -> str:
        return f"<pickmap backend {self.name!r}>"
