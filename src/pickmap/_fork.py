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

import _pickle
import _socket
import atexit
import os
import struct
import sys
import threading

from ._shm import pid_alive

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    import signal as _signal  # _signal has no stub; its functions are signal's
    from collections.abc import Sequence
    from typing import Any, NamedTuple
else:
    import _signal

    from ._records import NamedTuple

# The C halves of pickle, signal and socket: the server imports this module before it
# can fork, and pickle.py, signal.py and socket.py would add ~5 ms (re, enum, selectors).

__all__ = (
    "ForkRefused",
    "ForkedProcess",
    "Request",
    "ServedProcess",
    "WorkerProcess",
    "prestart_server",
    "readable",
    "serve",
    "start_served_worker",
    "stop",
)

_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")
_FDS = struct.Struct("2i")  # a request's two descriptors, as SCM_RIGHTS carries them
#: Seconds the server keeps reaping its children once the caller has gone.
_REAP_SECONDS = 5.0


class ForkRefused(OSError):
    """The fork server runs, but its ``fork()`` failed (EAGAIN, ENOMEM)."""


class Request(NamedTuple):
    """One worker to fork: what the child sets up, then ``process_main``'s arguments."""

    preload: tuple[str, ...]  # modules the server imports first (kept for later forks)
    sys_path: list[str]  # the caller's, now: the child imports as the caller would
    cwd: str | None  # None: the caller's was removed
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
            readable(self.sentinel, timeout)

    def kill(self) -> None:
        if self.exitcode is not None:
            return  # reaped: its pid may be another process's by now
        try:
            os.kill(self.pid, _signal.SIGKILL)
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
        from ._worker import flush_std_streams, forked_main

        _reap_abandoned()
        flush_std_streams()  # or the child writes the caller's buffered output a second time
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            forked_main([read_end, *close], *args)  # never returns
        os.close(write_end)
        super().__init__(pid, read_end)

    def close(self) -> None:
        if self.exitcode is None:
            _abandoned.add(self.pid)  # killed but not yet exited: reaped by a later fork
        super().close()

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


_abandoned: set[int] = set()  # forked workers closed before they were reaped


def _reap_abandoned() -> None:
    for pid in list(_abandoned):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _abandoned.discard(pid)


class ServedProcess(WorkerProcess):
    """A worker the fork server forked; its status arrives on the sentinel pipe."""

    @property
    def exitcode(self) -> int | None:
        if self._code is None and self.sentinel >= 0 and readable(self.sentinel, 0.0):
            data = _read_exactly(self.sentinel, _STATUS.size)
            # no status: the server died; say so only once the worker is gone too
            self._code = _STATUS.unpack(data)[0] if data else (None if pid_alive(self.pid) else 255)
        return self._code


class _Server:
    """The caller's handle on one running server: its control socket and process."""

    def __init__(self) -> None:
        from subprocess import _args_from_interpreter_flags  # type: ignore[attr-defined]

        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        for end in (ours, theirs):
            end.setblocking(True)  # whatever socket.setdefaulttimeout() says
        target = 3 if theirs.fileno() != 3 else 4  # dup2 onto itself would keep close-on-exec
        code = f"import sys; sys.path[:] = {sys.path!r}; from pickmap._fork import serve; serve({target})"
        # The server (and every worker it forks) holds none of the caller's descriptors but
        # its control socket, and reads /dev/null, never the caller's terminal.
        actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), target)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd != target]
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        try:
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, *_args_from_interpreter_flags(), "-c", code],
                os.environ,
                file_actions=actions,
                setsigmask=(),  # a caller thread's blocked signals are not the server's
            )
        finally:
            theirs.close()
        self.sock = ours
        self.preloaded: set[str] = set()
        self.exited = False

    def fork(self, conn: _socket.socket, request: Request) -> ServedProcess:
        status_r, status_w = os.pipe()
        try:
            body = _pickle.dumps(request, protocol=5)
            rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _FDS.pack(conn.fileno(), status_w))]
            message = _HEADER.pack(len(body)) + body
            sent = self.sock.sendmsg([message], rights)
            if sent < len(message):  # a signal cut the send short: the rest, without the fds
                self.sock.sendall(message[sent:])
            reply = self._reply()
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        (pid,) = _STATUS.unpack(reply)
        if pid < 0:
            os.close(status_r)
            raise ForkRefused(
                -pid, f"pickmap's fork server could not fork a worker: {os.strerror(-pid)}"
            )
        self.preloaded.update(request.preload)
        return ServedProcess(pid, status_r)

    def _reply(self) -> bytes:
        """The server's answer; ``OSError`` if it exits first (never a wait on a dead server)."""
        while not readable(self.sock.fileno(), 0.1):
            if self._reaped(block=False):
                break
        reply = _read_exactly(self.sock.fileno(), _STATUS.size) if self.sock.fileno() >= 0 else b""
        if len(reply) < _STATUS.size:
            raise OSError(
                "pickmap's fork server exited before it could start a worker (its error, if it "
                "printed one, is above); start_method='spawn' starts workers without it"
            )
        return reply

    def close(self, *, kill: bool = False, wait: bool = True) -> None:
        """Drop the server: it sees the end of file and exits once it has reaped its workers
        (at most ``_REAP_SECONDS``); ``kill`` ends it at once (a request went wrong)."""
        self.sock.close()
        if kill and not self.exited:
            os.kill(self.pid, _signal.SIGKILL)  # our child, not reaped yet: the pid is still its
        if wait:
            self._reaped(block=True)

    def _reaped(self, *, block: bool) -> bool:
        if not self.exited:
            try:
                self.exited = os.waitpid(self.pid, 0 if block else os.WNOHANG)[0] != 0
            except ChildProcessError:
                self.exited = True
        return self.exited


_server: _Server | None = None
_lock = threading.Lock()  # one request at a time; the server answers in order


def start_served_worker(
    conn: _socket.socket, preload: set[str], args: tuple[str, float, int]
) -> ServedProcess:
    """Fork a worker from the server (started now if none runs) that serves ``conn``."""
    global _server
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # the caller's directory was removed: the worker stays in the server's
        cwd = None
    with _lock:
        for attempt in (1, 2):
            fresh = _server is None
            if _server is None:
                _server = _Server()
            server = _server
            request = Request(tuple(sorted(preload - server.preloaded)), list(sys.path), cwd, *args)
            try:
                return server.fork(conn, request)
            except ForkRefused:
                raise  # the server is well, its fork() failed (EAGAIN, ENOMEM): it stays
            except BaseException as exc:
                # Died, or interrupted between request and reply (Ctrl-C): its next reply
                # could be this request's, so it answers no other.
                _server = None
                if isinstance(exc, OSError) and not server._reaped(block=False):
                    # It closed its end itself (a request it could not read) and still reaps
                    # the workers it forked: killed, it would lose their exit statuses.
                    server.close(wait=False)
                    _abandoned.add(server.pid)  # reaped by a later fork, like closed workers
                else:
                    server.close(kill=True)
                if fresh or attempt == 2 or not isinstance(exc, OSError):
                    raise
                # a server that died since its last worker: this one gets a new server
    raise AssertionError("unreachable")


def prestart_server() -> None:
    """Start the fork server now, if none runs, without waiting for it to boot."""
    global _server
    with _lock:
        if _server is None:
            _server = _Server()


def _close_at_exit() -> None:
    # The server sees the end of file and exits once its workers have; nobody waits for it.
    if _server is not None:
        _server.close(wait=False)


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
        _server.close(wait=False)
    _server, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_caller_child)


# --------------------------------------------------------------------------- server side
def serve(control_fd: int) -> None:
    """The server's loop (``python -c``): fork a worker per request until the caller goes."""
    import select

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    # a caller thread that blocked SIGCHLD passed its mask on: unblock it, or nothing is reaped
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGCHLD})
    from . import _worker  # what every worker runs, loaded once here

    control = _socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
    statuses: dict[int, int] = {}  # child pid -> its status pipe's write end
    poller = select.poll()
    poller.register(control_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(statuses, block=False)
        if control_fd in ready:
            try:
                received = _receive(control)
            except Exception:  # a request that cannot be read: the caller is gone or broken
                break
            if received is None:
                break
            request, fds = received
            _worker.flush_std_streams()
            try:
                pid = os.fork()
            except OSError as exc:  # EAGAIN, ENOMEM: this worker fails, the server stays
                pid = -(exc.errno or 1)
            if pid == 0:
                _child(_worker, request, fds, [control_fd, wake_r, wake_w, *statuses.values()])
            os.close(fds[0])
            if pid > 0:
                statuses[pid] = fds[1]
            else:
                os.close(fds[1])
            try:
                os.write(control_fd, _STATUS.pack(pid))
            except OSError:
                break
    control.close()  # a caller waiting on a reply sees the end at once, not after the reaping
    _reap(statuses, block=True)


def _receive(control: _socket.socket) -> tuple[Request, list[int]] | None:
    """The next request and its two descriptors; ``None`` when the caller has closed."""
    try:
        head, ancillary, _, _ = control.recvmsg(_HEADER.size, _socket.CMSG_LEN(_FDS.size))
    except OSError:
        return None
    fds = [
        fd
        for level, kind, data in ancillary
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
        for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4])
    ]
    request: Request | None = None
    try:
        if head:
            if len(fds) != 2:
                raise ValueError("a request came without its two descriptors")
            head += _read_exactly(control.fileno(), _HEADER.size - len(head))
            body = _read_exactly(control.fileno(), _HEADER.unpack(head)[0])
            request = _pickle.loads(body)
    finally:
        if request is None:  # the caller closed, or a request that cannot be read
            for fd in fds:
                os.close(fd)
    if request is None:
        return None
    for module in request.preload:
        try:
            __import__(module)
        except BaseException:  # the worker reports it when it loads the callable
            pass
    return request, fds


def _child(worker: Any, request: Request, fds: list[int], server_fds: list[int]) -> None:
    """In the forked worker: shed the server's state, then run the worker (never returns)."""
    try:
        _signal.set_wakeup_fd(-1)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        if request.cwd is not None:
            os.chdir(request.cwd)
        sys.path[:] = request.sys_path
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    conn = _socket.socket(fileno=fds[0])
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


def _inheritable_fds() -> list[int]:
    """The caller's descriptors a spawned program would inherit (not close-on-exec)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: Python opens descriptors close-on-exec unless told otherwise
        return []
    inheritable = []
    for fd in fds:
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    inheritable.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
    return inheritable


def readable(fd: int, seconds: float | None) -> bool:
    """Whether ``fd`` is readable within ``seconds`` (``None``: wait as long as it takes)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if seconds is None else max(0, int(seconds * 1000 + 0.999))))
