"""The capability probe: which backend can carry this callable and these items?

For each backend on the ladder (``registry.LADDER``: stdlib, cloudpickle,
dill, thread) the probe makes a real round trip — ``dump`` then
``trial_load`` — of the callable and of a sample of the items, checking the
by-reference trap (``serializers.main_references``) in between: a pickle that
names a ``__main__`` object, or imports the ``__main__`` module itself, loads
here but not in a spawn/forkserver worker, nor in a warm worker forked before
the object was defined. A pickle that would copy a threading lock into a
worker (dill can) is refused too: the copy guards nothing shared, so objects
holding locks go to threads. The first backend that passes wins.

Cost: the winning trial's pickle is what is shipped to workers, so a 50 MB
callable is serialized once per call. Large buffers (arrays) stay out of band
as views of the caller's memory and the trial loads from those same views, so
probing costs no copy of them. Verdicts are cached per callable (weakly,
so the cache never keeps a closure alive); a cached verdict is re-checked by
the one serialization the call needs anyway, and a verdict that no longer
holds (the object changed) sends the probe back down the ladder.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Sequence

from .backends.base import Backend
from .registry import LADDER, available_backends, get_backend, is_available
from .serializers import _MAIN_MODULES, Pickled, copies_locks, get_serializer, main_references

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = ("Plan", "Verdict", "capable_backends", "choose", "try_backend")


class Verdict(NamedTuple):
    """Whether one backend can carry the call, and why in one line."""

    backend: str
    ok: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


class Plan(NamedTuple):
    """What ``pmap`` would do: the chosen backend, why, and every verdict the probe made."""

    backend: str
    source: str  # "argument", "environment", "probe" or "nested"
    workers: int
    start_method: str | None
    verdicts: tuple[Verdict, ...] = ()
    runs_on: str | None = None  # Backend.describe(): a cluster's address and size

    def verdict(self, backend: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.backend == backend), None)

    def __str__(self) -> str:
        method = f", start method {self.start_method}" if self.start_method else ""
        workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        lines = [f"backend: {self.backend} (from {self.source}; {workers}{method})"]
        if self.runs_on:
            lines.append(f"  runs on {self.runs_on}")
        chosen = self.verdict(self.backend)
        if chosen is not None and not chosen.ok:
            lines.append(
                f"  pmap would raise SerializationError: {self.backend} cannot carry this call"
            )
        width = max((len(v.backend) for v in self.verdicts), default=0)
        for v in self.verdicts:
            mark = (
                ("->" if v.ok else "!>") if v.backend == self.backend else ("ok" if v.ok else "no")
            )
            lines.append(f"  {mark:2} {v.backend:<{width}}  {v.reason}")
        return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# Streams already scanned for traps, and what was found: a warm call dumps the same
# callable to the same bytes every time, and the opcode walk is most of such a
# call's own CPU when the stream mentions __main__ (cloudpickle's by-value functions do).
_SCANNED: dict[bytes, tuple[list[str], bool]] = {}
_SCANNED_KEPT = 64
_SCANNED_MAX_BYTES = 1 << 16


def _scan(data: bytes) -> tuple[list[str], bool]:
    """``(main_references(data), copies_locks(data))``, remembered for small streams."""
    found = _SCANNED.get(data)
    if found is None:
        found = (main_references(data), copies_locks(data))
        if len(data) <= _SCANNED_MAX_BYTES:
            while len(_SCANNED) >= _SCANNED_KEPT:
                _SCANNED.pop(next(iter(_SCANNED), b""), None)
            _SCANNED[data] = found
    return found


def _trap(data: bytes, what: str) -> str | None:
    """Why the pickle stream ``data`` would load here but be wrong in a worker, or None."""
    # first: a pickle of __main__ itself holds anything, locks too
    refs, locks = _scan(data)
    if refs and refs[0] in _MAIN_MODULES:
        return (
            f"{what} imports the {refs[0]} module itself, which in a worker process is the worker's "
            f"own main module, not this one"
        )
    if refs:
        return (
            f"{what} refers to {refs[0]} by name, which a worker process cannot import "
            f"(spawn/forkserver, or a worker started before it was defined)"
        )
    if locks:
        return (
            f"{what} holds a threading lock; a copy in a worker process would no longer "
            f"lock anything shared with this process (threads share it)"
        )
    return None


def _round_trip(
    serializer_name: str, obj: Any, what: str, *, load: bool = True
) -> tuple[str | None, Any]:
    """``(failure reason or None, Pickled)`` for one object; ``load=False`` skips the load half.

    The traps are checked before the trial load: they need only the stream,
    and loading a pickle that imports ``__main__`` can write into this
    process's ``__main__`` (dill carries the module as "import it, then
    overwrite its namespace"). The trial load reuses the dump's buffers, so
    probing a 400 MB ``self`` copies none of it.
    """
    serializer = get_serializer(serializer_name)
    if not serializer.by_value:
        return None, obj
    try:
        pickled = serializer.dump(obj)
    except Exception as exc:
        return f"{what}: {_first_line(exc)}", None
    reason = _trap(pickled.data, what)
    if reason is not None:
        return reason, None
    if load:
        try:
            serializer.trial_load(pickled)
        except Exception as exc:
            return f"{what}: {_first_line(exc)}", None
    return None, pickled


def _size(pickled: Pickled) -> str:
    out_of_band = pickled.nbytes - len(pickled.data)
    return (
        f"{pickled.nbytes:,} bytes, {out_of_band:,} out of band"
        if out_of_band
        else f"{pickled.nbytes:,} bytes"
    )


def try_backend(
    name: str | Backend,
    func: Callable[..., Any],
    sample: Sequence[Any],
    *,
    setup: Any = None,
    load: bool = True,
) -> tuple[Verdict, Any, Any]:
    """One backend's verdict (by name, or a backend instance), with the callable's and
    the ``setup`` (initializer, initargs) :class:`~pickmap.serializers.Pickled` when it
    passes (the objects themselves for in-memory backends)."""
    backend = get_backend(name) if isinstance(name, str) else name
    name = backend.name
    serializer_name = backend.serializer
    reason, payload = _round_trip(serializer_name, func, "callable", load=load)
    init_payload = None
    if reason is None and setup is not None:
        reason, init_payload = _round_trip(serializer_name, setup, "initializer", load=load)
    if reason is None:
        for item in sample:
            item_reason, _ = _round_trip(serializer_name, item, "item")
            if item_reason is not None:
                reason = item_reason
                break
    if reason is not None:
        return Verdict(name, False, reason), None, None
    if not get_serializer(serializer_name).by_value:
        return (
            Verdict(name, True, "shares memory with the caller: nothing is serialized"),
            payload,
            init_payload,
        )
    return Verdict(name, True, f"round trip ok ({_size(payload)})"), payload, init_payload


# --------------------------------------------------------------------------- verdict cache
# object (weakly) -> {(function, item types) -> backend name}. A bound method is
# a fresh object on every attribute access, so it is keyed by the object it is
# bound to (and its function): one instance's verdict never sticks to another.
_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()


def _cache_slot(func: Any, sample: Sequence[Any]) -> tuple[Any, Any]:
    item_types = tuple(type(item) for item in sample)
    if isinstance(func, types.MethodType):
        return func.__self__, (func.__func__, item_types)
    return func, (None, item_types)


def _cached(func: Any, sample: Sequence[Any]) -> str | None:
    owner, key = _cache_slot(func, sample)
    try:
        return _CACHE.get(owner, {}).get(key)
    except TypeError:  # not weak-referenceable or not hashable: no caching
        return None


def _remember(func: Any, sample: Sequence[Any], backend: str) -> None:
    owner, key = _cache_slot(func, sample)
    try:
        _CACHE.setdefault(owner, {})[key] = backend
    except TypeError:
        pass


FREE_THREADED_REASON = (
    "the GIL is disabled (free-threaded Python): threads run Python code in parallel, "
    "and nothing is serialized"
)


def free_threaded() -> bool:
    """Whether this interpreter runs without the GIL (``sys._is_gil_enabled()`` false)."""
    import sys

    check = getattr(sys, "_is_gil_enabled", None)
    return check is not None and not check()


def choose(
    func: Callable[..., Any], sample: Sequence[Any], setup: Any = None, *, use_cache: bool = True
) -> tuple[str, Any, Any, tuple[Verdict, ...]]:
    """Walk the ladder: ``(backend, callable Pickled, setup Pickled, verdicts so far)``.

    Calls with an initializer are neither looked up nor remembered: the
    verdict then depends on the initializer too.
    """
    if free_threaded():
        # Threads run Python code in parallel here, and nothing has to be serialized.
        return "thread", func, setup, (Verdict("thread", True, FREE_THREADED_REASON),)
    use_cache = use_cache and setup is None
    cached = _cached(func, sample) if use_cache else None
    if cached is not None:
        # Trusted: only the dumps the call needs anyway, no second loads.
        verdict, payload, init_payload = try_backend(cached, func, sample, setup=setup, load=False)
        if verdict.ok:
            return cached, payload, init_payload, (verdict,)
    verdicts = []
    for name in LADDER:
        # Asked rung by rung: the first rung (stdlib) needs no package, so a call it
        # carries looks for none (importlib.util and a sys.path scan per package).
        if not is_available(name):
            continue
        verdict, payload, init_payload = try_backend(name, func, sample, setup=setup)
        verdicts.append(verdict)
        if verdict.ok:
            if use_cache:
                _remember(func, sample, name)
            return name, payload, init_payload, tuple(verdicts)
    raise AssertionError("the thread backend carries everything")  # pragma: no cover


def all_verdicts(
    func: Callable[..., Any], sample: Sequence[Any], setup: Any = None
) -> tuple[Verdict, ...]:
    """Every installed ladder backend's verdict (for ``explain`` and error messages)."""
    installed = available_backends()
    verdicts = [
        try_backend(name, func, sample, setup=setup)[0] for name in LADDER if name in installed
    ]
    if free_threaded():
        verdicts = [
            Verdict("thread", True, FREE_THREADED_REASON) if v.backend == "thread" else v
            for v in verdicts
        ]
    return tuple(verdicts)


def capable_backends(func: Callable[..., Any], sample: Sequence[Any]) -> list[str]:
    return [v.backend for v in all_verdicts(func, sample) if v.ok]
