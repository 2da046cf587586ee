"""Ship once across calls: a callable's large buffers stay in shared memory while its object is unchanged.

Three ``pmap(m.predict, ...)`` calls on the same ``m`` holding 400 MB write
the 400 MB to shared memory once. The rule, checked at every call:

- the object is the same object (weakly keyed: a bound method by its
  ``__self__``, anything else by itself), and
- its pickle stream is byte-for-byte the one shipped before (any attribute
  that is not a large buffer — a number, a string, a small list — changed
  means a new stream), and
- every large buffer holds the same bytes as the shared copy (compared in
  full: an in-place ``m.w[0] = 5`` is seen; comparing 400 MB costs tens of
  milliseconds, copying it costs far more).

Anything else is shipped anew and the old copy removed. Objects that cannot
be weakly referenced are shipped for this call only.
"""

from __future__ import annotations

import os
import sys
import types
import weakref

from . import _logs, _shm, _wire
from .serializers import Pickled

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = ("ship",)

_COMPARE_STEP = 16 << 20


class _Entry(NamedTuple):
    data: bytes
    shared: Pickled  # the payload with segments
    finalizer: Any  # removes the segment when the object dies; detached when the entry is replaced


_SHIPPED: weakref.WeakKeyDictionary[Any, dict[Any, _Entry]] = weakref.WeakKeyDictionary()


def _same_as_segment(segment: _shm.Segment, new: memoryview) -> bool:
    """Whether the segment holds ``new``'s bytes, read a slice at a time: never mapped,
    so the comparison neither holds a descriptor nor counts 400 MB in this process's RSS."""
    if segment.size != new.nbytes:
        return False
    numpy = sys.modules.get("numpy")  # a large buffer almost always comes from numpy
    step = min(_COMPARE_STEP, segment.size)
    try:
        return _same_bytes(segment, new, numpy, step)
    except OSError:
        return False  # gone (swept, or /dev/shm cleaned by hand): ship anew


def _same_bytes(segment: _shm.Segment, new: memoryview, numpy: Any, step: int) -> bool:
    scratch = bytearray(step)
    with open(segment.path, "rb") as file:
        for start in range(0, segment.size, step):
            size = min(step, segment.size - start)
            window = memoryview(scratch)[:size]
            if os.preadv(file.fileno(), [window], segment.offset + start) != size:
                return False
            theirs = new[start : start + size]
            if numpy is not None:
                same = numpy.array_equal(
                    numpy.frombuffer(window, numpy.uint8), numpy.frombuffer(theirs, numpy.uint8)
                )
            else:
                same = window == theirs
            if not same:
                return False
    return True


def _owner(func: Any) -> tuple[Any, Any]:
    if isinstance(func, types.MethodType):
        return func.__self__, func.__func__
    return func, None


def _unchanged(entry: _Entry, payload: Pickled) -> bool:
    if bytes(entry.data) != bytes(payload.data) or len(entry.shared.buffers) != len(
        payload.buffers
    ):
        return False
    for old, new in zip(entry.shared.buffers, payload.buffers, strict=False):
        if isinstance(old, _shm.Segment):
            if not isinstance(new, memoryview) or not _same_as_segment(old, new.cast("B")):
                return False
        elif bytes(old) != bytes(new):
            return False
    return True


def _forget(entry: _Entry) -> None:
    entry.finalizer.detach()
    _shm.unlink(_wire.segment_paths(entry.shared))


def ship(func: Any, payload: Any) -> tuple[Any, list[str]]:
    """``(payload to send, segment paths to remove when the call ends)``."""
    if not _wire.has_large(payload):
        return payload, []  # small: the pipe carries it
    owner, key = _owner(func)
    try:
        entries = _SHIPPED.setdefault(owner, {})
    except TypeError:  # not weakly referenceable, or not hashable: shared for this call only
        shared = _wire.share(payload, transient=False, writer="c")
        return shared, _wire.segment_paths(shared)
    entry = entries.get(key)
    if entry is not None and _unchanged(entry, payload):
        _logs.debug(
            "shared memory: %s is unchanged, its %d bytes are not sent again",
            key or owner,
            payload.nbytes,
        )
        return entry.shared, []
    shared = _wire.share(payload, transient=False, writer="c")
    if shared is payload:
        return payload, []  # no shared memory to be had: the pipe carries it
    if entry is not None:
        _forget(entry)
    paths = _wire.segment_paths(shared)
    _logs.debug(
        "shared memory: %d bytes of the callable written once to %s",
        payload.nbytes,
        ", ".join(paths),
    )
    entries[key] = _Entry(bytes(payload.data), shared, weakref.finalize(owner, _shm.unlink, paths))
    return shared, []
