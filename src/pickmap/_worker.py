"""The worker side of pickmap, and the messages that cross to it.

Every backend runs this same code; only the channel differs (a pipe to a
process, a queue to a thread, a direct call for ``serial``). Data flow for
one ``pmap`` call on a process backend::

    caller thread (engine.py)                            worker process (this module)
    ─────────────────────────                            ─────────────────────────────
    probe: serialize func once ──┐
                                 │  SETUP(call, flags) + func bytes [+ initializer]
    first chunk for this worker ─┤  (>= 1 MiB: bytes written once to a spill file
                                 │   on tmpfs; SETUP names the file)
                                 └───────────────────────────────▶ loads func, run
                                                                   initializer, keep
                                                                   both for this call
    chunker: next items ─▶ dumps ─  CHUNK(call, seq, start) + items bytes
                                  ───────────────────────────────▶ loads items,
                                                                   results = map(func)
                                    RESULT(seq, seconds) + results bytes
    ordered/unordered emit ◀───────────────────────────────────── dumps results
                                    ERROR(seq, index, repr, traceback) + exception
                                                                   (+ results before it)
                                    UNSENDABLE(seq, index, type, reason)
                                                                   a result that cannot
                                                                   be serialized
                                    SETUP_FAILED(call, stage, index, repr, traceback) + exception
                                                                   callable, initializer or
                                                                   items could not load/run
                                    BYE                            idle too long: exits
                                                                   without reading more
                                    READY                          sent once at start-up, so
                                                                   a death before it is told
                                                                   apart from a crash
    engine also waits on the process sentinel (death), and reads the shared
    progress slot [item index, start time] to enforce ``timeout=`` per item.

A worker holds one call's callable at a time: a SETUP for a new call replaces
the previous callable, so nothing leaks from one call into the next. At most
two chunks are queued per worker (see engine.py), so a pipe never holds more
than a bounded amount of work.

Messages are ``(header, payloads)``: ``header`` is a small tuple whose first
field is the kind; ``payloads`` holds serialized blobs (bytes for processes,
objects for threads). Each write carries a batch of messages (SETUP and the
first CHUNK go together, so a warm worker wakes once). On a pipe a small batch
is one frame; payloads over 1 MiB follow as raw frames, never copied into a
second pickle.
"""

from __future__ import annotations

import itertools
import mmap
import pickle
import queue
import signal
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple, Sequence

from .serializers import Pickled, Serializer, get_serializer

# Message kinds, caller -> worker.
SETUP, CHUNK, STOP = 1, 2, 3
# Message kinds, worker -> caller.
RESULT, ERROR, UNSENDABLE, SETUP_FAILED, BYE, READY = 11, 12, 13, 14, 15, 16

Header = tuple
Message = tuple[Header, Sequence[Any]]



class Spill(NamedTuple):
    """A large payload (a 50 MB ``self``), or one with out-of-band buffers, parked
    once in a file, on tmpfs where there is one, instead of being pushed through
    every worker's pipe. ``layout``: (offset, size) of the pickle stream, then of
    each out-of-band buffer."""

    path: str
    layout: tuple[tuple[int, int], ...]


def load_payload(serializer: Serializer, payload: Any) -> Any:
    if isinstance(payload, Spill):
        with open(payload.path, "rb") as file:
            # Copy-on-write: out-of-band buffers (arrays) stay views of the file,
            # writable, copied page by page only where a task writes.
            view = memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY))
        pieces = [view[offset : offset + size] for offset, size in payload.layout]
        return serializer.load(Pickled(pieces[0], tuple(pieces[1:])))
    return serializer.loads(payload)


# Set in every pickmap worker (process or thread); nested pmap calls read it.
_IN_WORKER = False
_INLINE_FRAME_LIMIT = 1 << 20


def in_worker() -> bool:
    """True inside a pickmap worker process or worker thread."""
    return _IN_WORKER or getattr(threading.current_thread(), "_pickmap_worker", False)


# --------------------------------------------------------------------------- pipe framing
def send_messages(conn: Any, messages: Sequence[Message]) -> None:
    """Write messages on a multiprocessing Connection: one frame when small.

    A SETUP and the first CHUNK go together, so a warm worker is woken once
    per call. Large payloads follow the control frame as raw frames, so a
    50 MB callable is never copied into a second pickle.
    """
    if sum(len(p) for _, payloads in messages for p in payloads if isinstance(p, bytes)) <= _INLINE_FRAME_LIMIT:
        conn.send_bytes(pickle.dumps(tuple(messages), pickle.HIGHEST_PROTOCOL))
        return
    # Split: bytes payloads become the marker 0 here and follow as raw frames.
    control = tuple(
        (header, tuple(0 if isinstance(p, bytes) else p for p in payloads)) for header, payloads in messages
    )
    conn.send_bytes(pickle.dumps(control, pickle.HIGHEST_PROTOCOL))
    for _, payloads in messages:
        for payload in payloads:
            if isinstance(payload, bytes):
                conn.send_bytes(payload)


def recv_messages(conn: Any) -> list[Message]:
    messages = []
    for header, payloads in pickle.loads(conn.recv_bytes()):
        payloads = tuple(conn.recv_bytes() if isinstance(p, int) else p for p in payloads)
        messages.append((header, payloads))
    return messages


# --------------------------------------------------------------------------- running items
def run_items(
    func: Callable[..., Any],
    items: Sequence[Any],
    start: int,
    *,
    star: bool,
    collect: bool,
    progress: Any = None,
) -> tuple[list[Any], int | None, BaseException | None]:
    """Apply ``func`` to ``items``; return ``(results, failed_index, exception)``.

    The fast path is ``list.extend(map(...))``, which keeps the results made
    before an exception, so the failing index is ``start + len(results)``.
    With ``progress`` (a shared ``[index, start_time]`` slot, used when a
    timeout is set) or ``collect`` (exceptions become results), items run one
    by one so the caller can see which item is running.
    """
    results: list[Any] = []
    if progress is None and not collect:
        try:
            results.extend(itertools.starmap(func, items) if star else map(func, items))
        except BaseException as exc:  # noqa: BLE001 - everything is reported back
            return results, start + len(results), exc
        return results, None, None
    for offset, item in enumerate(items):
        if progress is not None:
            progress[1] = time.monotonic()
            progress[0] = start + offset
        try:
            results.append(func(*item) if star else func(item))
        except BaseException as exc:  # noqa: BLE001
            if not collect or isinstance(exc, KeyboardInterrupt):
                # Ctrl-C (serial backend, in the caller's thread) is never a result.
                return results, start + offset, exc
            exc.add_note(f"pickmap: raised on item {start + offset}")
            results.append(exc)
    if progress is not None:
        progress[1] = 0.0
    return results, None, None


def _safe_text(render: Callable[[], str], exc: BaseException) -> str:
    try:
        return render()
    except BaseException as failure:  # noqa: BLE001 - a broken __repr__ must not kill the worker
        return f"<{type(exc).__qualname__}: rendering it raised {type(failure).__name__}>"


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """``(repr, formatted traceback)`` — what survives even if the exception cannot."""
    return (
        _safe_text(lambda: repr(exc), exc),
        _safe_text(lambda: "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), exc),
    )


class WorkerState:
    """One worker's memory between messages: the current call's callable and flags."""

    def __init__(self, serializer: Serializer, progress: Any = None) -> None:
        self.serializer = serializer
        self.progress = progress
        self.call_id: int | None = None
        self.func: Callable[..., Any] | None = None
        self.star = self.collect = self.timed = False

    def handle(self, header: Header, payloads: Sequence[Any]) -> list[Message]:
        kind = header[0]
        if kind == SETUP:
            return self._setup(header, payloads)
        if kind == CHUNK:
            return self._chunk(header, payloads)
        raise ValueError(f"unknown message kind {kind!r}")

    def adopt(self, inherited: tuple[Any, ...]) -> list[Message]:
        """Take a call handed over by fork: the callable is already in memory."""
        self.call_id, func, setup, self.star, self.collect, self.timed = inherited
        if setup is not None:
            initializer, initargs = setup
            try:
                initializer(*initargs)
            except BaseException as exc:  # noqa: BLE001
                return [self._failure("initializer", None, exc)]
        self.func = func
        return []

    def _clock(self, index: float) -> None:
        """With ``timeout=``: the task at ``index`` starts now (-1: loading the callable; -2: idle).

        Loading items and dumping results count as part of their task, so a
        slow ``__reduce__`` is caught by the timeout too.
        """
        if self.timed and self.progress is not None:
            self.progress[1] = 0.0 if index == -2 else time.monotonic()
            self.progress[0] = index

    def _setup(self, header: Header, payloads: Sequence[Any]) -> list[Message]:
        _, self.call_id, self.star, self.collect, self.timed = header
        self.func = None  # drop the previous call's callable before anything else
        stage = "callable"
        self._clock(-1)
        try:
            func = load_payload(self.serializer, payloads[0])
            if len(payloads) > 1:
                stage = "initializer-load"
                initializer, initargs = load_payload(self.serializer, payloads[1])
                stage = "initializer"
                initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001
            return [self._failure(stage, None, exc)]
        finally:
            self._clock(-2)
        self.func = func
        return []

    def _failure(self, stage: str, index: int | None, exc: BaseException) -> Message:
        header = (SETUP_FAILED, self.call_id, stage, index, *describe_exception(exc))
        return header, (self._dump_or_none(exc),)

    def _chunk(self, header: Header, payloads: Sequence[Any]) -> list[Message]:
        _, call_id, seq, start = header
        if call_id != self.call_id or self.func is None:
            return []  # setup failed and was reported; the caller is already raising
        try:
            self._clock(start)
            try:
                items = self.serializer.loads(payloads[0])
            except BaseException as exc:  # noqa: BLE001
                return [self._failure("items", start, exc)]
            began = time.perf_counter()
            progress = self.progress if self.timed else None
            results, failed_at, exc = run_items(
                self.func, items, start, star=self.star, collect=self.collect, progress=progress
            )
            elapsed = time.perf_counter() - began
            if exc is not None:
                header = (ERROR, seq, failed_at, *describe_exception(exc))
                return [(header, (self._dump_or_none(exc), self._dump_or_none(results)))]
            if self.collect:
                results = [self._sendable_exception(r) if isinstance(r, BaseException) else r for r in results]
            self._clock(start + max(len(results) - 1, 0))
            try:
                blob = self.serializer.dumps(results)
            except BaseException as exc:  # noqa: BLE001
                index, bad = self._first_unsendable(results, start)
                reason = f"{type(exc).__name__}: {_safe_text(lambda: str(exc), exc)}"
                return [((UNSENDABLE, seq, index, type(bad).__qualname__, reason), ())]
            return [((RESULT, seq, elapsed), (blob,))]
        finally:
            self._clock(-2)

    def _dump_or_none(self, obj: Any) -> Any:
        try:
            return self.serializer.dumps(obj)
        except BaseException:  # noqa: BLE001 - the repr/traceback still travel
            return None

    def _sendable_exception(self, exc: BaseException) -> BaseException:
        """A collected exception, or a WorkerError standing in for one that cannot travel."""
        if not self.serializer.by_value:
            return exc
        try:
            self.serializer.loads(self.serializer.dumps(exc))
            return exc
        except BaseException:  # noqa: BLE001
            from .errors import WorkerError

            exc_repr, remote_tb = describe_exception(exc)
            notes = getattr(exc, "__notes__", [""])
            return WorkerError(
                f"{exc_repr} could not be sent back as itself ({notes[-1]})",
                exc_repr=exc_repr,
                remote_traceback=remote_tb,
                index=None,
            )

    def _first_unsendable(self, results: list[Any], start: int) -> tuple[int, Any]:
        for offset, result in enumerate(results):
            if self._dump_or_none(result) is None:
                return start + offset, result
        return start, results  # the list as a whole failed (should not happen)


def serve(
    recv: Callable[[], Sequence[Message]], send: Callable[[list[Message]], None], state: WorkerState
) -> None:
    """The worker loop shared by process and thread workers."""
    while True:
        replies: list[Message] = []
        for header, payloads in recv():
            if header[0] == STOP:
                return
            replies.extend(state.handle(header, payloads))
        if replies:
            send(replies)


# --------------------------------------------------------------------------- process entry point
def _close_inherited(fds: Sequence[Any]) -> None:
    # A forked child inherits the caller's ends of its siblings' pipes; holding
    # them would keep those pipes open after the caller dies, so close them.
    for conn in fds:
        try:
            conn.close()
        except OSError:
            pass


def process_main(
    conn: Any,
    serializer_name: str,
    progress: Any,
    idle_timeout: float,
    inherited: Sequence[Any],
    call: tuple[Any, ...] | None = None,
) -> None:
    """Entry point of a worker process (the ``target`` of ``Process``).

    ``call`` is set only for a worker forked during a call: that call's
    callable and initializer, inherited with the process's memory, so they are
    never serialized for this worker.
    """
    global _IN_WORKER
    _IN_WORKER = True
    # Ctrl-C goes to the whole process group; the caller decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _close_inherited(inherited)
    view = progress.create_memoryview().cast("d") if progress is not None else None
    state = WorkerState(get_serializer(serializer_name), view)

    # A reader thread drains the pipe into a queue, so the caller's writes
    # always complete while this worker lives. Without it, a caller writing a
    # large chunk and a worker writing a large result to each other would
    # both block forever.
    inbox: queue.SimpleQueue[list[Message] | None] = queue.SimpleQueue()

    def read_forever() -> None:
        try:
            while True:
                inbox.put(recv_messages(conn))
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read_forever, name="pickmap-reader", daemon=True).start()

    def recv() -> list[Message]:
        try:
            batch = inbox.get(timeout=idle_timeout)
        except queue.Empty:
            # Idle too long: say so and leave. The caller re-queues anything it
            # sent after our last reply: we never run it.
            send_messages(conn, [((BYE,), ())])
            raise SystemExit(0) from None
        if batch is None:
            raise EOFError
        return batch

    try:
        send_messages(conn, [((READY,), ()), *(state.adopt(call) if call is not None else [])])
        serve(recv, lambda replies: send_messages(conn, replies), state)
    except (EOFError, OSError, SystemExit):
        pass  # the caller went away or we said BYE; Process._bootstrap flushes and exits
