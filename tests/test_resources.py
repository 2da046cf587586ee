"""No leaks: many calls, and many faults, leave the count of file descriptors,
child processes, threads and spill files flat.

Processes are counted as *descendants* of the test process (scanning
``/proc/*/stat`` for parent pids), because forkserver workers are children of
the fork server, not of the caller; zombies count too, so a worker that is
never reaped shows up as a leak. Baselines are taken after a warm-up call, so
what a start method sets up once (the fork server, the resource tracker, the
shared-memory arena) is in both counts.
"""

from __future__ import annotations

import gc
import glob
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import faults
import pytest
import zoo
from conftest import START_METHODS

import pickmap
from pickmap import (
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerError,
    imap,
    pmap,
)
from pickmap import pool as pools

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(TESTS_DIR), "src")
SPILL_DIRS = sorted({"/dev/shm", tempfile.gettempdir()})


def kw(backend: str, method: str | None, **extra: object) -> dict[str, object]:
    return {"backend": backend, "start_method": method, "workers": 2, **extra}


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def snapshot() -> tuple[int, list[int]]:
    gc.collect()  # worker handles in reference cycles close their pipes when collected
    return faults.open_fds(), faults.descendant_pids(os.getpid())


def settled(baseline: tuple[int, list[int]], seconds: float = 5.0) -> tuple[int, list[int]]:
    """The current snapshot, once it equals ``baseline`` or ``seconds`` have passed
    (a killed process may take a moment to be reaped by the fork server)."""
    deadline = time.monotonic() + seconds
    now = snapshot()
    while now != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        now = snapshot()
    return now


def difference(before: tuple[int, list[int]], after: tuple[int, list[int]]) -> str:
    new = sorted(set(after[1]) - set(before[1]))
    gone = sorted(set(before[1]) - set(after[1]))
    return (
        f"open fds {before[0]} -> {after[0]}; new processes {faults.describe_pids(new)}; "
        f"processes gone {gone}; fds now {sorted(os.listdir('/proc/self/fd'), key=int)}"
    )


def read_until(
    proc: subprocess.Popen[bytes], marker: bytes, count: int, *, seconds: float
) -> bytes:
    """What the child printed, once ``marker`` appeared ``count`` times (or it stopped, or time ran out)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + seconds
    while seen.count(marker) < count and time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    return seen


def spill_files(pid: int) -> list[str]:
    return [path for d in SPILL_DIRS for path in glob.glob(os.path.join(d, f"pickmap-{pid}-*"))]


@pytest.fixture(autouse=True, scope="module")
def _no_user_executors():
    # The conftest's user executors (loky's idle workers leave after a while)
    # would change the counts of their own accord; they are made again on demand.
    import conftest

    for made in conftest._MADE.values():
        made.shutdown(wait=True)
    conftest._MADE.clear()


@pytest.fixture(autouse=True)
def _default_idle_timeout(monkeypatch):
    # Workers must not leave on their own in the middle of a count.
    monkeypatch.delenv("PICKMAP_IDLE_TIMEOUT", raising=False)


# =========================================================================== many ordinary calls
@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_a_thousand_warm_calls_leave_fds_and_processes_flat(method):
    pickmap.shutdown()
    pmap(faults.square, range(8), chunksize=1, **kw("stdlib", method))  # warm: both workers started
    before = snapshot()
    idle_before = pools.idle_pool_count()
    started = time.monotonic()
    for i in range(1000):
        assert pmap(faults.square, range(i % 7 + 1), **kw("stdlib", method)) == [
            x * x for x in range(i % 7 + 1)
        ]
    elapsed = time.monotonic() - started
    after = settled(before)
    assert after == before, difference(before, after)
    assert pools.idle_pool_count() == idle_before
    # A warm call costs well under a millisecond here; 20 s leaves room for a loaded machine.
    assert elapsed < 20, f"1000 warm calls took {elapsed:.1f}s"
    pickmap.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["cloudpickle", "dill", "thread", "serial"])
def test_many_calls_on_the_other_backends_leave_nothing_behind(backend):
    method = "fork" if backend in ("cloudpickle", "dill") else None
    pickmap.shutdown()
    pmap(faults.square, range(8), chunksize=1, **kw(backend, method))
    before, threads = snapshot(), thread_count()
    for i in range(300):
        assert pmap(faults.square, range(i % 5 + 1), **kw(backend, method)) == [
            x * x for x in range(i % 5 + 1)
        ]
    after = settled(before)
    assert after == before, difference(before, after)
    assert thread_count() == threads
    pickmap.shutdown()


@pytest.mark.timeout(60)
def test_many_imap_calls_abandoned_early_leave_nothing_behind():
    pickmap.shutdown()
    pmap(faults.square, range(8), chunksize=1, **kw("stdlib", "fork"))
    pickmap.shutdown()
    before = snapshot()
    for _ in range(50):
        results = imap(
            faults.sleep_for, [0] + [5] * 20, range(21), chunksize=1, **kw("stdlib", "fork")
        )
        assert next(results) == 0
        results.close()  # the busy workers are killed
    pickmap.shutdown()
    after = settled(before)
    assert after == before, difference(before, after)


# =========================================================================== many faults
def _crash_exit(k):
    with pytest.raises(WorkerCrashedError):
        pmap(faults.CrashOn(1, "exit"), range(4), chunksize=1, **k)


def _crash_sigkill(k):
    with pytest.raises(WorkerCrashedError):
        pmap(faults.CrashOn(2, "sigkill"), range(6), chunksize=1, **k)


def _crash_segfault(k):
    with pytest.raises(WorkerCrashedError):
        pmap(faults.CrashOn(0, "segfault"), range(3), chunksize=1, **k)


def _exception(k):
    with pytest.raises(faults.Boom):
        pmap(faults.CrashOn(3, "raise"), range(8), chunksize=1, **k)


def _unrebuildable_exception(k):
    with pytest.raises(WorkerError):
        pmap(faults.RaiseOn(1, "holds-a-lock"), range(4), chunksize=1, **k)


def _unsendable_result(k):
    with pytest.raises(SerializationError):
        pmap(faults.ReturnBomb(2, "raise", "dump", "worker"), range(4), chunksize=1, **k)


def _unsendable_item(k):
    with pytest.raises(SerializationError):
        pmap(faults.identity, [0, 1, faults.Bomb("raise", "dump", "caller")], chunksize=1, **k)


def _callable_fails_to_load(k):
    with pytest.raises(SerializationError):
        pmap(faults.BombOnLoad("raise"), range(4), chunksize=1, **k)


def _timeout(k):
    with pytest.raises(TaskTimeoutError):
        pmap(faults.CrashOn(1, "hang"), range(4), chunksize=1, timeout=0.2, **k)


def _interrupted(k):
    def items():
        yield from range(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pmap(faults.sleep_for, [5] * 10, items(), chunksize=1, **k)


def _abandoned_imap(k):
    results = imap(faults.sleep_on, [1] * 10, [5] * 10, range(10), chunksize=1, **k)
    assert next(results) == 0
    results.close()


FAULTS = [
    _crash_exit,
    _crash_sigkill,
    _crash_segfault,
    _exception,
    _unrebuildable_exception,
    _unsendable_result,
    _unsendable_item,
    _callable_fails_to_load,
    _timeout,
    _interrupted,
    _abandoned_imap,
]
FAULT_CASES = [
    pytest.param("stdlib", "fork", 8, id="stdlib-fork"),
    pytest.param("cloudpickle", "spawn", 1, id="cloudpickle-spawn"),
    pytest.param("dill", "forkserver", 1, id="dill-forkserver"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,method,rounds", FAULT_CASES)
def test_faults_leave_fds_and_processes_flat(backend, method, rounds):
    k = kw(backend, method)
    pickmap.shutdown()
    pmap(faults.square, range(8), chunksize=1, **k)  # start-method helpers exist from here on
    pickmap.shutdown()
    before = snapshot()
    for _ in range(rounds):
        for inject in FAULTS:
            inject(k)
            # after every fault the next call works
            assert pmap(faults.square, range(5), chunksize=1, **k) == [0, 1, 4, 9, 16]
    pickmap.shutdown()
    after = settled(before)
    assert after == before, difference(before, after)
    assert spill_files(os.getpid()) == []


# =========================================================================== spill files
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["exit", "raise", "hang"])
def test_shared_memory_of_a_failed_call_goes_with_its_object(kind):
    func = faults.CrashOn(1, kind)
    # large: shipped through shared memory, kept while func lives
    func.ballast = os.urandom(3 << 20)
    raised = {"exit": WorkerCrashedError, "raise": faults.Boom, "hang": TaskTimeoutError}[kind]
    with pytest.raises(raised):
        pmap(
            func,
            range(4),
            chunksize=1,
            timeout=0.5 if kind == "hang" else None,
            **kw("stdlib", "fork"),
        )
    del func
    gc.collect()
    assert spill_files(os.getpid()) == []


@pytest.mark.timeout(60)
def test_ctrl_c_leaves_no_spill_file_and_no_process():
    # A large callable (shipped through a spill file) and Ctrl-C mid-call.
    code = textwrap.dedent(
        """
        import os
        import faults, pickmap
        big = faults.SleepsWithBallast(os.urandom(3 << 20))
        pickmap.pmap(big, range(8), backend="stdlib", start_method="fork", workers=2, chunksize=1)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    descendants: list[int] = []
    try:
        seen = read_until(proc, b"WORKER", 2, seconds=30)
        assert seen.count(b"WORKER") >= 2, seen
        descendants = faults.descendant_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
        assert faults.wait_until_gone(descendants, 10) == []
        _, err = proc.communicate(timeout=10)
        assert b"KeyboardInterrupt" in err
        assert spill_files(proc.pid) == []
    finally:
        faults.kill_leftovers(proc, descendants)


# =========================================================================== threads
@pytest.mark.timeout(60)
def test_thread_backend_faults_leave_no_thread_running():
    before_threads = thread_count()
    before = snapshot()
    for _ in range(20):
        with pytest.raises(faults.Boom):
            pmap(faults.CrashOn(3, "raise"), range(8), chunksize=1, **kw("thread", None))
    # a stuck thread cannot be killed; it is abandoned, and must end once its item ends
    with pytest.raises(TaskTimeoutError):
        pmap(
            faults.sleep_on,
            [1] * 4,
            [1.0] * 4,
            range(4),
            chunksize=1,
            timeout=0.2,
            **kw("thread", None),
        )
    deadline = time.monotonic() + 5
    while thread_count() > before_threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread_count() == before_threads, [t.name for t in threading.enumerate()]
    after = settled(before)
    assert after == before, difference(before, after)


# =========================================================================== issue 9: /dev/shm unusable, a caller killed
@pytest.mark.timeout(60)
def test_shared_memory_that_cannot_be_written_warns_once_and_the_pipe_carries_the_call(
    monkeypatch, tmp_path
):
    from pickmap import _shm

    # every segment write fails there (root ignores permissions)
    missing = str(tmp_path / "no-such-dir")
    monkeypatch.setattr(_shm, "segment_dirs", lambda: [missing])
    monkeypatch.setattr(_shm, "_warned", False)
    func = faults.CrashOn(-1, "raise")
    func.ballast = os.urandom(3 << 20)  # a large callable
    big = [os.urandom(1 << 20) for _ in range(3)]  # and large items
    with pytest.warns(RuntimeWarning, match="could not use shared memory") as caught:
        assert pmap(func, range(4), chunksize=1, **kw("stdlib", "fork")) == [0, 1, 4, 9]
        assert pmap(faults.identity, big, chunksize=1, **kw("stdlib", "fork")) == big
    assert len([w for w in caught if "shared memory" in str(w.message)]) == 1


DEV_SHM_CHILD = textwrap.dedent(
    """
    import os, sys, warnings
    import faults, pickmap
    if __name__ == "__main__":
        warnings.simplefilter("always")
        func = faults.CrashOn(-1, "raise")
        func.ballast = os.urandom(3 << 20)
        big = [os.urandom(1 << 20) for _ in range(3)]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for method in sys.argv[1:]:
                assert pickmap.pmap(func, range(4), start_method=method, workers=2, chunksize=1, timeout=30) == [0, 1, 4, 9]
                assert pickmap.pmap(faults.identity, big, start_method=method, workers=2, chunksize=1) == big
        print("OK", sum("shared memory" in str(w.message) for w in seen), flush=True)
    """
)


def _in_a_mount_namespace(setup: str) -> list[str] | None:
    """The argv prefix that runs a command with ``/dev/shm`` replaced as ``setup`` says, or None if not permitted."""
    probe = (
        subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True,
            timeout=30,
        )
        if _has("unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", f'{setup} && exec "$0" "$@"']


def _has(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "setup,warnings_seen",
    [
        # Read-only: the temp directory takes the segments and the progress
        # slots; one warning says so.
        ("mount -t tmpfs -o size=1m tmpfs /dev/shm && mount -o remount,ro /dev/shm", 1),
        # Docker-like but tinier: a 3 MB callable does not fit; the pipe carries it, with one warning.
        ("mount -t tmpfs -o size=1m tmpfs /dev/shm", 1),
    ],
    ids=["read-only", "too-small"],
)
def test_a_dev_shm_read_only_or_too_small_never_fails_a_call(setup, warnings_seen):
    prefix = _in_a_mount_namespace(setup)
    if prefix is None:
        pytest.skip("cannot mount a private /dev/shm here (needs unshare -m)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [*prefix, sys.executable, "-c", DEV_SHM_CHILD, *START_METHODS],
        capture_output=True,
        env=env,
        cwd=TESTS_DIR,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().split() == ["OK", str(warnings_seen)], done.stdout.decode()


SIGTERM_CHILD = textwrap.dedent(
    """
    import os
    import faults, pickmap
    big = faults.ReportsWithBallast(os.urandom(3 << 20))
    items = [os.urandom(1 << 20) for _ in range(8)]  # large items: segments their reader removes
    pickmap.pmap(big, items, backend="stdlib", start_method="fork", workers=2, chunksize=1)
    """
)


@pytest.mark.timeout(90)
def test_a_caller_killed_by_sigterm_leaves_nothing_once_the_next_pickmap_process_starts():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        seen = read_until(proc, b"WORKER", 2, seconds=30)
        assert seen.count(b"WORKER") >= 2, seen
        workers = [int(pid) for pid in re.findall(rb"WORKER (\d+) ", seen)]
        # Mid-call: the items the workers hold were mapped and unlinked at once;
        # only the callable's segment (writer "c", owned by the caller) remains.
        left = spill_files(proc.pid)
        assert left and all(f"pickmap-{proc.pid}-c-" in os.path.basename(path) for path in left), (
            left
        )
        os.kill(proc.pid, signal.SIGTERM)  # the default handler: no atexit, no clean-up
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGTERM
        faults.kill_pids(workers)
        # The next pickmap process sweeps what a dead caller left.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, pickmap; pickmap.pmap(len, [os.urandom(1 << 20)], "
                "backend='stdlib', workers=1)",
            ],
            env=env,
            timeout=60,
            check=True,
        )
        assert spill_files(proc.pid) == []
    finally:
        faults.kill_leftovers(proc, workers)
        proc.communicate(timeout=10)


def test_a_payload_goes_through_shared_memory_when_its_large_buffers_add_up():
    from pickmap import _shm, _wire
    from pickmap.serializers import Pickled

    def payload(*sizes: int) -> Pickled:
        return Pickled(b"", tuple(memoryview(bytearray(size)) for size in sizes))

    kib = 1024
    assert _wire.has_large(payload(4096 * kib))  # one 4 MB array
    assert _wire.has_large(payload(250_000, 250_000))  # a DataFrame chunk's two blocks
    assert not _wire.has_large(payload(200 * kib))  # one mid-size buffer: the pipe is cheaper
    assert not _wire.has_large(payload(*[32 * kib] * 20))  # small buffers never count
    shared = _wire.share(payload(250_000, 250_000, 1000), transient=True, writer="c")
    try:
        kinds = [type(b).__name__ for b in shared.buffers]
        assert kinds == ["Segment", "Segment", "memoryview"]  # one segment, the small one stays
        assert len(set(_wire.segment_paths(shared))) == 1
    finally:
        _shm.unlink(_wire.segment_paths(shared))


# =========================================================================== results mapped, not read
def mapped_segments(writer: str = "") -> set[str]:
    """The pickmap segments (of writers whose name starts so) this process has mapped, even once removed."""
    with open("/proc/self/maps") as maps:
        paths = {fields[5] for fields in map(str.split, maps) if len(fields) > 5}
    return {p for p in paths if os.path.basename(p).startswith("pickmap-") and f"-{writer}" in p}


@pytest.mark.parametrize("mapper", ["libc", "mmap", "read"])
def test_a_result_segment_is_mapped_without_a_descriptor_until_its_last_view_goes(
    monkeypatch, mapper
):
    np = pytest.importorskip("numpy")
    from pickmap import _shm

    if mapper == "mmap" and not _shm._MAP_WITHOUT_FD:
        pytest.skip("mmap(trackfd=False) is new in 3.13")
    if mapper != "mmap":  # libc's mmap through ctypes (before 3.13), or a read into memory
        monkeypatch.setattr(_shm, "_MAP_WITHOUT_FD", False)
    if mapper == "read":  # where ctypes or libc's mmap is missing
        monkeypatch.setattr(_shm, "_mapper", None)
        monkeypatch.setattr(_shm, "_mapper_failed", True)
    data = np.arange(
        (5 << 17) + 1000, dtype=np.float64
    )  # not whole pages: the mapping is rounded up
    (segment,) = _shm.write(
        [memoryview(data).cast("B")], caller_pid=os.getpid(), writer="t", reader_unlinks=True
    )
    before = faults.open_fds()
    mapping = _shm.map_segment(segment.path, writable=True)
    _shm.unlink([segment.path])
    assert faults.open_fds() == before  # results a caller keeps by the thousand hold no descriptor
    assert len(memoryview(mapping)) == segment.size  # never the pages past the file's end
    assert bytes(memoryview(mapping)[-8:]) == data[-1:].tobytes()
    result = np.frombuffer(_shm.view(mapping, segment), dtype=np.float64)
    del mapping
    gc.collect()
    assert np.array_equal(result, data)
    assert (segment.path in mapped_segments()) == (mapper != "read")
    result[:3] = -1.0  # private: the task's copy is the caller's to change
    assert result[:3].tolist() == [-1.0] * 3 and result[3] == 3.0
    del result
    gc.collect()
    assert segment.path not in mapped_segments()  # unmapped with its last view
    assert not os.path.exists(segment.path)


def test_large_results_a_caller_keeps_are_mappings_and_leave_nothing_once_dropped():
    np = pytest.importorskip("numpy")
    pools.shutdown()  # workers forked now: not ones an earlier test changed (its segment_dirs)
    del pmap(zoo.filled_array, range(2), chunksize=1, **kw("stdlib", "fork"))[:]  # warm workers
    gc.collect()
    baseline, mapped_before = faults.open_fds(), mapped_segments("w")
    results = pmap(zoo.filled_array, range(12), chunksize=1, **kw("stdlib", "fork"))
    assert all(np.array_equal(r, np.full(6 << 17, float(i))) for i, r in enumerate(results))
    assert faults.open_fds() == baseline  # not one descriptor per result kept
    assert len(mapped_segments("w") - mapped_before) == 12  # the workers' result segments
    results[0][0] = 1.5  # writable, as map's results are
    del results
    gc.collect()
    assert mapped_segments("w") <= mapped_before
