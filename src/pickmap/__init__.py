"""pickmap: a parallel ``map`` that works for every callable.

``pmap(self.f, data)`` picks the cheapest backend that can carry ``self.f``
and the items (stdlib pickle, cloudpickle, dill, or threads), runs it on warm
worker pools, and turns every failure into a clear exception. Architecture,
in reading order:

- ``api``         pmap / imap / explain: argument checks and selection
- ``registry``    backend names -> lazily imported classes; PICKMAP_BACKEND
- ``probe``       can a backend carry this call? (round trips, cached verdicts)
- ``engine``      the dispatch loop shared by every backend
- ``chunking``    how input is cut into chunks
- ``pool``        warm worker pools, shutdown()
- ``_worker``     the worker side and its message protocol
- ``serializers`` stdlib (private dispatch table), cloudpickle, dill
- ``backends/``   one small module per backend
- ``errors``      the exception tree
"""

from __future__ import annotations

from .api import explain, imap, pmap
from .errors import (
    BackendUnavailableError,
    PickmapError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    UnknownBackendError,
    WorkerCrashedError,
    WorkerError,
)
from .pool import shutdown
from .probe import Plan, Verdict
from .registry import available_backends, register_backend

__version__ = "0.1.0"

__all__ = (
    "pmap",
    "imap",
    "explain",
    "available_backends",
    "register_backend",
    "shutdown",
    "Plan",
    "Verdict",
    "PickmapError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "SerializationError",
    "WorkerCrashedError",
    "TaskTimeoutError",
    "WorkerError",
    "RemoteTraceback",
    "__version__",
)
