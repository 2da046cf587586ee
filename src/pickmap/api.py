"""The front-end: ``pmap``, ``imap`` and ``explain``.

Everything shared by all backends happens here, once, before any worker
starts: argument checks, backend selection (argument, ``PICKMAP_BACKEND``,
probe), the capability probe, peeking a sample item, and serializing the
callable and initializer. Then ``engine.execute`` runs the call on a warm
pool from ``pool.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

from . import _logs
from . import pool as pools
from ._progress import resolve_progress
from ._settings import (
    check_positive_int,
    check_retries,
    check_timeout,
    resolve_idle_timeout,
    resolve_inner_threads,
    resolve_max_tasks,
    resolve_start_method,
    resolve_workers,
)
from ._worker import in_worker
from .backends.base import Backend
from .chunking import Chunker, input_length
from .engine import Call, execute
from .errors import SerializationError
from .probe import Plan, Verdict, all_verdicts, choose, try_backend
from .registry import LADDER, get_backend, select_backend

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = ("explain", "imap", "pmap")

if TYPE_CHECKING:
    from typing import Literal, TypedDict, TypeVar, Unpack, overload

    T1 = TypeVar("T1")
    T2 = TypeVar("T2")
    T3 = TypeVar("T3")
    R = TypeVar("R")

    class Options(TypedDict, total=False):
        """The keyword arguments ``pmap`` and ``imap`` share (for the overloads below)."""

        backend: Any
        workers: int | None
        chunksize: int | None
        timeout: float | None
        initializer: Callable[..., Any] | None
        initargs: Sequence[Any]
        start_method: str | None
        inner_threads: int | None
        max_tasks_per_worker: int | None
        retries: int
        progress: Any


_NOTHING = object()
_NESTED_OK = ("thread", "serial")


class _Prepared(NamedTuple):
    plan: Plan
    call: Call | None  # None: empty input, nothing to run
    chunker: Chunker | None
    idle_timeout: float


def _check_arguments(
    api: str,
    func: Any,
    iterables: tuple[Any, ...],
    workers: Any,
    chunksize: Any,
    timeout: Any,
    initializer: Any,
    initargs: Any,
) -> tuple[list[Iterator[Any]], float | None]:
    if not callable(func):
        raise TypeError(
            f"{api}() needs a callable as its first argument, not {type(func).__name__} {func!r:.60}"
        )
    if not iterables:
        raise TypeError(f"{api}() needs at least one iterable after the function, as map() does")
    iterators = []
    for position, iterable in enumerate(iterables, start=2):
        try:
            iterators.append(iter(iterable))
        except TypeError:
            raise TypeError(
                f"argument {position} of {api}() must be iterable, not {type(iterable).__name__}"
            ) from None
    if workers is not None:
        check_positive_int("workers", workers)
    if chunksize is not None:
        check_positive_int("chunksize", chunksize)
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable or None, not {type(initializer).__name__}")
    if not isinstance(initargs, (tuple, list)):
        raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
    return iterators, check_timeout(timeout)


def _prepare(
    api: str,
    func: Callable[..., Any],
    iterables: tuple[Any, ...],
    *,
    backend: Any,
    workers: int | None,
    chunksize: int | None,
    timeout: float | None,
    initializer: Callable[..., Any] | None,
    initargs: Sequence[Any],
    start_method: str | None,
    return_exceptions: bool,
    inner_threads: int | None = None,
    max_tasks_per_worker: int | None = None,
    retries: int = 0,
    progress: Any = None,
    explaining: bool = False,
) -> _Prepared:
    iterators, timeout = _check_arguments(
        api, func, iterables, workers, chunksize, timeout, initializer, initargs
    )
    retries = check_retries(retries)
    max_tasks = resolve_max_tasks(max_tasks_per_worker)
    length = input_length(iterables)
    method = resolve_start_method(start_method)
    idle_timeout = resolve_idle_timeout()
    name, source = select_backend(backend)
    if in_worker() and not (isinstance(name, str) and name in _NESTED_OK):
        # Nested call inside a worker: run in place, never start processes
        # from a worker (no process explosion, no deadlock on a full pool).
        name, source = "serial", "nested"

    if method == "forkserver" and name is None and not explaining:
        # The probe picks a process backend unless nothing pickles: their fork server
        # boots now, beside the probe and the first chunk's pickling, not after them.
        from ._fork import prestart_server

        prestart_server()

    star = len(iterators) > 1
    items: Iterator[Any] = zip(*iterators, strict=False) if star else iterators[0]
    first = next(items, _NOTHING)
    sample = [] if first is _NOTHING else [first]
    if sample:
        items = itertools.chain(sample, items)

    setup = None if initializer is None else (initializer, tuple(initargs))
    chosen: Backend | None = name if isinstance(name, Backend) else None
    if name is None:
        # explain() probes afresh, so its verdict table and its choice agree.
        name, payload, init_payload, verdicts = choose(
            func, sample, setup, use_cache=not explaining
        )
    else:
        verdict, payload, init_payload = try_backend(name, func, sample, setup=setup)
        if not verdict.ok and not explaining:
            _raise_cannot_carry(name, source, verdict, func, sample, setup)
        verdicts = (verdict,)
    if explaining:
        verdicts = all_verdicts(func, sample, setup)
        if chosen is not None or name not in LADDER:
            verdicts += (try_backend(chosen or name, func, sample, setup=setup)[0],)

    if chosen is None:
        assert isinstance(name, str)  # probed, forced or nested: always a name here
        chosen = get_backend(name)
    size = resolve_workers(workers, chosen.default_workers)
    if chosen.max_workers is not None:
        size = min(size, chosen.max_workers)
    runs_on = chosen.describe() if explaining else None
    plan = Plan(
        chosen.name,
        source,
        size,
        method if chosen.start_methods else None,
        tuple(verdicts),
        runs_on,
    )
    if not sample:
        # checked all the same: a bar at 0/0
        empty = None if explaining else resolve_progress(progress, 0)
        if empty is not None:
            empty.close()
        return _Prepared(plan, None, None, idle_timeout)
    sink = None if explaining else resolve_progress(progress, length)
    _logs.debug(
        "%s(%s): backend %s (from %s), %d workers, start method %s, chunksize %s",
        api,
        getattr(func, "__qualname__", type(func).__qualname__),
        plan.backend,
        source,
        size,
        plan.start_method,
        chunksize or "automatic",
    )

    call = Call(
        func,
        chosen,
        payload,
        init_payload,
        star=star,
        collect=return_exceptions,
        timeout=timeout,
        forced=source in ("argument", "environment"),
        setup_objects=setup,
        inner_threads=resolve_inner_threads(inner_threads, size),
        max_tasks=max_tasks,
        retries=retries,
        progress=sink,
    )
    if call.timed and not chosen.reports_progress:
        # no per-item progress: each task's clock starts when its one item is handed over
        chunksize = 1
    chunker = Chunker(items, length, size, chunksize, func, largest=max_tasks)
    return _Prepared(plan, call, chunker, idle_timeout)


def _raise_cannot_carry(
    name: str | Backend, source: str, verdict: Verdict, func: Any, sample: list[Any], setup: Any
) -> None:
    name = name.name if isinstance(name, Backend) else name
    capable = [v.backend for v in all_verdicts(func, sample, setup) if v.ok and v.backend != name]
    where = {"argument": "backend=", "environment": "PICKMAP_BACKEND"}.get(source, source)
    raise SerializationError(
        f"backend {name!r} (forced by {where}) cannot carry this call: {verdict.reason}. "
        f"Backends that can: {', '.join(capable) or 'none'}; remove the forced backend to let pickmap choose",
        backend=name,
        what=getattr(func, "__qualname__", type(func).__qualname__),
        capable=capable,
    )


def _run(
    prepared: _Prepared, *, ordered: bool, eager_errors: bool, bounded: bool
) -> Iterator[list[Any]]:
    """Run the prepared call on a warm pool; yield one list of results per chunk."""
    call, chunker, plan = prepared.call, prepared.chunker, prepared.plan
    if call is None or chunker is None:
        return
    pool = pools.acquire(call.backend, plan.start_method, plan.workers, prepared.idle_timeout)
    try:
        yield from execute(
            pool, call, chunker, ordered=ordered, eager_errors=eager_errors, bounded=bounded
        )
    finally:
        pools.release(pool)
        if call.progress is not None:
            call.progress.close()


def _stream(chunks: Iterator[list[Any]]) -> Iterator[Any]:
    try:
        for results in chunks:
            yield from results
    finally:
        chunks.close()  # type: ignore[attr-defined] # closing early cancels the call now, not at GC


if TYPE_CHECKING:  # the overloads give the results the callable's return type

    @overload
    def pmap(
        func: Callable[[T1], R],
        iterable: Iterable[T1],
        /,
        *,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> list[R]: ...
    @overload
    def pmap(
        func: Callable[[T1], R],
        iterable: Iterable[T1],
        /,
        *,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> list[R | BaseException]: ...
    @overload
    def pmap(
        func: Callable[[T1, T2], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        /,
        *,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> list[R]: ...
    @overload
    def pmap(
        func: Callable[[T1, T2], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        /,
        *,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> list[R | BaseException]: ...
    @overload
    def pmap(
        func: Callable[[T1, T2, T3], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        iterable3: Iterable[T3],
        /,
        *,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> list[R]: ...
    @overload
    def pmap(
        func: Callable[[T1, T2, T3], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        iterable3: Iterable[T3],
        /,
        *,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> list[R | BaseException]: ...
    @overload
    def pmap(
        func: Callable[..., R],
        iterable1: Iterable[Any],
        iterable2: Iterable[Any],
        iterable3: Iterable[Any],
        iterable4: Iterable[Any],
        /,
        *more: Iterable[Any],
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> list[R]: ...
    @overload
    def pmap(
        func: Callable[..., R],
        iterable1: Iterable[Any],
        iterable2: Iterable[Any],
        iterable3: Iterable[Any],
        iterable4: Iterable[Any],
        /,
        *more: Iterable[Any],
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> list[R | BaseException]: ...


def pmap(
    func: Callable[..., Any],
    *iterables: Iterable[Any],
    backend: Any = None,
    workers: int | None = None,
    chunksize: int | None = None,
    timeout: float | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: Sequence[Any] = (),
    start_method: str | None = None,
    return_exceptions: bool = False,
    inner_threads: int | None = None,
    max_tasks_per_worker: int | None = None,
    retries: int = 0,
    progress: Any = None,
) -> list[Any]:
    """``list(map(func, *iterables))``, in parallel, in input order.

    ``backend``: ``"stdlib"``, ``"cloudpickle"``, ``"dill"`` (or ``"pathos"``),
    ``"thread"``, ``"serial"``, or ``None``/``"auto"`` to read
    ``PICKMAP_BACKEND`` and otherwise probe for the cheapest backend that can
    carry ``func`` and the items. ``workers`` (default: ``PICKMAP_WORKERS`` or
    the usable CPUs), ``chunksize`` (default: automatic), ``timeout`` (seconds
    per item), ``initializer(*initargs)`` (run once in each worker before its
    first item of this call), ``start_method`` (``"fork"``, ``"spawn"``,
    ``"forkserver"``; default ``PICKMAP_START_METHOD`` or see docs).

    The first exception raised by ``func`` is re-raised as itself, with the
    worker's traceback as ``__cause__`` and a note naming the item; remaining
    work is cancelled. With ``return_exceptions=True`` exceptions are returned
    in place of their results instead. ``inner_threads``: BLAS/OpenMP threads
    per worker process (default ``PICKMAP_INNER_THREADS`` or usable CPUs //
    workers; 0 leaves the pools alone).

    ``max_tasks_per_worker`` (or ``PICKMAP_MAX_TASKS_PER_WORKER``): a worker
    process is replaced after running that many items, for leaky C
    extensions. ``retries``: the items of a worker that died (a crash, the
    OOM killer, a lost executor task) run again on another worker, up to that
    many times, then ``WorkerCrashedError`` names them and every attempt's
    exit status; an exception raised by ``func`` is never retried, nor a
    timeout.

    ``progress``: ``True`` (or ``PICKMAP_PROGRESS=1``) shows a tqdm bar on
    stderr counting items; a tqdm bar of yours, or a callable receiving the
    number of newly finished items, works too.

    ``backend`` may also be a :class:`~pickmap.backends.base.Backend` instance
    (options for a backend, e.g. a dask client) or any
    ``concurrent.futures.Executor`` (``ProcessPoolExecutor``, loky's,
    ``mpi4py``'s): chunks become its tasks; pickmap never shuts it down.
    """
    prepared = _prepare(
        "pmap",
        func,
        iterables,
        backend=backend,
        workers=workers,
        chunksize=chunksize,
        timeout=timeout,
        initializer=initializer,
        initargs=initargs,
        start_method=start_method,
        return_exceptions=return_exceptions,
        inner_threads=inner_threads,
        max_tasks_per_worker=max_tasks_per_worker,
        retries=retries,
        progress=progress,
    )
    results: list[Any] = []
    for chunk_results in _run(prepared, ordered=True, eager_errors=True, bounded=False):
        results.extend(chunk_results)
    return results


if TYPE_CHECKING:  # the overloads give the results the callable's return type

    @overload
    def imap(
        func: Callable[[T1], R],
        iterable: Iterable[T1],
        /,
        *,
        ordered: bool = True,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> Iterator[R]: ...
    @overload
    def imap(
        func: Callable[[T1], R],
        iterable: Iterable[T1],
        /,
        *,
        ordered: bool = True,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> Iterator[R | BaseException]: ...
    @overload
    def imap(
        func: Callable[[T1, T2], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        /,
        *,
        ordered: bool = True,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> Iterator[R]: ...
    @overload
    def imap(
        func: Callable[[T1, T2], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        /,
        *,
        ordered: bool = True,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> Iterator[R | BaseException]: ...
    @overload
    def imap(
        func: Callable[[T1, T2, T3], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        iterable3: Iterable[T3],
        /,
        *,
        ordered: bool = True,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> Iterator[R]: ...
    @overload
    def imap(
        func: Callable[[T1, T2, T3], R],
        iterable1: Iterable[T1],
        iterable2: Iterable[T2],
        iterable3: Iterable[T3],
        /,
        *,
        ordered: bool = True,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> Iterator[R | BaseException]: ...
    @overload
    def imap(
        func: Callable[..., R],
        iterable1: Iterable[Any],
        iterable2: Iterable[Any],
        iterable3: Iterable[Any],
        iterable4: Iterable[Any],
        /,
        *more: Iterable[Any],
        ordered: bool = True,
        return_exceptions: Literal[False] = False,
        **options: Unpack[Options],
    ) -> Iterator[R]: ...
    @overload
    def imap(
        func: Callable[..., R],
        iterable1: Iterable[Any],
        iterable2: Iterable[Any],
        iterable3: Iterable[Any],
        iterable4: Iterable[Any],
        /,
        *more: Iterable[Any],
        ordered: bool = True,
        return_exceptions: bool,
        **options: Unpack[Options],
    ) -> Iterator[R | BaseException]: ...


def imap(
    func: Callable[..., Any],
    *iterables: Iterable[Any],
    ordered: bool = True,
    backend: Any = None,
    workers: int | None = None,
    chunksize: int | None = None,
    timeout: float | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: Sequence[Any] = (),
    start_method: str | None = None,
    return_exceptions: bool = False,
    inner_threads: int | None = None,
    max_tasks_per_worker: int | None = None,
    retries: int = 0,
    progress: Any = None,
) -> Iterator[Any]:
    """Like :func:`pmap`, but lazy: results stream as they complete.

    ``ordered=True`` yields in input order; ``ordered=False`` in completion
    order. The input is read lazily, a chunk at a time: at most ``4 * workers``
    chunks are read but not yet consumed (for an input without ``len()``,
    chunks grow adaptively up to 16,384 items), so memory does not grow with
    the input's length and endless generators work. Arguments are
    checked, and the backend chosen, when ``imap`` is called; work starts on
    the first ``next()``. Closing the iterator early cancels what is running.
    """
    prepared = _prepare(
        "imap",
        func,
        iterables,
        backend=backend,
        workers=workers,
        chunksize=chunksize,
        timeout=timeout,
        initializer=initializer,
        initargs=initargs,
        start_method=start_method,
        return_exceptions=return_exceptions,
        inner_threads=inner_threads,
        max_tasks_per_worker=max_tasks_per_worker,
        retries=retries,
        progress=progress,
    )
    return _stream(_run(prepared, ordered=ordered, eager_errors=not ordered, bounded=True))


def explain(func: Callable[..., Any], *iterables: Iterable[Any], backend: Any = None) -> Plan:
    """What :func:`pmap` would do with these arguments, without running anything.

    Returns a :class:`~pickmap.probe.Plan`: ``plan.backend``, ``plan.source``
    and one verdict per backend. It reads the first item of each iterable as a
    sample (an iterator loses that item; pass a list or a sample).
    """
    if not iterables:
        iterables = ((),)
    return _prepare(
        "explain",
        func,
        iterables,
        backend=backend,
        workers=None,
        chunksize=None,
        timeout=None,
        initializer=None,
        initargs=(),
        start_method=None,
        return_exceptions=False,
        explaining=True,
    ).plan
