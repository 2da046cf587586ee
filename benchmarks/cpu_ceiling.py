"""How parallel can the ``cpu`` workload be on this machine, with no library at all?

    python benchmarks/cpu_ceiling.py                # 12 rounds
    python benchmarks/cpu_ceiling.py --rounds 20
    python benchmarks/cpu_ceiling.py --rounds 2 --loops 190000 --no-fresh --json   # what compare.py runs

The ``cpu`` target asks for ``time <= 0.55 x serial`` on 2 cores, i.e. at
least 90% parallel efficiency. That is only reachable if a task runs as fast
when both cores are busy as when one is. On a virtual machine it may not: the
host can give one busy vCPU more than two. This script measures that, with
bare processes (``os.fork``, no pool, no pickling, no messages):

- *alone*: one process runs 24 tasks while the other core idles;
- *both*: two processes, started together, each run 24 tasks.

Rounds alternate the two so drifting host load hits both. It prints the
median time per task in each case, and the ratio a zero-overhead library
would reach on 48 tasks: ``(24 x task_both) / (48 x task_alone)``. A pool
adds its start-up and its tail on top of that.

A second measurement compares fresh interpreters: one that imports nothing
but the workload (as the ``serial`` row of ``compare.py`` does) and one that
first imports ``multiprocessing.pool`` (as every pool's workers have). On
this machine the lean one runs the same pure-Python loop several per cent
faster; any ``import`` (even ``typing``) costs it that, which points at
memory layout rather than at anything a pool does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads

TASKS_EACH = 24


def _run_tasks(loops: int, write_fd: int) -> None:
    times = []
    for _ in range(TASKS_EACH):
        began = time.perf_counter()
        workloads.spin(loops)
        times.append(time.perf_counter() - began)
    os.write(write_fd, (" ".join(f"{t:.6f}" for t in times) + "\n").encode())


def _fork_tasks(count: int, loops: int) -> list[float]:
    """Start ``count`` processes at once; each runs TASKS_EACH tasks; return every task's time."""
    read_fd, write_fd = os.pipe()
    go_read, go_write = os.pipe()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # child: wait for the start signal, run, report, leave
            os.close(read_fd)
            os.read(go_read, 1)
            _run_tasks(loops, write_fd)
            os._exit(0)
        pids.append(pid)
    os.close(write_fd)
    os.write(go_write, b"x" * count)  # release them together
    with os.fdopen(read_fd) as reports:
        lines = reports.read().split()
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(go_read)
    os.close(go_write)
    return [float(x) for x in lines]


_FRESH_RUN = """
import sys, time
{imports}
sys.path.insert(0, {here!r})
import workloads
began = time.perf_counter()
for _ in range({tasks}):
    workloads.spin({loops})
print((time.perf_counter() - began) / {tasks})
"""


def _fresh_task_time(loops: int, imports: str) -> float:
    code = _FRESH_RUN.format(
        imports=imports, here=str(Path(__file__).resolve().parent), tasks=TASKS_EACH, loops=loops
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--loops", type=int, help="spin() loop count (default: calibrate here to ~20 ms)"
    )
    parser.add_argument(
        "--no-fresh", action="store_true", help="skip the lean-vs-loaded interpreter comparison"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line (per-round medians) instead of the text; compare.py reads it",
    )
    args = parser.parse_args()
    loops = args.loops or workloads.calibrate_spin()
    alone: list[float] = []
    both: list[float] = []
    for _ in range(args.rounds):
        alone.append(statistics.median(_fork_tasks(1, loops)))
        both.append(statistics.median(_fork_tasks(2, loops)))
    if args.json:
        print(json.dumps({"loops": loops, "alone": alone, "both": both}))
        return
    task_alone, task_both = statistics.median(alone), statistics.median(both)
    print(f"spin({loops}); {args.rounds} rounds, alternating; median time per task:")
    print(
        f"  alone (other core idle): {task_alone * 1000:.1f} ms  (rounds: {min(alone) * 1000:.1f}–{max(alone) * 1000:.1f})"
    )
    print(
        f"  both cores busy:         {task_both * 1000:.1f} ms  (rounds: {min(both) * 1000:.1f}–{max(both) * 1000:.1f})"
    )
    print(f"  slowdown when both are busy: {task_both / task_alone:.3f}x")
    print(
        f"  best ratio any 2-worker pool can reach on 48 tasks: {task_both / (2 * task_alone):.3f} x serial"
    )
    if args.no_fresh:
        return

    lean: list[float] = []
    loaded: list[float] = []
    for _ in range(args.rounds):
        lean.append(_fresh_task_time(loops, ""))
        loaded.append(_fresh_task_time(loops, "import multiprocessing.pool"))
    task_lean, task_loaded = statistics.median(lean), statistics.median(loaded)
    print("fresh interpreters, one core busy, alternating; median time per task:")
    print(f"  nothing imported:                  {task_lean * 1000:.1f} ms")
    print(
        f"  after import multiprocessing.pool: {task_loaded * 1000:.1f} ms  ({task_loaded / task_lean:.3f}x)"
    )


if __name__ == "__main__":
    main()
