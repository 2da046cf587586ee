"""``pickmap.Executor``: a ``concurrent.futures.Executor`` that runs on pickmap.

A drop-in for ``ProcessPoolExecutor`` that accepts every callable pickmap
accepts — ``submit(self.__private, x)`` inside a class, lambdas, closures,
``__main__`` functions — because each submitted callable goes through the same
capability probe as ``pmap`` (stdlib pickle, cloudpickle, dill, threads).

Design
------
- **Batching per callable.** ``submit`` only appends a work item to a queue
  kept per callable (a bound method is identified by its object and function,
  so ``submit(self.f, x)`` in a loop is one callable although every
  ``self.f`` is a fresh object). One dispatcher thread takes the oldest
  callable's queue and runs it as *one* ``pickmap.imap(..., ordered=False,
  chunksize=1)`` call: the callable is probed and shipped to the workers once
  per group, not once per task. The group's input is a generator that pops
  the queue lazily, so a future is marked running only when pickmap actually
  takes its task (a later ``cancel()`` or ``shutdown(cancel_futures=True)``
  still reaches everything pickmap has not taken), and tasks submitted while
  the group runs join it — until another callable is waiting, so one busy
  callable cannot starve the others. Groups run one at a time: while a group
  runs, tasks of other callables wait for it to finish.
- **What runs where.** The callable runs wherever pickmap puts it (worker
  processes, threads, or — ``backend="serial"`` — the dispatcher thread).
  Futures are resolved, and their done-callbacks run, in the dispatcher
  thread, as in the standard library's executors.
- **Exceptions.** Each task is wrapped in :class:`_Apply`, which catches what
  the callable raises and returns it as that task's outcome, so one failing
  task never ends its group; the future re-raises it as itself with the
  worker's traceback as ``__cause__`` (a :class:`~pickmap.RemoteTraceback`)
  when it ran in another process. An exception that cannot travel back (it
  fails a pickle round trip in the worker) arrives as a
  :class:`~pickmap.WorkerError` carrying its repr and traceback. A failure of
  the whole pickmap call — a worker killed mid-task
  (:class:`~pickmap.WorkerCrashedError`, a ``BrokenExecutor``), ``timeout=``
  exceeded (:class:`~pickmap.TaskTimeoutError`), a result or argument that
  cannot be serialized (:class:`~pickmap.SerializationError`) — goes to every
  future of that group that was taken and has no outcome yet. Tasks pickmap
  had not taken stay queued, and the executor keeps working: unlike
  ``ProcessPoolExecutor`` it does not become broken after a crash, since
  pickmap replaces the lost workers on the next call.
- **map.** ``map(fn, *iterables, chunksize=k)`` submits every item at once
  (as the standard library does); with ``k > 1`` one task carries ``k``
  items. Results come back in input order; an exception re-raises at its
  item, after the results before it; ``timeout=`` bounds the whole iteration
  and cancels what has not started when it expires or the iterator is closed.
- **shutdown.** ``shutdown()`` refuses new work (``submit`` raises
  ``RuntimeError``); queued tasks still run unless ``cancel_futures=True``,
  which cancels every task pickmap has not taken; ``wait=True`` blocks until
  the dispatcher has finished the rest. Garbage-collecting an executor, or
  leaving the interpreter, without ``shutdown()`` shuts it down the same way
  (queued work finishes, then the dispatcher thread exits), so nothing hangs.
  Worker processes stay warm in pickmap's pools afterwards, for the next
  call; ``pickmap.shutdown()`` stops them.

``initializer(*initargs)`` runs as in ``pmap``: once in each worker before its
first task *of a group*, and a worker that ran it is retired when the group
ends — so it may run more than once per worker lifetime, unlike
``ProcessPoolExecutor``. Its failure fails that group's taken futures.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures import Executor as _StdExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from ._settings import supported_start_methods
from .api import imap
from .errors import RemoteTraceback, WorkerError

__all__ = ("Executor",)

T = TypeVar("T")
if TYPE_CHECKING:
    from typing import ParamSpec

    P = ParamSpec("P")

# (exception or WorkerError, worker's formatted traceback or None when it ran in this process)
_Failure = tuple[BaseException, "str | None"]


def _callable_key(fn: Callable[..., Any], chunked: bool) -> Hashable:
    """Which submissions may share one pickmap call. Every ``obj.method``
    access makes a new bound-method object, so a method is known by its object
    and function; anything else by identity. Queued items keep ``fn`` alive,
    so an ``id`` here cannot be reused while it is queued."""
    if isinstance(fn, types.MethodType):
        return (id(fn.__self__), id(fn.__func__), chunked)
    if isinstance(fn, types.BuiltinMethodType) and fn.__self__ is not None:
        return (id(fn.__self__), fn.__name__, chunked)
    return (id(fn), chunked)


def _label(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _travels(exc: BaseException) -> bool:
    """Can ``exc`` come back from this worker as itself? Tried with the
    pickler and with any by-value serializer the worker has loaded (the one
    its backend uses is among them)."""
    loaded = (sys.modules.get(name) for name in ("pickle", "cloudpickle", "dill"))
    return any(_round_trips(module, exc) for module in loaded if module is not None)


def _round_trips(module: Any, exc: BaseException) -> bool:
    try:
        module.loads(module.dumps(exc))
    except Exception:
        return False
    return True


class _Apply:
    """The callable pickmap runs for a group: one task in, ``(index, value,
    failure)`` out, so an exception belongs to its own future instead of
    ending the group. With ``chunked`` a task's args are a list of argument
    tuples (one ``map`` chunk) and ``value`` the results made before any
    failure. Module-level and plain, so it travels with whatever carries
    ``fn``."""

    def __init__(self, fn: Callable[..., Any], chunked: bool, caller_pid: int) -> None:
        self.fn = fn
        self.chunked = chunked
        self.caller_pid = caller_pid
        # pickmap names the callable in its messages ("... while running item 3 of <name>").
        self.__qualname__ = _label(fn)

    def __call__(self, task: tuple[int, Any, dict[str, Any]]) -> tuple[int, Any, _Failure | None]:
        index, args, kwargs = task
        if self.chunked:
            results: list[Any] = []
            for item_args in args:
                try:
                    results.append(self.fn(*item_args))
                except BaseException as exc:
                    return index, results, self._failure(exc)
            return index, results, None
        try:
            return index, self.fn(*args, **kwargs), None
        except BaseException as exc:
            return index, None, self._failure(exc)

    def _failure(self, exc: BaseException) -> _Failure:
        if os.getpid() == self.caller_pid:
            return exc, None  # a thread: the object itself, traceback and all
        tb = exc.__traceback__
        text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
        if not _travels(exc):
            exc = WorkerError(
                f"{_label(self.fn)} raised {exc!r:.200} in a worker process (pid {os.getpid()}), and that "
                f"exception cannot be sent back as itself (it does not survive pickling); its traceback follows",
                exc_repr=repr(exc),
                remote_traceback=text,
                index=None,
            )
        return exc, text


def _rebuild(failure: _Failure, fn: Any) -> BaseException:
    exc, text = failure
    if text is not None:
        exc.__cause__ = RemoteTraceback(text)
        exc.add_note(f"pickmap.Executor: raised by {_label(fn)} in a worker process")
    return exc


class _WorkItem:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(
        self, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs


class _State:
    """What the executor and its dispatcher thread share. The thread holds only
    this, never the executor, so an executor nobody references can be collected
    (and its finalizer then lets the thread finish and exit)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        # callable key -> its queued work, oldest callable first (dicts keep insertion order)
        self.pending: dict[Hashable, collections.deque[_WorkItem]] = {}
        self.closing = False
        self.broken: str | None = None
        self.thread: threading.Thread | None = None

    def close(self, cancel_futures: bool = False) -> list[_WorkItem]:
        with self.lock:
            self.closing = True
            dropped = (
                [item for queue in self.pending.values() for item in queue]
                if cancel_futures
                else []
            )
            if cancel_futures:
                self.pending.clear()
            self.wakeup.notify_all()
        return dropped


# Interpreter exit: threading joins non-daemon threads before atexit handlers
# run, so the dispatchers are told to finish from threading's own exit hook.
_exiting = False
_live_states: weakref.WeakSet[_State] = weakref.WeakSet()
_live_lock = threading.Lock()


def _on_interpreter_exit() -> None:
    global _exiting
    with _live_lock:
        _exiting = True
        states = list(_live_states)
    for state in states:
        state.close()


_register_exit = getattr(threading, "_register_atexit", None)
if _register_exit is not None:
    _register_exit(_on_interpreter_exit)


def _dispatch(state: _State) -> None:
    """The dispatcher thread: run the oldest callable's queue as one pickmap call, repeat."""
    try:
        while True:
            with state.wakeup:
                while not state.pending and not state.closing:
                    state.wakeup.wait()
                if not state.pending:
                    return  # closing, and nothing left to run
                key, queue = next(iter(state.pending.items()))
                fn, owed = queue[0].fn, len(queue)
            _run_group(state, key, fn, owed)
    except (
        BaseException
    ) as error:  # pragma: no cover - a bug here must not leave futures waiting forever
        with state.lock:
            state.broken = f"the pickmap.Executor dispatcher failed: {error!r}"
            dropped = [item for queue in state.pending.values() for item in queue]
            state.pending.clear()
        for item in dropped:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BrokenExecutor(state.broken))
        raise


def _run_group(state: _State, key: Hashable, fn: Callable[..., Any], owed: int) -> None:
    chunked = key[-1]  # type: ignore[index]
    taken: dict[int, _WorkItem] = {}  # by position in this call's input, until resolved
    positions = itertools.count()

    def tasks() -> Iterator[tuple[int, Any, dict[str, Any]]]:
        left = owed  # queued when the group started: always taken
        while True:
            with state.lock:
                queue = state.pending.get(key)
                if not queue:
                    return
                if left <= 0 and len(state.pending) > 1:
                    # Another callable is waiting: it goes first, the rest of this queue after it.
                    state.pending[key] = state.pending.pop(key)
                    return
                item = queue.popleft()
                if not queue:
                    del state.pending[key]  # a later submit starts a fresh queue at the back
                left -= 1
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            index = next(positions)
            taken[index] = item
            yield index, item.args, item.kwargs

    try:
        for index, value, failure in imap(
            _Apply(fn, chunked, os.getpid()), tasks(), ordered=False, chunksize=1, **state.options
        ):
            item = taken.pop(index)
            if chunked:
                item.future.set_result((value, None if failure is None else _rebuild(failure, fn)))
            elif failure is None:
                item.future.set_result(value)
            else:
                item.future.set_exception(_rebuild(failure, fn))
    except Exception as error:
        for item in taken.values():
            if not item.future.done():
                item.future.set_exception(error)
        return
    for item in taken.values():  # pragma: no cover - pickmap returns one result per input
        item.future.set_exception(
            RuntimeError("pickmap.Executor: pickmap returned no result for this task")
        )


def _check_options(
    backend: Any, workers: Any, start_method: Any, timeout: Any, initializer: Any, initargs: Any
) -> dict[str, Any]:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name or None, not {type(backend).__name__}")
    if start_method is not None and start_method not in supported_start_methods():
        raise ValueError(
            f"unknown start method {start_method!r}; valid start methods on this platform: "
            f"{', '.join(supported_start_methods())}"
        )
    options = {
        "backend": backend,
        "workers": workers,
        "start_method": start_method,
        "timeout": timeout,
        "initializer": initializer,
        "initargs": tuple(initargs) if isinstance(initargs, list) else initargs,
    }
    # imap checks every argument and selects the backend (unknown name, missing
    # package) when it is called; work would start only on the first next().
    imap(abs, [], **options)
    return options


class Executor(_StdExecutor):
    """A ``concurrent.futures.Executor`` that runs every task with pickmap.

    ``backend``, ``workers``, ``start_method``, ``timeout`` (seconds per task;
    with ``map(chunksize=k)``, per chunk), ``initializer`` and ``initargs``
    mean what they mean for :func:`pickmap.pmap`; by default the capability
    probe picks a backend for each submitted callable. Arguments are checked
    here, so a bad backend name fails now rather than in every future.
    """

    def __init__(
        self,
        backend: str | None = None,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        timeout: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
    ) -> None:
        self._state = _State(
            _check_options(backend, workers, start_method, timeout, initializer, initargs)
        )
        # Collected without shutdown(): let queued work finish and the thread exit.
        finalizer = weakref.finalize(self, self._state.close)
        # exit is handled by _on_interpreter_exit, before threads are joined
        finalizer.atexit = False
        with _live_lock:
            _live_states.add(self._state)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return its :class:`~concurrent.futures.Future`."""
        return self._enqueue(fn, _callable_key(fn, False), args, kwargs)

    def _enqueue(
        self, fn: Callable[..., Any], key: Hashable, args: Any, kwargs: dict[str, Any]
    ) -> Future[Any]:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__} {fn!r:.60}")
        state = self._state
        with state.lock:
            if state.broken is not None:
                raise BrokenExecutor(state.broken)
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            if state.closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future[Any] = Future()
            state.pending.setdefault(key, collections.deque()).append(
                _WorkItem(future, fn, args, kwargs)
            )
            if state.thread is None:
                state.thread = threading.Thread(
                    target=_dispatch,
                    args=(state,),
                    name="pickmap.Executor",
                    daemon=_register_exit is None,
                )
                state.thread.start()
            state.wakeup.notify()
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """``map(fn, *iterables)`` on the executor: every item is submitted now;
        the iterator yields results in input order and re-raises an item's
        exception at that item. ``timeout`` (seconds, for the whole iteration)
        raises ``TimeoutError`` when a result is late; ``chunksize`` items
        travel as one task."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables, strict=False)
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in items]
        else:
            key = _callable_key(fn, True)
            futures = []
            while chunk := list(_take(items, chunksize)):
                futures.append(self._enqueue(fn, key, chunk, {}))
        return _MapResults(futures, deadline, chunked=chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; with ``cancel_futures`` cancel what has not started;
        with ``wait`` return once everything else has finished."""
        for item in self._state.close(cancel_futures):
            item.future.cancel()
        thread = self._state.thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()


def _take(items: Iterator[Any], count: int) -> Iterator[Any]:
    for _, item in zip(range(count), items, strict=False):
        yield item


class _MapResults(Iterator[Any]):
    """``map``'s iterator. A class rather than a generator so that closing it,
    or dropping it, before the first ``next()`` still cancels its queued tasks."""

    def __init__(self, futures: list[Future[Any]], deadline: float | None, chunked: bool) -> None:
        futures.reverse()  # popped from the end, so a consumed future is not kept alive here
        self._futures = futures
        self._deadline = deadline
        self._chunked = chunked
        self._values: collections.deque[Any] = collections.deque()
        self._error: BaseException | None = None  # raised once the chunk's earlier results are out

    def __next__(self) -> Any:
        while not self._values:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if not self._futures:
                raise StopIteration
            future = self._futures.pop()
            try:
                timeout = None if self._deadline is None else self._deadline - time.monotonic()
                outcome = future.result(timeout)
            except BaseException:
                future.cancel()
                self.close()
                raise
            if not self._chunked:
                return outcome
            values, self._error = outcome
            self._values.extend(values)
            if self._error is not None:
                self.close()  # nothing after a failed item is yielded
        return self._values.popleft()

    def close(self) -> None:
        """Cancel every task not yet started; the iterator then ends."""
        while self._futures:
            self._futures.pop().cancel()

    def __del__(self) -> None:
        self.close()
