"""Time ONE workload with ONE library in this (fresh) process; print one JSON line.

``compare.py`` runs this script once per measurement, so every measurement
starts from a cold interpreter: no warm pool, no cached probe verdict, no
imported module left over from a previous library.

    python benchmarks/run_one.py --lib pickmap --workload trivial --cpu-loops 150000

What is timed, for every library alike: from just before the pool is created
(or, for pickmap, just before the first ``pmap``) until the last call's results
are in hand. The import statement a user writes (``IMPORTS``), building the
data and the 50 MB object, checking the results and tearing the pool down are
outside the timed region; the import and teardown times are reported
separately (``import_s``, ``teardown_s``). What a library imports lazily on
first use is inside it, as it is for the user.

Besides wall seconds, every measurement reports what it cost (``Clock``):

- ``caller_cpu_s``: user+sys of this process (all its threads) over the timed
  region, from ``getrusage(RUSAGE_SELF)``.
- ``workers_cpu_s`` and ``workers_peak_mb``: ``getrusage(RUSAGE_CHILDREN)``
  after the pool is torn down and joined (and a fork server, if one was
  started, stopped and reaped, so the workers it forked are counted too).
  Chosen over psutil sampling because it is exact, costs the timed region
  nothing (a sampler thread would take CPU from the workers on a 2-core
  machine) and cannot miss a short-lived worker. Its costs: the CPU figure
  covers each worker's whole life (start-up and teardown included, since the
  workers are created inside the timed region anyway), and the peak is
  ``ru_maxrss``, the largest *single* descendant's peak RSS, not a sum. A
  fork worker's RSS counts the copy-on-write pages it inherited, so a fork
  pool's workers show the caller's size even when nothing was copied.
- ``caller_peak_mb``: growth of ``VmHWM`` (/proc/self/status) from just before
  the timed region to its end. VmHWM cannot be reset, so a peak reached while
  building the data and freed before the region hides that much growth;
  ``caller_hwm_slack_mb`` (VmHWM - VmRSS at the start) says how much.
- ``cluster_cpu_s`` / ``cluster_peak_mb`` (dask rows only): the same, read
  from /proc for the long-lived scheduler and worker processes whose ids
  compare.py passes in ``PICKMAP_BENCH_CLUSTER_PIDS`` (they are not children).

The output line starts with ``RESULT_MARKER`` so warnings on stdout cannot be
mistaken for it.
"""

from __future__ import annotations

import sys
import time

# What a user writes at the top of the script, timed separately (``import_s``).
# Whatever a library imports lazily when it is first used (multiprocessing.pool
# inside ``Pool()``, pickmap's backend modules inside ``pmap``) lands in the
# timed region, as it does for the user.
IMPORTS = {
    "pickmap": "from pickmap import pmap",
    "serial": "",
    "pool": "from multiprocessing import Pool",
    "ppe": "from concurrent.futures import ProcessPoolExecutor",
    "joblib": "from joblib import Parallel, delayed",
    "pathos": "from pathos.pools import ProcessPool",
    "mpire": "from mpire import WorkerPool",
    "mpire_shared": "from mpire import WorkerPool",
    "pool_per_thread": "from multiprocessing import Pool",
    "pickmap_cloudpickle": "from pickmap import pmap",
    "pickmap_ppe": "from pickmap import pmap",
    "pickmap_executor": "from pickmap import pmap\nfrom concurrent.futures import ProcessPoolExecutor",
    "pickmap_dask": "from pickmap import pmap",
    "dask": "from distributed import Client",
    "floor": "",
}

# Rows whose script starts, as a data user's does, with numpy and pandas
# (so OpenBLAS has started its threads before any pool exists). Imported
# before the library, untimed.
NUMPY_WORKLOADS = frozenset(
    (
        "big_items",
        "big_results",
        "big_self",
        "big_self_x3",
        "dataframe",
        "threads",
        "first_call_installed_np",
    )
)


def _import_first() -> float:
    """Run the library's import statement before this script imports anything
    else (argparse, typing, json...), so ``import_s`` is what a fresh script pays."""
    lib = sys.argv[sys.argv.index("--lib") + 1] if "--lib" in sys.argv[:-1] else ""
    workload = sys.argv[sys.argv.index("--workload") + 1] if "--workload" in sys.argv[:-1] else ""
    if workload in NUMPY_WORKLOADS:
        import numpy  # noqa: F401
        import pandas  # noqa: F401
    began = time.perf_counter()
    exec(IMPORTS.get(lib, ""), {})
    return time.perf_counter() - began


IMPORT_SECONDS = _import_first()


import argparse
import dataclasses
import functools
import json
import os
import resource
import socket
import statistics
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import workloads

RESULT_MARKER = "PICKMAP-BENCH "
# The result goes to a copy of the original stdout descriptor: a library may
# leave ``sys.stdout`` swapped (mpire's progress-bar set-up uses
# ``contextlib.redirect_stdout``, which is not thread-safe: in the threads row
# it can leave a StringIO behind).
_RESULT_FD = os.dup(1)
WORKERS = 2

WORKLOADS = (
    "trivial",
    "big_method",
    "cpu",
    "first_call",
    "many_calls",
    "many_calls_reused",
    "lambda_closure",
    # issue 8: data at memory speed
    "big_items",
    "big_results",
    "big_self",
    "big_self_x3",
    "dataframe",
    "threads",
    "first_call_installed",
    "first_call_installed_np",
    # issue 11: dask
    "trivial_dask",
    "warm8_dask",
)
LIBS = (
    "pickmap",
    "serial",
    "pool",
    "ppe",
    "joblib",
    "pathos",
    "mpire",
    "mpire_shared",
    "pool_per_thread",
    "floor",
    "pickmap_cloudpickle",
    "pickmap_ppe",
    "pickmap_executor",  # issue 10
    "pickmap_dask",
    "dask",  # issue 11
)
# warm8_dask: timed calls after one untimed warm-up; the median call is reported
WARM_TIMED_CALLS = 20
THREADS = 4
THREAD_CALLS = 50


@dataclass
class Workload:
    func: Callable[[Any], Any]
    data: list[Any]
    calls: int
    expected: list[Any]
    pool_per_call: bool = False  # peers: `with Pool(2) as p: p.map(...)` inside each call
    check: Callable[[list[Any]], bool] | None = None  # instead of `== expected` (arrays, frames)
    # mpire's `shared_objects=` variant: the shared object, and what is mapped instead
    shared: Any = None
    shared_func: Callable[..., Any] | None = None
    shared_data: list[Any] | None = None
    threads: int = 0  # > 0: that many caller threads, each making `calls` calls
    warm: bool = False  # one untimed call, then `calls` timed calls; the median call is reported
    nbytes: int = 0  # what the physical floor moves for this row
    mpire_wrap: bool = False  # items are iterables mpire would unpack into arguments

    def correct(self, results: list[Any]) -> bool:
        return self.check(results) if self.check is not None else list(results) == self.expected


def build_workload(name: str, cpu_loops: int, scale: float = 1.0) -> Workload:
    if name == "trivial":
        data = list(range(max(1000, int(200_000 * scale))))
        return Workload(workloads.square, data, 1, [x * x for x in data])
    if name == "big_method":
        holder = workloads.BigHolder()
        data = list(range(2_000))
        return Workload(holder.method, data, 1, [x + workloads.BIG_BYTES for x in data])
    if name == "cpu":
        one = workloads.spin(cpu_loops)
        return Workload(workloads.spin, [cpu_loops] * 48, 1, [one] * 48)
    if name in ("first_call", "first_call_installed", "first_call_installed_np"):
        data = list(range(8))
        return Workload(workloads.square, data, 1, [x * x for x in data])
    if name in ("many_calls", "many_calls_reused"):
        # many_calls: each call is a function that makes its own pool, as
        # `def go(self): with Pool(2) as p: return p.map(...)` does (the issue's
        # peer figures, ~10 ms a call, are of this kind). many_calls_reused:
        # the peers keep one pool for all 50 calls.
        data = list(range(8))
        return Workload(
            workloads.square, data, 50, [x * x for x in data], pool_per_call=name == "many_calls"
        )
    if name == "lambda_closure":
        # Defined here, in the __main__ script, as a user would write it.
        k = 3
        func = lambda x: x * k  # noqa: E731
        data = list(range(max(1000, int(20_000 * scale))))
        return Workload(func, data, 1, [x * k for x in data])
    if name in DATA_BUILDERS:
        return DATA_BUILDERS[name](scale)
    if name == "trivial_dask":
        data = list(range(max(1000, int(100_000 * scale))))
        return Workload(workloads.square, data, 1, [x * x for x in data])
    if name == "warm8_dask":
        data = list(range(8))
        return Workload(workloads.square, data, WARM_TIMED_CALLS, [x * x for x in data], warm=True)
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


# --------------------------------------------------------------------------- what a measurement costs
def _proc_status_kb(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    """user+sys seconds of a process that is not our child (utime, stime of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def _cluster_pids() -> list[int]:
    return [
        int(p) for p in os.environ.get("PICKMAP_BENCH_CLUSTER_PIDS", "").split(",") if p.strip()
    ]


class Clock:
    """Wall time of the timed region, and what the caller (and a cluster) spent in it.

    ``start()`` may be called again (warm rows: after the untimed warm-up
    call); ``per_call`` makes ``stop()`` report one call's median and the CPU
    figures per call."""

    def __init__(self, *, record: bool = True) -> None:
        self.record = record
        self.started: float | None = None
        self.elapsed: float | None = None
        self.median_call: float | None = None
        self.calls = 1
        self.usage: dict[str, Any] = {}

    def start(self) -> None:
        if self.record:
            self._hwm = _proc_status_kb("VmHWM")
            self._slack = self._hwm - _proc_status_kb("VmRSS")
            self._self = resource.getrusage(resource.RUSAGE_SELF)
            self._cluster = {
                pid: (_proc_cpu_s(pid), _proc_status_kb("VmHWM", pid)) for pid in _cluster_pids()
            }
        self.started = time.perf_counter()

    def per_call(self, median_seconds: float, calls: int) -> None:
        self.median_call, self.calls = median_seconds, calls

    def stop(self) -> float:
        self.elapsed = time.perf_counter() - (self.started or 0.0)
        if self.record and self.started is not None:
            now = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (now.ru_utime - self._self.ru_utime) + (now.ru_stime - self._self.ru_stime)
            self.usage = {
                "caller_cpu_s": cpu / self.calls,
                "caller_peak_mb": max(0, _proc_status_kb("VmHWM") - self._hwm) / 1024,
                "caller_hwm_slack_mb": self._slack / 1024,
            }
            if self._cluster:
                self.usage["cluster_cpu_s"] = (
                    sum(_proc_cpu_s(pid) - cpu0 for pid, (cpu0, _) in self._cluster.items())
                    / self.calls
                )
                self.usage["cluster_peak_mb"] = (
                    max(
                        _proc_status_kb("VmHWM", pid) - hwm0
                        for pid, (_, hwm0) in self._cluster.items()
                    )
                    / 1024
                )
        return self.median_call if self.median_call is not None else self.elapsed


def _children_usage() -> tuple[float, float]:
    """(user+sys seconds, ru_maxrss MB) of every descendant reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _reap_fork_server() -> None:
    """Stop the fork servers, if any run: each has reaped the workers it forked, so once it
    is reaped their CPU and peak RSS reach our RUSAGE_CHILDREN too. ``multiprocess`` (the
    dill-based fork pathos uses) has a fork server of its own, and pickmap has its own
    (``pickmap._fork``), which waits for the workers pickmap's shutdown stopped."""
    pickmap_server = sys.modules.get("pickmap._fork")
    if pickmap_server is not None:
        sys.modules["pickmap"].shutdown()
        pickmap_server.stop()
    for package in ("multiprocessing", "multiprocess"):
        forkserver = sys.modules.get(f"{package}.forkserver")
        if (
            forkserver is not None
            and getattr(forkserver._forkserver, "_forkserver_pid", None) is not None
        ):
            try:
                forkserver._forkserver._stop()
            except (OSError, ChildProcessError):
                pass


# --------------------------------------------------------------------------- the data rows (issue 8)
def _big_items(scale: float) -> Workload:
    import numpy as np

    nbytes = workloads.scaled(workloads.ITEM_BYTES, scale)
    arrays = [np.full(nbytes // 8, float(i)) for i in range(workloads.ITEM_COUNT)]
    return Workload(
        workloads.array_sum,
        arrays,
        1,
        [float(a.sum()) for a in arrays],
        shared=arrays,
        shared_func=workloads.shared_array_sum,
        shared_data=list(range(len(arrays))),
        nbytes=nbytes * len(arrays),
    )


def _big_results(scale: float) -> Workload:
    import numpy as np

    nbytes = workloads.scaled(workloads.ITEM_BYTES, scale)
    data = list(range(workloads.ITEM_COUNT))

    def check(results: list[Any]) -> bool:
        return len(results) == len(data) and all(
            isinstance(r, np.ndarray) and r.shape == (nbytes // 8,) and r[0] == i and r[-1] == i
            for i, r in zip(data, results, strict=False)
        )

    return Workload(
        workloads.ArrayMaker(nbytes), data, 1, [], check=check, nbytes=nbytes * len(data)
    )


def _big_self(scale: float, calls: int = 1) -> Workload:
    model = workloads.Model(workloads.scaled(workloads.SELF_BYTES, scale))
    data = list(range(workloads.SELF_ITEMS))
    return Workload(
        model.predict,
        data,
        calls,
        [model.predict(i) for i in data],
        pool_per_call=calls > 1,
        shared=model,
        shared_func=workloads.shared_predict,
        shared_data=data,
        nbytes=model.w.nbytes,
    )


def _dataframe(scale: float) -> Workload:
    frame = workloads.make_frame(
        max(100 * workloads.FRAME_CHUNKS, int(workloads.FRAME_ROWS * scale))
    )
    chunks = workloads.split_frame(frame)
    expected = [workloads.group_agg(chunk) for chunk in chunks]

    def check(results: list[Any]) -> bool:
        return len(results) == len(expected) and all(
            r.equals(e) for r, e in zip(results, expected, strict=False)
        )

    return Workload(
        workloads.group_agg,
        chunks,
        1,
        [],
        check=check,
        mpire_wrap=True,
        shared=frame,
        shared_func=workloads.shared_group_agg,
        shared_data=workloads.frame_bounds(len(frame)),
        nbytes=int(frame.memory_usage(index=True).sum()),
    )


def _threads(scale: float) -> Workload:
    data = list(range(8))
    return Workload(workloads.square, data, THREAD_CALLS, [x * x for x in data], threads=THREADS)


DATA_BUILDERS: dict[str, Callable[[float], Workload]] = {
    "big_items": _big_items,
    "big_results": _big_results,
    "big_self": _big_self,
    "big_self_x3": functools.partial(_big_self, calls=3),
    "dataframe": _dataframe,
    "threads": _threads,
}


# --------------------------------------------------------------------------- one adapter per library
# Each adapter returns (seconds, last results, teardown seconds, extra info).
# It calls ``clock.start()`` where the timed region starts (so a failure can
# still report how long it took to surface) and ``clock.stop()`` where it ends.


def run_serial(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    clock.start()
    for _ in range(w.calls):
        results = list(map(w.func, w.data))
    return clock.stop(), results, 0.0, {}


def _pickmap_backend(lib: str) -> Any:
    """What ``backend=`` the pickmap variant passes (``None``: let pickmap choose)."""
    if lib == "pickmap_executor":
        from concurrent.futures import ProcessPoolExecutor

        # the user's executor, created inside the timed region as peers' pools are
        return ProcessPoolExecutor(WORKERS)
    return {
        "pickmap": None,
        "pickmap_cloudpickle": "cloudpickle",
        "pickmap_ppe": "ppe",
        "pickmap_dask": "dask",
    }[lib]


def _pickmap_kwargs(lib: str, backend: Any) -> dict[str, Any]:
    # The cluster or the user's executor decides its own size; say nothing about workers there.
    if lib in ("pickmap_executor", "pickmap_dask"):
        return {"backend": backend}
    return {"backend": backend, "workers": WORKERS} if backend is not None else {"workers": WORKERS}


def _start_method_now() -> str | None:
    """The start method pickmap resolves in this state (threads alive now); private, so best effort."""
    try:
        from pickmap._settings import resolve_start_method

        return resolve_start_method(None)
    except Exception:
        return None


def _pickmap_info(w: Workload, lib: str, start_method: str | None) -> dict[str, Any]:
    """Which backend the calls used (the probe's cached verdict, after the timed region)."""
    import pickmap

    info: dict[str, Any] = {"start_method": start_method} if start_method else {}
    # the checkout, or an installed copy
    info["pickmap_from"] = os.path.dirname(pickmap.__file__ or "")
    if lib != "pickmap":
        info["backend"] = {"pickmap_executor": "user executor"}.get(
            lib, lib.removeprefix("pickmap_")
        )
        return info
    try:
        from pickmap.probe import choose

        info["backend"] = choose(w.func, w.data[:1])[0]
    except Exception:
        pass
    return info


def run_pickmap(
    w: Workload, clock: Clock, lib: str = "pickmap"
) -> tuple[float, list[Any], float, dict[str, Any]]:
    from pickmap import pmap

    start_method = _start_method_now() if lib in ("pickmap", "pickmap_cloudpickle") else None
    clock.start()
    backend = _pickmap_backend(lib)
    kwargs = _pickmap_kwargs(lib, backend)
    try:
        if w.warm:
            results = _warm_calls(lambda: pmap(w.func, w.data, **kwargs), w, clock)
        else:
            for _ in range(w.calls):
                results = pmap(w.func, w.data, **kwargs)
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        import pickmap

        pickmap.shutdown()
        if lib == "pickmap_executor":
            backend.shutdown(wait=True)  # the user's to close, not pickmap's
        teardown_s = time.perf_counter() - down
    return elapsed, results, teardown_s, _pickmap_info(w, lib, start_method)


def _warm_calls(call: Callable[[], Any], w: Workload, clock: Clock) -> Any:
    """One untimed call, then ``w.calls`` timed ones; the clock reports the median call
    (and the CPU of the timed calls, per call)."""
    result = call()
    times = []
    clock.start()  # again: the warm-up call is not part of what is measured
    for _ in range(w.calls):
        began = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - began)
    clock.per_call(statistics.median(times), w.calls)
    return result


def run_pool(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    from multiprocessing import Pool

    clock.start()
    pool = Pool(WORKERS)
    try:
        for _ in range(w.calls):
            results = pool.map(w.func, w.data)
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        pool.terminate()
        pool.join()
    import multiprocessing

    return (
        elapsed,
        results,
        time.perf_counter() - down,
        {"start_method": multiprocessing.get_start_method()},
    )


def run_ppe(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor

    clock.start()
    executor = ProcessPoolExecutor(WORKERS)
    try:
        for _ in range(w.calls):
            # default chunksize=1, as most users call it
            results = list(executor.map(w.func, w.data))
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        executor.shutdown(wait=True, cancel_futures=True)
    return elapsed, results, time.perf_counter() - down, {"chunksize": 1}


def run_joblib(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    from joblib import Parallel, delayed

    clock.start()
    if w.calls == 1:
        results = Parallel(n_jobs=WORKERS)(delayed(w.func)(x) for x in w.data)
        elapsed = clock.stop()
    else:
        parallel = Parallel(n_jobs=WORKERS)
        parallel.__enter__()  # `with Parallel(...) as parallel:`, with the exit outside the timing
        try:
            for _ in range(w.calls):
                results = parallel(delayed(w.func)(x) for x in w.data)
            elapsed = clock.stop()
        finally:
            parallel.__exit__(None, None, None)
    from joblib.externals.loky import get_reusable_executor

    down = time.perf_counter()
    get_reusable_executor().shutdown(wait=True)
    return elapsed, results, time.perf_counter() - down, {"backend": "loky"}


def run_pathos(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    from pathos.pools import ProcessPool

    clock.start()
    pool = ProcessPool(nodes=WORKERS)
    try:
        for _ in range(w.calls):
            results = pool.map(w.func, w.data)
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        pool.terminate()
        pool.join()
        pool.clear()
    return elapsed, results, time.perf_counter() - down, {}


def run_mpire(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    from mpire import WorkerPool

    clock.start()
    # keep_alive=True reuses the same workers across map() calls (many_calls);
    # with a single call it makes no difference to what is timed.
    pool = WorkerPool(n_jobs=WORKERS, keep_alive=w.calls > 1)
    # mpire unpacks an iterable item (a DataFrame: its column names) into arguments; a
    # 1-tuple is its documented way to pass one. Numpy results stay a list of arrays.
    data = [(x,) for x in w.data] if w.mpire_wrap else w.data
    try:
        for _ in range(w.calls):
            results = pool.map(w.func, data, concatenate_numpy_output=False)
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        pool.terminate()
    return elapsed, results, time.perf_counter() - down, {"keep_alive": w.calls > 1}


def run_mpire_shared(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    """mpire as its docs advise for large data: ``shared_objects=`` (copy-on-write under fork)."""
    from mpire import WorkerPool

    if w.shared_func is None:
        raise NotImplementedError("no shared_objects variant for this workload")
    clock.start()
    pool = WorkerPool(n_jobs=WORKERS, shared_objects=w.shared, keep_alive=w.calls > 1)
    try:
        for _ in range(w.calls):
            results = pool.map(w.shared_func, w.shared_data, concatenate_numpy_output=False)
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        pool.terminate()
    return elapsed, results, time.perf_counter() - down, {"shared_objects": True}


def run_floor(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    """The physical floor for moving ``w.nbytes``: a memory copy, one socket write, one /dev/shm write.

    The copy goes into memory already faulted in (memory bandwidth alone;
    ``copyto_fresh_s`` is the same into fresh pages, as a receiver's would
    be); the socket and file writes include the kernel's page allocation,
    which they cannot avoid. The reported seconds are the fastest of the three.
    """
    import numpy as np

    if not w.nbytes:
        raise NotImplementedError("this row moves no data")
    nbytes = w.nbytes // 8 * 8  # whole float64 elements
    source = np.ones(nbytes // 8)
    view = memoryview(source).cast("B")
    clock.start()
    target = np.empty_like(source)
    np.copyto(target, source)
    copy_fresh_s = clock.stop()
    began = time.perf_counter()
    np.copyto(target, source)
    copy_s = time.perf_counter() - began
    del target

    left, right = socket.socketpair()
    received = bytearray(nbytes)
    writer = threading.Thread(target=left.sendall, args=(view,))
    began = time.perf_counter()
    writer.start()
    into, got = memoryview(received), 0
    while got < nbytes:
        got += right.recv_into(into[got:])
    writer.join()
    socket_s = time.perf_counter() - began
    left.close()
    right.close()
    del received, into

    path = f"/dev/shm/pickmap-bench-floor-{os.getpid()}"
    try:
        began = time.perf_counter()
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            written = 0
            while written < nbytes:
                written += os.write(fd, view[written:])
        finally:
            os.close(fd)
        shm_s = time.perf_counter() - began
    finally:
        os.unlink(path)
    info = {
        "copyto_s": copy_s,
        "copyto_fresh_s": copy_fresh_s,
        "socket_s": socket_s,
        "shm_s": shm_s,
        "nbytes": nbytes,
    }
    return min(copy_s, socket_s, shm_s), None, 0.0, info


def run_dask(w: Workload, clock: Clock) -> tuple[float, list[Any], float, dict[str, Any]]:
    """dask.distributed on the cluster compare.py started: ``client.gather(client.map(f, data))``;
    warm rows: one ``client.submit(f, 1).result()`` round trip per timed call.

    The warm round trips use ``pure=False`` so that dask never serves a
    repeated key from memory (which would time a cache, not a round trip)."""
    from distributed import Client

    address = os.environ.get("PICKMAP_DASK_ADDRESS")
    if not address:
        raise RuntimeError("no cluster: PICKMAP_DASK_ADDRESS is not set (compare.py starts one)")
    clock.start()
    client = Client(address)
    try:
        if w.warm:
            expected_one = w.func(1)
            one = _warm_calls(lambda: client.submit(w.func, 1, pure=False).result(), w, clock)
            if one != expected_one:
                raise AssertionError(f"wrong result {one!r}")
            results = None  # checked here: the peer maps one item, not the row's eight
        else:
            results = client.gather(client.map(w.func, w.data))
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        client.close()
    return elapsed, results, time.perf_counter() - down, {}


def _pool_per_call(
    adapter: Callable[..., Any], w: Workload, clock: Clock
) -> tuple[float, list[Any], float, dict[str, Any]]:
    """``w.calls`` calls, each creating and closing its own pool: pool start and teardown are both timed."""
    one = dataclasses.replace(w, calls=1, pool_per_call=False)
    if adapter is run_joblib:
        # joblib users never make pools: each Parallel(...) call reuses loky's
        # executor, so a call is just that (the executor starts once).
        from joblib import Parallel, delayed
        from joblib.externals.loky import get_reusable_executor

        clock.start()
        for _ in range(w.calls):
            results = Parallel(n_jobs=WORKERS)(delayed(w.func)(x) for x in w.data)
        elapsed = clock.stop()
        get_reusable_executor().shutdown(wait=True)
        return elapsed, results, 0.0, {"pool_per_call": "loky executor reused"}
    clock.start()
    for _ in range(w.calls):
        _seconds, results, _teardown_s, extra = adapter(one, Clock(record=False))
    elapsed = clock.stop()  # includes every pool's start and teardown
    return elapsed, results, 0.0, {**extra, "pool_per_call": True}


# --------------------------------------------------------------------------- threads row
# (open a pool, map with it, close it) per library, for `THREADS` caller
# threads. Libraries whose pool is safe to share get ONE pool for all threads
# (as a user would share a module-level pool); mpire's WorkerPool is not
# thread-safe, so it gets one per thread, like `pool_per_thread`.
def _threads_ops(
    lib: str,
) -> tuple[Callable[[], Any], Callable[[Any, Workload], list[Any]], Callable[[Any], None]]:
    if lib == "pickmap":
        # Imported before the clock starts, as every other row imports pmap (and Pool here):
        # `pickmap.pmap` looked up in the timed region would time the import of pickmap.api.
        from pickmap import pmap, shutdown

        return (
            (lambda: None),
            (lambda _, w: pmap(w.func, w.data, workers=WORKERS)),
            (lambda _: shutdown()),
        )
    if lib == "serial":
        return (lambda: None), (lambda _, w: list(map(w.func, w.data))), (lambda _: None)
    if lib in ("pool", "pool_per_thread"):
        from multiprocessing import Pool

        def close_pool(pool: Any) -> None:
            pool.terminate()
            pool.join()

        return (lambda: Pool(WORKERS)), (lambda pool, w: pool.map(w.func, w.data)), close_pool
    if lib == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        return (
            lambda: ProcessPoolExecutor(WORKERS),
            lambda ex, w: list(ex.map(w.func, w.data)),
            lambda ex: ex.shutdown(wait=True, cancel_futures=True),
        )
    if lib == "joblib":
        from joblib import Parallel, delayed
        from joblib.externals.loky import get_reusable_executor

        return (
            lambda: None,
            lambda _, w: Parallel(n_jobs=WORKERS)(delayed(w.func)(x) for x in w.data),
            lambda _: get_reusable_executor().shutdown(wait=True),
        )
    if lib == "pathos":
        from pathos.pools import ProcessPool

        def close_pathos(pool: Any) -> None:
            pool.terminate()
            pool.join()
            pool.clear()

        return (
            (lambda: ProcessPool(nodes=WORKERS)),
            (lambda pool, w: pool.map(w.func, w.data)),
            close_pathos,
        )
    if lib == "mpire":
        from mpire import WorkerPool

        return (
            lambda: WorkerPool(n_jobs=WORKERS, keep_alive=True),
            lambda pool, w: pool.map(w.func, w.data),
            lambda pool: pool.terminate(),
        )
    raise NotImplementedError(f"{lib} has no threads variant")


PER_THREAD_POOL = frozenset(("pool_per_thread", "mpire"))


def run_threads(
    w: Workload, clock: Clock, lib: str
) -> tuple[float, list[Any], float, dict[str, Any]]:
    """``w.threads`` caller threads, each making ``w.calls`` calls; timed until every thread is done."""
    open_pool, call, close_pool = _threads_ops(lib)
    per_thread = lib in PER_THREAD_POOL
    errors: list[BaseException] = []
    wrong: list[Any] = []

    def caller(shared: Any) -> None:
        try:
            own = open_pool() if per_thread else shared
            try:
                for _ in range(w.calls):
                    got = call(own, w)
                    if list(got) != w.expected:
                        wrong.append(got)
            finally:
                if per_thread:
                    # inside the timed region: the thread's `with Pool(2) as p:` ends
                    close_pool(own)
        except BaseException as exc:
            errors.append(exc)

    clock.start()
    shared = None if per_thread else open_pool()
    try:
        threads = [threading.Thread(target=caller, args=(shared,)) for _ in range(w.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = clock.stop()
    finally:
        down = time.perf_counter()
        if not per_thread:
            close_pool(shared)
    if errors:
        raise errors[0]
    results = wrong[0] if wrong else w.expected
    return elapsed, results, time.perf_counter() - down, {"shared_pool": not per_thread}


ADAPTERS = {
    "pickmap": run_pickmap,
    "serial": run_serial,
    "pool": run_pool,
    "ppe": run_ppe,
    "joblib": run_joblib,
    "pathos": run_pathos,
    "mpire": run_mpire,
    "mpire_shared": run_mpire_shared,
    "floor": run_floor,
    "dask": run_dask,
    **{
        lib: functools.partial(run_pickmap, lib=lib)
        for lib in ("pickmap_cloudpickle", "pickmap_ppe", "pickmap_executor", "pickmap_dask")
    },
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, choices=LIBS)
    parser.add_argument("--workload", required=True, choices=WORKLOADS)
    parser.add_argument(
        "--cpu-loops", type=int, required=True, help="spin() loop count (from compare.py)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="data sizes and large item counts times this (default 1)",
    )
    args = parser.parse_args(argv)

    import_s = IMPORT_SECONDS

    workload = build_workload(args.workload, args.cpu_loops, args.scale)
    out: dict[str, Any] = {"lib": args.lib, "workload": args.workload, "import_s": import_s}
    clock = Clock()
    children_cpu0, children_peak0 = _children_usage()
    try:
        adapter = ADAPTERS.get(args.lib)
        if workload.threads:
            seconds, results, teardown_s, extra = run_threads(workload, clock, args.lib)
        elif (
            workload.pool_per_call
            and args.lib in ADAPTERS
            and not args.lib.startswith("pickmap")
            and args.lib not in ("serial", "floor", "dask")
        ):
            seconds, results, teardown_s, extra = _pool_per_call(adapter, workload, clock)
        elif adapter is None:
            raise NotImplementedError(f"{args.lib} only runs the threads row")
        else:
            seconds, results, teardown_s, extra = adapter(workload, clock)
    except BaseException as exc:
        out.update(
            status="fails",
            error=_first_line(exc),
            seconds=time.perf_counter() - clock.started if clock.started is not None else None,
            traceback=traceback.format_exc(limit=-6),
        )
    else:
        # None: the adapter checked its own results
        ok = results is None or workload.correct(results)
        out.update(status="ok" if ok else "wrong", seconds=seconds, teardown_s=teardown_s, **extra)
        if not ok:
            out["error"] = f"wrong results (first: {list(results)[:3]!r})"[:300]
        _reap_fork_server()
        children_cpu1, children_peak1 = _children_usage()
        out.update(clock.usage)
        if args.lib not in ("floor", "serial"):
            out["workers_cpu_s"] = children_cpu1 - children_cpu0
            out["workers_peak_mb"] = children_peak1
            if children_peak0:
                # a child reaped before the region set the floor
                out["workers_peak_before_mb"] = children_peak0
    line = (RESULT_MARKER + json.dumps(out) + "\n").encode()
    view = memoryview(line)
    while view:
        view = view[os.write(_RESULT_FD, view) :]
    return 0


if __name__ == "__main__":
    sys.exit(main())
