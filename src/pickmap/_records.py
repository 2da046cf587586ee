"""``NamedTuple`` records without importing ``typing`` at run time.

``import typing`` costs about 6 ms (it brings ``re`` along), a fifth of what
``import pickmap`` pays, and a first ``pmap`` needs none of it: the
annotations are strings (``from __future__ import annotations``). So modules
declare their records as usual and take ``NamedTuple`` from here at run time::

    TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
    if TYPE_CHECKING:
        from typing import NamedTuple
    else:
        from ._records import NamedTuple


    class Task(NamedTuple):
        call_id: int
        items: Any = None

mypy sees typing's ``NamedTuple`` (it treats any name ``TYPE_CHECKING`` as
true) and checks every field; at run time the class statement builds the same
thing ``typing.NamedTuple`` builds: what ``collections.namedtuple`` makes of
the annotated fields in order and the defaults given (built here without its
per-class ``eval``), plus the class body's methods, properties and docstring.
Records pickle by reference like any class.
"""

from __future__ import annotations

import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see above)
if TYPE_CHECKING:
    from typing import Any

try:  # the C field accessor collections.namedtuple uses
    from _collections import _tuplegetter  # type: ignore[import-not-found]
except ImportError:  # not CPython
    from operator import itemgetter as _itemgetter

    def _tuplegetter(index: int, doc: str) -> Any:
        return property(_itemgetter(index), doc=doc)


__all__ = ("NamedTuple",)

_NOT_COPIED = frozenset(
    ("__module__", "__qualname__", "__annotations__", "__dict__", "__weakref__")
)

# collections.namedtuple compiles a ``__new__`` for every class (~70 µs each, a
# fifth of ``import pickmap``); the bytecode depends only on the field count,
# so one is compiled per count and its parameters renamed for each record.
_NEW_CODE: dict[int, types.CodeType] = {}


def _new_code(fields: tuple[str, ...]) -> types.CodeType:
    count = len(fields)
    template = _NEW_CODE.get(count)
    if template is None:
        params = "".join(f", _{i}" for i in range(count))
        items = "".join(f"_{i}, " for i in range(count))
        source = f"lambda _cls{params}: _tuple_new(_cls, ({items}))"
        template = eval(source, {"_tuple_new": tuple.__new__}).__code__
        _NEW_CODE[count] = template
    return template.replace(co_varnames=("_cls", *fields), co_name="__new__")


def _record_class(
    name: str, fields: tuple[str, ...], defaults: tuple[object, ...], namespace: dict[str, object]
) -> type:
    """What ``collections.namedtuple(name, fields, defaults=defaults)`` builds, plus the
    class body's methods, properties and docstring."""
    qualname = str(namespace.get("__qualname__", name))
    new = types.FunctionType(
        _new_code(fields), {"_tuple_new": tuple.__new__}, "__new__", defaults or None
    )
    new.__qualname__ = f"{qualname}.__new__"
    new.__doc__ = f"Create new instance of {name}({', '.join(fields)})"
    shown = "(" + ", ".join(f"{field}=%r" for field in fields) + ")"
    count = len(fields)

    def __repr__(self: tuple[Any, ...]) -> str:
        return self.__class__.__name__ + shown % self

    def _make(cls: type, iterable: Any) -> Any:
        made: tuple[Any, ...] = tuple.__new__(cls, iterable)
        if len(made) != count:
            raise TypeError(f"Expected {count} arguments, got {len(made)}")
        return made

    def _replace(self: Any, /, **changes: Any) -> Any:
        made = self._make(map(changes.pop, fields, self))
        if changes:
            raise ValueError(f"Got unexpected field names: {list(changes)!r}")
        return made

    def _asdict(self: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(fields, self, strict=True))

    def __getnewargs__(self: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(self)

    body: dict[str, object] = {
        "__doc__": f"{name}({', '.join(fields)})",
        "__slots__": (),
        "_fields": fields,
        "_field_defaults": dict(zip(fields[count - len(defaults) :], defaults, strict=True)),
        "__new__": new,
        "_make": classmethod(_make),
        "_replace": _replace,
        "__replace__": _replace,  # copy.replace() (3.13)
        "__repr__": __repr__,
        "_asdict": _asdict,
        "__getnewargs__": __getnewargs__,
        "__match_args__": fields,
        "__module__": str(namespace.get("__module__")),
        "__qualname__": qualname,
    }
    for method in (__repr__, _make, _replace, _asdict, __getnewargs__):
        method.__qualname__ = f"{qualname}.{method.__name__}"
    for index, field in enumerate(fields):
        body[field] = _tuplegetter(index, f"Alias for field number {index}")
    return type(name, (tuple,), body)


class _RecordMaker(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, object]) -> type:
        if not bases:  # NamedTuple itself
            return super().__new__(mcs, name, bases, namespace)
        declared = namespace.get("__annotations__")
        annotations = dict(declared) if isinstance(declared, dict) else {}
        fields = tuple(annotations)
        for field in fields:
            if field.startswith("_"):  # as namedtuple: they would shadow its own names
                raise ValueError(f"{name}: field names cannot start with an underscore: {field!r}")
        defaults = tuple(namespace[field] for field in fields if field in namespace)
        if any(field not in namespace for field in fields[len(fields) - len(defaults) :]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
        record = _record_class(name, fields, defaults, namespace)
        record.__annotations__ = annotations
        for key, value in namespace.items():
            if key not in _NOT_COPIED and key not in annotations:
                setattr(record, key, value)  # methods, properties, __doc__
        return record


class NamedTuple(metaclass=_RecordMaker):
    """Base of a record class; the class statement returns a namedtuple-like tuple class."""
