"""Backend names, mapped to lazily imported classes, and the one place a backend is selected.

Like fsspec's registry: the table below names a class by its import path, so
``import pickmap`` imports no backend module, and pathos/dill/cloudpickle are
imported only when their backend runs. Each entry carries the ``pip install``
hint shown when its package is missing.

Selection order, in :func:`select_backend` (read at call time, never cached):
the ``backend=`` argument, else ``PICKMAP_BACKEND``, else the capability probe.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable

from .backends.base import Backend
from .errors import BackendUnavailableError, UnknownBackendError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from ._records import NamedTuple

__all__ = (
    "LADDER",
    "available_backends",
    "get_backend",
    "register_backend",
    "registered_backends",
    "registration",
    "select_backend",
)

ENV_BACKEND = "PICKMAP_BACKEND"
AUTO = "auto"

#: The probe tries these in order and keeps the first that can carry the call.
LADDER = ("stdlib", "cloudpickle", "dill", "thread")

BackendFactory = str | type[Backend] | Callable[[], Backend]


class Registration(NamedTuple):
    """How a name is registered: what makes the backend, and what it needs installed."""

    factory: BackendFactory  # "module:Class" (imported lazily), a class, or a callable
    install_hint: str = ""
    requires: tuple[str, ...] = ()


_Entry = Registration


_REGISTRY: dict[str, _Entry] = {
    "stdlib": _Entry("pickmap.backends.stdlib:StdlibBackend"),
    "cloudpickle": _Entry(
        "pickmap.backends.cloudpickle:CloudpickleBackend",
        "pip install cloudpickle",
        ("cloudpickle",),
    ),
    "dill": _Entry(
        "pickmap.backends.dill:DillBackend", "pip install pathos", ("dill", "multiprocess")
    ),
    "thread": _Entry("pickmap.backends.thread:ThreadBackend"),
    "ppe": _Entry("pickmap.backends.ppe:PPEBackend", "pip install cloudpickle", ("cloudpickle",)),
    "serial": _Entry("pickmap.backends.serial:SerialBackend"),
    "dask": _Entry(
        "pickmap.backends.dask:DaskBackend", 'pip install "pickmap[dask]"', ("distributed",)
    ),
}
_ALIASES = {"pathos": "dill"}
_INSTANCES: dict[str, Backend] = {}
_LOCK = threading.Lock()


def loaded_backends() -> list[Backend]:
    """The backend instances made so far (``pickmap.shutdown`` releases what they own)."""
    with _LOCK:
        return list(_INSTANCES.values())


def registration(name: str) -> Registration:
    """The registration of ``name`` (``UnknownBackendError`` if there is none)."""
    entry = _REGISTRY.get(_canonical(name))
    if entry is None:
        raise UnknownBackendError(name, registered_backends())
    return entry


def registered_backends() -> tuple[str, ...]:
    """Every registered name (aliases excluded), installed or not."""
    return tuple(_REGISTRY)


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


_FOUND: set[str] = set()  # modules known to be installed (a package does not vanish mid-run)


def _missing_module(entry: _Entry) -> str | None:
    for module in entry.requires:
        if module in _FOUND:
            continue
        import importlib.util  # ~1 ms (contextlib): only when an optional backend is looked for

        if importlib.util.find_spec(module) is None:
            return module
        _FOUND.add(module)
    return None


def available_backends() -> tuple[str, ...]:
    """Registered backends whose packages are installed (checked without importing them)."""
    return tuple(name for name, entry in _REGISTRY.items() if _missing_module(entry) is None)


def is_available(name: str) -> bool:
    """Whether one registered backend's packages are installed (``available_backends`` for one)."""
    entry = _REGISTRY.get(_canonical(name))
    return entry is not None and _missing_module(entry) is None


def register_backend(
    name: str, factory: BackendFactory, *, clobber: bool = False, install_hint: str = ""
) -> None:
    """Register a backend under ``name``.

    ``factory`` is a :class:`~pickmap.backends.base.Backend` subclass, a
    zero-argument callable returning a backend, or ``"module:Class"`` to import
    lazily. An existing name is replaced only with ``clobber=True``.
    """
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(
            f"a backend name must be a non-empty string other than {AUTO!r}, not {name!r}"
        )
    with _LOCK:
        if not clobber and (name in _REGISTRY or name in _ALIASES):
            raise ValueError(
                f"a backend named {name!r} is already registered; pass clobber=True to replace it"
            )
        _ALIASES.pop(name, None)
        # A lazily imported factory needs its top-level package installed.
        requires = (factory.partition(":")[0].split(".")[0],) if isinstance(factory, str) else ()
        _REGISTRY[name] = _Entry(factory, install_hint, requires)
        _INSTANCES.pop(name, None)


def get_backend(name: str) -> Backend:
    """The backend instance for ``name`` (importing its module on first use)."""
    name = _canonical(name)
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownBackendError(name, registered_backends())
    with _LOCK:
        backend = _INSTANCES.get(name)
        if backend is not None:
            return backend
        missing = _missing_module(entry)
        if missing is not None:
            raise BackendUnavailableError(
                name, missing, entry.install_hint or f"pip install {missing}"
            )
        factory = entry.factory
        if isinstance(factory, str):
            module_name, _, attr = factory.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except ModuleNotFoundError as exc:
                missing = exc.name or module_name
                hint = entry.install_hint or f"pip install {missing.split('.')[0]}"
                raise BackendUnavailableError(name, missing, hint) from exc
        backend = factory()
        if not isinstance(backend, Backend):
            raise TypeError(
                f"the factory registered for {name!r} returned {backend!r}, not a pickmap Backend"
            )
        if getattr(backend, "name", None) != name:
            # pools and messages use the registered name; a class need not repeat it
            backend.name = name
        _INSTANCES[name] = backend
        return backend


def select_backend(argument: object) -> tuple[str | Backend | None, str]:
    """``(name or backend, source)``: the backend the caller asked for, and where the ask came from.

    ``argument`` is a registered name, ``"auto"``/``None``, a :class:`Backend`
    instance (how options such as a client reach a backend), or any object
    with ``submit()`` — a ``concurrent.futures.Executor`` — which is wrapped
    in an :class:`~pickmap.backends.executor.ExecutorBackend`. The first is
    ``None`` when the capability probe must decide (source ``"probe"``).
    Unknown names raise :class:`UnknownBackendError`, naming the environment
    variable when that is where the name came from.
    """
    if isinstance(argument, Backend):
        return argument, "argument"
    if type(argument).__module__.startswith("distributed") and type(argument).__name__ == "Client":
        from .backends.dask import (
            DaskBackend,  # a dask client: the call's setup travels once, not per task
        )

        return DaskBackend(client=argument), "argument"
    if (
        argument is not None
        and not isinstance(argument, str)
        and callable(getattr(argument, "submit", None))
    ):
        from .backends.executor import ExecutorBackend

        return ExecutorBackend(argument), "argument"  # type: ignore[arg-type]
    if argument is not None and argument != AUTO:
        return _known(argument, None), "argument"
    if argument is None:
        value = os.environ.get(ENV_BACKEND, "").strip()
        if value and value != AUTO:
            return _known(value, ENV_BACKEND), "environment"
    return None, "probe"


def _known(name: object, variable: str | None) -> str:
    if not isinstance(name, str) or _canonical(name) not in _REGISTRY:
        shown = name if isinstance(name, str) else f"{type(name).__qualname__} object"
        raise UnknownBackendError(
            str(shown),
            (*registered_backends(), *_ALIASES, "a Backend instance", "an Executor"),
            variable=variable,
        )
    return _canonical(name)
