"""pickmap: a parallel ``map`` that works for every callable.

``pmap(self.f, data)`` picks the cheapest backend that can carry ``self.f``
and the items (stdlib pickle, cloudpickle, dill, or threads), runs it on warm
worker pools, and turns every failure into a clear exception. Architecture,
in reading order:

- ``api``         pmap / imap / explain: argument checks and selection
- ``registry``    backend names -> lazily imported classes; PICKMAP_BACKEND
- ``probe``       can a backend carry this call? (round trips, cached verdicts)
- ``engine``      the dispatch loop shared by every backend: scheduling
- ``_waiting``    .. one poll(2) over replies, deaths and unwritten output
- ``_replies``    .. replies -> results or exceptions, and their wording
- ``_deaths``     .. what a death or a timeout does, and what it says
- ``chunking``    how input is cut into chunks
- ``pool``        warm worker pools, shutdown()
- ``_protocol``   the messages: named records
- ``_records``    .. their NamedTuple base, without importing typing at run time
- ``_wire``       how they cross: pipe frames, out-of-band buffers, blobs
- ``_shm``        shared-memory segments; ``_shipping``: ship once across calls
- ``_worker``     the worker side (the data-flow diagram), ``run_job``
- ``_fork``       workers pickmap forks itself: from the caller, or its fork server
- ``serializers`` stdlib (private dispatch table), cloudpickle, dill
- ``backends/``   one small module per backend (contract in ``base``)
- ``executor``    ``pickmap.Executor``: a concurrent.futures.Executor over pmap
- ``_cli``        ``python -m pickmap doctor | explain``
- ``errors``      the exception tree
"""

from __future__ import annotations

from ._worker import run_job
from .errors import (
    BackendUnavailableError,
    PickmapError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    UnknownBackendError,
    WorkerError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from .api import explain, imap, pmap
    from .errors import WorkerCrashedError
    from .executor import Executor
    from .pool import shutdown
    from .probe import Plan, Verdict
    from .registry import available_backends, register_backend

__version__ = "0.1.0"

# The caller's side is imported on first use. ``from pickmap import pmap`` costs
# the same as before, but a worker that a fork server or spawn starts imports
# ``pickmap._worker`` (this package first) and needs none of the caller's
# modules: api, engine, probe, pool, registry (~10 ms of a fork server's start).
_LAZY = {
    "pmap": "api",
    "imap": "api",
    "explain": "api",
    "shutdown": "pool",
    "Plan": "probe",
    "Verdict": "probe",
    "available_backends": "registry",
    "register_backend": "registry",
    "Executor": "executor",  # needs concurrent.futures, which a plain pmap does not
    "WorkerCrashedError": "errors",  # made on first use, see errors.py
}


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})  # the lazy names too, for dir() and completion


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pickmap' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    if name != "WorkerCrashedError":  # errors.py keeps making that one itself
        globals()[name] = value
    return value


__all__ = (
    "BackendUnavailableError",
    "Executor",
    "PickmapError",
    "Plan",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "UnknownBackendError",
    "Verdict",
    "WorkerCrashedError",
    "WorkerError",
    "__version__",
    "available_backends",
    "explain",
    "imap",
    "pmap",
    "register_backend",
    "run_job",
    "shutdown",
)
