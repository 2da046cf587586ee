"""The benchmark workloads, in an importable module (never ``__main__``).

Every library under test gets the same callables and the same data from here,
so workers started by any start method (fork, spawn, loky, forkserver) import
them by name. ``compare.py`` calibrates :func:`spin` once and passes the loop
count to every measurement, so all libraries run the same amount of CPU work.
"""

from __future__ import annotations

import os
import time

BIG_BYTES = 50 * 2**20
TARGET_TASK_SECONDS = 0.020


def square(x: int) -> int:
    """The ``trivial`` workload: almost no work per item."""
    return x * x


def spin(loops: int) -> int:
    """Pure-Python CPU work (holds the GIL); about 20 ms once calibrated."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


class BigHolder:
    """An object holding 50 MB; its bound method is the ``big_method`` callable."""

    def __init__(self, size: int = BIG_BYTES) -> None:
        self.data = os.urandom(size)

    def method(self, x: int) -> int:
        return x + len(self.data)


def make_closure(k: int):
    """``lambda x: x * k`` closing over a local: what ``Pool.map`` cannot pickle."""
    return lambda x: x * k


def calibrate_spin(target: float = TARGET_TASK_SECONDS, *, attempts: int = 5) -> int:
    """A loop count for which ``spin(count)`` takes about ``target`` seconds here."""
    loops = 20_000
    while True:  # grow until one run is long enough to time reliably
        began = time.perf_counter()
        spin(loops)
        elapsed = time.perf_counter() - began
        if elapsed >= target / 4:
            break
        loops *= 2
    loops = max(1, int(loops * target / elapsed))
    for _ in range(2):  # refine against the median of a few runs
        times = []
        for _ in range(attempts):
            began = time.perf_counter()
            spin(loops)
            times.append(time.perf_counter() - began)
        times.sort()
        loops = max(1, int(loops * target / times[len(times) // 2]))
    return loops
