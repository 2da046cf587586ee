"""Workers that are pickmap's own processes: shared by the stdlib, cloudpickle and dill backends.

Each worker gets its own duplex pipe and a two-slot shared array for progress;
the engine waits on the pipe (replies) and on the worker's death, and writes
through a non-blocking outbox.

Death is watched on the process itself, a pidfd (Linux 5.3 and later), not
on ``Process.sentinel``: under fork and spawn that is a pipe the worker holds
open, and so does any grandchild a task forks, so a worker that died while a
grandchild lives would never look dead, and joining it would wait out every
timeout. A pidfd becomes readable when the process exits, whoever holds
what. A forkserver worker is not our child: its exit status comes from the
fork server, a moment after the pidfd says it died. Elsewhere (no pidfd) the
sentinel is used as before. A backend only chooses the
serializer and which ``multiprocessing``-like package starts the processes
(``multiprocessing`` or pathos' ``multiprocess``).
"""

from __future__ import annotations

import importlib
import math
import os
import select
import time
import weakref
from typing import Any, ClassVar, Sequence

from .. import _wire
from .._protocol import Message, Stop
from .._worker import process_main
from .base import Backend, Worker, WorkerStart

# The caller's ends of every live worker pipe. A worker started by fork
# inherits them and must close them (see _worker._close_inherited).
_CALLER_ENDS: "weakref.WeakSet[Any]" = weakref.WeakSet()


class ProcessWorker(Worker):
    def __init__(self, package: str, start: WorkerStart) -> None:
        assert start.start_method is not None
        context = importlib.import_module(package).get_context(start.start_method)
        caller_end, worker_end = context.Pipe(duplex=True)
        # Two doubles of shared memory, from multiprocessing's heap: RawArray
        # would do the same but imports ctypes (6-9 ms on a first call here).
        shared = _progress_block(package)
        progress = shared.create_memoryview().cast("d")
        # The heap reuses freed blocks without clearing them: a slot left by a
        # worker killed mid-item would read as an item running since then.
        progress[0] = progress[1] = 0.0
        forked = start.start_method == "fork"
        inherited = [*_CALLER_ENDS, caller_end] if forked else []
        # Under fork, Process arguments are inherited, not pickled: the call's
        # callable reaches the worker without being serialized at all.
        adopted = tuple(start.inheritance) if forked and start.inheritance is not None else None
        self.adopted_call = start.inheritance.spec.id if adopted is not None else None
        self.process = context.Process(
            target=process_main,
            args=(worker_end, shared, start.idle_timeout, os.getpid(), inherited, adopted),
            name="pickmap-worker",
            daemon=True,
        )
        self.process.start()
        worker_end.close()
        _CALLER_ENDS.add(caller_end)
        self._shared = shared  # keep the shared memory alive as long as the handle
        self.progress = progress
        self.conn = caller_end
        self.waitable = caller_end
        self.outbox = _wire.Outbox(caller_end.fileno())
        self._reader = _wire.FrameReader(caller_end.fileno())
        self.pid = self.process.pid
        self._child = start.start_method != "forkserver"  # forkserver workers are the fork server's children
        self._pidfd = _open_pidfd(self.pid)
        self.sentinel = self._pidfd if self._pidfd is not None else self.process.sentinel
        self._closed = False
        self._exitcode: int | None = None

    def send(self, messages: Sequence[Message]) -> None:
        self.outbox.put(messages)

    def receive(self) -> list[Message]:
        return self._reader.read()

    def exitcode(self) -> int | None:
        if self._closed:
            return self._exitcode
        code = self.process.exitcode
        if code is None and self._pidfd is not None and _readable(self._pidfd, 0):
            # It has exited; the status follows at once from waitpid (a child),
            # or shortly from the fork server (forkserver).
            code = self._status_after_exit(_STATUS_SECONDS)
        return code

    def _status_after_exit(self, seconds: float) -> int | None:
        if not self._child:
            self.process.join(seconds)  # waits on the fork server's report, which no grandchild holds
            return self.process.exitcode
        deadline = time.monotonic() + seconds
        code = self.process.exitcode  # waitpid(WNOHANG): reaps it
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
        if _readable(self._pidfd, seconds):
            self._status_after_exit(max(0.0, seconds - (time.monotonic() - started)) + 0.1)

    def kill(self) -> None:
        if self._closed:
            return  # killed already (a second clean-up after Ctrl-C)
        self.process.kill()
        self._await_exit(5)
        self._close()

    def stop(self, grace: float) -> None:
        if self._closed:
            return
        try:
            self.send([Stop()])
            if self.outbox.pending:  # a Stop that cannot be written now: nothing to wait for
                raise OSError
        except OSError:
            self.kill()
            return
        self._await_exit(grace)
        if self.process.exitcode is None:
            self.process.kill()
            self._await_exit(5)
        self._close()

    def _close(self) -> None:
        self.conn.close()
        _CALLER_ENDS.discard(self.conn)
        self._exitcode = self.process.exitcode
        if self._exitcode is not None:
            self.process.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._closed = True


class _PrivateBlock:
    """Progress memory that needs no ``/dev/shm``: a memfd (else a temp file) of our own.

    Its arena travels to a spawn/forkserver worker as a duplicated descriptor
    (multiprocessing reduces an ``Arena`` that way); under fork it is inherited.
    """

    def __init__(self, package: str, size: int) -> None:
        heap = importlib.import_module(f"{package}.heap")
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is not None:
            fd = memfd_create("pickmap-progress")
        else:
            import tempfile

            fd, path = tempfile.mkstemp(prefix="pickmap-progress-")
            os.unlink(path)
        os.ftruncate(fd, size)
        self.arena = heap.Arena(size, fd)
        self.size = size

    def create_memoryview(self) -> memoryview:
        return memoryview(self.arena.buffer)[: self.size]


_heap_unusable = False


def _progress_block(package: str) -> Any:
    """Two doubles of shared memory: from multiprocessing's heap, or our own block where
    its directory (``/dev/shm``) is read-only or full, so a call never fails for want of 16 bytes."""
    global _heap_unusable
    if not _heap_unusable:
        try:
            return importlib.import_module(f"{package}.heap").BufferWrapper(16)
        except OSError:
            _heap_unusable = True
    return _PrivateBlock(package, 16)


#: How long a worker whose pidfd says it exited may take to report its status.
_STATUS_SECONDS = 2.0


def _open_pidfd(pid: int | None) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits; ``None`` where there is none."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None or pid is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:  # an old kernel (ENOSYS), a sandbox (EPERM), or already reaped (ESRCH): the sentinel will do
        return None


def _readable(fd: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(seconds * 1000))))


class ProcessBackend(Backend):
    """Base of the process backends: picks the package that starts processes."""

    #: The ``multiprocessing``-compatible package that starts the processes.
    process_package: ClassVar[str] = "multiprocessing"

    def start_worker(self, start: WorkerStart) -> Worker:
        return ProcessWorker(self.process_package, start)
