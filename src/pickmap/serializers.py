"""How objects become bytes for each process backend, and how the probe tests that.

A :class:`Serializer` has a name; workers look theirs up by name
(:func:`get_serializer`), so only the name crosses the process boundary at
worker start. Two pairs of methods:

- ``dump``/``load`` speak :class:`Pickled`: the pickle stream (protocol 5)
  plus its *out-of-band* buffers. Every contiguous buffer of at least
  :data:`OOB_MIN_BYTES` that an object exposes through ``PickleBuffer``
  (numpy arrays, C- or F-ordered; pandas blocks; bytearray; and large
  ``bytes``, see below) stays out of the stream as a flat view of the
  *original* memory: dumping copies nothing, and ``trial_load`` (the probe's
  round trip in the caller) loads from those same views, so a 400 MB ``self``
  costs no copy to probe.

Serializers:

- ``stdlib``: the C pickler with a *private* dispatch table (copyreg's table,
  read afresh for every pickler, plus a reducer for bound methods). The
  global ``copyreg`` registry and ``pickle`` module state of the user's
  process are never touched.
- ``cloudpickle``: cloudpickle for dumping (by value where needed), the C
  unpickler for loading.
- ``dill``: dill with ``recurse=True``, so a ``__main__`` function carries the
  globals it uses instead of expecting them in the worker's ``__main__``; a
  class it carries by value keeps one identity per process across pickles
  (:func:`_tracked_class`).
- ``identity``: no bytes at all; thread and serial workers share memory.

Large ``bytes``/``bytearray``: the C pickler writes these itself before it
consults any dispatch table or ``reducer_override``, so no reducer can turn
them into a ``PickleBuffer``; only ``persistent_id`` sees them. Calling a
Python ``persistent_id`` for every object makes small-object pickling 2-4x
slower, so ``dump`` runs it only in a second pass, when the first (fast) pass
saw one written in band (:class:`_StreamSink`). They travel as the persistent
id ``(bytes or bytearray, PickleBuffer)`` and are rebuilt by
``persistent_load``: one copy on load (none for ``bytes`` when the buffer
handed to ``load`` is a whole ``bytes`` object), none in the probe's trial.

:func:`main_references` finds the by-reference trap: a pickle that names a
``__main__`` object (``GLOBAL '__main__ f'``), or imports the ``__main__``
module itself, loads in this process but not in a spawn/forkserver worker,
nor in a fork worker started before ``f`` existed. :func:`copies_locks` finds
a pickle that would rebuild a threading lock in the worker: it loads, but the
copy no longer guards anything shared. Both read only the pickle stream:
out-of-band buffers are raw data, never opcodes.
"""

from __future__ import annotations

import _pickle as pickle  # pickle.py's C half: a worker starts without pickle.py (re, enum)
import copyreg
import functools
import io
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, ClassVar, NamedTuple
else:
    from ._records import NamedTuple

__all__ = (
    "OOB_MIN_BYTES",
    "Pickled",
    "Serializer",
    "copies_locks",
    "get_serializer",
    "main_references",
)

_MAIN_MODULES = ("__main__", "__mp_main__")
_PROTOCOL = 5  # the first with out-of-band buffers (NEXT_BUFFER); every supported Python has it

#: Buffers smaller than this stay in band: below it, a separate buffer costs
#: more (a frame, a mapping) than copying it into the stream.
OOB_MIN_BYTES = 64 * 1024


class Pickled(NamedTuple):
    """A serialized object: the pickle stream plus its out-of-band buffers."""

    data: bytes  # the pickle stream (opcodes + small in-band data)
    # Out-of-band buffers, each a flat (1-D, format 'B') view of the ORIGINAL memory, never copied.
    buffers: tuple[memoryview, ...] = ()

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(buffer.nbytes for buffer in self.buffers)


class Serializer:
    """A named serializer. ``by_value`` is False for in-memory transports."""

    name: ClassVar[str]
    by_value: ClassVar[bool] = True

    def dump(self, obj: Any) -> Pickled:
        raise NotImplementedError

    def load(self, pickled: Pickled) -> Any:
        raise NotImplementedError

    def trial_load(self, pickled: Pickled) -> Any:
        """``load`` for the probe's round trip in the caller's process: no side effects,
        and no copy of the buffers (the loaded object's arrays are read-only views of the
        original memory)."""
        return self.load(pickled)


# --------------------------------------------------------------------------- out-of-band plumbing
class _BufferCollector:
    """A ``buffer_callback``: keeps large contiguous buffers out of band, uncopied."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: in band, where pickle itself reports it
            return True
        if view.nbytes < OOB_MIN_BYTES:
            view.release()
            return True  # true means "in band"
        self.buffers.append(view)
        return False


def _announces(previous: Any, size: int) -> bool:
    """True when ``previous`` ends with the opcode that introduces ``size`` bytes of
    ``bytes`` (BINBYTES, BINBYTES8) or ``bytearray`` (BYTEARRAY8) data."""
    tail = bytes(memoryview(previous)[-9:])
    return tail[-5:] == b"B" + size.to_bytes(4, "little") or tail in (
        b"\x8e" + size.to_bytes(8, "little"),
        b"\x96" + size.to_bytes(8, "little"),
    )


class _StreamSink:
    """The C pickler's file: keeps the stream's pieces, and notices a large
    ``bytes``/``bytearray`` written in band.

    The C pickler hands a payload of 64 KiB or more to ``write`` as the
    original object, right after a write that ends with the opcode announcing
    it; frames never look like that.
    """

    __slots__ = ("large_bytes_in_band", "parts")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.large_bytes_in_band = False

    def write(self, chunk: Any) -> None:
        kind = type(chunk)
        if (
            (kind is bytes or kind is bytearray)
            and len(chunk) >= OOB_MIN_BYTES
            and self.parts
            and _announces(self.parts[-1], len(chunk))
        ):
            self.large_bytes_in_band = True
        self.parts.append(chunk)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def _large_bytes_id(obj: Any) -> Any:
    """The persistent id of a ``bytes``/``bytearray`` worth carrying out of band, else None."""
    kind = type(obj)
    if (kind is bytes or kind is bytearray) and len(obj) >= OOB_MIN_BYTES:
        return (kind, pickle.PickleBuffer(obj))
    return None


def _bytes_from_buffer(pid: Any, *, reuse_original: bool) -> Any:
    """Rebuilds a large ``bytes``/``bytearray`` from its persistent id.

    A ``bytes`` whose buffer is a whole ``bytes`` object is that object (it is
    immutable, so sharing it is safe). ``reuse_original`` (the probe's trial,
    whose buffers are views of the caller's own objects) returns the original
    ``bytearray`` too instead of copying it.
    """
    if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] in (bytes, bytearray)):
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
    kind, buffer = pid
    view = memoryview(buffer)
    base = view.obj
    if (
        isinstance(base, (bytes, bytearray))
        and type(base) is kind
        and len(base) == view.nbytes
        and (kind is bytes or reuse_original)
    ):
        return base
    return kind(view)


class _Unpickler(pickle.Unpickler):
    """The C unpickler, plus the persistent ids ``dump`` writes for large bytes."""

    reuse_original = False

    def persistent_load(self, pid: Any) -> Any:
        return _bytes_from_buffer(pid, reuse_original=self.reuse_original)


class _TrialUnpickler(_Unpickler):
    reuse_original = True


def _read_only(buffers: tuple[memoryview, ...]) -> tuple[memoryview, ...]:
    # The trial loads views of the caller's own memory: read-only, so nothing a
    # __setstate__ does while probing can write into the caller's arrays.
    return tuple(buffer.toreadonly() for buffer in buffers)


def _load_with(unpickler: type[pickle.Unpickler], pickled: Pickled) -> Any:
    return unpickler(io.BytesIO(pickled.data), buffers=pickled.buffers).load()


def _dump_two_pass(fast: Callable[..., Any], with_bytes: Callable[..., Any], obj: Any) -> Pickled:
    """Dumps with the C pickler class ``fast``; again with ``with_bytes`` (the
    same plus ``persistent_id``) only if the first pass wrote large bytes in band."""
    sink, collector = _StreamSink(), _BufferCollector()
    fast(sink, protocol=_PROTOCOL, buffer_callback=collector).dump(obj)
    if sink.large_bytes_in_band:
        sink, collector = _StreamSink(), _BufferCollector()
        with_bytes(sink, protocol=_PROTOCOL, buffer_callback=collector).dump(obj)
    return Pickled(sink.getvalue(), tuple(collector.buffers))


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


_STDLIB_REDUCERS: dict[type, Callable[[Any], Any]] = {types.MethodType: _reduce_bound_method}


class _StdlibPickler(pickle.Pickler):
    @property
    def dispatch_table(self) -> dict[type, Callable[[Any], Any]]:  # type: ignore[override]
        # Read once by each pickler as it is made: copyreg's table as it is
        # *now* (numpy registers its ufunc reducer when imported, maybe after
        # pickmap), plus ours, in a fresh dict, so the user's process-wide
        # pickle behaviour is never changed.
        return {**copyreg.dispatch_table, **_STDLIB_REDUCERS}


class _StdlibBytesPickler(_StdlibPickler):
    def persistent_id(self, obj: Any) -> Any:
        return _large_bytes_id(obj)


class StdlibSerializer(Serializer):
    name = "stdlib"

    def dump(self, obj: Any) -> Pickled:
        return _dump_two_pass(_StdlibPickler, _StdlibBytesPickler, obj)

    def load(self, pickled: Pickled) -> Any:
        if not pickled.buffers:  # persistent ids always come with a buffer
            return pickle.loads(pickled.data)
        return _load_with(_Unpickler, pickled)

    def trial_load(self, pickled: Pickled) -> Any:
        return _load_with(_TrialUnpickler, pickled._replace(buffers=_read_only(pickled.buffers)))


# --------------------------------------------------------------------------- cloudpickle
class _UntrackedUnpickler(_TrialUnpickler):
    """Loads cloudpickle output without touching the caller's own classes.

    A by-value class carries a tracker id; cloudpickle resolves it to the
    *original* class in the process that dumped it and re-sets its attributes
    from the pickle, replacing the user's methods with copies. A trial load in
    the caller must not do that, so the skeleton builders get no tracker id.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module.startswith("cloudpickle") and name in (
            "_make_skeleton_class",
            "_make_skeleton_enum",
        ):
            return functools.partial(_untracked, found)
        return found


def _untracked(builder: Callable[..., Any], *args: Any) -> Any:
    import inspect

    bound = inspect.signature(builder).bind(*args)
    if "class_tracker_id" in bound.arguments:
        bound.arguments["class_tracker_id"] = None
    return builder(*bound.args, **bound.kwargs)


@functools.cache
def _cloudpicklers() -> tuple[type, type]:
    """``(CloudPickler, the same with persistent_id)``; cloudpickle is imported on first use."""
    import cloudpickle

    class _CloudBytesPickler(cloudpickle.CloudPickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> Any:
            return _large_bytes_id(obj)

    return cloudpickle.CloudPickler, _CloudBytesPickler


class CloudpickleSerializer(Serializer):
    name = "cloudpickle"

    def dump(self, obj: Any) -> Pickled:
        return _dump_two_pass(*_cloudpicklers(), obj)

    def load(self, pickled: Pickled) -> Any:
        if not pickled.buffers:
            return pickle.loads(pickled.data)
        return _load_with(_Unpickler, pickled)

    def trial_load(self, pickled: Pickled) -> Any:
        return _load_with(
            _UntrackedUnpickler, pickled._replace(buffers=_read_only(pickled.buffers))
        )


# --------------------------------------------------------------------------- dill
class _DispatchWithout:
    """dill's dispatch table minus one type (the exact ``numpy.ndarray``).

    dill saves every ndarray through ``ndarray.__reduce__()`` (protocol 2: the
    data as in-band bytes); without its entry the pickler uses
    ``__reduce_ex__(5)``, numpy's ``PickleBuffer`` path. Subclasses (memmap,
    matrix) keep dill's handling, which also carries their ``__dict__``.
    """

    __slots__ = ("_skipped", "_table")

    def __init__(self, table: Any, skipped: type) -> None:
        self._table = table
        self._skipped = skipped

    def get(self, kind: type, default: Any = None) -> Any:
        return default if kind is self._skipped else self._table.get(kind, default)


# dill pickles a class that cannot be imported by value, and each pickle
# rebuilds it: the callable and the items travel in separate pickles, so one
# class would become two in the worker (``isinstance`` fails), and a returned
# instance would not be of the caller's class. As cloudpickle's class tracker
# does, a by-value class gets an id the first time this process dumps or
# loads it, and loading an id this process knows returns the class it knows:
# in the worker the callable's and the items' class are one object, and
# results come back as instances of the caller's original class.
_CLASS_IDS: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()
_CLASSES_BY_ID: weakref.WeakValueDictionary[str, type] = weakref.WeakValueDictionary()
_CLASS_LOCK = threading.Lock()


def _class_id(cls: type) -> str:
    with _CLASS_LOCK:
        class_id = _CLASS_IDS.get(cls)
        if class_id is None:
            class_id = os.urandom(16).hex()  # as random as uuid4, without importing uuid
            _CLASS_IDS[cls] = class_id
            _CLASSES_BY_ID[class_id] = cls
        return class_id


def _tracked_class(class_id: str, build: Callable[..., type], args: tuple[Any, ...]) -> type:
    """Load side of a by-value class: the class this process knows under ``class_id``, else the one ``build`` makes.

    It is built even when known, so the probe's trial load in the caller
    still proves the class can be rebuilt; the copy is then dropped.
    """
    built = build(*args)
    with _CLASS_LOCK:
        known = _CLASSES_BY_ID.get(class_id)
        if known is not None:
            return known
        _CLASSES_BY_ID[class_id] = built
        _CLASS_IDS[built] = class_id
        return built


@functools.cache
def _dill_classes() -> tuple[type, type, type]:
    """``(pickler, unpickler, trial unpickler)``; dill is imported on first use."""
    import dill
    from dill import _dill

    class_builders = tuple(
        builder
        for builder in (
            getattr(_dill, name, None)
            for name in ("_create_type", "new_class", "_create_namedtuple")
        )
        if builder is not None
    )

    class _DillPickler(dill.Pickler):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # no numpy loaded: no arrays
            ndarray = getattr(sys.modules.get("numpy"), "ndarray", None)
            if ndarray is not None:
                self.dispatch = _DispatchWithout(dill.Pickler.dispatch, ndarray)

        # dill's pickler is the pure-Python one, where persistent_id is a small
        # share of the cost: always on, no second pass.
        def persistent_id(self, obj: Any) -> Any:
            return _large_bytes_id(obj)

        def save_reduce(
            self, func: Any, args: Any, *rest: Any, obj: Any = None, **kwargs: Any
        ) -> None:
            # dill rebuilds a by-value class with one of these builders: wrap the
            # call so that the loading process resolves the class by its id.
            if func in class_builders and isinstance(obj, type):
                func, args = _tracked_class, (_class_id(obj), func, tuple(args))
            super().save_reduce(func, args, *rest, obj=obj, **kwargs)

    class _DillUnpickler(dill.Unpickler):  # type: ignore[misc]
        reuse_original = False

        def persistent_load(self, pid: Any) -> Any:
            return _bytes_from_buffer(pid, reuse_original=self.reuse_original)

    class _DillTrialUnpickler(_DillUnpickler):
        reuse_original = True

    return _DillPickler, _DillUnpickler, _DillTrialUnpickler


class DillSerializer(Serializer):
    name = "dill"

    def dump(self, obj: Any) -> Pickled:
        pickler_class = _dill_classes()[0]
        sink, collector = io.BytesIO(), _BufferCollector()
        try:
            pickler = pickler_class(sink, _PROTOCOL, recurse=True, buffer_callback=collector)
        except TypeError:
            # A dill whose Pickler does not pass buffer_callback on (older than
            # 0.3.6): every buffer in band, the persistent ids' too.
            pickler = pickler_class(sink, _PROTOCOL, recurse=True)
        pickler.dump(obj)
        return Pickled(sink.getvalue(), tuple(collector.buffers))

    def load(self, pickled: Pickled) -> Any:
        return _load_with(_dill_classes()[1], pickled)

    def trial_load(self, pickled: Pickled) -> Any:
        return _load_with(_dill_classes()[2], pickled._replace(buffers=_read_only(pickled.buffers)))


# --------------------------------------------------------------------------- identity
class IdentitySerializer(Serializer):
    """Threads and the serial backend pass references: nothing is copied."""

    name = "identity"
    by_value = False

    def dump(self, obj: Any) -> Any:
        return obj

    def load(self, pickled: Any) -> Any:
        return pickled


_SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "stdlib": StdlibSerializer,
    "cloudpickle": CloudpickleSerializer,
    "dill": DillSerializer,
    "identity": IdentitySerializer,
}


@functools.cache
def get_serializer(name: str) -> Serializer:
    """The serializer called ``name`` (workers call this after they start)."""
    return _SERIALIZERS[name]()


# --------------------------------------------------------------------------- the by-reference trap
_STRING_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
    }
)
# Functions that pickles call to import a module by name: cloudpickle's
# by-reference modules, dill's modules (by reference, or by value as
# "import it, then overwrite its namespace"), and the plain ways.
_IMPORTERS = frozenset(
    {
        ("cloudpickle.cloudpickle", "subimport"),
        ("cloudpickle.cloudpickle_fast", "subimport"),
        ("dill._dill", "_import_module"),
        ("dill.dill", "_import_module"),
        ("importlib", "import_module"),
        ("builtins", "__import__"),
    }
)
_TUPLE_SIZES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# dill's reference to the unpickling process's own ``__main__.__dict__``.
_MAIN_DICT = ("__builtin__", "__main__")


class _Importer:
    """Stands in, on the modelled stack, for a global that imports modules."""


_IMPORTER = _Importer()


class _Names(NamedTuple):
    globals: list[tuple[str, str]]  # every (module, name) imported by GLOBAL / STACK_GLOBAL
    modules: list[str]  # every module a pickled call to an importer imports


def _names_in(data: bytes) -> _Names:
    """The globals and modules the pickle stream ``data`` imports by name."""
    found = _Names([], [])
    memo: dict[int, Any] = {}
    pushed: list[
        Any
    ] = []  # recent pushes: strings and the importer marker kept, anything else None
    import pickletools  # only when a pickle mentions __main__ or a lock builder

    for opcode, arg, _pos in pickletools.genops(data):
        op = opcode.name
        if op in _STRING_OPS:
            pushed.append(arg)
        elif op == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg or 0)] = pushed[-1] if pushed else None  # these opcodes always carry one
        elif op in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg or 0)))
        elif op == "GLOBAL" or op == "STACK_GLOBAL":
            if op == "GLOBAL":
                module, _, name = str(arg).partition(" ")
            elif len(pushed) >= 2 and isinstance(pushed[-2], str):
                module, name = pushed[-2], str(pushed[-1])
            else:
                module = name = ""
            if module:
                found.globals.append((module, name))
            pushed.append(_IMPORTER if (module, name) in _IMPORTERS else None)
        elif op in _TUPLE_SIZES:
            size = _TUPLE_SIZES[op]
            # importer, then the args tuple's first item: the module's name
            if (
                len(pushed) > size
                and pushed[-size - 1] is _IMPORTER
                and isinstance(pushed[-size], str)
            ):
                found.modules.append(pushed[-size])
            pushed.append(None)
        elif opcode.stack_after:
            pushed.append(None)
        if len(pushed) > 64:
            del pushed[:-8]
    return found


def _mentions(data: bytes, needles: tuple[str, ...]) -> bool:
    return any(needle.encode() in data for needle in needles)


def main_references(data: bytes) -> list[str]:
    """What of ``__main__`` the pickle stream ``data`` refers to by name, e.g.
    ``["__main__.f"]``; ``"__main__"`` itself when it imports the module.

    In a worker, ``__main__`` is the worker's own main module, not the
    caller's. Cheap when there are none: the opcode walk only runs when the
    stream mentions ``__main__`` at all.
    """
    if not _mentions(data, _MAIN_MODULES):
        return []
    names = _names_in(data)
    found = [f"{module}.{name}" for module, name in names.globals if module in _MAIN_MODULES]
    found += ["__main__.__dict__" for ref in names.globals if ref == _MAIN_DICT]
    found += [module for module in names.modules if module in _MAIN_MODULES]
    return found


_LOCK_BUILDERS = ("_create_lock", "_create_rlock")


def copies_locks(data: bytes) -> bool:
    """True when loading the pickle stream ``data`` would build a fresh threading lock (dill does).

    A lock copied into another process no longer excludes anything shared
    with this one — and a copy of a held lock is held forever there.
    """
    if not _mentions(data, _LOCK_BUILDERS):
        return False
    return any(name in _LOCK_BUILDERS for _, name in _names_in(data).globals)
