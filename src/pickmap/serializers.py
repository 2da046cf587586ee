"""How objects become bytes for each process backend, and how the probe tests that.

A :class:`Serializer` is a pair ``dumps``/``loads`` with a name. Workers look
their serializer up by name (:func:`get_serializer`), so only the name crosses
the process boundary at worker start.

- ``stdlib``: the C pickler with a *private* dispatch table that adds a
  copyreg-style reducer for bound methods. The global ``copyreg`` registry and
  ``pickle`` module state of the user's process are never touched.
- ``cloudpickle``: cloudpickle for dumping (by value where needed), the C
  unpickler for loading.
- ``dill``: dill with ``recurse=True``, so a ``__main__`` function carries the
  globals it uses instead of expecting them in the worker's ``__main__``.
- ``identity``: no bytes at all; thread and serial workers share memory.

:func:`main_references` finds the by-reference trap: a pickle that names a
``__main__`` object (``GLOBAL '__main__ f'``) loads in this process but not in
a spawn/forkserver worker, nor in a fork worker started before ``f`` existed.
:func:`copies_locks` finds a pickle that would rebuild a threading lock in the
worker: it loads, but the copy no longer guards anything shared.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import pickletools
import types
from typing import Any, Callable, ClassVar, NamedTuple

__all__ = ("Pickled", "Serializer", "get_serializer", "main_references", "copies_locks")

#: Buffers smaller than this stay in the pickle stream.
OOB_MIN_BYTES = 64 * 1024


class Pickled(NamedTuple):
    """A serialized object: the pickle stream plus its out-of-band buffers."""

    data: Any  # bytes (or any bytes-like object once it has crossed a transport)
    buffers: tuple[Any, ...] = ()  # flat views of the original memory, never copied

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(getattr(b, "nbytes", 0) for b in self.buffers)


def _keep_large_out_of_band(collected: list[Any]) -> Callable[[pickle.PickleBuffer], bool]:
    def callback(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: the pickler copies it in-band
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        collected.append(raw)
        return False

    return callback

_MAIN_MODULES = ("__main__", "__mp_main__")


class _Parts:
    """A write-only file that keeps what it is given: large ``bytes`` pass through uncopied."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data) if not isinstance(data, bytes) else data)
        return len(data)


class PartsReader(io.RawIOBase):
    """Reads a list of byte strings as one stream, without joining them first."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self._index < len(self._parts):
            part = self._parts[self._index]
            take = min(len(view) - filled, len(part) - self._offset)
            view[filled : filled + take] = part[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(part):
                self._index, self._offset = self._index + 1, 0
        return filled


class Serializer:
    """A named ``dumps``/``loads`` pair. ``by_value`` is False for in-memory transports."""

    name: ClassVar[str]
    by_value: ClassVar[bool] = True

    def dumps(self, obj: Any) -> Any:
        raise NotImplementedError

    def loads(self, data: Any) -> Any:
        raise NotImplementedError

    def dump_parts(self, obj: Any) -> list[bytes]:
        """The pickle as a list of pieces; large buffers are not copied (see ``_Parts``)."""
        return [self.dumps(obj)]

    def trial_loads(self, parts: list[bytes]) -> Any:
        """``loads`` for the probe's round trip in the caller's process: no side effects."""
        return self.loads(b"".join(parts))

    def _pickler(self, file: Any, buffer_callback: Any) -> Any:
        return pickle.Pickler(file, protocol=5, buffer_callback=buffer_callback)

    def dump(self, obj: Any) -> Pickled:
        """Protocol 5, large contiguous buffers out of band (uncopied)."""
        buffers: list[Any] = []
        stream = io.BytesIO()
        self._pickler(stream, _keep_large_out_of_band(buffers)).dump(obj)
        return Pickled(stream.getvalue(), tuple(buffers))

    def load(self, pickled: Pickled) -> Any:
        return pickle.loads(pickled.data, buffers=pickled.buffers)

    def trial_load(self, pickled: Pickled) -> Any:
        """The probe's side-effect-free load in the caller, reusing the same buffers."""
        return self.load(pickled)


# --------------------------------------------------------------------------- stdlib
def _attribute_name_of(method: types.MethodType) -> str | None:
    """The attribute under which ``method`` is reachable on its ``__self__``.

    A private method ``__f`` is stored as ``_A__f``; an aliased method under
    its alias. ``None`` when no attribute of the class holds the function.
    """
    func = method.__func__
    owner = method.__self__
    name = func.__name__
    if getattr(getattr(owner, name, None), "__func__", None) is func:
        return name
    klass = owner if isinstance(owner, type) else type(owner)
    for base in klass.__mro__:
        for attr, value in vars(base).items():
            if value is func or getattr(value, "__func__", None) is func:
                return attr
    return None


def _bind(func: Callable[..., Any], owner: Any) -> types.MethodType:
    """Rebuilds a bound method in the worker (``types.MethodType`` has no importable name)."""
    return types.MethodType(func, owner)


def _reduce_bound_method(method: types.MethodType) -> tuple[Any, tuple[Any, ...]]:
    attr = _attribute_name_of(method)
    if attr is not None:
        return getattr, (method.__self__, attr)
    # The function is not on the class (e.g. MethodType(module_func, obj)):
    # rebuild the binding; the function itself must then pickle by reference.
    return _bind, (method.__func__, method.__self__)


class _StdlibPickler(pickle.Pickler):
    # A private table: copyreg's global registry plus our reducers, resolved
    # per pickler, so the user's process-wide pickle behaviour is unchanged.
    dispatch_table = {**copyreg.dispatch_table, types.MethodType: _reduce_bound_method}


class StdlibSerializer(Serializer):
    name = "stdlib"

    def dumps(self, obj: Any) -> bytes:
        buffer = io.BytesIO()
        _StdlibPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return buffer.getvalue()

    loads = staticmethod(pickle.loads)  # type: ignore[assignment]

    def _pickler(self, file: Any, buffer_callback: Any) -> Any:
        return _StdlibPickler(file, protocol=5, buffer_callback=buffer_callback)

    def dump_parts(self, obj: Any) -> list[bytes]:
        sink = _Parts()
        _StdlibPickler(sink, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return sink.parts

    def trial_loads(self, parts: list[bytes]) -> Any:
        return pickle.Unpickler(PartsReader(parts)).load()


# --------------------------------------------------------------------------- cloudpickle / dill
class _UntrackedUnpickler(pickle.Unpickler):
    """Loads cloudpickle output without touching the caller's own classes.

    A by-value class carries a tracker id; cloudpickle resolves it to the
    *original* class in the process that dumped it and re-sets its attributes
    from the pickle, replacing the user's methods with copies. A trial load in
    the caller must not do that, so the skeleton builders get no tracker id.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module.startswith("cloudpickle") and name in ("_make_skeleton_class", "_make_skeleton_enum"):
            return functools.partial(_untracked, found)
        return found


def _untracked(builder: Callable[..., Any], *args: Any) -> Any:
    import inspect

    bound = inspect.signature(builder).bind(*args)
    if "class_tracker_id" in bound.arguments:
        bound.arguments["class_tracker_id"] = None
    return builder(*bound.args, **bound.kwargs)


class CloudpickleSerializer(Serializer):
    name = "cloudpickle"

    def dumps(self, obj: Any) -> bytes:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    loads = staticmethod(pickle.loads)  # type: ignore[assignment]

    def dump_parts(self, obj: Any) -> list[bytes]:
        import cloudpickle

        sink = _Parts()
        cloudpickle.CloudPickler(sink, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return sink.parts

    def trial_loads(self, parts: list[bytes]) -> Any:
        return _UntrackedUnpickler(PartsReader(parts)).load()

    def _pickler(self, file: Any, buffer_callback: Any) -> Any:
        import cloudpickle

        return cloudpickle.CloudPickler(file, protocol=5, buffer_callback=buffer_callback)

    def trial_load(self, pickled: Pickled) -> Any:
        return _UntrackedUnpickler(io.BytesIO(pickled.data), buffers=pickled.buffers).load()


class DillSerializer(Serializer):
    name = "dill"

    def dumps(self, obj: Any) -> bytes:
        import dill

        return dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)

    def loads(self, data: bytes) -> Any:
        import dill

        return dill.loads(data)

    def _pickler(self, file: Any, buffer_callback: Any) -> Any:
        import dill

        return dill.Pickler(file, protocol=5, recurse=True, buffer_callback=buffer_callback)

    def load(self, pickled: Pickled) -> Any:
        import dill

        return dill.Unpickler(io.BytesIO(pickled.data), buffers=pickled.buffers).load()

    def dump_parts(self, obj: Any) -> list[bytes]:
        import dill

        sink = _Parts()
        dill.dump(obj, sink, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
        return sink.parts


class IdentitySerializer(Serializer):
    """Threads and the serial backend pass references: nothing is copied."""

    name = "identity"
    by_value = False

    def dumps(self, obj: Any) -> Any:
        return obj

    def loads(self, data: Any) -> Any:
        return data

    def dump(self, obj: Any) -> Any:
        return obj

    def load(self, pickled: Any) -> Any:
        return pickled

    trial_load = load


_SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "stdlib": StdlibSerializer,
    "cloudpickle": CloudpickleSerializer,
    "dill": DillSerializer,
    "identity": IdentitySerializer,
}


@functools.lru_cache(maxsize=None)
def get_serializer(name: str) -> Serializer:
    """The serializer called ``name`` (workers call this after they start)."""
    return _SERIALIZERS[name]()


# --------------------------------------------------------------------------- the by-reference trap
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


def _globals_in(parts: list[bytes]) -> list[tuple[str, str]]:
    """Every ``(module, name)`` the pickle imports by name (GLOBAL / STACK_GLOBAL)."""
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # recent pushes, strings kept, anything else as None
    for opcode, arg, _pos in pickletools.genops(b"".join(parts)):
        op = opcode.name
        if op in _STRING_OPS:
            pushed.append(arg)
        elif op == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif op == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
            pushed.append(None)
        elif op == "STACK_GLOBAL":
            if len(pushed) >= 2 and isinstance(pushed[-2], str):
                found.append((pushed[-2], str(pushed[-1])))
            pushed.append(None)
        elif opcode.stack_after:
            pushed.append(None)
        if len(pushed) > 64:
            del pushed[:-8]
    return found


# Picklers write opcodes in frames of about 64 KiB and hand the contents of
# larger buffers (a 50 MB ``bytes``) to ``write`` on their own: a part above this size
# is data, never an opcode, so the name checks below need not scan it.
_RAW_PART = 256 * 1024


def _mentions(parts: list[bytes], needles: tuple[str, ...]) -> bool:
    return any(n.encode() in part for part in parts if len(part) <= _RAW_PART for n in needles)


def main_references(parts: list[bytes]) -> list[str]:
    """Names of ``__main__`` objects that the pickle in ``parts`` refers to by reference.

    Cheap when there are none: the opcode walk only runs when the opcode
    frames mention ``__main__`` at all.
    """
    if not _mentions(parts, _MAIN_MODULES):
        return []
    return [name for module, name in _globals_in(parts) if module in _MAIN_MODULES]


_LOCK_BUILDERS = ("_create_lock", "_create_rlock")


def copies_locks(parts: list[bytes]) -> bool:
    """True when loading the pickle would build a fresh threading lock (dill does).

    A lock copied into another process no longer excludes anything shared
    with this one — and a copy of a held lock is held forever there.
    """
    if not _mentions(parts, _LOCK_BUILDERS):
        return False
    return any(name in _LOCK_BUILDERS for _, name in _globals_in(parts))
