"""Workers pickmap forks itself: from the caller (``fork``) or from its own fork server (``forkserver``).

Neither goes through ``multiprocessing``: a first call then imports none of
it (~5 ms), and a worker's arguments are inherited or sent as plain values,
never spawn preparation data. :class:`ForkedProcess` and
:class:`ServedProcess` are as much of ``multiprocessing.Process`` as a worker
needs; the child runs ``_worker.forked_main``.

A fork server is a fresh, single-threaded interpreter that imports what
workers need once and forks a worker on request, so workers start with
those modules loaded and never inherit the caller's threads. The caller
picks forkserver when it runs threads of its own (``_settings``), which is
when its first call most needs to be quick. ``multiprocessing``'s fork
server costs a first call about 20 ms more than this one: it imports
``multiprocessing`` (connection, reduction, spawn, resource tracker) before
it can fork, and every child unpickles spawn preparation data. This server
imports only ``pickmap._worker`` and the callable's modules::

    caller (start_served_worker)                  server (serve, one per caller)
    ────────────────────────────                  ──────────────────────────────
    posix_spawn python -c serve(fd)  ───────────▶ imports pickmap._worker
    [worker socket end, status pipe] + Request ─▶ imports Request.preload (once each)
                                                  fork ─▶ child: forked_main(...)
                                     ◀─────────── pid
    status pipe read end (sentinel)  ◀─────────── exit status, when the child is reaped

Served workers are the server's children, so their exit statuses come
through the status pipe; death itself is watched on a pidfd
(``backends/_process``). The server exits when the caller's end of its
control socket closes (the caller exited or stopped it), after reaping its
children for a few seconds.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import struct
import sys
import threading

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = (
    "ForkedProcess",
    "Request",
    "ServedProcess",
    "WorkerProcess",
    "serve",
    "start_served_worker",
    "stop",
)

_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
#: Seconds the server keeps reaping its children once the caller has gone.
_REAP_SECONDS = 5.0


class Request(NamedTuple):
    """One worker to fork: what the child sets up, then ``process_main``'s arguments."""

    preload: tuple[str, ...]  # modules the server imports first (kept for later forks)
    sys_path: list[str]  # the caller's, now: the child imports as the caller would
    cwd: str
    progress: str  # process_main's arguments after the socket
    idle_timeout: float
    caller_pid: int


# --------------------------------------------------------------------------- caller side
class WorkerProcess:
    """What the worker handle needs of a process: pid, a sentinel, exit code, kill, join."""

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # readable once the process has exited (or its status is known)
        self._code: int | None = None

    @property
    def exitcode(self) -> int | None:
        raise NotImplementedError

    def join(self, timeout: float | None = None) -> None:
        if self._code is None and self.sentinel >= 0:
            _readable(self.sentinel, timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class ForkedProcess(WorkerProcess):
    """A worker forked from the caller, running ``forked_main(close, *args)``.

    Its sentinel is a pipe only the child holds open (end of file: it exited,
    with any grandchild that inherited it); its status comes from ``waitpid``.
    """

    def __init__(self, close: Sequence[int], args: tuple[Any, ...]) -> None:
        from ._worker import forked_main

        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            forked_main([read_end, *close], *args)  # never returns
        os.close(write_end)
        super().__init__(pid, read_end)

    @property
    def exitcode(self) -> int | None:
        if self._code is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler of the caller's)
                pid, status = self.pid, 255 << 8
            if pid:
                self._code = os.waitstatus_to_exitcode(status)
        return self._code


class ServedProcess(WorkerProcess):
    """A worker the fork server forked; its status arrives on the sentinel pipe."""

    @property
    def exitcode(self) -> int | None:
        if self._code is None and self.sentinel >= 0 and _readable(self.sentinel, 0.0):
            data = _read_exactly(self.sentinel, _STATUS.size)
            # no status: the server died; say so only once the worker is gone too
            self._code = _STATUS.unpack(data)[0] if data else (None if _alive(self.pid) else 255)
        return self._code


class _Server:
    """The caller's handle on one running server: its control socket and process."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        target = 3 if theirs.fileno() != 3 else 4  # dup2 onto itself would keep close-on-exec
        from subprocess import _args_from_interpreter_flags  # type: ignore[attr-defined]

        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            f"from pickmap._fork import serve; serve({target})"
        )
        argv = [sys.executable, *_args_from_interpreter_flags(), "-c", code]
        try:
            self.pid = os.posix_spawn(
                sys.executable,
                argv,
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), target)],
            )
        finally:
            theirs.close()
        self.sock = ours
        self.preloaded: set[str] = set()

    def fork(self, conn: socket.socket, request: Request) -> ServedProcess:
        status_r, status_w = os.pipe()
        try:
            body = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            socket.send_fds(self.sock, [_HEADER.pack(len(body)) + body], [conn.fileno(), status_w])
            reply = _read_exactly(self.sock.fileno(), _STATUS.size)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        if len(reply) < _STATUS.size:
            os.close(status_r)
            raise OSError("pickmap's fork server exited before it could start a worker")
        self.preloaded.update(request.preload)
        return ServedProcess(_STATUS.unpack(reply)[0], status_r)

    def close(self) -> None:
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)  # it reaps its children for at most _REAP_SECONDS
        except ChildProcessError:
            pass


_server: _Server | None = None
_lock = threading.Lock()  # one request at a time; the server answers in order


def start_served_worker(
    conn: socket.socket, preload: set[str], args: tuple[str, float, int]
) -> ServedProcess:
    """Fork a worker from the server (started now if none runs) that serves ``conn``."""
    global _server
    with _lock:
        if _server is None or _server.sock.fileno() == -1:
            _server = _Server()
        server = _server
        request = Request(
            tuple(sorted(preload - server.preloaded)), list(sys.path), os.getcwd(), *args
        )
        try:
            return server.fork(conn, request)
        except OSError:
            _server = None  # it died: the next worker gets a new one
            server.sock.close()
            raise


def _close_at_exit() -> None:
    # The server sees the end of file and exits once its workers have; nobody waits for it.
    if _server is not None:
        _server.sock.close()


atexit.register(_close_at_exit)


def stop() -> None:
    """Stop the fork server, if one runs, once it has reaped its workers (benchmarks)."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.close()


def _after_fork_in_caller_child() -> None:
    # A process forked from the caller must not share its server (requests would
    # interleave), nor hold its control socket open (the server would outlive the caller).
    global _server, _lock
    if _server is not None:
        _server.sock.close()
    _server, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_caller_child)


# --------------------------------------------------------------------------- server side
def serve(control_fd: int) -> None:
    """The server's loop (``python -c``): fork a worker per request until the caller goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    from . import _worker  # what every worker runs, loaded once here

    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
    statuses: dict[int, int] = {}  # child pid -> its status pipe's write end
    import select

    poller = select.poll()
    poller.register(control_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(statuses, block=False)
        if control_fd in ready:
            received = _receive(control)
            if received is None:
                break
            request, fds = received
            pid = os.fork()
            if pid == 0:
                _child(_worker, request, fds, [control_fd, wake_r, wake_w, *statuses.values()])
            os.close(fds[0])
            statuses[pid] = fds[1]
            os.write(control_fd, _STATUS.pack(pid))
    _reap(statuses, block=True)


def _receive(control: socket.socket) -> tuple[Request, list[int]] | None:
    try:
        head, fds, _, _ = socket.recv_fds(control, _HEADER.size, 2)
    except OSError:
        return None
    if not head:
        return None
    head += _read_exactly(control.fileno(), _HEADER.size - len(head))
    body = _read_exactly(control.fileno(), _HEADER.unpack(head)[0])
    request: Request = pickle.loads(body)
    for module in request.preload:
        try:
            __import__(module)
        except BaseException:  # the worker reports it when it loads the callable
            pass
    return request, fds


def _child(worker: Any, request: Request, fds: list[int], server_fds: list[int]) -> None:
    """In the forked worker: shed the server's state, then run the worker (never returns)."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(request.cwd)
        sys.path[:] = request.sys_path
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    conn = socket.socket(fileno=fds[0])
    args = (conn, request.progress, request.idle_timeout, request.caller_pid, ())
    worker.forked_main([*server_fds, fds[1]], *args)


def _reap(statuses: dict[int, int], *, block: bool) -> None:
    """Report the exit of every child that has exited (``block``: wait a while for the rest)."""
    import time

    deadline = time.monotonic() + _REAP_SECONDS
    while statuses:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if not block or time.monotonic() > deadline:
                return
            time.sleep(0.01)
            continue
        fd = statuses.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, _STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            os.close(fd)


# --------------------------------------------------------------------------- small helpers
def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes, or fewer at end of file."""
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _readable(fd: int, seconds: float | None) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if seconds is None else max(0, int(seconds * 1000 + 0.999))))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
