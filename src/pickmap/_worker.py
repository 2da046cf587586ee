"""The worker side of pickmap: the code every worker runs, whatever starts it.

Only the channel differs: frames on a pipe to a pickmap process, a mailbox to
a thread, a direct call for ``serial``, a submitted :func:`run_job` for an
executor or a cluster. Data flow for one ``pmap`` call (records from
``_protocol.py``, transports from ``_wire.py``)::

    caller thread (engine.py)                            worker (this module)
    ─────────────────────────                            ────────────────────
    probe: dump func once (protocol 5,
    large buffers out of band, uncopied)
    large buffers -> one shared-memory
    segment, kept across calls while the
    object is unchanged ──────────┐
                                  │  Setup(CallSpec, func [, initializer])
    first task for this worker ───┤  (sticky workers: once per worker per call;
                                  │   executors: inside every Job)
                                  └──────────────────────────────▶ load func (buffers are
                                                                   read-only views of the
                                                                   segment), run initializer
    chunker: next items ─▶ dump ──  Task(call_id, seq, start, items)
    (large buffers: a segment the   ──────────────────────────────▶ load items (private,
     worker unlinks once mapped)                                    copy-on-write views)
                                                                    results = map(func)
                                    Result(seq, seconds, results)
    ordered/unordered emit ◀──────────────────────────────────────── dump results (large
    (maps and unlinks result                                        buffers: a segment)
     segments at once)
                                    Raised(seq, item, repr, traceback, exc, partial)
                                    Unsendable(seq, item, type, reason)
                                    SetupFailed(call_id, stage, first_item, repr, traceback, exc)
                                    Bye      idle too long: exits without reading more
                                    Ready    sent once at start-up, so a death before
                                             it is told apart from a crash
    engine also waits on the process sentinel (death), and reads the shared
    progress slot [item index, start time] to enforce ``timeout=`` per item.

A worker holds one call's callable at a time: a Setup for a new call replaces
the previous callable, so nothing leaks from one call into the next. The
caller never blocks on a write (``_wire.Outbox``) and reads while its writes
wait, so a worker blocked writing a large result while a large chunk waits
for it can never deadlock: the worker needs no reader thread of its own, and
runs on one thread.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import select
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence

from . import _logs, _shm, _wire
from ._protocol import (
    Bye,
    CallSpec,
    Job,
    Logged,
    Message,
    Raised,
    Ready,
    Result,
    Setup,
    SetupFailed,
    Stop,
    Task,
    Unsendable,
)
from ._settings import blas_pools_loaded
from .serializers import Serializer, get_serializer

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    import signal  # _signal has no stub; its functions are signal's
    from typing import Any
else:
    import _signal as signal  # signal.py's C half: a worker starts without signal.py (enum)

__all__ = (
    "WorkerState",
    "flush_std_streams",
    "forked_main",
    "in_worker",
    "mark_worker",
    "process_main",
    "run_items",
    "run_job",
    "serve",
)

# Set in every pickmap worker process; nested pmap calls read it (and the thread-local below).
_IN_WORKER = False
_THREAD = threading.local()


def _function_of(obj: Any) -> types.FunctionType | None:
    """The plain function behind a callable: itself, a bound method's, a partial's, or a
    callable object's ``__call__``; None for anything else (builtins, classes)."""
    for _ in range(8):  # a partial of a method of ...: a few levels at most
        if isinstance(obj, types.FunctionType):
            return obj
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        elif not isinstance(obj, type) and isinstance(_call_of(type(obj)), types.FunctionType):
            obj = _call_of(type(obj))  # a callable object of a class defined in Python
        else:
            return None
    return None


def _call_of(cls: type) -> Any:
    return next((vars(k)["__call__"] for k in cls.__mro__ if "__call__" in vars(k)), None)


def _rebound(obj: Any, namespace: dict[str, Any]) -> Any:
    """``obj`` with its function reading ``namespace`` as its globals (the wrappers kept)."""
    if isinstance(obj, types.FunctionType):
        rebuilt = types.FunctionType(
            obj.__code__, namespace, obj.__name__, obj.__defaults__, obj.__closure__
        )
        rebuilt.__kwdefaults__ = obj.__kwdefaults__
        rebuilt.__dict__.update(obj.__dict__)
        return rebuilt
    if isinstance(obj, functools.partial):
        return functools.partial(_rebound(obj.func, namespace), *obj.args, **obj.keywords)
    if isinstance(obj, types.MethodType):
        return types.MethodType(_rebound(obj.__func__, namespace), obj.__self__)
    return obj


def share_namespace(func: Any, initializer: Any) -> Any:
    """The initializer, reading and writing the callable's globals when both came from one script.

    A callable and an initializer defined in ``__main__`` (or any module the
    worker cannot import) travel by value in two payloads, and each would get
    a namespace of its own: a global the initializer sets would never be seen
    by the callable. In the caller they shared one module, so here they do too.
    """
    target_function = _function_of(func)
    own_function = _function_of(initializer)
    if target_function is None or own_function is None:
        return initializer
    target, own = target_function.__globals__, own_function.__globals__
    if own is target or own.get("__name__") != target.get("__name__"):
        return initializer
    module = sys.modules.get(own_function.__module__)
    if module is not None and vars(module) is own:
        return initializer  # an imported module's function: the namespace is shared already
    for name, value in own.items():
        target.setdefault(name, value)
    if not isinstance(initializer, (types.FunctionType, functools.partial, types.MethodType)):
        return initializer  # a callable object: its class's method cannot be rebuilt here
    return _rebound(initializer, target)


def in_worker() -> bool:
    """True inside a pickmap worker process, worker thread, or a task an executor runs for pickmap."""
    return (
        _IN_WORKER
        or getattr(_THREAD, "in_task", False)
        or getattr(threading.current_thread(), "_pickmap_worker", False)
    )


class mark_worker:
    """Context manager: the current thread runs pickmap work (nested calls run in place)."""

    def __enter__(self) -> None:
        self._before = getattr(_THREAD, "in_task", False)
        _THREAD.in_task = True

    def __exit__(self, *exc: object) -> None:
        _THREAD.in_task = self._before


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
        except BaseException as exc:
            return results, start + len(results), exc
        if len(results) < len(items):
            # map() ends quietly when func raises StopIteration, and keeps no
            # trace of it: a short list can only mean that (checking the length
            # costs nothing per item, unlike a wrapper around func).
            index = start + len(results)
            return results, index, stop_iteration_error(func, index, None)
        return results, None, None
    for offset, item in enumerate(items):
        if progress is not None:
            progress[1] = time.monotonic()
            progress[0] = start + offset
        try:
            results.append(func(*item) if star else func(item))
        except BaseException as exc:
            if isinstance(exc, StopIteration):
                exc = stop_iteration_error(func, start + offset, exc)
            if not collect or isinstance(exc, KeyboardInterrupt):
                # Ctrl-C (serial backend, in the caller's thread) is never a result.
                return results, start + offset, exc
            exc.add_note(f"pickmap: raised on item {start + offset}")
            results.append(exc)
    if progress is not None:
        progress[1] = 0.0
    return results, None, None


def stop_iteration_error(
    func: Callable[..., Any], index: int, exc: StopIteration | None
) -> RuntimeError:
    """What a ``StopIteration`` raised by ``func`` on item ``index`` becomes: a ``RuntimeError``.

    Raised as itself, it would end whatever loop consumes the results (a
    ``for`` over ``imap``, a generator calling ``pmap``) as if they had run
    out: a silently shorter list. Generators turn it into ``RuntimeError``
    for the same reason (PEP 479). ``exc`` is the original when it was caught
    (its traceback is the ``__cause__``); ``None`` when ``map()`` swallowed it.
    """
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    error = RuntimeError(f"{name} raised StopIteration on item {index}")
    if exc is not None:
        error.__cause__ = exc
        error.__traceback__ = exc.__traceback__
    return error


def _safe_text(render: Callable[[], str], exc: BaseException) -> str:
    try:
        return render()
    except BaseException as failure:
        return f"<{type(exc).__qualname__}: rendering it raised {type(failure).__name__}>"


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """``(repr, formatted traceback)`` — what survives even if the exception cannot."""
    import traceback  # only when something failed

    return (
        _safe_text(lambda: repr(exc), exc),
        _safe_text(
            lambda: "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), exc
        ),
    )


_inner_limit: Any = None  # threadpoolctl's limiter, while a limit is applied
_inner_threads = 0


def limit_inner_threads(threads: int) -> None:
    """Cap this worker process's BLAS/OpenMP pools (once the libraries are loaded); 0 restores them."""
    global _inner_limit, _inner_threads
    if threads == _inner_threads or not blas_pools_loaded():
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    if _inner_limit is not None:
        _inner_limit.restore_original_limits()  # a warm worker: the last call's limit goes first
        _inner_limit = None
    if threads > 0:
        # kept for the process's life, not a context
        _inner_limit = threadpool_limits(limits=threads)
    _inner_threads = threads


def adopt_inner_limit(limiter: Any, threads: int) -> None:
    """A worker forked while the caller held its pools at ``threads`` (see ``_process``):
    the pools are limited already, and ``limiter`` restores the caller's counts later.

    Setting a limit here instead would make a forked OpenBLAS restart its
    thread pool (it has none after ``fork``), and the new thread spins about
    0.1 s of CPU waiting for work that never comes.
    """
    global _inner_limit, _inner_threads
    _inner_limit, _inner_threads = limiter, threads


class WorkerState:
    """One worker's memory between messages: the current call's callable and flags.

    ``share_results`` (a process on the caller's machine) puts large result
    buffers in shared memory; ``mappings`` keeps a callable's segments mapped
    across calls; ``own_process`` (not a thread of the caller) may cap BLAS pools.
    """

    def __init__(
        self, progress: Any = None, *, share_results: bool = False, own_process: bool = False
    ) -> None:
        self.progress = progress
        self.own_process = own_process
        self.share_results = share_results
        self.mappings = _wire.Mappings()
        self.spec: CallSpec | None = None
        self.serializer: Serializer = get_serializer("identity")
        self.func: Callable[..., Any] | None = None
        # _logs.Forwarder, once the caller's logging is known to be configured
        self.logs: Any = None

    def handle(self, message: Message) -> list[Message]:
        if isinstance(message, Setup):
            replies = self._setup(message)
        elif isinstance(message, Task):
            replies = self._task(message)
        else:
            raise ValueError(f"unknown message {type(message).__name__}")
        if self.logs is not None:
            records = self.logs.take()
            if records:
                replies.insert(0, Logged(records))  # before the reply they belong to
        return replies

    def adopt(self, spec: CallSpec, func: Callable[..., Any], setup: Any) -> list[Message]:
        """Take a call handed over by fork: the callable is already in memory."""
        self._begin(spec)
        if setup is not None:
            initializer, initargs = setup
            try:
                initializer(*initargs)
            except BaseException as exc:
                return [self._failure("initializer", None, exc)]
        self._ready(func)
        return []

    def _begin(self, spec: CallSpec) -> None:
        self.spec = spec
        self.serializer = get_serializer(spec.serializer)
        self.func = None  # drop the previous call's callable before anything else

    def _ready(self, func: Callable[..., Any]) -> None:
        if self.own_process and self.spec is not None:
            # after loading: the callable may have imported numpy
            limit_inner_threads(self.spec.inner_threads)
            if self.spec.log_levels is not None:
                self.logs = _logs.install_forwarder(self.spec.log_levels)
        self.func = func

    def _load(self, payload: Any) -> Any:
        return self.serializer.load(self.mappings.resolve(payload))

    def _dump(self, obj: Any) -> Any:
        payload = self.serializer.dump(obj)
        if self.share_results:
            payload = _wire.share(payload, transient=True, writer=f"w{os.getpid()}")
        return payload

    def _clock(self, index: float) -> None:
        """With ``timeout=``: the task at ``index`` starts now (-1: loading the callable; -2: idle).

        Loading items and dumping results count as part of their task, so a
        slow ``__reduce__`` is caught by the timeout too.
        """
        if self.spec is not None and self.spec.timed and self.progress is not None:
            self.progress[1] = 0.0 if index == -2 else time.monotonic()
            self.progress[0] = index

    def _setup(self, setup: Setup) -> list[Message]:
        self._begin(setup.call)
        stage = "callable"
        self._clock(-1)
        try:
            func = self._load(setup.func)
            if setup.init is not None:
                stage = "initializer-load"
                initializer, initargs = self._load(setup.init)
                stage = "initializer"
                share_namespace(func, initializer)(*initargs)
        except BaseException as exc:
            return [self._failure(stage, None, exc)]
        finally:
            self._clock(-2)
        self._ready(func)
        return []

    def _failure(self, stage: str, index: int | None, exc: BaseException) -> Message:
        call_id = self.spec.id if self.spec is not None else -1
        return SetupFailed(call_id, stage, index, *describe_exception(exc), self._dump_or_none(exc))

    def _task(self, task: Task) -> list[Message]:
        spec = self.spec
        if spec is None or task.call_id != spec.id or self.func is None:
            return []  # setup failed and was reported; the caller is already raising
        try:
            self._clock(task.start)
            try:
                items = self._load(task.items)
            except BaseException as exc:
                return [self._failure("items", task.start, exc)]
            began = time.perf_counter()
            progress = self.progress if spec.timed else None
            results, failed_at, raised = run_items(
                self.func,
                items,
                task.start,
                star=spec.star,
                collect=spec.collect,
                progress=progress,
            )
            elapsed = time.perf_counter() - began
            if raised is not None:
                assert failed_at is not None
                exc_repr, remote_tb = describe_exception(raised)
                return [
                    Raised(
                        task.seq,
                        failed_at,
                        exc_repr,
                        remote_tb,
                        self._dump_or_none(raised),
                        self._dump_or_none(results),
                    )
                ]
            if spec.collect:
                results = [
                    self._sendable_exception(r) if isinstance(r, BaseException) else r
                    for r in results
                ]
            self._clock(task.start + max(len(results) - 1, 0))
            try:
                payload = self._dump(results)
            except BaseException as exc:
                index, bad = self._first_unsendable(results, task.start)
                reason = f"{type(exc).__name__}: {_safe_text(functools.partial(str, exc), exc)}"
                return [Unsendable(task.seq, index, type(bad).__qualname__, reason)]
            return [Result(task.seq, elapsed, payload)]
        finally:
            self._clock(-2)

    def _dump_or_none(self, obj: Any) -> Any:
        try:
            return self._dump(obj)
        except BaseException:
            return None

    def _sendable_exception(self, exc: BaseException) -> BaseException:
        """A collected exception, or a WorkerError standing in for one that cannot travel."""
        if not self.serializer.by_value:
            return exc
        try:
            self.serializer.load(self.serializer.dump(exc))
            return exc
        except BaseException:
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
            try:
                self.serializer.dump(result)
            except BaseException:
                return start + offset, result
        return start, results  # the list as a whole failed (should not happen)


def serve(
    recv: Callable[[], Sequence[Message]], send: Callable[[list[Message]], None], state: WorkerState
) -> None:
    """The loop of a sticky worker (process or thread)."""
    while True:
        replies: list[Message] = []
        for message in recv():
            if isinstance(message, Stop):
                return
            replies.extend(state.handle(message))
        if replies:
            send(replies)


# --------------------------------------------------------------------------- self-contained tasks
# (caller token, call id) -> the state that loaded that call's callable, most recent last.
_JOB_STATES: collections.OrderedDict[tuple[str, int], WorkerState] = collections.OrderedDict()
_JOB_LOCK = threading.Lock()
_JOB_STATES_KEPT = 4


def run_job(job: Job | bytes) -> list[Message] | bytes:
    """Run one self-contained task: the entry point any executor or cluster runs for pickmap.

    ``job`` is a :class:`~pickmap._protocol.Job`, or its blob (``_wire.to_blob``)
    where the executor pickles what it carries; the replies come back in the
    same form. The callable is loaded once per process per call (cached by
    caller token and call id), and the running thread counts as a pickmap
    worker, so a nested ``pmap`` inside the task runs in place.
    """
    blob = not isinstance(job, Job)
    if isinstance(job, (bytes, bytearray, memoryview)):
        (loaded,) = _wire.from_blob(bytes(job))
        assert isinstance(loaded, Job)
        job = loaded
    if not isinstance(job, Job):
        raise TypeError(f"run_job takes a Job or its blob (bytes), not {type(job).__name__}")
    spec = job.setup.call
    key = (spec.token, spec.id)
    with _JOB_LOCK:
        state = _JOB_STATES.get(key)
        if state is not None:
            _JOB_STATES.move_to_end(key)
    replies: list[Message] = []
    with mark_worker():
        if state is None:
            if spec.share:
                _wire.set_caller_pid(spec.caller_pid)  # result segments are named after the caller
            state = WorkerState(share_results=blob and spec.share, own_process=blob)
            replies = state.handle(job.setup)
            if state.func is not None:
                with _JOB_LOCK:
                    _JOB_STATES[key] = state
                    while len(_JOB_STATES) > _JOB_STATES_KEPT:
                        _JOB_STATES.popitem(last=False)
        if state.func is not None:
            replies.extend(state.handle(job.task))
    return _wire.to_blob(replies) if blob else replies


# --------------------------------------------------------------------------- process entry point
def _close_inherited(fds: Sequence[Any]) -> None:
    # A forked child inherits the caller's ends of its siblings' pipes; holding
    # them would keep those pipes open after the caller dies, so close them.
    for conn in fds:
        try:
            conn.close()
        except OSError:
            pass


def flush_std_streams() -> None:
    """Flush stdout and stderr: before a fork (or the child writes the forker's buffered
    output a second time), and before a forked worker leaves through ``os._exit``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # closed, or replaced by an object without flush
            pass


def forked_main(close: Sequence[int], *args: Any) -> None:
    """Entry point of a worker that pickmap forked itself (from the caller or its fork
    server): :func:`process_main` with ``args``, then the process exits with its code.

    What ``multiprocessing.Process`` would have done around it is done here:
    ``close`` (the forker's descriptors) are closed, stdin is ``/dev/null``
    (a worker never reads the caller's terminal), ``multiprocessing``'s own
    after-fork hooks run if the caller loaded it (its queues and locks start
    afresh), and the output is flushed before ``os._exit``, which runs no
    ``atexit`` handler of the caller's.
    """
    code = 1
    try:
        for fd in close:
            os.close(fd)
        try:
            sys.stdin.close()
            sys.stdin = open(os.devnull)  # noqa: SIM115 (for the process's life)
        except (OSError, ValueError, AttributeError):
            pass
        _as_multiprocessing_child()
        process_main(*args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        flush_std_streams()
        os._exit(code)


def _as_multiprocessing_child() -> None:
    """If the caller loaded ``multiprocessing``, be one of its children, as ``Process`` would:
    its after-fork hooks run (queues, locks), ``current_process()`` is this worker (log
    records' ``processName``), and the caller's children are not this process's."""
    process = sys.modules.get("multiprocessing.process")
    if process is None:
        return
    process.current_process().name = "pickmap-worker"
    setattr(process, "_children", set())  # noqa: B010 (a private name mypy does not know)
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util._run_after_forkers()


def process_main(
    conn: Any,
    progress: str,
    idle_timeout: float,
    caller_pid: int,
    inherited: Sequence[Any],
    adopted: tuple[CallSpec, Callable[..., Any], Any] | None = None,
    capped: tuple[Any, int] | None = None,
) -> None:
    """Entry point of a pickmap worker process (``forked_main``'s, or a spawn ``Process``'s target).

    ``adopted`` is set only for a worker forked during a call: that call's
    spec, callable and initializer, inherited with the process's memory, so
    they are never serialized for this worker. ``capped`` (fork only): the
    caller's threadpoolctl limiter and thread count its BLAS pools were held
    at while it forked this worker (``adopt_inner_limit``).
    """
    global _IN_WORKER
    _IN_WORKER = True
    if capped is not None:
        adopt_inner_limit(*capped)
    # Ctrl-C goes to the whole process group; the caller decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _close_inherited(inherited)
    _wire.set_caller_pid(caller_pid)
    view = memoryview(_shm.map_progress(progress)).cast("d")
    state = WorkerState(view, share_results=True, own_process=True)
    fd = conn.fileno()
    os.set_blocking(fd, True)

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    idle_ms = int(max(1.0, min(idle_timeout * 1000, 2**31 - 1)))  # poll's limit: ~24 days
    reader = _wire.FrameReader(fd, blocking=True)

    def recv() -> list[Message]:
        if not reader.buffered and not poller.poll(idle_ms):
            # (a timeout beyond what one poll takes is waited out in several)
            deadline = time.monotonic() - idle_ms / 1000 + idle_timeout
            while time.monotonic() < deadline and not poller.poll(idle_ms):
                pass
            if not poller.poll(0):
                # Idle too long: say so and leave. The caller re-queues anything it
                # sent after our last reply: we never run it.
                _wire.write_frame(fd, [Bye()])
                raise SystemExit(0)
        return reader.read()

    try:
        first: list[Message] = [Ready(os.getpid())]
        if adopted is not None:
            first.extend(state.adopt(*adopted))
        _wire.write_frame(fd, first)
        serve(recv, lambda replies: _wire.write_frame(fd, replies), state)
    except (EOFError, OSError, SystemExit):
        pass  # the caller went away or we said BYE; forked_main (or Process) flushes and exits
    finally:
        # A spawn worker exits through the interpreter's shutdown, which would find the
        # socket still open (a ResourceWarning under -X dev or -W default); fork and
        # fork-server workers leave with os._exit.
        try:
            conn.close()
        except OSError:  # the task closed the descriptor itself: the exit stays clean
            pass
