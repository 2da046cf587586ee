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
}


def _import_first() -> float:
    """Run the library's import statement before this script imports anything
    else (argparse, typing, json...), so ``import_s`` is what a fresh script pays."""
    lib = sys.argv[sys.argv.index("--lib") + 1] if "--lib" in sys.argv[:-1] else ""
    began = time.perf_counter()
    exec(IMPORTS.get(lib, ""), {})  # noqa: S102 - a fixed statement from the table above
    return time.perf_counter() - began


IMPORT_SECONDS = _import_first()


import argparse  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import workloads  # noqa: E402

RESULT_MARKER = "PICKMAP-BENCH "
WORKERS = 2

WORKLOADS = ("trivial", "big_method", "cpu", "first_call", "many_calls", "many_calls_reused", "lambda_closure")
LIBS = ("pickmap", "serial", "pool", "ppe", "joblib", "pathos", "mpire")


@dataclass
class Workload:
    func: Callable[[Any], Any]
    data: list[Any]
    calls: int
    expected: list[Any]
    pool_per_call: bool = False  # peers: `with Pool(2) as p: p.map(...)` inside each call


def build_workload(name: str, cpu_loops: int) -> Workload:
    if name == "trivial":
        data = list(range(200_000))
        return Workload(workloads.square, data, 1, [x * x for x in data])
    if name == "big_method":
        holder = workloads.BigHolder()
        data = list(range(2_000))
        return Workload(holder.method, data, 1, [x + workloads.BIG_BYTES for x in data])
    if name == "cpu":
        one = workloads.spin(cpu_loops)
        return Workload(workloads.spin, [cpu_loops] * 48, 1, [one] * 48)
    if name == "first_call":
        data = list(range(8))
        return Workload(workloads.square, data, 1, [x * x for x in data])
    if name in ("many_calls", "many_calls_reused"):
        # many_calls: each call is a function that makes its own pool, as
        # `def go(self): with Pool(2) as p: return p.map(...)` does (the issue's
        # peer figures, ~10 ms a call, are of this kind). many_calls_reused:
        # the peers keep one pool for all 50 calls.
        data = list(range(8))
        return Workload(workloads.square, data, 50, [x * x for x in data], pool_per_call=name == "many_calls")
    if name == "lambda_closure":
        # Defined here, in the __main__ script, as a user would write it.
        k = 3
        func = lambda x: x * k  # noqa: E731
        data = list(range(20_000))
        return Workload(func, data, 1, [x * k for x in data])
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


# --------------------------------------------------------------------------- one adapter per library
# Each adapter returns (seconds, last results, teardown seconds, extra info).
# ``mark`` is called at the moment the timed region starts, so a failure can
# still report how long it took to surface.


def run_serial(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    mark()
    began = time.perf_counter()
    for _ in range(w.calls):
        results = list(map(w.func, w.data))
    return time.perf_counter() - began, results, 0.0, {}


def run_pickmap(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    from pickmap import pmap

    mark()
    began = time.perf_counter()
    for _ in range(w.calls):
        results = pmap(w.func, w.data, workers=WORKERS)
    elapsed = time.perf_counter() - began
    import pickmap
    from pickmap.probe import choose

    backend = choose(w.func, w.data[:1])[0]  # cached verdict: what the calls used
    began = time.perf_counter()
    pickmap.shutdown()
    return elapsed, results, time.perf_counter() - began, {"backend": backend}


def run_pool(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    from multiprocessing import Pool

    mark()
    began = time.perf_counter()
    pool = Pool(WORKERS)
    try:
        for _ in range(w.calls):
            results = pool.map(w.func, w.data)
        elapsed = time.perf_counter() - began
    finally:
        down = time.perf_counter()
        pool.terminate()
        pool.join()
    import multiprocessing

    return elapsed, results, time.perf_counter() - down, {"start_method": multiprocessing.get_start_method()}


def run_ppe(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor

    mark()
    began = time.perf_counter()
    executor = ProcessPoolExecutor(WORKERS)
    try:
        for _ in range(w.calls):
            results = list(executor.map(w.func, w.data))  # default chunksize=1, as most users call it
        elapsed = time.perf_counter() - began
    finally:
        down = time.perf_counter()
        executor.shutdown(wait=True, cancel_futures=True)
    return elapsed, results, time.perf_counter() - down, {"chunksize": 1}


def run_joblib(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    from joblib import Parallel, delayed

    mark()
    began = time.perf_counter()
    if w.calls == 1:
        results = Parallel(n_jobs=WORKERS)(delayed(w.func)(x) for x in w.data)
        elapsed = time.perf_counter() - began
    else:
        parallel = Parallel(n_jobs=WORKERS)
        parallel.__enter__()  # `with Parallel(...) as parallel:`, with the exit outside the timing
        try:
            for _ in range(w.calls):
                results = parallel(delayed(w.func)(x) for x in w.data)
            elapsed = time.perf_counter() - began
        finally:
            parallel.__exit__(None, None, None)
    from joblib.externals.loky import get_reusable_executor

    down = time.perf_counter()
    get_reusable_executor().shutdown(wait=True)
    return elapsed, results, time.perf_counter() - down, {"backend": "loky"}


def run_pathos(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    from pathos.pools import ProcessPool

    mark()
    began = time.perf_counter()
    pool = ProcessPool(nodes=WORKERS)
    try:
        for _ in range(w.calls):
            results = pool.map(w.func, w.data)
        elapsed = time.perf_counter() - began
    finally:
        down = time.perf_counter()
        pool.terminate()
        pool.join()
        pool.clear()
    return elapsed, results, time.perf_counter() - down, {}


def run_mpire(w: Workload, mark: Callable[[], None]) -> tuple[float, list[Any], float, dict[str, Any]]:
    from mpire import WorkerPool

    mark()
    began = time.perf_counter()
    # keep_alive=True reuses the same workers across map() calls (many_calls);
    # with a single call it makes no difference to what is timed.
    pool = WorkerPool(n_jobs=WORKERS, keep_alive=w.calls > 1)
    try:
        for _ in range(w.calls):
            results = pool.map(w.func, w.data)
        elapsed = time.perf_counter() - began
    finally:
        down = time.perf_counter()
        pool.terminate()
    return elapsed, results, time.perf_counter() - down, {"keep_alive": w.calls > 1}


def _pool_per_call(adapter: Callable[..., Any], w: Workload, started: list[float]) -> tuple[float, list[Any], float, dict[str, Any]]:
    """50 calls, each creating and closing its own pool: pool start and teardown are both timed."""
    one = Workload(w.func, w.data, 1, w.expected)
    if adapter is run_joblib:
        # joblib users never make pools: each Parallel(...) call reuses loky's
        # executor, so a call is just that (the executor starts once).
        from joblib import Parallel, delayed

        started.append(time.perf_counter())
        began = time.perf_counter()
        for _ in range(w.calls):
            results = Parallel(n_jobs=WORKERS)(delayed(w.func)(x) for x in w.data)
        return time.perf_counter() - began, results, 0.0, {"pool_per_call": "loky executor reused"}
    started.append(time.perf_counter())
    total = 0.0
    for _ in range(w.calls):
        seconds, results, teardown_s, extra = adapter(one, lambda: None)
        total += seconds + teardown_s
    return total, results, 0.0, {**extra, "pool_per_call": True}


ADAPTERS = {
    "pickmap": run_pickmap,
    "serial": run_serial,
    "pool": run_pool,
    "ppe": run_ppe,
    "joblib": run_joblib,
    "pathos": run_pathos,
    "mpire": run_mpire,
}
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, choices=LIBS)
    parser.add_argument("--workload", required=True, choices=WORKLOADS)
    parser.add_argument("--cpu-loops", type=int, required=True, help="spin() loop count (from compare.py)")
    args = parser.parse_args(argv)

    import_s = IMPORT_SECONDS

    workload = build_workload(args.workload, args.cpu_loops)
    out: dict[str, Any] = {"lib": args.lib, "workload": args.workload, "import_s": import_s}
    started: list[float] = []
    try:
        adapter = ADAPTERS[args.lib]
        if workload.pool_per_call and args.lib not in ("pickmap", "serial"):
            seconds, results, teardown_s, extra = _pool_per_call(adapter, workload, started)
        else:
            seconds, results, teardown_s, extra = adapter(workload, lambda: started.append(time.perf_counter()))
    except BaseException as exc:  # noqa: BLE001 - a library that cannot run the workload "fails"
        out.update(
            status="fails",
            error=_first_line(exc),
            seconds=time.perf_counter() - started[0] if started else None,
            traceback=traceback.format_exc(limit=-6),
        )
    else:
        ok = list(results) == workload.expected
        out.update(status="ok" if ok else "wrong", seconds=seconds, teardown_s=teardown_s, **extra)
        if not ok:
            out["error"] = f"wrong results (first: {list(results)[:3]!r})"
    print(RESULT_MARKER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
