"""Decoding replies, and the wording of every error a reply can turn into.

The engine hands each reply record here; what comes back is the chunk's
results or the exception the caller will see. Every message a user reads
about a failing item, callable or result is written in this module.
"""

from __future__ import annotations

from . import _wire, errors
from ._protocol import Lost, Raised, SetupFailed, Unsendable
from .errors import RemoteTraceback, SerializationError, WorkerError
from .serializers import copies_locks

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

    from .engine import Call, Chunk


__all__ = (
    "describe_indices",
    "load",
    "lost_error",
    "raised_error",
    "setup_error",
    "unloadable_results",
    "unsendable_item",
    "unsendable_result",
)


def describe_indices(start: int, count: int) -> str:
    return f"item {start}" if count == 1 else f"items {start}-{start + count - 1} (one chunk)"


def load(call: Call, payload: Any) -> Any:
    """A payload from a worker, as an object (its shared-memory segments mapped and removed)."""
    return call.serializer.load(_wire.resolve(payload))


def _rebuild(
    call: Call, where: str, index: int | None, exc_repr: str, remote_tb: str, payload: Any
) -> BaseException:
    """The worker's exception as itself, or a WorkerError when it cannot be rebuilt."""
    exc: Any = None
    if payload is not None:
        try:
            exc = load(call, payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = WorkerError(
            f"{where} raised {exc_repr} in a {call.backend.name!r} worker, and that "
            f"exception could not be rebuilt here as itself; the worker's traceback follows",
            exc_repr=exc_repr,
            remote_traceback=remote_tb,
            index=index,
        )
    if call.backend.processes:
        exc.__cause__ = RemoteTraceback(remote_tb)
    exc.add_note(f"pickmap: raised by {call.label} on {where} (backend {call.backend.name!r})")
    rebuilt: BaseException = exc
    return rebuilt


def raised_error(call: Call, raised: Raised) -> BaseException:
    return _rebuild(
        call, f"item {raised.item}", raised.item, raised.exc_repr, raised.traceback, raised.exc
    )


def setup_error(call: Call, failed: SetupFailed) -> BaseException:
    if failed.stage == "initializer":
        return _rebuild(
            call, "the initializer", None, failed.exc_repr, failed.traceback, failed.exc
        )
    backend = call.backend.name
    what = f"the chunk of items starting at index {failed.first_item}"
    if failed.stage in ("callable", "initializer-load"):
        what = call.label if failed.stage == "callable" else "the initializer"
        advice = "define what it needs at module level of an importable module"
        if call.forced:
            advice += ", or let pickmap choose the backend (backend='auto')"
    else:
        advice = "an item's own unpickling (its __reduce__ or __setstate__) raised in the worker"
    error = SerializationError(
        f"a {backend!r} worker could not load {what}: {failed.exc_repr}; {advice}",
        backend=backend,
        what=what,
        index=failed.first_item,
    )
    error.__cause__ = RemoteTraceback(failed.traceback)
    return error


def unsendable_result(call: Call, unsendable: Unsendable) -> SerializationError:
    backend = call.backend.name
    return SerializationError(
        f"the result of item {unsendable.item} (a {unsendable.type_name}) cannot be sent back by the "
        f"{backend!r} backend: {unsendable.reason}. Return a plain value instead, "
        f"or use backend='thread', which keeps results in memory",
        backend=backend,
        what=unsendable.type_name,
        index=unsendable.item,
    )


def unloadable_results(call: Call, chunk: Chunk, exc: Exception) -> SerializationError:
    backend = call.backend.name
    error = SerializationError(
        f"the results of {describe_indices(chunk.start, chunk.size)} were sent back by the {backend!r} "
        f"worker but cannot be loaded here: {type(exc).__name__}: {exc}. Return plain values, or use "
        f"backend='thread', which keeps results in memory",
        backend=backend,
        index=chunk.start,
    )
    error.__cause__ = exc
    return error


def unsendable_item(call: Call, start: int, items: list[Any]) -> SerializationError:
    from .probe import capable_backends

    serializer, backend = call.serializer, call.backend.name
    for offset, item in enumerate(items):
        try:
            if copies_locks(serializer.dump(item).data):
                raise TypeError(
                    "it holds a threading lock, which must not be copied into a worker process"
                )
        except Exception as exc:
            capable = [b for b in capable_backends(call.func, [item]) if b != backend]
            return SerializationError(
                f"item {start + offset} (a {type(item).__qualname__}) cannot be serialized by the "
                f"{backend!r} backend: {exc}. Backends that can carry it: {', '.join(capable) or 'none'}",
                backend=backend,
                what=type(item).__qualname__,
                index=start + offset,
                capable=capable,
            )
    return SerializationError(
        f"a chunk starting at item {start} cannot be serialized", backend=backend
    )


def lost_error(
    call: Call, chunk: Chunk, lost: Lost, history: str = ""
) -> errors.WorkerCrashedError:
    where = describe_indices(chunk.start, chunk.size)
    return errors.WorkerCrashedError(
        f"the {call.backend.name!r} backend lost {where} of {call.label}: {lost.reason}{history}. "
        f"The process that ran it died (a crash, a signal, the OOM killer), or its executor or "
        f"cluster was shut down or gave up on it; an executor you passed in is yours to replace",
        exitcode=lost.exitcode,
        indices=list(range(chunk.start, chunk.start + chunk.size)),
    )
