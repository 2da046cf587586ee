"""The dispatch loop: one per call, in the caller's thread, for every backend.

``execute`` yields lists of results, one per chunk, while it

1. pulls a chunk from the :class:`~pickmap.chunking.Chunker` only when a worker
   has room (at most ``max_queued`` chunks per worker — one near the end of a
   known-length input with slow chunks, see ``Chunker.wants_prefetch`` — and
   in streaming mode at most twice that many chunks dispatched but not yet
   consumed), so memory stays bounded whatever the input's length;
2. sends the call's Setup before a sticky worker's first chunk, or a
   self-contained Job per chunk to an executor-like backend; a worker forked
   during the call inherits the callable instead, and large buffers travel
   through shared memory (``_wire``, ``_shipping``), never blocking the loop;
3. waits (``_waiting``) on every worker's replies, deaths and unwritten
   output, so a reply, a death or a deadline wakes it — never a hang;
4. emits results in input order (buffering out-of-order chunks) or in
   completion order; replies become results or the caller's exceptions in
   ``_replies``, deaths and timeouts in ``_deaths``.

There is no background thread: Ctrl-C lands here, in the wait, and the
``finally`` clause hands the pool to :meth:`WorkerPool.end_call`, which kills
whatever is still running.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator

from . import _deaths, _logs, _replies, _shipping, _shm, _waiting, _wire, errors
from ._protocol import (
    CALLER_TOKEN,
    Bye,
    CallSpec,
    Job,
    Logged,
    Lost,
    Message,
    Raised,
    Ready,
    Result,
    Setup,
    SetupFailed,
    Task,
    Unsendable,
)
from .backends.base import Backend, Inheritance
from .chunking import Chunker
from .pool import Slot, WorkerPool
from .serializers import Serializer, copies_locks, get_serializer

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = ("Call", "Chunk", "execute")

_call_ids = itertools.count(1)


class Call:
    """Everything the engine needs to know about one ``pmap``/``imap`` call.

    ``func_payload``/``init_payload`` are what the probe produced: a
    ``Pickled`` (process backends) or the objects themselves (threads,
    serial). Large buffers are moved to shared memory once, on first use.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        backend: Backend,
        func_payload: Any,
        init_payload: Any = None,
        *,
        star: bool = False,
        collect: bool = False,
        timeout: float | None = None,
        forced: bool = False,
        setup_objects: Any = None,
        inner_threads: int = 0,
        max_tasks: int | None = None,
        retries: int = 0,
        progress: Any = None,
    ) -> None:
        self.func = func
        self.forced = forced  # the backend was named by the caller, not chosen by the probe
        self.backend = backend
        self.timeout = timeout
        self.max_tasks = max_tasks  # items a worker runs before it is replaced
        self.retries = retries  # times a chunk whose worker died is run again
        self.progress = progress  # _progress.Progress, advanced per finished chunk
        self.setup_objects = setup_objects  # (initializer, initargs), for fork inheritance
        self.serializer: Serializer = get_serializer(backend.serializer)
        self.timed = timeout is not None and backend.enforces_timeout
        self.label = getattr(func, "__qualname__", None) or type(func).__qualname__
        self.uses_shared_memory = self.serializer.by_value and backend.shares_files
        self.spec = CallSpec(
            next(_call_ids),
            CALLER_TOKEN,
            backend.serializer,
            star,
            collect,
            self.timed,
            self.uses_shared_memory,
            inner_threads if backend.processes else 0,
            # not to a cluster: its workers log through dask
            _logs.caller_levels() if backend.processes and backend.shares_files else None,
        )
        self._func_payload = func_payload
        self._init_payload = init_payload
        self._setup: Setup | None = None
        self._segments: list[str] = []  # removed when the call ends
        self.item_segments: dict[
            int, list[str]
        ] = {}  # chunk seq -> segments its reader has not removed yet

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def has_initializer(self) -> bool:
        return self._init_payload is not None

    def inheritance(self) -> Inheritance:
        """What a worker forked now inherits instead of a Setup."""
        return Inheritance(self.spec, self.func, self.setup_objects)

    def setup(self) -> Setup:
        if self._setup is None:
            func, init = self._func_payload, self._init_payload
            if self.uses_shared_memory:
                func, paths = _shipping.ship(self.func, func)
                self._segments.extend(paths)
                if init is not None:
                    init = _wire.share(init, transient=False, writer="c")
                    self._segments.extend(_wire.segment_paths(init))
            self._setup = Setup(self.spec, func, init)
        return self._setup

    def items_payload(self, seq: int, items: list[Any]) -> Any:
        payload = self.serializer.dump(items)
        if self.serializer.by_value and copies_locks(payload.data):
            raise TypeError("an item holds a threading lock")  # the probe's rule, for every chunk
        if self.uses_shared_memory and not self.retries:
            # (with retries= a chunk may be sent twice: its reader would have removed the segment)
            payload = _wire.share(payload, transient=True, writer="c")
            paths = _wire.segment_paths(payload)
            if paths:
                self.item_segments[seq] = paths
        return payload

    def close(self) -> None:
        """Remove this call's shared memory: every worker that got it has mapped it by now,
        or was killed for being busy with this call (a task still queued in an executor
        that cannot be cancelled fails to load its items, and its result is never read)."""
        _shm.unlink(self._segments)
        _shm.unlink(path for paths in self.item_segments.values() for path in paths)
        self._segments.clear()
        self.item_segments.clear()


class Chunk(NamedTuple):
    seq: int
    start: int
    size: int
    payload: Any


class _Run:
    """One call's state: what is in flight, what is finished, what to emit next."""

    def __init__(
        self,
        pool: WorkerPool,
        call: Call,
        chunker: Chunker,
        *,
        ordered: bool,
        eager_errors: bool,
        bounded: bool,
    ) -> None:
        self.pool = pool
        self.call = call
        self.chunker = chunker
        self.ordered = ordered
        self.eager_errors = eager_errors
        self.limit = pool.size * pool.backend.max_queued
        self.cap = 2 * self.limit if bounded else None
        self.inflight: dict[int, Chunk] = {}
        self.requeued: collections.deque[Chunk] = collections.deque()
        self.finished: dict[int, tuple[list[Any], BaseException | None]] = {}
        self.seqs = itertools.count()
        self.next_emit = 0
        self.source_done = False
        self.failed_seq: int | None = None  # ordered streaming: first chunk that raised
        self.failure: BaseException | None = None  # to raise once this round's results are out
        self.attempts = _deaths.Attempts(call.retries)

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
                            self._pause()  # the consumer may hold us at the yield
                            yield results
                            self._resume()
                        if error is not None:
                            raise error
                    continue  # emitting made room under the cap: dispatch before waiting
                if (
                    not self.inflight
                    and not self.requeued
                    and not self.finished
                    and (self.source_done or self.failed_seq is not None)
                ):
                    if self.chunker.input_error is not None and self.failed_seq is None:
                        # The input raised: now that every result before it is out, as map() would.
                        raise self.chunker.input_error
                    return
                ready = self._wait()
                if ready:
                    self._pause()
                    yield from ready
                    self._resume()
                if self.failure is not None:
                    # Raised after the results that arrived with it were handed over.
                    raise self.failure
        except (KeyboardInterrupt, errors.PickmapError) as stopped:
            # WorkerCrashedError is made on first use (errors.py): looked up only when something failed.
            if not isinstance(stopped, (KeyboardInterrupt, errors.WorkerCrashedError)):
                raise
            interrupted = True
            self.pool.broken = True  # the next call starts on fresh workers
            raise
        finally:
            try:
                self.pool.end_call(self.call.id, interrupted=interrupted)
            finally:
                self.call.close()

    def _pause(self) -> None:
        # Only imap (bounded) hands its generator to a consumer who may pause it;
        # pmap consumes it at once, and pausing would let others go past the size.
        if self.cap is not None:
            self.pool.pause(self.call.id)

    def _resume(self) -> None:
        if self.cap is not None:
            self.pool.resume(self.call.id)

    def _fail(self, error: BaseException | None) -> None:
        """Record the call's first failure; ``results`` raises it after this round's results."""
        if error is not None and self.failure is None:
            self.failure = error

    # ------------------------------------------------------------------ scheduling
    def _dispatch(self) -> None:
        while (
            self.failure is None
            and len(self.inflight) < self.limit
            and (self.cap is None or len(self.inflight) + len(self.finished) < self.cap)
        ):
            # Asked before a new chunk is taken, so it judges that chunk.
            depth = None if self.chunker.wants_prefetch() and self.call.max_tasks is None else 1
            chunk: Chunk | None
            finishing = False
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
                finishing = not self.requeued and self.chunker.took_short_last(chunk.size)
            slot = self._pick(chunk, depth, finishing=finishing)
            if slot is None:
                self.requeued.appendleft(chunk)
                return
            self._send(slot, chunk)

    def _pick(self, chunk: Chunk, depth: int | None, *, finishing: bool = False) -> Slot | None:
        """A worker for ``chunk``; with ``max_tasks_per_worker``, one with that many items of life left."""
        while True:
            slot = self.pool.pick(
                self.call.id, self.call.inheritance(), depth=depth, finishing=finishing
            )
            limit = self.call.max_tasks
            if slot is None or limit is None:
                return slot
            if slot.items_run + sum(c.size for c in slot.queued) + chunk.size <= limit:
                return slot
            slot.retiring = True  # too little life left for this chunk: replaced by a fresh worker
            self.pool.hand_back(slot)

    def _next_chunk(self) -> Chunk | None:
        got = self.chunker.next_chunk(alone=self.pool.others_wait(self.call.id))
        if got is None:
            return None
        start, items = got
        seq = next(self.seqs)
        try:
            payload = self.call.items_payload(seq, items)
        except Exception:
            raise _replies.unsendable_item(self.call, start, items) from None
        return Chunk(seq, start, len(items), payload)

    def _messages_for(self, slot: Slot, chunk: Chunk) -> list[Message]:
        call = self.call
        task = Task(call.id, chunk.seq, chunk.start, chunk.payload)
        if not self.pool.backend.sticky:
            return [Job(call.setup(), task)]
        if slot.call_id != call.id:
            return [call.setup(), task]
        return [task]

    def _send(self, slot: Slot, chunk: Chunk) -> None:
        try:
            slot.worker.send(self._messages_for(slot, chunk))
        except OSError:
            # The worker is gone (idle exit or a crash between calls); its
            # death is handled while waiting. This chunk never reached it.
            slot.eof = True
            self.requeued.appendleft(chunk)
            return
        slot.call_id = self.call.id
        slot.tainted = slot.tainted or self.call.has_initializer
        if not slot.queued:
            slot.handed_at = time.monotonic()
        slot.queued.append(chunk)
        self.inflight[chunk.seq] = chunk

    # ------------------------------------------------------------------ waiting
    def _wait(self) -> list[list[Any]]:
        slots = self.pool.held_by(self.call.id)
        timeout = _waiting.next_deadline(
            slots,
            timeout=self.call.timeout if self.call.timed else None,
            busy=bool(self.inflight),
            started=lambda slot: _deaths.item_started(slot)[1],
        )
        turn = self.pool.turn_fd(self.call.id)
        wake = _waiting.wait_for(slots, timeout, also=turn)
        if turn is not None:
            self.pool.drain_turn(self.call.id)
        out: list[list[Any]] = []
        for slot in wake.replies:
            if not slot.eof or slot.worker.waitable is None:
                self._drain(slot, out)
        for slot in slots:
            # Threads have no sentinel: look at them when the periodic wake-up fires.
            maybe_dead = slot in wake.deaths if slot.worker.sentinel is not None else wake.timed_out
            if (
                maybe_dead
                and slot.owner == self.call.id  # not one handed back (and maybe claimed) just now
                and slot in self.pool.slots
                and slot.worker.exitcode() is not None
            ):
                # whatever it wrote before dying (results, Bye) is still in the pipe
                self._drain(slot, out)
                error, again = _deaths.on_death(self.pool, self.call, slot, self.attempts)
                self._run_again(again)
                self._fail(error)
        self._fail(_deaths.check_timeouts(self.pool, self.call))
        return out

    def _drain(self, slot: Slot, out: list[list[Any]]) -> None:
        try:
            messages = slot.worker.receive()
        except (EOFError, OSError):
            slot.eof, messages = True, []
        for message in messages:
            results = self._on_message(slot, message)
            if results is not None:
                out.append(results)
        if slot in self.pool.slots:
            self.pool.hand_back(slot)  # after the whole batch (a Bye in it must be seen first)

    def _run_again(self, chunks: list[Chunk]) -> None:
        """Chunks of a lost worker go back to the front of the line (``retries=``)."""
        for chunk in chunks:
            self.inflight.pop(chunk.seq, None)
        self.requeued.extendleft(reversed(chunks))

    # ------------------------------------------------------------------ replies
    def _take(self, slot: Slot, seq: int) -> Chunk:
        """The chunk a reply answers, off its worker's queue."""
        chunk = self.inflight.pop(seq)
        slot.queued.remove(chunk)
        slot.handed_at = time.monotonic()
        self.call.item_segments.pop(seq, None)
        slot.items_run += chunk.size
        if self.call.max_tasks is not None and slot.items_run >= self.call.max_tasks:
            slot.retiring = True  # no more chunks; replaced once its queue is empty
        return chunk

    def _on_message(self, slot: Slot, message: Message) -> list[Any] | None:
        call = self.call
        if isinstance(message, Ready):
            slot.ready = True
        elif isinstance(message, Logged):
            for record in message.records:
                _logs.deliver(record)
        elif isinstance(message, Bye):
            slot.said_bye = True
            # It stopped reading before these arrived: none of them ran.
            self.requeued.extendleft(reversed(slot.queued))
            for chunk in slot.queued:
                del self.inflight[chunk.seq]
            slot.queued.clear()
        elif isinstance(message, SetupFailed):
            self._fail(_replies.setup_error(call, message))
        elif isinstance(message, Result):
            chunk = self._take(slot, message.seq)
            try:
                results: list[Any] = _replies.load(call, message.results)
            except Exception as exc:
                self._fail(_replies.unloadable_results(call, chunk, exc))
                return None
            self.chunker.observe(chunk.size, message.seconds)
            if call.progress is not None:
                call.progress.advance(chunk.size)
            if not self.ordered:
                return results
            self.finished[chunk.seq] = (results, None)
        elif isinstance(message, Raised):
            chunk = self._take(slot, message.seq)
            error = _replies.raised_error(call, message)
            if self.eager_errors:
                # not needed: only remove its segments
                _shm.unlink(_wire.segment_paths(message.partial))
                self._fail(error)
                return None
            partial = _replies.load(call, message.partial) if message.partial is not None else []
            self.finished[chunk.seq] = (partial, error)
            self.failed_seq = (
                chunk.seq if self.failed_seq is None else min(self.failed_seq, chunk.seq)
            )
        elif isinstance(message, Unsendable):
            self._take(slot, message.seq)
            self._fail(_replies.unsendable_result(call, message))
        elif isinstance(message, Lost):
            chunk = self._take(slot, message.seq)
            if self.attempts.again(chunk.seq, message.reason):
                self._run_again([chunk])
                self.pool.remove(slot, kill=True)  # a fresh worker (an owned executor is remade)
            else:
                self._fail(
                    _replies.lost_error(call, chunk, message, self.attempts.history(chunk.seq))
                )
        else:  # pragma: no cover
            raise RuntimeError(f"pickmap: unexpected reply {message!r} from a worker")
        return None


def execute(
    pool: WorkerPool,
    call: Call,
    chunker: Chunker,
    *,
    ordered: bool,
    eager_errors: bool,
    bounded: bool,
) -> Iterator[list[Any]]:
    """Run ``call`` on ``pool``; yield one list of results per chunk."""
    return _Run(
        pool, call, chunker, ordered=ordered, eager_errors=eager_errors, bounded=bounded
    ).results()
