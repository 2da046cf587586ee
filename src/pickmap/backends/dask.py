"""``dask``: the same ``pmap`` on a dask.distributed cluster (``pip install "pickmap[dask]"``).

Which cluster, first match wins (looked up at every call; see docs/how-to/dask.md):

1. ``DaskBackend(client=c)``, passed as ``backend=``;
2. ``PICKMAP_DASK_ADDRESS`` (``tcp://host:port``, ``tls://``, ``ws(s)://``,
   ``ucx://``, ``inproc://``): one client per address, made on first use. A
   malformed address is a ``ValueError`` before anything connects; a
   scheduler not reached (or without a worker) within ``PICKMAP_DASK_TIMEOUT``
   seconds (default 5) is a :class:`DaskConnectionError`;
3. the client already active in this process (``Client.current()``), never
   one started for the purpose;
4. else a ``LocalCluster()``, started on first use, reused, closed at exit
   and by ``pickmap.shutdown()`` (as are the clients of 2.; 1. and 3. are the
   caller's).

A call's Setup (callable, initializer) goes to the cluster once, as the result
of one ``pickmap_setup`` task, which the scheduler recomputes if the worker
holding it dies (scattered data would be lost with it). Each chunk is one
``pickmap_task`` depending on it, keyed ``pure=False``: equal inputs are never
merged with, or served from, an earlier call. A running task cannot be
killed (``timeout=`` waits only); Ctrl-C cancels the call's futures.
"""

from __future__ import annotations

import atexit
import collections
import os
import re
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from .. import _wire
from .._protocol import Job, Lost, Message, Setup
from .._worker import run_job
from ..errors import PickmapError
from ._futures import FuturesWorker
from .base import Backend, Worker, WorkerStart

__all__ = ("DaskBackend", "DaskConnectionError", "check_address", "pickmap_setup", "pickmap_task")

ENV_ADDRESS, ENV_TIMEOUT, DEFAULT_TIMEOUT = "PICKMAP_DASK_ADDRESS", "PICKMAP_DASK_TIMEOUT", 5.0
_ADDRESS = re.compile(
    r"(?:(?:tcp|tls|ws|wss|ucx)://(?:\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\d{1,5})|inproc://\S+)\Z"
)
_OWNED: dict[str, Any] = {}  # address, or "local" -> a Client pickmap made (and closes)
_CLUSTER: list[Any] = []  # the LocalCluster behind _OWNED["local"]
_LOCK = threading.Lock()


class DaskConnectionError(PickmapError, ConnectionError):
    """The configured scheduler cannot be reached (or has no worker) within the timeout."""


def check_address(address: str, variable: str = ENV_ADDRESS) -> str:
    match = _ADDRESS.match(address)
    if match is None or (match.group(1) is not None and not 0 < int(match.group(1)) < 65536):
        raise ValueError(
            f"{variable}={address!r} is not a dask scheduler address: expected scheme://host:port, "
            "e.g. tcp://127.0.0.1:8786 (schemes tcp, tls, ws, wss, ucx; or inproc://...)"
        )
    return address


def _timeout() -> float:
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    if not re.fullmatch(r"\d*\.?\d+(?:[eE][-+]?\d+)?", text) or float(text) == 0:
        raise ValueError(f"{ENV_TIMEOUT}={text!r} must be a positive number of seconds")
    return float(text)


def _owned_client(address: str | None) -> Any:
    """pickmap's own client of ``address``, or of its LocalCluster (``None``), made once."""
    import distributed

    with _LOCK:
        client = _OWNED.get(address or "local")
        if client is not None and client.status == "running":
            return client
        if address is None:
            _CLUSTER.append(distributed.LocalCluster())
            _OWNED["local"] = distributed.Client(_CLUSTER[-1], set_as_default=False)
            return _OWNED["local"]
        seconds = _timeout()
        try:  # set_as_default=False: dask.compute() never picks pickmap's client up
            _OWNED[address] = distributed.Client(address, timeout=seconds, set_as_default=False)
        except OSError as exc:
            raise DaskConnectionError(
                f"cannot reach the dask scheduler at {address} (from {ENV_ADDRESS}) "
                f"within {seconds:g} s ({ENV_TIMEOUT}): {exc}"
            ) from None
        return _OWNED[address]


def close_owned() -> None:
    """Close the clients and the LocalCluster pickmap made (at exit, and by ``pickmap.shutdown()``)."""
    with _LOCK:
        owned = [*_OWNED.values(), *_CLUSTER]
        _OWNED.clear()
        _CLUSTER.clear()
    for resource in owned:
        try:
            resource.close()
        except Exception:
            pass


atexit.register(close_owned)

# --------------------------------------------------------------------------- on a dask worker
_SETUPS: collections.OrderedDict[tuple[str, int], Setup] = collections.OrderedDict()
_SETUPS_LOCK = threading.Lock()


def pickmap_setup(setup_blob: bytes) -> bytes:
    """A call's Setup, held on the cluster as a task's result (recomputed if lost)."""
    return setup_blob


def pickmap_task(call: tuple[str, int], setup_blob: bytes, task_blob: bytes) -> bytes:
    """One chunk; the Setup is decoded once per process per call (``call``: caller token, call id)."""
    with _SETUPS_LOCK:
        setup = _SETUPS.get(call)
        if setup is None:
            (decoded,) = _wire.from_blob(setup_blob)
            assert isinstance(decoded, Setup)
            setup = _SETUPS[call] = decoded
            while len(_SETUPS) > 4:
                _SETUPS.popitem(last=False)
    (task,) = _wire.from_blob(task_blob)
    return _wire.to_blob(run_job(Job(setup, task)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- in the caller
class _DaskWorker(FuturesWorker):
    def __init__(self, backend: DaskBackend, client: Any) -> None:
        super().__init__(client.submit, blobs=True)
        self._backend, self._client = backend, client
        # keeps its calls' setup futures alive (see DaskBackend._setups)
        self._held: set[Any] = set()

    def send(self, messages: Sequence[Message]) -> None:
        for job in messages:
            assert isinstance(job, Job), "a dask worker takes Job records only"
            seq, call = job.task.seq, (job.setup.call.token, job.setup.call.id)
            try:
                setup = self._backend.setup_future(self._client, job.setup)
                self._held.add(setup)
                future = self._client.submit(
                    pickmap_task, call, setup, _wire.to_blob([job.task]), pure=False
                )
            except Exception as exc:
                self._mailbox.post(
                    [Lost(seq, f"the dask client refused the task: {type(exc).__name__}: {exc}")]
                )
                continue
            self._futures[seq] = future
            future.add_done_callback(lambda done, seq=seq: self._done(seq, done))

    def _done(self, seq: int, future: Any) -> None:
        try:
            super()._done(seq, future)
        except Exception as exc:
            self._mailbox.post(
                [Lost(seq, f"its result could not be fetched: {type(exc).__name__}: {exc}")]
            )

    def kill(self) -> None:
        """Cancel the call's futures on the scheduler in one request (a running task finishes unseen)."""
        futures = list(self._futures.values())
        self._futures.clear()
        if futures:
            try:
                self._client.cancel(futures)
            except Exception:
                pass
        self._held.clear()
        self._mailbox.close()


class DaskBackend(Backend):
    name = "dask"
    serializer = "cloudpickle"
    sticky = start_methods = shares_files = killable = reports_progress = False
    keep_warm = False  # workers are handles to the cluster: nothing to keep warm
    # One task per slot, slots = the cluster's threads: a task starts when handed over, so
    # timeout= (counted from then: no per-item progress) never counts time queued in dask.
    max_queued = 1

    def __init__(self, client: Any = None) -> None:
        self.client = client
        # (client, caller token, call id) -> the call's setup future, while a worker holds it.
        self._setups: weakref.WeakValueDictionary[tuple[int, str, int], Any] = (
            weakref.WeakValueDictionary()
        )

    def find_client(self, *, start: bool = True) -> Any:
        """The cluster's client, in the documented order (``start=False``: no LocalCluster, ``None``)."""
        if self.client is not None:
            return self.client
        address = os.environ.get(ENV_ADDRESS, "").strip()
        if address:
            return _owned_client(check_address(address))
        if "distributed" not in sys.modules:
            # No client can be active; and importing distributed installs tblib's
            # exception reducers process-wide, which a mere doctor or explain must not do.
            return _owned_client(None) if start else None
        import distributed

        try:
            return distributed.Client.current()
        except ValueError:
            return _owned_client(None) if start or "local" in _OWNED else None

    def threads(self, client: Any) -> tuple[int, int]:
        """``(workers, threads)`` on the cluster, waiting up to the timeout for a first worker."""
        nthreads = client.nthreads()
        if not nthreads:
            seconds = _timeout()
            try:
                client.wait_for_workers(1, timeout=seconds)
            except TimeoutError:
                raise DaskConnectionError(
                    f"the dask scheduler at {client.scheduler.address} has no worker "
                    f"after {seconds:g} s ({ENV_TIMEOUT})"
                ) from None
            nthreads = client.nthreads()
        return len(nthreads), sum(nthreads.values())

    def default_workers(self) -> int:
        client = self.find_client(start=False)
        # what LocalCluster() will have (one thread per usable CPU), without starting it
        if client is None:
            return super().default_workers()
        return max(1, self.threads(client)[1])

    def describe(self) -> str:
        client = self.find_client(start=False)
        if client is None:
            return f"a dask LocalCluster it starts on first use (no client active, {ENV_ADDRESS} unset)"
        workers, threads = self.threads(client)
        return f"the dask scheduler at {client.scheduler.address} ({workers} workers, {threads} threads)"

    def setup_future(self, client: Any, setup: Setup) -> Any:
        key = (id(client), setup.call.token, setup.call.id)
        with _LOCK:
            future = self._setups.get(key)
            if future is None:
                future = client.submit(pickmap_setup, _wire.to_blob([setup]), pure=False)
                self._setups[key] = future
            return future

    def start_worker(self, start: WorkerStart) -> Worker:
        return _DaskWorker(self, self.find_client())

    def shutdown(self) -> None:
        close_owned()
