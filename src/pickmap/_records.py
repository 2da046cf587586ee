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
thing ``typing.NamedTuple`` builds: a ``collections.namedtuple`` with the
annotated fields in order, the defaults given, and the class body's methods,
properties and docstring. Records pickle by reference like any class.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

__all__ = ("NamedTuple",)

# Called through a plain name: mypy checks literal namedtuple() calls as declarations.
_namedtuple: Callable[..., type] = collections.namedtuple

_NOT_COPIED = frozenset(
    ("__module__", "__qualname__", "__annotations__", "__dict__", "__weakref__")
)


class _RecordMaker(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, object]) -> type:
        if not bases:  # NamedTuple itself
            return super().__new__(mcs, name, bases, namespace)
        declared = namespace.get("__annotations__")
        annotations = dict(declared) if isinstance(declared, dict) else {}
        fields = list(annotations)
        defaults = [namespace[field] for field in fields if field in namespace]
        if any(field not in namespace for field in fields[len(fields) - len(defaults) :]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
        record = _namedtuple(
            name, fields, defaults=defaults, module=str(namespace.get("__module__"))
        )
        record.__qualname__ = str(namespace.get("__qualname__", name))
        record.__annotations__ = annotations
        for key, value in namespace.items():
            if key not in _NOT_COPIED and key not in annotations:
                setattr(record, key, value)  # methods, properties, __doc__
        return record


class NamedTuple(metaclass=_RecordMaker):
    """Base of a record class; the class statement returns a ``collections.namedtuple``."""
