"""Workers that are pickmap's own processes: shared by the stdlib, cloudpickle and dill backends.

Each worker gets its own duplex pipe and a two-slot shared progress segment;
the engine waits on the pipe (replies) and on the worker's death, and writes
through a non-blocking outbox.

Death is watched on the process itself, a pidfd (Linux 5.3 and later), not
on ``Process.sentinel``: under fork and spawn that is a pipe the worker holds
open, and so does any grandchild a task forks, so a worker that died while a
grandchild lives would never look dead, and joining it would wait out every
timeout. A pidfd becomes readable when the process exits, whoever holds
what. A forkserver worker is not our child: its exit status comes from the
fork server, a moment after the pidfd says it died. Elsewhere (no pidfd) the
sentinel is used as before. ``fork`` and ``forkserver`` workers are forked by
pickmap itself (``_fork.py``); a backend only chooses the serializer and which
``multiprocessing``-like package starts ``spawn`` workers (``multiprocessing``
or pathos' ``multiprocess``).
"""

from __future__ import annotations

import _socket
import importlib
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Sequence

from .. import _fork, _shm, _wire
from .._protocol import Message, Stop
from .._settings import _thread_count, blas_pools_loaded, pool_controller
from .._worker import process_main
from .base import Backend, Worker, WorkerStart

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, ClassVar

# The caller's ends of every live worker pipe. A worker started by fork
# inherits them and must close them (see _worker._close_inherited).
_CALLER_ENDS: weakref.WeakSet[Any] = weakref.WeakSet()


class _End(_socket.socket):
    """One end of a worker's socket pair: ``_socket``'s socket, made weak-referenceable for
    :data:`_CALLER_ENDS`. ``socket.py`` would cost a first fork call ~4 ms of imports (itself,
    ``selectors``, ``array``) for a pair whose descriptors pickmap reads and writes itself."""

    __slots__ = ("__weakref__",)


def _socket_pair() -> tuple[_End, _End]:
    # The blocking mode follows socket.setdefaulttimeout(), as socket.socketpair()'s does.
    first, second = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    return _End(fileno=first.detach()), _End(fileno=second.detach())


def _modules_of(func: Any) -> set[str]:
    owner = getattr(func, "__self__", None)
    found = {
        getattr(func, "__module__", None),
        getattr(type(owner), "__module__", None) if owner is not None else None,
    }
    return {
        m for m in found if isinstance(m, str) and m not in ("__main__", "__mp_main__", "builtins")
    }


def _preload(start: WorkerStart) -> set[str]:
    """What the fork server imports before it forks: the callable's modules, never ``__main__``.

    multiprocessing's default preload runs the caller's main script in the
    server (``import numpy, pandas`` at its top: half a second here). pickmap
    never needs ``__main__`` by reference in a worker (the probe refuses such
    pickles), so the server imports the callable's modules instead, once, and
    every worker forked from it starts with them loaded.
    """
    if start.inheritance is None:
        return set()
    return _modules_of(start.inheritance.func)


_PREPARING = threading.Lock()

_pool_cap: tuple[Any, int] | None = None  # (limiter, threads) while forks hold the pools capped
_cap_holders: set[int] = set()  # ids of the calls that forked workers under the cap
# Held from taking the cap to the end of the fork, so no call's end restores it in between.
_POOL_CAP_LOCK = threading.RLock()


def _cap_pools_for_fork(start: WorkerStart) -> tuple[Any, int] | None:
    """Hold the caller's BLAS/OpenMP pools at the worker's inner thread count while it forks.

    A forked OpenBLAS has no threads until it is next configured; a worker
    that then sets its limit itself makes it start a thread that spins about
    0.1 s of CPU — on a 2-core machine, a tenth of a second taken from the
    other worker or the caller, in every new worker. Forked with the limit in
    place, the worker inherits it and never touches its pool.

    The caller's counts come back when the call ends (``release_pool_cap``),
    not after each fork: OpenBLAS shuts the caller's pool down around every
    ``fork()`` too, and setting its count restarts it, with the same spin —
    once, after the call, instead of in the middle of it. Meanwhile the caller
    runs no BLAS work of its own in parallel: it forks only while its other
    threads are that idle pool (``_settings.default_start_method``).
    ``(limiter, threads)`` for the worker, or ``None`` when there is nothing to cap.
    """
    global _pool_cap
    if start.inheritance is None:
        return None
    call_id, threads = start.inheritance.spec.id, start.inheritance.spec.inner_threads
    if threads <= 0 or not blas_pools_loaded():
        return None
    with _POOL_CAP_LOCK:
        if _pool_cap is not None:
            if _pool_cap[1] != threads:
                return None  # capped for another call's count: this worker limits itself
            _cap_holders.add(call_id)
            return _pool_cap
        try:
            controller = pool_controller()
            if all(lib.num_threads <= threads for lib in controller.lib_controllers):
                return None
            _pool_cap = (controller.limit(limits=threads), threads)
        except Exception:  # threadpoolctl missing or failing: the worker limits its pools itself
            return None
        _cap_holders.add(call_id)
        return _pool_cap


def release_pool_cap(call_id: int) -> None:
    """The call ``call_id`` ended: when no call that forked under the cap still runs,
    give the caller's pools back their own counts."""
    global _pool_cap
    with _POOL_CAP_LOCK:
        _cap_holders.discard(call_id)
        if _cap_holders or _pool_cap is None:
            return
        cap, _pool_cap = _pool_cap, None
        cap[0].restore_original_limits()


def _start_without_main(package: str, process: Any) -> None:
    """Start a spawn process that does not re-run the caller's main script.

    multiprocessing makes every such child import ``__main__`` again (as
    ``__mp_main__``), so a script's own top-level imports (numpy, pandas) are
    paid once per worker, and a script without an ``if __name__ ==
    "__main__":`` guard starts workers recursively. pickmap's workers never
    need the main module: the probe refuses pickles that name ``__main__``
    objects by reference, and by-value callables carry what they use. So the
    preparation data sent to this one child leaves the main script out.
    (multiprocessing has no option for this; the function is swapped only
    around this start, under a lock.)
    """
    spawn = importlib.import_module(f"{package}.spawn")
    original = spawn.get_preparation_data

    def without_main(name: str) -> dict[str, Any]:
        data: dict[str, Any] = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _PREPARING:
        spawn.get_preparation_data = without_main  # type: ignore[attr-defined]
        try:
            process.start()
        finally:
            spawn.get_preparation_data = original  # type: ignore[attr-defined]


class ProcessWorker(Worker):
    def __init__(self, package: str, start: WorkerStart) -> None:
        assert start.start_method is not None
        # A plain socket pair, what Pipe(duplex=True) wraps: pickmap reads and writes the raw
        # descriptors, and multiprocessing.connection would cost a first call ~7 ms of imports
        # (tempfile, shutil, bz2, lzma, random).
        caller_end, worker_end = _socket_pair()
        # Known at once: a worker forked meanwhile by another thread closes it (_CALLER_ENDS).
        _CALLER_ENDS.add(caller_end)
        try:
            # Two doubles of shared memory: [item index, start time] while a timed call runs.
            self._progress_path, self._progress_map = _shm.progress_segment("p")
        except BaseException:
            _CALLER_ENDS.discard(caller_end)
            caller_end.close()
            worker_end.close()
            raise
        progress = memoryview(self._progress_map).cast("d")
        self.adopted_call: int | None = None
        try:
            if start.start_method == "forkserver":
                # pickmap's own fork server (see _fork.py for why not multiprocessing's)
                self.process: Any = _fork.start_served_worker(
                    worker_end,
                    _preload(start),
                    (self._progress_path, start.idle_timeout, os.getpid()),
                )
            else:
                self.process = self._start_process(package, start, caller_end, worker_end)
        except BaseException:
            _CALLER_ENDS.discard(caller_end)
            caller_end.close()
            _shm.unlink([self._progress_path])
            raise
        finally:
            worker_end.close()
        self.progress = progress
        self.conn = caller_end
        self.waitable = caller_end
        self.outbox = _wire.Outbox(caller_end.fileno())
        self._reader = _wire.FrameReader(caller_end.fileno())
        self._stop_sent = False
        self._closed = False
        self._exitcode: int | None = None
        self.pid = self.process.pid
        # forkserver workers are the fork server's children, not ours
        self._child = start.start_method != "forkserver"
        self._pidfd = _open_pidfd(self.pid)
        self.sentinel = self._pidfd if self._pidfd is not None else self.process.sentinel

    def _start_process(
        self, package: str, start: WorkerStart, caller_end: _End, worker_end: _End
    ) -> Any:
        """A fork worker (forked by pickmap: see _fork.py), or a spawn worker started by
        ``package`` (multiprocessing or multiprocess)."""
        if start.start_method != "fork":
            import socket  # a spawn child costs far more than its ~4 ms

            context = importlib.import_module(package).get_context(start.start_method)
            # multiprocessing pickles a socket.socket for the child (multiprocessing.reduction);
            # the caller's later close of the detached worker_end does nothing
            child_end = socket.socket(fileno=worker_end.detach())
            try:
                process = context.Process(
                    target=process_main,
                    args=(child_end, self._progress_path, start.idle_timeout, os.getpid(), []),
                    name="pickmap-worker",
                    daemon=True,
                )
                _start_without_main(package, process)
            finally:
                child_end.close()
            return process
        # Inherited, never pickled: the call's callable reaches the worker without being
        # serialized at all.
        adopted = tuple(start.inheritance) if start.inheritance is not None else None
        if start.inheritance is not None:
            self.adopted_call = start.inheritance.spec.id
        # The cap is held from its taking to the end of the fork: no call's end restores it between.
        with _POOL_CAP_LOCK:
            capped = _cap_pools_for_fork(start)
            args = (
                worker_end,
                self._progress_path,
                start.idle_timeout,
                os.getpid(),
                [*_CALLER_ENDS, caller_end],
                adopted,
                capped,
            )
            if sys.version_info < (3, 12) or _thread_count() <= 1:
                # Nothing to silence: the warning is new in 3.12, and only for a process with
                # other threads. (filterwarnings compiles its message, and importing re for
                # that is ~3 ms of a first call in a process that has not imported it.)
                return _fork.ForkedProcess((), args)
            with warnings.catch_warnings():
                # Python 3.12+ warns on any fork of a multi-threaded process; pickmap forks
                # with other threads only when they are an OpenBLAS pool (see _settings.py).
                warnings.filterwarnings(
                    "ignore", message=".*multi-threaded.*fork", category=DeprecationWarning
                )
                return _fork.ForkedProcess((), args)

    def send(self, messages: Sequence[Message]) -> None:
        self.outbox.put(messages)

    def receive(self) -> list[Message]:
        return self._reader.read()

    def exitcode(self) -> int | None:
        if self._closed:
            return self._exitcode
        code: int | None = self.process.exitcode
        if code is None and self._pidfd is not None and _fork.readable(self._pidfd, 0):
            # It has exited; the status follows at once from waitpid (a child),
            # or shortly from the fork server (forkserver).
            code = self._status_after_exit(_STATUS_SECONDS)
        return code

    def _status_after_exit(self, seconds: float) -> int | None:
        if not self._child:
            # waits on the fork server's report, which no grandchild holds
            self.process.join(seconds)
            exitcode: int | None = self.process.exitcode
            return exitcode
        deadline = time.monotonic() + seconds
        code: int | None = self.process.exitcode  # waitpid(WNOHANG): reaps it
        while code is None and time.monotonic() < deadline:
            time.sleep(0.001)
            code = self.process.exitcode
        return code

    def _await_exit(self, seconds: float) -> None:
        """Wait at most ``seconds`` for the process to exit, never on a descriptor a grandchild may hold."""
        if self._pidfd is None:
            self.process.join(seconds)
            return
        started = time.monotonic()
        if _fork.readable(self._pidfd, seconds):
            self._status_after_exit(max(0.0, seconds - (time.monotonic() - started)) + 0.1)

    def kill(self) -> None:
        if self._closed:
            return  # killed already (a second clean-up after Ctrl-C)
        self.process.kill()
        self._await_exit(5)
        self._close()

    def announce_stop(self) -> None:
        if not self._stop_sent:
            self._stop_sent = True
            try:
                self.send([Stop()])
            except OSError:
                pass

    def stop(self, grace: float) -> None:
        if self._closed:
            return
        self.announce_stop()
        # a Stop that cannot be written now: nothing to wait for
        if self.outbox.pending or self.conn.fileno() == -1:
            self.kill()
            return
        self._await_exit(grace)
        if self.process.exitcode is None:
            self.process.kill()
            self._await_exit(5)
        self._close()

    def _close(self) -> None:
        if self._closed:
            return  # a kill interrupted by Ctrl-C is finished again by end_call
        self._closed = True
        self.conn.close()
        _CALLER_ENDS.discard(self.conn)
        if self.pid is not None:
            # results it wrote that will never be read
            _shm.unlink_writer(os.getpid(), f"w{self.pid}")
        # the worker removes it once mapped; not if it died first
        _shm.unlink([self._progress_path])
        self.progress.release()
        self._progress_map.close()
        self._exitcode = self.process.exitcode
        if self._exitcode is not None or isinstance(self.process, _fork.WorkerProcess):
            self.process.close()  # pickmap's own handles close even while the process runs
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


#: How long a worker whose pidfd says it exited may take to report its status.
_STATUS_SECONDS = 2.0


def _open_pidfd(pid: int | None) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits; ``None`` where there is none."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None or pid is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:
        # an old kernel (ENOSYS), a sandbox (EPERM), or already reaped (ESRCH): the sentinel will do
        return None
    return fd


class ProcessBackend(Backend):
    """Base of the process backends: picks the package that starts processes."""

    #: The ``multiprocessing``-compatible package that starts the processes.
    process_package: ClassVar[str] = "multiprocessing"

    def start_worker(self, start: WorkerStart) -> Worker:
        return ProcessWorker(self.process_package, start)

    def call_ended(self, call_id: int) -> None:
        release_pool_cap(call_id)
