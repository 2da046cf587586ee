"""The dispatch loop: one per call, in the caller's thread, for every backend.

``execute`` yields lists of results, one per chunk, while it

1. pulls a chunk from the :class:`~pickmap.chunking.Chunker` only when a worker
   has room (at most ``max_queued`` chunks per worker — one near the end of a
   known-length input with slow chunks, see ``Chunker.wants_prefetch`` — and
   in streaming mode at most twice that many chunks dispatched but not yet
   consumed), so memory stays bounded whatever the input's length;
2. sends the call's SETUP (the callable, once per worker per call) before a
   worker's first chunk, then the chunk — a worker forked during the call
   inherits the callable instead, and payloads of 1 MiB or more travel once
   through a spill file rather than through every worker's pipe;
3. waits with ``poll(2)`` on every worker's pipe and process sentinel, so a
   reply, a death or a timeout wakes it — never a hang;
4. emits results in input order (buffering out-of-order chunks) or in
   completion order, and turns worker replies into the caller's exceptions.

There is no background thread: Ctrl-C lands here, in ``wait``, and the
``finally`` clause hands the pool to :meth:`WorkerPool.end_call`, which kills
whatever is still running.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import math
import os
import select
import signal
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from ._worker import BYE, CHUNK, ERROR, READY, RESULT, SETUP, SETUP_FAILED, UNSENDABLE, Spill
from .backends.base import Backend
from .chunking import Chunker
from .errors import RemoteTraceback, SerializationError, TaskTimeoutError, WorkerCrashedError, WorkerError
from .pool import Slot, WorkerPool
from .serializers import Serializer, copies_locks, get_serializer

__all__ = ("Call", "execute")

_call_ids = itertools.count(1)
_THREAD_POLL = 1.0  # seconds; threads have no sentinel, so check on them this often


SPILL_BYTES = 1 << 20  # payloads this large go through a file, not every worker's pipe
_SPILL_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
_LIVE_SPILLS: set[str] = set()


def _remove_spills(paths: Iterable[str]) -> None:
    for path in list(paths):
        _LIVE_SPILLS.discard(path)
        try:
            os.unlink(path)
        except OSError:
            pass


atexit.register(lambda: _remove_spills(_LIVE_SPILLS))


class Call:
    """Everything the engine needs to know about one ``pmap``/``imap`` call.

    ``func_parts``/``init_parts`` are what the probe produced: pickle pieces
    (process backends) or the objects themselves (threads, serial). They are
    turned into what travels (:meth:`setup_payloads`) once, on first use.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        backend: Backend,
        func_parts: Any,
        init_parts: Any = None,
        *,
        star: bool = False,
        collect: bool = False,
        timeout: float | None = None,
        forced: bool = False,
    ) -> None:
        self.func = func
        self.forced = forced  # the backend was named by the caller, not chosen by the probe
        self.backend = backend
        self.star = star
        self.collect = collect
        self.timeout = timeout
        self.id = next(_call_ids)
        self.serializer: Serializer = get_serializer(backend.serializer)
        self.timed = timeout is not None and backend.enforces_timeout
        self.label = getattr(func, "__qualname__", None) or type(func).__qualname__
        self._parts = (func_parts,) if init_parts is None else (func_parts, init_parts)
        self.setup: tuple[Any, tuple[Any, ...]] | None = None  # (initializer, initargs) objects
        self._payloads: tuple[Any, ...] | None = None
        self._spills: list[str] = []

    @property
    def has_initializer(self) -> bool:
        return len(self._parts) > 1

    def inheritable(self) -> tuple[Any, ...]:
        """What a worker forked now inherits instead of a SETUP message."""
        return (self.id, self.func, self.setup, self.star, self.collect, self.timed)

    def setup_payloads(self) -> tuple[Any, ...]:
        if self._payloads is None:
            self._payloads = tuple(self._ship(parts) for parts in self._parts)
        return self._payloads

    def _ship(self, pickled: Any) -> Any:
        if not self.serializer.by_value:
            return pickled
        if not pickled.buffers and pickled.nbytes < SPILL_BYTES:
            return pickled.data
        fd, path = tempfile.mkstemp(prefix=f"pickmap-{os.getpid()}-", dir=_SPILL_DIR)
        _LIVE_SPILLS.add(path)
        self._spills.append(path)
        layout = []
        with os.fdopen(fd, "wb") as file:
            for piece in (pickled.data, *pickled.buffers):
                file.write(bytes(-file.tell() % 64))  # 64-byte aligned, so loaded arrays are aligned
                layout.append((file.tell(), memoryview(piece).nbytes))
                file.write(piece)
        return Spill(path, tuple(layout))

    def close(self) -> None:
        """Remove spill files. Every worker that got the SETUP has loaded it by now,
        or was killed for being busy with this call."""
        _remove_spills(self._spills)
        self._spills.clear()


class _Chunk(NamedTuple):
    seq: int
    start: int
    count: int
    payload: Any


def _describe_indices(start: int, count: int) -> str:
    return f"item {start}" if count == 1 else f"items {start}-{start + count - 1} (one chunk)"


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            pass
    return f"exit code {code}"


def _wait_ready(waitables: list[Any], timeout: float | None) -> list[Any]:
    """The waitables (file descriptors or objects with ``fileno()``) that are
    readable or closed, waiting at most ``timeout`` seconds.

    ``multiprocessing.connection.wait`` does the same through a new
    ``selectors`` object each time; with a reply per chunk, that Python-level
    set-up was a third of the caller's work, taken from a busy core.
    """
    poller = select.poll()
    by_fd = {}
    for waitable in waitables:
        fd = waitable if isinstance(waitable, int) else waitable.fileno()
        by_fd[fd] = waitable
        poller.register(fd, select.POLLIN)
    events = poller.poll(None if timeout is None else math.ceil(max(timeout, 0.0) * 1000))
    return [by_fd[fd] for fd, _ in events]


class _Run:
    def __init__(self, pool: WorkerPool, call: Call, chunker: Chunker, *, ordered: bool, eager_errors: bool, bounded: bool) -> None:
        self.pool = pool
        self.call = call
        self.chunker = chunker
        self.ordered = ordered
        self.eager_errors = eager_errors
        self.limit = pool.size * pool.backend.max_queued
        self.cap = 2 * self.limit if bounded else None
        self.inflight: dict[int, _Chunk] = {}
        self.requeued: collections.deque[_Chunk] = collections.deque()
        self.finished: dict[int, tuple[list[Any], BaseException | None]] = {}
        self.seqs = itertools.count()
        self.next_emit = 0
        self.source_done = False
        self.failed_seq: int | None = None  # ordered streaming: first chunk that raised
        self.failure: BaseException | None = None  # to raise once this round's results are out

    # ------------------------------------------------------------------ main loop
    def results(self) -> Iterator[list[Any]]:
        interrupted = False
        try:
            while True:
                self._dispatch()
                if self.ordered and self.next_emit in self.finished:
                    while self.next_emit in self.finished:
                        results, error = self.finished.pop(self.next_emit)
                        self.next_emit += 1
                        if results:
                            yield results
                        if error is not None:
                            raise error
                    continue  # emitting made room under the cap: dispatch before waiting
                if not self.inflight and not self.requeued and not self.finished and (
                    self.source_done or self.failed_seq is not None
                ):
                    return
                for results in self._wait():
                    yield results
                if self.failure is not None:
                    # Raised after the results that arrived with it were handed over.
                    raise self.failure
        except (KeyboardInterrupt, WorkerCrashedError):
            interrupted = True
            raise
        finally:
            self.pool.end_call(interrupted=interrupted)
            self.call.close()

    # ------------------------------------------------------------------ dispatching
    def _dispatch(self) -> None:
        while self.failure is None and len(self.inflight) < self.limit and (
            self.cap is None or len(self.inflight) + len(self.finished) < self.cap
        ):
            # Asked before a new chunk is taken, so it judges that chunk.
            depth = None if self.chunker.wants_prefetch() else 1
            if self.requeued:
                chunk = self.requeued.popleft()
                if self.failed_seq is not None and chunk.seq > self.failed_seq:
                    continue  # never emitted: drop it
            elif self.source_done or self.failed_seq is not None:
                return
            else:
                chunk = self._next_chunk()
                if chunk is None:
                    self.source_done = True
                    return
            slot = self.pool.pick(self.call.inheritable(), depth=depth)
            if slot is None:
                self.requeued.appendleft(chunk)
                return
            self._send(slot, chunk)

    def _next_chunk(self) -> _Chunk | None:
        got = self.chunker.next_chunk()
        if got is None:
            return None
        start, items = got
        try:
            payload = self.call.serializer.dumps(items)
        except Exception:  # noqa: BLE001
            raise self._unsendable_item(start, items) from None
        if self.call.serializer.by_value and copies_locks(payload):
            raise self._unsendable_item(start, items)  # the probe's rule, for every chunk
        return _Chunk(next(self.seqs), start, len(items), payload)

    def _send(self, slot: Slot, chunk: _Chunk) -> None:
        call = self.call
        messages = []
        if slot.call_id != call.id:
            messages.append(((SETUP, call.id, call.star, call.collect, call.timed), call.setup_payloads()))
        messages.append(((CHUNK, call.id, chunk.seq, chunk.start), (chunk.payload,)))
        try:
            slot.worker.send(messages)
            slot.call_id = call.id
            slot.tainted = slot.tainted or call.has_initializer
        except OSError:
            # The worker is gone (idle exit or a crash between calls); its
            # death is handled by _wait. This chunk never reached it.
            slot.eof = True
            self.requeued.appendleft(chunk)
            return
        slot.queued.append(chunk)
        self.inflight[chunk.seq] = chunk

    # ------------------------------------------------------------------ waiting
    def _wait(self) -> list[list[Any]]:
        slots = list(self.pool.slots)
        watched: dict[Any, Slot] = {}
        immediate = False
        for slot in slots:
            worker = slot.worker
            if worker.waitable is None:
                immediate = immediate or bool(slot.queued)
                continue
            if not slot.eof:
                watched[worker.waitable] = slot
            if worker.sentinel is not None:
                watched[worker.sentinel] = slot
        timeout = 0.0 if immediate else self._wait_timeout(slots)
        ready = set(_wait_ready(list(watched), timeout)) if watched else set()
        out: list[list[Any]] = []
        for slot in slots:
            if slot.worker.waitable is None or (slot.worker.waitable in ready and not slot.eof):
                self._drain(slot, out)
        for slot in slots:
            sentinel = slot.worker.sentinel
            # Threads have no sentinel: look at them when the periodic wake-up fires.
            maybe_dead = sentinel in ready if sentinel is not None else (timeout is not None and not ready)
            if maybe_dead and slot in self.pool.slots and slot.worker.exitcode() is not None:
                # Whatever it wrote before dying (results, BYE) is still in the pipe.
                self._drain(slot, out)
                self._on_death(slot)
        self._check_timeouts()
        return out

    def _drain(self, slot: Slot, out: list[list[Any]]) -> None:
        try:
            messages = slot.worker.receive()
        except (EOFError, OSError):
            slot.eof, messages = True, []
        for header, payloads in messages:
            results = self._on_message(slot, header, payloads)
            if results is not None:
                out.append(results)

    def _wait_timeout(self, slots: list[Slot]) -> float | None:
        timeouts = [] if self.inflight else [0.05]  # only dead slots to reap: look again soon
        if any(slot.worker.sentinel is None and slot.queued for slot in slots):
            timeouts.append(_THREAD_POLL)
        if self.call.timed:
            assert self.call.timeout is not None
            now = time.monotonic()
            timeouts.append(self.call.timeout / 4)
            for slot in slots:
                started = slot.worker.progress[1]
                if slot.queued and started > 0:
                    timeouts.append(started + self.call.timeout - now)
        return max(0.001, min(timeouts)) if timeouts else None

    # ------------------------------------------------------------------ replies
    def _fail(self, error: BaseException) -> None:
        """Record the call's first failure; ``results`` raises it after this round's results."""
        if self.failure is None:
            self.failure = error

    def _on_message(self, slot: Slot, header: tuple, payloads: Any) -> list[Any] | None:
        kind = header[0]
        if kind == READY:
            slot.ready = True
            return None
        if kind == BYE:
            slot.said_bye = True
            # It stopped reading before these arrived: none of them ran.
            self.requeued.extendleft(reversed(slot.queued))
            for chunk in slot.queued:
                del self.inflight[chunk.seq]
            slot.queued.clear()
            return None
        if kind == SETUP_FAILED:
            self._fail(self._setup_error(header, payloads))
            return None
        chunk = slot.queued.popleft()
        del self.inflight[chunk.seq]
        serializer = self.call.serializer
        if kind == RESULT:
            try:
                results = serializer.loads(payloads[0])
            except Exception as exc:  # noqa: BLE001 - e.g. a result whose __reduce__ fails on load
                self._fail(self._unloadable_results(chunk, exc))
                return None
            self.chunker.observe(chunk.count, header[2])
            if self.ordered:
                self.finished[chunk.seq] = (results, None)
                return None
            return results
        if kind == ERROR:
            error = self._worker_exception(header, payloads)
            if self.eager_errors:
                self._fail(error)
                return None
            partial = serializer.loads(payloads[1]) if payloads[1] is not None else []
            self.finished[chunk.seq] = (partial, error)
            self.failed_seq = chunk.seq if self.failed_seq is None else min(self.failed_seq, chunk.seq)
            return None
        if kind == UNSENDABLE:
            _, _, index, type_name, reason = header
            self._fail(SerializationError(
                f"the result of item {index} (a {type_name}) cannot be sent back by the "
                f"{self.call.backend.name!r} backend: {reason}. Return a plain value instead, "
                f"or use backend='thread', which keeps results in memory",
                backend=self.call.backend.name,
                what=type_name,
                index=index,
            ))
            return None
        raise RuntimeError(f"pickmap: unexpected reply {kind!r} from a worker")  # pragma: no cover

    def _worker_exception(self, header: tuple, payloads: Any) -> BaseException:
        _, _, index, exc_repr, remote_tb = header
        return self._rebuild(f"item {index}", index, exc_repr, remote_tb, payloads[0])

    def _rebuild(self, where: str, index: int | None, exc_repr: str, remote_tb: str, blob: Any) -> BaseException:
        """The worker's exception as itself, or a WorkerError when it cannot be rebuilt."""
        exc: Any = None
        if blob is not None:
            try:
                exc = self.call.serializer.loads(blob)
            except Exception:  # noqa: BLE001 - e.g. an __init__ that wants other arguments
                exc = None
        if not isinstance(exc, BaseException):
            exc = WorkerError(
                f"{where} raised {exc_repr} in a {self.call.backend.name!r} worker, and that "
                f"exception could not be rebuilt here as itself; the worker's traceback follows",
                exc_repr=exc_repr,
                remote_traceback=remote_tb,
                index=index,
            )
        if self.call.backend.isolated:
            exc.__cause__ = RemoteTraceback(remote_tb)
        exc.add_note(f"pickmap: raised by {self.call.label} on {where} (backend {self.call.backend.name!r})")
        return exc

    def _setup_error(self, header: tuple, payloads: Any) -> BaseException:
        _, _, stage, index, exc_repr, remote_tb = header
        if stage == "initializer":
            return self._rebuild("the initializer", None, exc_repr, remote_tb, payloads[0])
        backend = self.call.backend.name
        what = f"the chunk of items starting at index {index}"
        if stage in ("callable", "initializer-load"):
            what = self.call.label if stage == "callable" else "the initializer"
            advice = "define what it needs at module level of an importable module"
            if self.call.forced:
                advice += ", or let pickmap choose the backend (backend='auto')"
        else:
            advice = "an item's own unpickling (its __reduce__ or __setstate__) raised in the worker"
        error = SerializationError(
            f"a {backend!r} worker could not load {what}: {exc_repr}; {advice}",
            backend=backend,
            what=what,
            index=index,
        )
        error.__cause__ = RemoteTraceback(remote_tb)
        return error

    def _unloadable_results(self, chunk: _Chunk, exc: Exception) -> SerializationError:
        backend = self.call.backend.name
        where = _describe_indices(chunk.start, chunk.count)
        error = SerializationError(
            f"the results of {where} were sent back by the {backend!r} worker but cannot be loaded "
            f"here: {type(exc).__name__}: {exc}. Return plain values, or use backend='thread', "
            f"which keeps results in memory",
            backend=backend,
            index=chunk.start,
        )
        error.__cause__ = exc
        return error

    def _unsendable_item(self, start: int, items: list[Any]) -> SerializationError:
        from .probe import capable_backends

        serializer, backend = self.call.serializer, self.call.backend.name
        for offset, item in enumerate(items):
            try:
                if copies_locks(serializer.dumps(item)):
                    raise TypeError("it holds a threading lock, which must not be copied into a worker process")
            except Exception as exc:  # noqa: BLE001
                capable = [b for b in capable_backends(self.call.func, [item]) if b != backend]
                return SerializationError(
                    f"item {start + offset} (a {type(item).__qualname__}) cannot be serialized by the "
                    f"{backend!r} backend: {exc}. Backends that can carry it: {', '.join(capable) or 'none'}",
                    backend=backend,
                    what=type(item).__qualname__,
                    index=start + offset,
                    capable=capable,
                )
        return SerializationError(f"a chunk starting at item {start} cannot be serialized", backend=backend)

    # ------------------------------------------------------------------ deaths and timeouts
    def _on_death(self, slot: Slot) -> None:
        code = slot.worker.exitcode()
        if slot.said_bye or not slot.queued:
            self.pool.remove(slot, kill=True)
            return
        pid = slot.worker.pid
        progress = slot.worker.progress
        timed = self.call.timed and progress is not None and progress[1] > 0
        if not slot.ready:
            where, indices = "while starting, before it ran anything", []
            advice = (
                "Under spawn/forkserver a worker re-imports your main module: keep the script's entry point "
                "under `if __name__ == \"__main__\":`, and run it from a file (a script read from stdin "
                "cannot be re-imported); the worker's own error is printed above"
            )
        else:
            advice = "the pool was discarded and the next call starts fresh workers"
            if timed and progress[0] < 0:
                where, indices = f"while loading {self.call.label}", []
            elif timed:
                where, indices = f"while running item {int(progress[0])} of {self.call.label}", [int(progress[0])]
            else:
                head = slot.queued[0]
                where = f"while running {_describe_indices(head.start, head.count)} of {self.call.label}"
                indices = list(range(head.start, head.start + head.count))
        self.pool.remove(slot, kill=True)
        self.pool.broken = True
        self._fail(WorkerCrashedError(
            f"a {self.call.backend.name!r} worker (pid {pid}) exited with {_describe_exit(code)} {where}; {advice}",
            exitcode=code,
            indices=indices,
        ))

    def _check_timeouts(self) -> None:
        if not self.call.timed:
            return
        timeout = self.call.timeout
        assert timeout is not None
        now = time.monotonic()
        for slot in list(self.pool.slots):
            started = slot.worker.progress[1]
            if not slot.queued or started <= 0 or now - started <= timeout:
                continue
            index = int(slot.worker.progress[0])
            what = f"item {index}" if index >= 0 else "loading the callable"
            backend = self.call.backend
            if backend.killable:
                action = f"its worker (pid {slot.worker.pid}) was killed and will be replaced"
                self.pool.remove(slot, kill=True)
            else:
                action = "its thread cannot be killed: it was abandoned and the pool retired"
                self.pool.broken = True
            self._fail(TaskTimeoutError(
                f"{what} of {self.call.label} ran longer than timeout={timeout:g}s on the "
                f"{backend.name!r} backend; {action}",
                index=index if index >= 0 else None,
                timeout=timeout,
            ))
            return


def execute(
    pool: WorkerPool, call: Call, chunker: Chunker, *, ordered: bool, eager_errors: bool, bounded: bool
) -> Iterator[list[Any]]:
    """Run ``call`` on ``pool``; yield one list of results per chunk."""
    return _Run(pool, call, chunker, ordered=ordered, eager_errors=eager_errors, bounded=bounded).results()
