"""Every exception pickmap raises, in one place.

Each pickmap error also subclasses the builtin exception a caller would
naturally catch, so ``except ValueError`` keeps working around ``pmap``::

    PickmapError (Exception)
    ├── UnknownBackendError       (+ ValueError)       bad backend name
    ├── BackendUnavailableError   (+ ImportError)      backend's package missing
    ├── SerializationError        (+ pickle.PicklingError)
    │                                                   callable/item/result
    │                                                   cannot travel
    ├── WorkerCrashedError        (+ concurrent.futures.BrokenExecutor)
    │                                                   a worker died mid-task
    ├── TaskTimeoutError          (+ TimeoutError)     one item ran too long
    └── WorkerError               (+ RuntimeError)     a worker exception that
                                                        could not be rebuilt in
                                                        the caller as itself

Exceptions raised by *your* function are not wrapped: they come back as their
original type, with the worker's traceback attached as ``__cause__`` (a
:class:`RemoteTraceback`) and a note naming the failing item's index.
"""

from __future__ import annotations

import _pickle as pickle  # pickle.py's C half: a worker starts without pickle.py (re, enum)
from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = (
    "BackendUnavailableError",
    "PickmapError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "UnknownBackendError",
    "WorkerCrashedError",
    "WorkerError",
)


class PickmapError(Exception):
    """Base class of every error pickmap itself raises."""

    def __reduce__(self) -> tuple[object, ...]:
        # The subclasses take keyword arguments, which default exception
        # pickling drops; rebuild from the message and restore the attributes
        # (and notes), so these errors travel between processes intact.
        return _rebuild, (type(self), str(self)), self.__dict__


def _rebuild(cls: type[PickmapError], message: str) -> PickmapError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


class UnknownBackendError(PickmapError, ValueError):
    """A backend name that is not registered (from an argument or the environment)."""

    def __init__(self, name: str, valid: Sequence[str], *, variable: str | None = None) -> None:
        self.name = name
        self.valid = tuple(valid)
        self.variable = variable
        where = f" (from the environment variable {variable})" if variable else ""
        super().__init__(
            f"unknown pickmap backend {name!r}{where}; valid names are: "
            f"{', '.join(self.valid)}, or 'auto' to let pickmap choose"
        )


class BackendUnavailableError(PickmapError, ImportError):
    """A registered backend whose third-party package is not installed."""

    def __init__(self, name: str, missing: str, hint: str) -> None:
        self.backend = name
        self.hint = hint
        super().__init__(
            f"pickmap backend {name!r} needs the package {missing!r}, which is not "
            f"installed; install it with: {hint}"
        )


class SerializationError(PickmapError, pickle.PicklingError):
    """The callable, an item or a result cannot travel with the chosen backend.

    ``backend`` names the backend that failed, ``what`` describes the object,
    ``index`` is the item's position in the input (``None`` for the callable;
    for a failure that concerns a whole chunk — items that cannot be loaded in
    the worker, results that cannot be loaded here — the chunk's first
    position, with the range in the message) and ``capable`` lists the
    backends that could carry it, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        what: str | None = None,
        index: int | None = None,
        capable: Sequence[str] = (),
    ) -> None:
        self.backend = backend
        self.what = what
        self.index = index
        self.capable = tuple(capable)
        super().__init__(message)


def _crash_error_init(
    self: Any, message: str, *, exitcode: int | None, indices: Sequence[int]
) -> None:
    self.exitcode = exitcode
    self.indices = tuple(indices)
    PickmapError.__init__(self, message)


_CRASH_DOC = """A worker process died while it held work (signal, ``os._exit``, segfault).

    ``exitcode`` is the process's exit code (negative: killed by that signal),
    ``indices`` the input positions that were in flight on it.
    """

if TYPE_CHECKING:
    from concurrent.futures import BrokenExecutor

    class WorkerCrashedError(PickmapError, BrokenExecutor):
        def __init__(
            self, message: str, *, exitcode: int | None, indices: Sequence[int]
        ) -> None: ...

else:

    def __getattr__(name: str) -> Any:
        # Made on first use: its base, BrokenExecutor, comes with concurrent.futures,
        # which imports logging (17 ms here) that a plain pmap never needs.
        if name != "WorkerCrashedError":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from concurrent.futures import BrokenExecutor

        made = type(
            "WorkerCrashedError",
            (PickmapError, BrokenExecutor),
            {"__init__": _crash_error_init, "__doc__": _CRASH_DOC, "__module__": __name__},
        )
        # Two threads may get here at once (the import lets the GIL go): the first class
        # stored wins, so every error, except clause and pickle sees one class.
        made = globals().setdefault("WorkerCrashedError", made)
        return made


class TaskTimeoutError(PickmapError, TimeoutError):
    """One item ran longer than ``timeout=`` seconds; its worker was killed.

    ``index`` is the item's position, or ``None`` when the time ran out while
    the worker was loading the callable.
    """

    def __init__(self, message: str, *, index: int | None, timeout: float) -> None:
        self.index = index
        self.timeout = timeout
        super().__init__(message)


class WorkerError(PickmapError, RuntimeError):
    """An exception raised in a worker that could not be sent back as itself.

    Happens when the exception object cannot be pickled in the worker or
    rebuilt in the caller (for example an ``__init__`` with extra required
    arguments). ``exc_repr`` and ``remote_traceback`` keep what is known.
    """

    def __init__(
        self, message: str, *, exc_repr: str, remote_traceback: str, index: int | None
    ) -> None:
        self.exc_repr = exc_repr
        self.remote_traceback = remote_traceback
        self.index = index
        super().__init__(message)


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
