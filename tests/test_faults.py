"""Fault injection: workers that die, objects that fail to (un)pickle, stuck
items, Ctrl-C, nested calls, bad arguments and fail-fast, on every process
backend and start method.

The faulty callables and objects live in ``faults.py`` so that spawn and
forkserver workers can import them. Every test that could hang carries a hard
``pytest.mark.timeout``; the time limits asserted inside tests are generous
(other work shares the machine) but far below those hard limits, so a hang
fails the test instead of stalling CI.

Cost control: the cheap, central scenarios (a worker dying mid-task) run on the
full backend x start method matrix. Slower or less method-dependent scenarios
run on every backend with ``fork`` plus a rotation that still puts each
backend on spawn and forkserver somewhere.
"""

from __future__ import annotations

import math
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import BrokenExecutor

import faults
import pytest
from conftest import START_METHODS

import pickmap
from pickmap import (
    RemoteTraceback,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerError,
    imap,
    pmap,
)

# From the registry: every installed backend with worker processes pickmap owns,
# and those that can kill a stuck task (a new backend gets these tests for free).
PROCESS_BACKENDS = faults.backends_with("processes", "sticky")
KILLABLE_BACKENDS = faults.backends_with("processes", "killable")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(TESTS_DIR), "src")

PROMPT = 10.0  # seconds: "within seconds", with room for a loaded machine
CRASH_EXITCODES = {
    "exit": faults.EXIT_CODE,
    "sigkill": -signal.SIGKILL,
    "segfault": -signal.SIGSEGV,
    "sigsegv": -signal.SIGSEGV,
}
CRASH_WORDS = {
    "exit": f"exit code {faults.EXIT_CODE}",
    "sigkill": "SIGKILL",
    "segfault": "SIGSEGV",
    "sigsegv": "SIGSEGV",
}


def _matrix(backends: tuple[str, ...] = PROCESS_BACKENDS) -> list[object]:
    return [pytest.param(b, m, id=f"{b}-{m}") for b in backends for m in START_METHODS]


def _rotation(backends: tuple[str, ...] = PROCESS_BACKENDS) -> list[object]:
    """Every backend on fork, plus each backend once on a slower start method."""
    cases = [(b, "fork") for b in backends if "fork" in START_METHODS]
    slow = [m for m in ("spawn", "forkserver") if m in START_METHODS]
    for i, b in enumerate(backends):
        if slow:
            cases.append((b, slow[i % len(slow)]))
    return [pytest.param(b, m, id=f"{b}-{m}") for b, m in cases]


MATRIX = _matrix()
ROTATION = _rotation()
KILLABLE_ROTATION = _rotation(KILLABLE_BACKENDS)
FORK = [pytest.param(b, "fork", id=f"{b}-fork") for b in PROCESS_BACKENDS]


def kw(backend: str, method: str, **extra: object) -> dict[str, object]:
    return {"backend": backend, "start_method": method, "workers": 2, **extra}


def pids_of_a_warm_pool(backend: str, method: str) -> set[int]:
    """Warm the pool this test will use; return its worker pids (two chunks
    start both workers: a worker with a queued chunk is never picked first)."""
    return set(pmap(faults.pid_of, range(8), chunksize=1, **kw(backend, method)))


def assert_pool_works(backend: str, method: str) -> set[int]:
    pids = set(pmap(faults.pid_of, range(8), chunksize=1, **kw(backend, method)))
    assert pmap(faults.square, range(10), **kw(backend, method)) == [i * i for i in range(10)]
    assert os.getpid() not in pids
    return pids


class Clock:
    def __enter__(self) -> Clock:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self.start


# =========================================================================== worker death mid-task
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["exit", "sigkill", "segfault"])
@pytest.mark.parametrize("backend,method", MATRIX)
def test_worker_dying_mid_task_raises_crash_error(backend, method, kind):
    before = pids_of_a_warm_pool(backend, method)
    with Clock() as clock, pytest.raises(WorkerCrashedError) as caught:
        pmap(faults.CrashOn(3, kind), range(8), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    error = caught.value
    assert isinstance(error, BrokenExecutor)
    assert error.exitcode == CRASH_EXITCODES[kind]
    assert error.indices == (3,)
    message = str(error)
    assert CRASH_WORDS[kind] in message and "item 3" in message, message
    # The broken pool is discarded: its workers are gone, the next call uses new ones.
    assert faults.wait_until_gone(before) == []
    assert not (assert_pool_works(backend, method) & before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_faulthandler_sigsegv_in_a_task(backend, method):
    with pytest.raises(WorkerCrashedError, match="SIGSEGV") as caught:
        pmap(faults.CrashOn(5, "sigsegv"), range(8), chunksize=1, **kw(backend, method))
    assert caught.value.exitcode == -signal.SIGSEGV and caught.value.indices == (5,)
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_crash_in_a_chunk_names_every_item_in_flight(backend, method):
    # Without a timeout the engine knows which chunk, not which item of it.
    with pytest.raises(WorkerCrashedError) as caught:
        pmap(faults.CrashOn(6, "exit"), range(8), chunksize=4, **kw(backend, method))
    assert caught.value.indices == (4, 5, 6, 7)
    assert "items 4-7" in str(caught.value)
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_crash_in_a_timed_chunk_names_the_exact_item(backend, method):
    # With timeout= the worker reports the item it runs, so the crash names it.
    with pytest.raises(WorkerCrashedError) as caught:
        pmap(faults.CrashOn(6, "exit"), range(8), chunksize=4, timeout=30, **kw(backend, method))
    assert caught.value.indices == (6,)
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_crash_through_imap_unordered(backend, method):
    got = []
    with pytest.raises(WorkerCrashedError) as caught:
        for value in imap(
            faults.CrashOn(9, "sigkill"),
            range(20),
            ordered=False,
            chunksize=1,
            **kw(backend, method),
        ):
            got.append(value)
    assert caught.value.indices == (9,)
    assert 81 not in got
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_crash_with_return_exceptions_is_not_a_hang(backend, method):
    # return_exceptions collects what func raises; a dead worker raised nothing,
    # so the call ends (documented: a crash is never collected as a result).
    with Clock() as clock, pytest.raises(WorkerCrashedError) as caught:
        pmap(
            faults.CrashOn(3, "exit"),
            range(6),
            chunksize=1,
            return_exceptions=True,
            **kw(backend, method),
        )
    assert caught.value.indices == (3,)
    assert clock.elapsed < PROMPT
    assert_pool_works(backend, method)


# =========================================================================== faults while (un)pickling
# (where the fault happens, fault kind) -> the call that triggers it
def _lethal_call(where: str, kind: str):
    if where == "item-load":  # an argument whose unpickling in the worker kills it
        return faults.identity, [0, 1, 2, faults.Bomb(kind, "load", "worker"), 4, 5]
    if where == "result-dump":  # a result whose pickling in the worker kills it
        return faults.ReturnBomb(3, kind, "dump", "worker"), range(6)
    if where == "exception-dump":  # an exception whose pickling kills the worker
        return faults.RaiseOn(3, "lethal-to-pickle"), range(6)
    raise AssertionError(where)


LETHAL_PICKLING = [
    ("item-load", "exit"),
    ("item-load", "segfault"),
    ("result-dump", "exit"),
    ("result-dump", "sigkill"),
    ("result-dump", "segfault"),
    ("exception-dump", "exit"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "where,kind", LETHAL_PICKLING, ids=[f"{w}-{k}" for w, k in LETHAL_PICKLING]
)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_lethal_pickling_fault_in_a_worker(backend, method, where, kind):
    func, items = _lethal_call(where, kind)
    with Clock() as clock, pytest.raises(WorkerCrashedError) as caught:
        pmap(func, items, chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    assert caught.value.indices == (3,)
    assert caught.value.exitcode == CRASH_EXITCODES[kind]
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["exit", "segfault"])
@pytest.mark.parametrize("backend,method", ROTATION)
def test_callable_whose_unpickling_kills_the_worker(backend, method, kind):
    with Clock() as clock, pytest.raises(WorkerCrashedError) as caught:
        pmap(faults.BombOnLoad(kind), range(6), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    assert caught.value.exitcode == CRASH_EXITCODES[kind]
    # It died before running anything: the chunk it held is named.
    assert caught.value.indices and set(caught.value.indices) <= set(range(6))
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["raise", "sysexit"])
@pytest.mark.parametrize("backend,method", ROTATION)
def test_callable_whose_unpickling_raises_in_the_worker(backend, method, kind):
    with Clock() as clock, pytest.raises(SerializationError, match="BombOnLoad") as caught:
        pmap(faults.BombOnLoad(kind), range(6), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    assert caught.value.backend == backend
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_callable_whose_pickling_raises_fails_before_any_worker_starts(backend, method):
    pickmap.shutdown()
    children = faults.child_pids(os.getpid())
    bomb = faults.Bomb("raise", "dump", "caller")
    func = faults.ReturnBomb(0, "raise", "dump", "caller")
    func.extra = bomb  # the callable itself cannot be pickled
    with pytest.raises(SerializationError) as caught:
        pmap(func, range(6), **kw(backend, method))
    assert "fault injected while pickling" in str(caught.value) and caught.value.backend == backend
    assert faults.child_pids(os.getpid()) == children


# --------------------------------------------------------------------------- items
@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_item_whose_pickling_raises_names_index_and_type(backend, method):
    items = [0, 1, 2, faults.Bomb("raise", "dump", "caller"), 4, 5]
    with pytest.raises(SerializationError) as caught:
        pmap(faults.identity, items, chunksize=1, **kw(backend, method))
    error = caught.value
    assert error.index == 3 and error.what == "Bomb" and error.backend == backend
    assert "item 3" in str(error) and "Bomb" in str(error)
    assert "thread" in error.capable  # the hint: who could carry it
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_first_item_that_cannot_be_pickled_fails_before_any_worker_starts(backend, method):
    pickmap.shutdown()
    children = faults.child_pids(os.getpid())
    with pytest.raises(SerializationError, match=r"Bomb|pickling") as caught:
        pmap(faults.identity, [faults.Bomb("raise", "dump", "caller"), 1], **kw(backend, method))
    assert "thread" in caught.value.capable
    assert faults.child_pids(os.getpid()) == children


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_item_whose_pickling_calls_sys_exit_propagates_and_cleans_up(backend, method):
    # sys.exit() in the caller's own code (a __reduce__) is the caller's wish:
    # it propagates, and nothing of the call keeps running.
    items = [0, 1, 2, faults.Bomb("sysexit", "dump", "caller"), 4]
    with pytest.raises(SystemExit):
        pmap(faults.identity, items, chunksize=1, **kw(backend, method))
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["raise", "sysexit"])
@pytest.mark.parametrize("backend,method", ROTATION)
def test_item_whose_unpickling_raises_in_the_worker(backend, method, kind):
    items = [0, 1, 2, faults.Bomb(kind, "load", "worker"), 4, 5]
    with Clock() as clock, pytest.raises(SerializationError) as caught:
        pmap(faults.identity, items, chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    assert caught.value.backend == backend
    assert "starting at index 3" in str(caught.value), str(caught.value)
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_item_whose_unpickling_raises_sets_the_index_attribute(backend, method):
    # errors.SerializationError documents index as "the item's position in
    # the input (None for the callable)".
    items = [0, 1, 2, faults.Bomb("raise", "load", "worker"), 4, 5]
    with pytest.raises(SerializationError) as caught:
        pmap(faults.identity, items, chunksize=1, **kw(backend, method))
    assert caught.value.index == 3


# --------------------------------------------------------------------------- results
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["raise", "sysexit"])
@pytest.mark.parametrize("backend,method", ROTATION)
def test_result_that_cannot_be_pickled_names_index_type_and_hint_and_pool_survives(
    backend, method, kind
):
    before = pids_of_a_warm_pool(backend, method)
    # On the warm pool, chunks alternate: items 1 and 3 go to the second
    # worker, which is idle again once it has reported item 3.
    with Clock() as clock, pytest.raises(SerializationError) as caught:
        pmap(
            faults.ReturnBomb(3, kind, "dump", "worker"),
            range(4),
            chunksize=1,
            **kw(backend, method),
        )
    assert clock.elapsed < PROMPT
    error = caught.value
    assert error.index == 3 and error.what == "Bomb" and error.backend == backend
    message = str(error)
    assert "item 3" in message and "Bomb" in message and "thread" in message, message
    # The pool survives: the worker that reported it is kept and reused (busy
    # ones may be killed: fail fast).
    after = assert_pool_works(backend, method)
    assert after & before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_result_that_cannot_be_unpickled_in_the_caller(backend, method):
    with Clock() as clock, pytest.raises(SerializationError) as caught:
        pmap(
            faults.ReturnBomb(3, "raise", "load", "caller"),
            range(6),
            chunksize=1,
            **kw(backend, method),
        )
    assert clock.elapsed < PROMPT
    assert caught.value.index == 3
    assert "Bomb" in str(caught.value), str(caught.value)
    assert isinstance(caught.value.__cause__, faults.Boom)
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_result_whose_unpickling_calls_sys_exit_in_the_caller(backend, method):
    with pytest.raises(SystemExit):
        pmap(
            faults.ReturnBomb(3, "sysexit", "load", "caller"),
            range(6),
            chunksize=1,
            **kw(backend, method),
        )
    assert_pool_works(backend, method)


# =========================================================================== exceptions
@pytest.mark.timeout(30)
@pytest.mark.parametrize("make", ["needs-two-arguments", "holds-a-lock"])
@pytest.mark.parametrize("backend,method", ROTATION)
def test_exception_that_cannot_come_back_is_a_worker_error(backend, method, make):
    with Clock() as clock, pytest.raises(WorkerError) as caught:
        pmap(faults.RaiseOn(3, make), range(6), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    error = caught.value
    name = {"needs-two-arguments": "NeedsTwoArguments", "holds-a-lock": "HoldsALock"}[make]
    assert error.exc_repr.startswith(name), error.exc_repr
    assert error.index == 3
    assert "Traceback" in error.remote_traceback and "__call__" in error.remote_traceback
    assert "faults.py" in error.remote_traceback and name in error.remote_traceback
    assert isinstance(error.__cause__, RemoteTraceback)
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_exception_whose_repr_fails_is_still_reported(backend, method):
    with Clock() as clock, pytest.raises(WorkerError) as caught:
        pmap(faults.RaiseOn(3, "broken-repr"), range(6), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    assert "BrokenRepr" in caught.value.exc_repr
    assert "BrokenRepr" in caught.value.remote_traceback
    assert caught.value.index == 3
    assert_pool_works(backend, method)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend,method", FORK)
def test_sys_exit_in_a_task_comes_back_as_itself(backend, method):
    with pytest.raises(SystemExit) as caught:
        pmap(faults.CrashOn(3, "sysexit"), range(6), chunksize=1, **kw(backend, method))
    assert caught.value.code == 5
    assert any("item 3" in note for note in getattr(caught.value, "__notes__", []))
    assert_pool_works(backend, method)


# =========================================================================== timeouts
@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", KILLABLE_ROTATION)
def test_timeout_is_per_task_and_the_stuck_worker_is_replaced(backend, method, tmp_path):
    pids_of_a_warm_pool(backend, method)
    func = faults.Recorder(str(tmp_path), bad=3, seconds=0, kind="hang")
    with Clock() as clock, pytest.raises(TaskTimeoutError) as caught:
        pmap(func, range(6), chunksize=1, timeout=1, **kw(backend, method))
    assert 0.9 < clock.elapsed < 1 + PROMPT
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert error.index == 3 and error.timeout == 1
    assert "item 3" in str(error)
    stuck = faults.started(str(tmp_path))[3]
    assert faults.wait_until_gone([stuck], 5) == [], "the stuck worker was not killed"
    assert stuck not in assert_pool_works(backend, method)


@pytest.mark.timeout(60)
def test_timeout_counts_each_task_not_the_whole_call():
    # 12 items of 0.25 s on 2 workers, in chunks of 4: every chunk and the
    # call take longer than the timeout, no single item does.
    got = pmap(
        faults.sleep_for, [0.25] * 12, range(12), chunksize=4, timeout=0.8, **kw("stdlib", "fork")
    )
    assert got == list(range(12))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_a_killed_workers_progress_never_times_out_its_successor(method):
    # A worker killed mid-item leaves [index, start time] in its progress
    # slot; the shared-memory heap hands that block to the next worker.
    import gc

    with pytest.raises(TaskTimeoutError):
        pmap(faults.sleep_for, [30.0], [0], timeout=0.3, **kw("stdlib", method, workers=1))
    gc.collect()  # free the dead worker's handle, and with it its slot
    time.sleep(0.5)  # the stale start time is now older than the next timeout
    got = pmap(
        faults.sleep_for, [0.05] * 4, range(4), timeout=0.5, **kw("stdlib", method, workers=1)
    )
    assert got == [0, 1, 2, 3]


SLOW_PHASES = {
    "item-load": (faults.identity, [0, 1, 2, faults.Bomb("slow", "load", "worker"), 4, 5]),
    "result-dump": (faults.ReturnBomb(3, "slow", "dump", "worker"), range(6)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("phase", sorted(SLOW_PHASES))
def test_timeout_covers_unpickling_the_item_and_pickling_the_result(phase):
    # The worker spends faults.SLOW_SECONDS in __reduce__ of item/result 3.
    func, items = SLOW_PHASES[phase]
    with Clock() as clock, pytest.raises(TaskTimeoutError) as caught:
        pmap(func, items, chunksize=1, timeout=0.5, **kw("stdlib", "fork"))
    assert clock.elapsed < faults.SLOW_SECONDS
    assert caught.value.index == 3
    assert_pool_works("stdlib", "fork")


@pytest.mark.timeout(60)
def test_timeout_covers_a_callable_that_is_slow_to_unpickle():
    with Clock() as clock, pytest.raises(TaskTimeoutError):
        pmap(faults.BombOnLoad("slow"), range(4), chunksize=1, timeout=0.5, **kw("stdlib", "fork"))
    assert clock.elapsed < faults.SLOW_SECONDS


# =========================================================================== fail fast
FAIL_FAST = [
    ("raise", faults.Boom, {}),
    ("exit", WorkerCrashedError, {}),
    ("hang", TaskTimeoutError, {"timeout": 1}),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,raised,extra", FAIL_FAST, ids=[f[0] for f in FAIL_FAST])
@pytest.mark.parametrize("backend,method", FORK)
def test_first_error_cancels_the_rest_and_kills_busy_workers(
    backend, method, kind, raised, extra, tmp_path
):
    # Item 0 fails (after 0.3 s); every other item would sleep 60 s.
    func = faults.Recorder(str(tmp_path), bad=0, seconds=60, kind=kind)
    with Clock() as clock, pytest.raises(raised):
        pmap(func, range(20), chunksize=1, **kw(backend, method, **extra))
    assert clock.elapsed < PROMPT
    started = faults.started(str(tmp_path))
    # Only what was queued on the two workers ever started ...
    assert len(started) <= 4, started
    # ... nobody is left running it ...
    assert faults.wait_until_gone(set(started.values()), 5) == []
    # ... and nothing starts later.
    time.sleep(0.5)
    assert faults.started(str(tmp_path)) == started
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_return_exceptions_collects_them_in_place(backend, method):
    results = pmap(
        faults.RaiseOn(1, "needs-two-arguments"),
        range(6),
        chunksize=2,
        return_exceptions=True,
        **kw(backend, method),
    )
    assert results[0] == 0 and results[2:] == [2, 3, 4, 5]
    assert isinstance(results[1], (faults.NeedsTwoArguments, WorkerError))
    unpicklable = pmap(
        faults.RaiseOn(2, "holds-a-lock"),
        range(4),
        chunksize=4,
        return_exceptions=True,
        **kw(backend, method),
    )
    assert unpicklable[:2] == [0, 1] and unpicklable[3] == 3
    assert isinstance(unpicklable[2], WorkerError) and "HoldsALock" in unpicklable[2].exc_repr
    crash_free = pmap(
        faults.CrashOn(4, "raise"),
        range(8),
        chunksize=3,
        return_exceptions=True,
        **kw(backend, method),
    )
    assert isinstance(crash_free[4], faults.Boom)
    assert [r for i, r in enumerate(crash_free) if i != 4] == [i * i for i in range(8) if i != 4]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_abandoned_imap_kills_what_it_started(backend, method, tmp_path):
    # Item 0 returns at once, every other item would sleep 60 s.
    func = faults.Recorder(str(tmp_path), bad=None, seconds=60, fast=1)
    results = imap(func, range(10), chunksize=1, **kw(backend, method))
    assert next(results) == 0
    deadline = time.monotonic() + PROMPT
    while len(faults.started(str(tmp_path))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # both workers are busy with a slow item
    results.close()
    started = faults.started(str(tmp_path))
    assert len(started) >= 3
    assert faults.wait_until_gone(set(started.values()), 5) == []
    time.sleep(0.3)
    assert faults.started(str(tmp_path)) == started
    assert_pool_works(backend, method)


# =========================================================================== Ctrl-C
CTRL_C_CHILD = textwrap.dedent(
    """
    import sys
    import faults, pickmap
    backend, method = sys.argv[1], sys.argv[2]
    print("CALLING", flush=True)
    pickmap.pmap(faults.report_pid_then_sleep, range(8), backend=backend, start_method=method,
                 workers=2, chunksize=1)
    print("RETURNED", flush=True)
    """
)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_until(proc: subprocess.Popen, predicate, seconds: float) -> str:
    """Reads the child's stdout until ``predicate(text)`` or the deadline."""
    fd = proc.stdout.fileno()
    text = ""
    deadline = time.monotonic() + seconds
    while not predicate(text):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        text += data.decode()
    return text


def _worker_pids(text: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"WORKER (\d+) ", text)}


CTRL_C_CASES = [
    pytest.param("stdlib", m, "group", id=f"stdlib-{m}-group") for m in START_METHODS
] + [
    pytest.param("cloudpickle", "spawn", "group", id="cloudpickle-spawn-group"),
    pytest.param("dill", "forkserver", "group", id="dill-forkserver-group"),
    pytest.param("dill", "fork", "caller-only", id="dill-fork-caller-only"),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend,method,target", CTRL_C_CASES)
def test_ctrl_c_propagates_and_no_worker_survives(backend, method, target):
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CHILD, backend, method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        cwd=TESTS_DIR,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    descendants: list[int] = []
    try:
        text = _read_until(proc, lambda t: len(_worker_pids(t)) >= 2, 60)
        workers = _worker_pids(text)
        assert len(workers) == 2, f"workers did not start: {text!r}"
        descendants = faults.descendant_pids(proc.pid)
        assert workers <= set(descendants)
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, signal.SIGINT)
        with Clock() as clock:
            try:
                proc.wait(timeout=PROMPT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the interpreter did not exit within {PROMPT}s of SIGINT")
        assert clock.elapsed < PROMPT
        survivors = faults.wait_until_gone(set(descendants) | workers, PROMPT)
        assert survivors == [], f"processes survived Ctrl-C: {survivors}"
        rest, err = proc.communicate(timeout=PROMPT)
        assert "RETURNED" not in text + rest.decode()
        # An uncaught KeyboardInterrupt ends CPython by SIGINT, as a shell expects.
        assert proc.returncode == -signal.SIGINT, (proc.returncode, err.decode())
        assert "KeyboardInterrupt" in err.decode(), err.decode()
    finally:
        faults.kill_leftovers(proc, descendants)


def _interrupting_input(count: int, pause: float):
    """``count`` items, then a KeyboardInterrupt raised in the caller's thread
    after ``pause`` seconds: a Ctrl-C that lands while work is in flight."""
    yield from range(count)
    time.sleep(pause)
    raise KeyboardInterrupt


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", FORK)
def test_keyboard_interrupt_in_the_caller_discards_the_pool(backend, method, tmp_path):
    before = pids_of_a_warm_pool(backend, method)
    func = faults.Recorder(str(tmp_path), bad=None, seconds=60)
    # 3 items < the 4 chunks two workers may hold, so the input is read
    # (and interrupts) while items 0 and 1 run.
    with Clock() as clock, pytest.raises(KeyboardInterrupt):
        pmap(func, _interrupting_input(3, 0.5), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    running = set(faults.started(str(tmp_path)).values())
    assert running and running <= before
    assert faults.wait_until_gone(before, 5) == []
    assert not (assert_pool_works(backend, method) & before)


# =========================================================================== nested calls
@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_nested_pmap_runs_without_deadlock_or_new_processes(backend, method):
    pickmap.shutdown()
    with Clock() as clock:
        results = pmap(faults.nested_sum, range(1, 9), chunksize=1, **kw(backend, method))
    assert clock.elapsed < PROMPT
    expected = [sum(i * i for i in range(x)) for x in range(1, 9)]
    assert [total for _, total, _ in results] == expected
    pids = {pid for pid, _, _ in results}
    assert os.getpid() not in pids and len(pids) <= 2
    # No worker started processes of its own: the nested calls ran in place.
    assert all(children == [] for _, _, children in results)
    assert pids <= set(faults.descendant_pids(os.getpid()))


@pytest.mark.timeout(60)
def test_doubly_nested_pmap_across_backends():
    got = pmap(faults.nested_twice, range(6), chunksize=1, **kw("stdlib", "fork"))
    assert got == [sum(sum(z * z for z in range(y)) for y in range(x)) for x in range(6)]


# =========================================================================== bad input
def _untouched_input(log: list):
    log.append("started")
    yield 1


BAD_INPUT = [
    ("func", 42, TypeError, "callable"),
    ("func", None, TypeError, "callable"),
    ("workers", 0, ValueError, "workers"),
    ("workers", -3, ValueError, "workers"),
    ("chunksize", 0, ValueError, "chunksize"),
    ("chunksize", -1, ValueError, "chunksize"),
    ("timeout", 0, ValueError, "timeout"),
    ("timeout", -0.5, ValueError, "timeout"),
    ("timeout", math.nan, ValueError, "timeout"),
    ("start_method", "bogus", ValueError, "bogus"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api", ["pmap", "imap"])
@pytest.mark.parametrize(
    "arg,value,error,word", BAD_INPUT, ids=[f"{a}={v}" for a, v, _, _ in BAD_INPUT]
)
def test_bad_input_fails_fast_before_any_worker_starts(api, arg, value, error, word):
    pickmap.shutdown()
    children = faults.child_pids(os.getpid())
    log: list = []
    call = {"func": faults.square, "backend": "stdlib", "workers": 2}
    call[arg] = value
    func = call.pop("func")
    with Clock() as clock, pytest.raises(error, match=word) as caught:
        # imap too: at the call, not at next()
        getattr(pickmap, api)(func, _untouched_input(log), **call)
    assert clock.elapsed < 2
    if arg == "start_method":
        for method in START_METHODS:
            assert method in str(caught.value)
    assert log == [], "the input was read before the arguments were checked"
    assert faults.child_pids(os.getpid()) == children


@pytest.mark.timeout(30)
def test_unknown_start_method_from_the_environment(monkeypatch):
    monkeypatch.setenv("PICKMAP_START_METHOD", "threads")
    with pytest.raises(ValueError, match="PICKMAP_START_METHOD") as caught:
        pmap(faults.square, range(3), backend="stdlib", workers=2)
    assert all(method in str(caught.value) for method in START_METHODS)


# =========================================================================== issue 9: faults v2 must survive
GRANDCHILD_CASES = MATRIX  # every process backend pickmap owns, every start method


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", GRANDCHILD_CASES)
def test_a_worker_that_forks_a_grandchild_and_exits_is_seen_dead_at_once(backend, method, tmp_path):
    # The grandchild holds the worker's pipe (and, under fork and spawn, its
    # sentinel): death must be seen from the process itself.
    func = faults.ForksAGrandchild(str(tmp_path), bad=1, then="exit")
    try:
        with Clock() as clock, pytest.raises(WorkerCrashedError) as caught:
            pmap(func, range(4), chunksize=1, **kw(backend, method))
        assert clock.elapsed < PROMPT
        assert caught.value.exitcode == faults.EXIT_CODE  # forkserver: reported by the fork server
        assert f"exit code {faults.EXIT_CODE}" in str(caught.value) and caught.value.indices == (1,)
        assert [pid for pid in faults.grandchildren(str(tmp_path)) if faults.alive(pid)], (
            "the grandchild must still live"
        )
    finally:
        faults.kill_pids(faults.grandchildren(str(tmp_path)))
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", GRANDCHILD_CASES)
def test_a_grandchild_outliving_its_task_does_not_delay_a_later_timeout(backend, method, tmp_path):
    # Item 0 leaves a grandchild behind; item 1 hangs. Killing the worker used
    # to join on the sentinel the grandchild holds: 5 s more. Measured as a
    # bound well under those 5 s, not as a speed.
    func = faults.ForksAGrandchild(str(tmp_path), bad=0, then="return", stuck=1)
    try:
        with Clock() as clock, pytest.raises(TaskTimeoutError) as caught:
            pmap(func, range(3), chunksize=1, timeout=1, **kw(backend, method, workers=1))
        assert caught.value.index == 1
        assert clock.elapsed < 1 + 3
    finally:
        faults.kill_pids(faults.grandchildren(str(tmp_path)))
    assert_pool_works(backend, method)


@pytest.fixture
def no_shared_memory(monkeypatch):
    """Large buffers go through the pipe (as where /dev/shm cannot take them)."""
    from pickmap import _shm

    monkeypatch.setattr(_shm, "segment_dirs", list)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_timeout_is_enforced_while_large_chunks_wait_for_a_worker_holding_the_gil(
    backend, method, no_shared_memory
):
    # Item 0 holds the GIL in a regex for minutes, so its worker's reader
    # thread cannot drain 4 MB chunks: the caller must never block writing.
    items = [0] + [b"x" * (4 << 20)] * 6
    with Clock() as clock, pytest.raises(TaskTimeoutError) as caught:
        pmap(faults.regex_or_size, items, chunksize=1, timeout=1, **kw(backend, method))
    assert caught.value.index == 0
    assert clock.elapsed < PROMPT  # a hang guard: it used to return after the writes, 4-10 s
    assert_pool_works(backend, method)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_a_worker_out_of_memory_for_a_chunk_is_a_crash_not_a_hang(
    backend, method, no_shared_memory, tmp_path
):
    # The worker hits MemoryError reading a 400 MB frame (RLIMIT_AS): it exits,
    # and the caller, in the middle of writing, sees a death.
    before = set(pmap(faults.pid_of, range(4), chunksize=1, **kw(backend, method, workers=1)))

    flag = tmp_path / "limited"

    def small_then_huge():
        yield b"small"
        deadline = time.monotonic() + 30  # read lazily: only once the worker runs under its limit
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield b"x" * (400 << 20)

    # Documented: WorkerCrashedError when the reader cannot hold the frame; in
    # some runs the frame fits and the copy made while loading it does not,
    # which is a SerializationError naming the MemoryError. Never a hang.
    with Clock() as clock, pytest.raises((WorkerCrashedError, SerializationError)) as caught:
        pmap(
            faults.identity,
            small_then_huge(),
            initializer=faults.limit_address_space,
            initargs=(16, str(flag)),
            chunksize=1,
            timeout=5,
            **kw(backend, method, workers=1),
        )
    assert clock.elapsed < PROMPT
    if isinstance(caught.value, SerializationError):
        assert "MemoryError" in str(caught.value), str(caught.value)
    else:
        assert faults.wait_until_gone(before, 5) == []
    assert_pool_works(backend, method)


CTRL_C_TWICE_CHILD = textwrap.dedent(
    """
    import sys, time
    import faults, pickmap
    backend, method = sys.argv[1], sys.argv[2]
    interrupts, called = 0, False
    while True:  # as a REPL does: an interrupt is caught, and the session goes on
        try:
            if not called:
                called = True
                pickmap.pmap(faults.report_pid_then_sleep, range(8), backend=backend, start_method=method,
                             workers=4, chunksize=1)
            time.sleep(0.5)
            break
        except KeyboardInterrupt:
            interrupts += 1
    print("CAUGHT", interrupts, flush=True)
    sys.stdin.read()  # stay alive while the parent counts workers
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend,method", ROTATION)
def test_ctrl_c_twice_in_a_session_that_catches_it_leaves_no_worker_running(backend, method):
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_TWICE_CHILD, backend, method],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        cwd=TESTS_DIR,
        start_new_session=True,
    )
    workers: set[int] = set()
    try:
        text = _read_until(proc, lambda t: len(_worker_pids(t)) >= 4, 60)
        workers = _worker_pids(text)
        assert len(workers) == 4, f"workers did not start: {text!r}"
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.001)
        os.kill(proc.pid, signal.SIGINT)  # lands in the clean-up of the first
        text += _read_until(proc, lambda t: "CAUGHT" in t, PROMPT)
        assert "CAUGHT" in text, f"the session did not survive two interrupts: {text!r}"
        # Counted while the caller still lives: workers must not outlive the call.
        assert faults.wait_until_gone(workers, PROMPT) == [], faults.describe_pids(workers)
    finally:
        faults.kill_leftovers(proc, workers)
        proc.communicate(timeout=PROMPT)
