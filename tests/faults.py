"""Faulty callables and objects for the fault-injection tests.

This module must be importable by worker processes (the stdlib backend pickles
these by reference), so it lives next to the tests and is found through
``sys.path``: pytest puts ``tests/`` on it, spawn workers receive the caller's
``sys.path``, and the subprocess tests set ``PYTHONPATH`` themselves.

Every fault is named by a short string, so tests can be parametrised by it:

``"raise"``     raise :class:`Boom` (an ordinary exception)
``"sysexit"``   ``sys.exit(5)``: a ``BaseException`` that is not an ``Exception``
``"exit"``      ``os._exit(EXIT_CODE)``: the process ends at once
``"sigkill"``   the process sends itself SIGKILL
``"segfault"``  read address 0 through ctypes (``ctypes.string_at(0)``)
``"sigsegv"``   ``faulthandler._sigsegv()``
``"hang"``      sleep far longer than any test waits
``"slow"``      sleep ``SLOW_SECONDS``, then carry on normally

The lethal ones (``LETHAL``) refuse to run outside a pickmap worker, so a
mistake in a test can never kill the pytest process itself.

A :class:`Bomb` is an object that faults while it is pickled (``stage="dump"``)
or unpickled (``stage="load"``), only on one ``side``: in a ``"worker"`` or in
the ``"caller"``. Sent as an item, its dump happens in the caller and its load
in a worker; returned as a result, the other way round.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

EXIT_CODE = 7
LETHAL = ("exit", "sigkill", "segfault", "sigsegv")
HANG_SECONDS = 300
SLOW_SECONDS = 2.0


class Boom(Exception):
    """The ordinary exception a fault raises."""


def in_worker() -> bool:
    from pickmap._worker import in_worker as _in_worker

    return _in_worker()


def _no_core_dump() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


def fault(kind: str, where: str = "") -> None:
    """Perform the fault ``kind``; ``where`` only decorates messages."""
    if kind in LETHAL and not in_worker():
        raise RuntimeError(f"faults.py refuses to {kind} outside a pickmap worker ({where})")
    if kind == "raise":
        raise Boom(f"fault injected {where}".strip())
    if kind == "sysexit":
        sys.exit(5)
    if kind == "hang":
        time.sleep(HANG_SECONDS)
        return
    if kind == "slow":
        time.sleep(SLOW_SECONDS)
        return
    if kind == "exit":
        os._exit(EXIT_CODE)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(HANG_SECONDS)  # not reached: SIGKILL is delivered at once
    if kind == "segfault":
        _no_core_dump()
        faulthandler.disable()  # no traceback dump on the shared stderr
        ctypes.string_at(0)
    if kind == "sigsegv":
        _no_core_dump()
        faulthandler.disable()
        faulthandler._sigsegv()
    raise AssertionError(f"unknown fault {kind!r} or it did not happen")


# --------------------------------------------------------------------------- which backends a test applies to
def backends_with(*flags: str) -> tuple[str, ...]:
    """Installed backends whose capability flags (``backends/base.py``) are all set,
    so a fault test runs on every backend where it means something, new ones included:
    crashes need ``processes`` and ``sticky`` workers pickmap owns, killing a stuck
    task needs ``killable``."""
    import pickmap
    from pickmap.registry import get_backend, registered_backends

    installed = pickmap.available_backends()
    return tuple(
        name
        for name in registered_backends()
        if name in installed and all(getattr(get_backend(name), flag) for flag in flags)
    )


def start_methods() -> tuple[str, ...]:
    import multiprocessing

    return tuple(
        m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
    )


# --------------------------------------------------------------------------- callables
class CrashOn:
    """``x * x``, except that item ``bad`` performs ``kind``."""

    def __init__(self, bad: int, kind: str) -> None:
        self.bad = bad
        self.kind = kind

    def __call__(self, x: int) -> int:
        if x == self.bad:
            fault(self.kind, f"while running item {x}")
        return x * x


class ReturnBomb:
    """Returns ``x``, except for item ``bad``, which returns a :class:`Bomb`."""

    def __init__(self, bad: int, kind: str, stage: str, side: str) -> None:
        self.bad = bad
        self.bomb = (kind, stage, side)

    def __call__(self, x: Any) -> Any:
        if x == self.bad:
            return Bomb(*self.bomb)
        return x


class RaiseOn:
    """Raises ``make()`` on item ``bad``, where ``make`` names a factory below."""

    def __init__(self, bad: int, make: str) -> None:
        self.bad = bad
        self.make = make

    def __call__(self, x: Any) -> Any:
        if x == self.bad:
            raise EXCEPTIONS[self.make]()
        return x


class BombOnLoad:
    """A callable that faults when a worker unpickles it (never in the caller)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self):
        return (_load_callable, (self.kind,))

    def __call__(self, x: Any) -> Any:
        return x


def _load_callable(kind: str) -> BombOnLoad:
    if in_worker():
        fault(kind, "while loading the callable")
    return BombOnLoad(kind)


def identity(x: Any) -> Any:
    return x


def pid_of(_: Any) -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def sleep_on(bad: int, seconds: float, x: int) -> int:
    """Sleeps ``seconds`` on item ``bad`` only."""
    if x == bad:
        time.sleep(seconds)
    return x


def sleep_for(seconds: float, x: Any) -> Any:
    time.sleep(seconds)
    return x


class Recorder:
    """Writes ``<index>.<pid>`` into ``directory`` when an item starts; then
    item ``bad`` performs the fault ``kind`` (after 0.3 s, so the other worker
    has picked up its own item), items below ``fast`` return at once and the
    others sleep ``seconds``."""

    def __init__(
        self, directory: str, bad: int | None, seconds: float, kind: str = "raise", fast: int = 0
    ) -> None:
        self.directory = directory
        self.bad = bad
        self.seconds = seconds
        self.kind = kind
        self.fast = fast

    def __call__(self, x: int) -> int:
        with open(os.path.join(self.directory, f"{x}.{os.getpid()}"), "w"):
            pass
        if x == self.bad:
            if self.kind != "hang":
                time.sleep(0.3)
            fault(self.kind, f"on item {x}")
        if x >= self.fast:
            time.sleep(self.seconds)
        return x


def started(directory: str) -> dict[int, int]:
    """``{index: pid}`` of the items a :class:`Recorder` started."""
    found = {}
    for name in os.listdir(directory):
        index, _, pid = name.partition(".")
        found[int(index)] = int(pid)
    return found


class ForksAGrandchild:
    """Item ``bad`` forks a grandchild that sleeps ``HANG_SECONDS`` (its pid is
    written to ``directory``), then the worker ``then``: ``"exit"`` (os._exit,
    EXIT_CODE) or ``"return"`` (x); item ``stuck`` hangs; the others return x.

    The grandchild inherits every descriptor the worker holds: its pipe to
    the caller and, under fork and spawn, the write end of its sentinel."""

    def __init__(self, directory: str, bad: int, then: str, stuck: int | None = None) -> None:
        self.directory = directory
        self.bad = bad
        self.then = then
        self.stuck = stuck

    def __call__(self, x: int) -> int:
        if x == self.stuck:
            fault("hang", f"on item {x}")
        if x != self.bad:
            return x
        if not in_worker():
            raise RuntimeError("faults.py refuses to fork outside a pickmap worker")
        child = os.fork()
        if child == 0:
            try:
                time.sleep(HANG_SECONDS)
            finally:
                os._exit(0)
        with open(os.path.join(self.directory, f"grandchild.{child}"), "w"):
            pass
        if self.then == "exit":
            os._exit(EXIT_CODE)
        return x


def grandchildren(directory: str) -> list[int]:
    """Pids a :class:`ForksAGrandchild` wrote into ``directory``."""
    return [
        int(name.partition(".")[2])
        for name in os.listdir(directory)
        if name.startswith("grandchild.")
    ]


def kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def report_pid_then_sleep(x: int) -> int:
    """For the Ctrl-C child: tell the parent which process runs, then block."""
    os.write(1, f"WORKER {os.getpid()} {x}\n".encode())  # one write: lines never interleave
    time.sleep(HANG_SECONDS)
    return x


class SleepsWithBallast:
    """A large callable (shipped through a spill file) that reports and blocks."""

    def __init__(self, ballast: bytes) -> None:
        self.ballast = ballast

    def __call__(self, x: int) -> int:
        return report_pid_then_sleep(x)


def nested_sum(x: int) -> tuple[int, int, list[int]]:
    """Runs a pmap inside a worker: ``(pid, sum, pids of this process's children)``."""
    import pickmap

    inner = pickmap.pmap(square, range(x), backend="stdlib", workers=2)
    return os.getpid(), sum(inner), child_pids(os.getpid())


def nested_twice(x: int) -> int:
    import pickmap

    return sum(pickmap.pmap(nested_inner, range(x), backend="cloudpickle", workers=2))


def nested_inner(y: int) -> int:
    import pickmap

    return sum(pickmap.pmap(square, range(y), backend="dill", workers=2))


# --------------------------------------------------------------------------- objects
class Bomb:
    """Faults with ``kind`` when pickled (``stage="dump"``) or unpickled
    (``stage="load"``), only on ``side`` ("worker" or "caller")."""

    def __init__(self, kind: str, stage: str, side: str) -> None:
        assert stage in ("dump", "load") and side in ("worker", "caller")
        self.kind = kind
        self.stage = stage
        self.side = side

    def _armed(self) -> bool:
        return in_worker() == (self.side == "worker")

    def __reduce__(self):
        if self.stage == "dump" and self._armed():
            fault(self.kind, "while pickling a Bomb")
        return (_load_bomb, (self.kind, self.stage, self.side))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bomb) and (self.kind, self.stage, self.side) == (
            other.kind,
            other.stage,
            other.side,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.stage, self.side))

    def __repr__(self) -> str:
        return f"Bomb({self.kind!r}, {self.stage!r}, {self.side!r})"


def _load_bomb(kind: str, stage: str, side: str) -> Bomb:
    bomb = Bomb(kind, stage, side)
    if stage == "load" and bomb._armed():
        fault(kind, "while unpickling a Bomb")
    return bomb


# --------------------------------------------------------------------------- exceptions
class NeedsTwoArguments(Exception):
    """Pickles fine in the worker, but ``Exception.__reduce__`` passes only
    ``args`` back to ``__init__``, which wants two: cannot be rebuilt."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code


class HoldsALock(Exception):
    """Cannot be pickled in the worker at all (a lock in its state)."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class BrokenRepr(Exception):
    """Its ``repr`` and ``str`` raise, and it cannot be pickled either."""

    def __init__(self) -> None:
        super().__init__("broken repr")
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        raise RuntimeError("repr of BrokenRepr fails")

    def __str__(self) -> str:
        raise RuntimeError("str of BrokenRepr fails")


class LethalToPickle(Exception):
    """Its pickling (in the worker) kills the worker."""

    def __reduce__(self):
        if in_worker():
            fault("exit", "while pickling an exception")
        return (LethalToPickle, ())


EXCEPTIONS = {
    "needs-two-arguments": lambda: NeedsTwoArguments(3, "cannot be rebuilt"),
    "holds-a-lock": HoldsALock,
    "broken-repr": BrokenRepr,
    "lethal-to-pickle": LethalToPickle,
}


# --------------------------------------------------------------------------- /proc helpers
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    return data[data.rindex(")") + 2 :].split()


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (zombies included), by scanning /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and int(fields[1]) == pid:
            children.append(int(entry))
    return sorted(children)


def descendant_pids(pid: int) -> list[int]:
    """Every descendant of ``pid``: children, their children, ..."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.append(child)
                frontier.append(child)
    return sorted(found)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def kill_leftovers(proc: Any, pids) -> None:
    """Test clean-up: kill the child interpreter and any of ``pids`` still alive."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it exited in between


def wait_until_gone(pids, seconds: float = 10.0) -> list[int]:
    """Waits until none of ``pids`` is alive; returns the ones still alive."""
    deadline = time.monotonic() + seconds
    survivors = [p for p in pids if alive(p)]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.05)
        survivors = [p for p in survivors if alive(p)]
    return survivors


def describe_pids(pids) -> dict[int, str]:
    """``{pid: "state cmdline"}``, for assertion messages."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            cmdline = "?"
        out[pid] = f"{fields[0] if fields else 'gone'} {cmdline}"
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- module state
#: A module global a test changes in the caller (issue 9, case 6).
OFFSET = 0


def add_offset(x: int) -> int:
    return x + OFFSET


def set_offset(value: int) -> None:
    global OFFSET
    OFFSET = value


def add(a: int, b: int) -> int:
    return a + b


# --------------------------------------------------------------------------- inputs
class InputBroke(Exception):
    """What a broken input raises."""


def breaks_after(count: int):
    """A generator of ``range(count)`` that then raises :class:`InputBroke`."""
    yield from range(count)
    raise InputBroke(f"the input broke after {count} items")


# --------------------------------------------------------------------------- issue 9: the GIL, memory, shared memory
def regex_or_size(x: Any) -> int:
    """Item ``0``: a catastrophic regex that holds the GIL for minutes; a bytes item: its length."""
    if isinstance(x, int) and x == 0:
        import re

        re.match(r"(a+)+$", "a" * 40 + "b")
    return len(x)


def limit_address_space(extra_mb: int, flag: str | None = None) -> None:
    """Initializer: this worker may map only ``extra_mb`` more MB than it has now
    (then it creates the file ``flag``, to say so)."""
    import resource

    # Free heap memory inherited at fork would count as room: hand it back first.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (vm_kb << 10) + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    if flag is not None:
        with open(flag, "w"):
            pass


class ReportsWithBallast:
    """A large callable (its ballast goes through shared memory) that reports its
    pid and the item's size on stdout, then blocks."""

    def __init__(self, ballast: bytes) -> None:
        self.ballast = ballast

    def __call__(self, x: Any) -> int:
        return report_pid_then_sleep(len(x))
