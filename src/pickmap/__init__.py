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
- ``_wire``       how they cross: pipe frames, out-of-band buffers, blobs
- ``_shm``        shared-memory segments; ``_shipping``: ship once across calls
- ``_worker``     the worker side (the data-flow diagram), ``run_job``
- ``serializers`` stdlib (private dispatch table), cloudpickle, dill
- ``backends/``   one small module per backend (contract in ``base``)
- ``executor``    ``pickmap.Executor``: a concurrent.futures.Executor over pmap
- ``_cli``        ``python -m pickmap doctor | explain``
- ``errors``      the exception tree
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._worker import run_job
from .api import explain, imap, pmap
from .errors import (
    BackendUnavailableError,
    PickmapError,
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    UnknownBackendError,
    WorkerError,
)
from .pool import shutdown
from .probe import Plan, Verdict
from .registry import available_backends, register_backend

__version__ = "0.1.0"

if TYPE_CHECKING:  # the two names made on first use (below), as a type checker sees them
    from .errors import WorkerCrashedError
    from .executor import Executor


def __getattr__(name: str) -> object:
    # Imported on first use: it needs concurrent.futures, which a plain pmap does not.
    if name == "Executor":
        from .executor import Executor

        return Executor
    if name == "WorkerCrashedError":  # made on first use, see errors.py
        from . import errors

        return errors.WorkerCrashedError
    raise AttributeError(f"module 'pickmap' has no attribute {name!r}")


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
