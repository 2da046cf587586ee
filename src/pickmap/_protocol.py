"""The messages between the engine and a worker: named records, nothing positional.

One protocol serves every kind of worker (see the diagram in ``_worker.py``):

- a *sticky* worker (pickmap's own processes and threads) keeps state between
  messages, so it gets one :class:`Setup` per call and then :class:`Task`
  after :class:`Task`;
- a *self-contained* task (any ``concurrent.futures.Executor``, a cluster) is
  a :class:`Job`: the setup travels with every task, and the process that
  runs it caches the loaded callable by ``(caller token, call id)``, so a
  call's hundred chunks on one executor process load it once.

A ``payload`` field holds the serialized object (``serializers.Pickled``:
pickle bytes plus out-of-band buffers) on process backends, or the object
itself on thread and serial backends. How payloads cross (a pipe, shared
memory, an executor's own pickling) is the transport's business
(``_wire.py``), never the records'.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = (
    "CALLER_TOKEN",
    "Bye",
    "CallSpec",
    "Job",
    "Logged",
    "Lost",
    "Message",
    "Raised",
    "Ready",
    "Result",
    "Setup",
    "SetupFailed",
    "Stop",
    "Task",
    "Unsendable",
)

#: Tells this caller process apart from others that share an executor process
#: (call ids are only unique per caller). Regenerated in a forked child.
# os.urandom: the secrets module costs 7 ms to import
CALLER_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"


def _new_token() -> None:
    global CALLER_TOKEN
    CALLER_TOKEN = f"{os.getpid()}-{os.urandom(4).hex()}"


os.register_at_fork(after_in_child=_new_token)


class CallSpec(NamedTuple):
    """What a worker must know about a call besides its callable."""

    id: int
    token: str  # CALLER_TOKEN of the process that made the call
    serializer: str  # name in serializers.py; workers look it up
    star: bool  # items are argument tuples (several iterables)
    collect: bool  # return_exceptions=True: exceptions are results
    timed: bool  # timeout= is set: report each item's start in the progress slot
    share: bool  # workers share the caller's files: large results may go through shared memory
    inner_threads: int = 0  # BLAS/OpenMP threads per worker process (0: leave the pools alone)
    # the caller's logger levels ("": the root's) when it has configured logging
    log_levels: tuple[tuple[str, int], ...] | None = None

    @property
    def caller_pid(self) -> int:
        return int(self.token.partition("-")[0])


# --------------------------------------------------------------------------- caller -> worker
class Setup(NamedTuple):
    """The call's callable (and initializer), sent before a worker's first task."""

    call: CallSpec
    func: Any  # payload
    init: Any = None  # payload of (initializer, initargs), or None


class Task(NamedTuple):
    """One chunk of items; ``start`` is the first item's index in the input."""

    call_id: int
    seq: int
    start: int
    items: Any  # payload of a list of items


class Stop(NamedTuple):
    """Finish what is queued, then exit."""


class Job(NamedTuple):
    """A self-contained task for a worker that keeps no state between tasks."""

    setup: Setup
    task: Task


# --------------------------------------------------------------------------- worker -> caller
class Ready(NamedTuple):
    """Sent once when a process worker has started, so a death before it is told apart."""

    pid: int


class Result(NamedTuple):
    seq: int
    seconds: float  # time spent running the chunk's items (the chunker learns from it)
    results: Any  # payload of a list of results


class Raised(NamedTuple):
    """The function raised on item ``item``; ``partial`` holds the chunk's results before it."""

    seq: int
    item: int
    exc_repr: str
    traceback: str
    exc: Any  # payload of the exception, or None when it cannot be serialized
    partial: Any  # payload of the results before it, or None


class Unsendable(NamedTuple):
    """A result that cannot be serialized back."""

    seq: int
    item: int
    type_name: str
    reason: str


class SetupFailed(NamedTuple):
    """The callable, the initializer or a chunk's items could not be loaded (or the initializer raised).

    ``stage`` is ``"callable"``, ``"initializer-load"``, ``"initializer"`` or
    ``"items"``; ``first_item`` the chunk's first item for ``"items"``.
    """

    call_id: int
    stage: str
    first_item: int | None
    exc_repr: str
    traceback: str
    exc: Any  # payload of the exception, or None


class Bye(NamedTuple):
    """Idle too long: the worker exits without reading anything more."""


class Logged(NamedTuple):
    """Log records a task emitted, as plain fields, sent before the chunk's reply."""

    records: list[dict[str, Any]]


class Lost(NamedTuple):
    """A self-contained task that never came back (its executor process died, or the
    future was cancelled): made by the caller's futures adapter, not by a worker."""

    seq: int
    reason: str
    exitcode: int | None = None


Message = (
    Setup
    | Task
    | Stop
    | Job
    | Ready
    | Result
    | Raised
    | Unsendable
    | SetupFailed
    | Bye
    | Logged
    | Lost
)
