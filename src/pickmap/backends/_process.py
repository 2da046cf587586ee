"""Workers that are pickmap's own processes: shared by the stdlib, cloudpickle and dill backends.

Each worker gets its own duplex pipe and a two-slot shared array for progress;
the engine waits on the pipe (replies) and on the process sentinel (death),
and writes through a non-blocking outbox. A backend only chooses the
serializer and which ``multiprocessing``-like package starts the processes
(``multiprocessing`` or pathos' ``multiprocess``).
"""

from __future__ import annotations

import importlib
import os
import warnings
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
        shared = importlib.import_module(f"{package}.heap").BufferWrapper(16)
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
        with warnings.catch_warnings():
            # Python 3.12+ warns on any fork of a multi-threaded process; pickmap forks
            # with other threads only when they are an OpenBLAS pool (see _settings.py).
            warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
            self.process.start()
        worker_end.close()
        _CALLER_ENDS.add(caller_end)
        self._shared = shared  # keep the shared memory alive as long as the handle
        self.progress = progress
        self.conn = caller_end
        self.waitable = caller_end
        self.outbox = _wire.Outbox(caller_end.fileno())
        self._reader = _wire.FrameReader(caller_end.fileno())
        self._stop_sent = False
        self.sentinel = self.process.sentinel
        self.pid = self.process.pid

    def send(self, messages: Sequence[Message]) -> None:
        self.outbox.put(messages)

    def receive(self) -> list[Message]:
        return self._reader.read()

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self._close()

    def announce_stop(self) -> None:
        if not self._stop_sent:
            self._stop_sent = True
            try:
                self.send([Stop()])
            except OSError:
                pass

    def stop(self, grace: float) -> None:
        self.announce_stop()
        if self.outbox.pending or self.conn.closed:  # a Stop that cannot be written now: nothing to wait for
            self.kill()
            return
        self.process.join(grace)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(5)
        self._close()

    def _close(self) -> None:
        self.conn.close()
        _CALLER_ENDS.discard(self.conn)
        if self.process.exitcode is not None:
            self.process.close()


class ProcessBackend(Backend):
    """Base of the process backends: picks the package that starts processes."""

    #: The ``multiprocessing``-compatible package that starts the processes.
    process_package: ClassVar[str] = "multiprocessing"

    def start_worker(self, start: WorkerStart) -> Worker:
        return ProcessWorker(self.process_package, start)
