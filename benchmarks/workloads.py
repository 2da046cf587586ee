"""The benchmark workloads, in an importable module (never ``__main__``).

Every library under test gets the same callables and the same data from here,
so workers started by any start method (fork, spawn, loky, forkserver) import
them by name. ``compare.py`` calibrates :func:`spin` once and passes the loop
count to every measurement, so all libraries run the same amount of CPU work.
"""

from __future__ import annotations

import os
import time
from typing import Any

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


# --------------------------------------------------------------------------- data rows (issue 8)
# numpy and pandas are imported lazily here so the old rows' workers (and the
# ``serial`` row) stay as lean as before; the data rows import both at the top
# of the measured script anyway (run_one.py), as a user's script would.
MB = 2**20
ITEM_BYTES = 4 * MB  # big_items / big_results: one float64 array per item
ITEM_COUNT = 64
SELF_BYTES = 400 * MB  # big_self: the model's weight matrix
SELF_ITEMS = 2_000
FRAME_ROWS = 1_000_000
FRAME_CHUNKS = 64
FRAME_KEYS = 100


def scaled(nbytes: int, scale: float) -> int:
    """A byte count times ``--scale``, rounded down to whole float64 elements (at least 8)."""
    return max(64, int(nbytes * scale) // 8 * 8)


def array_sum(arr: Any) -> float:
    """``big_items``: one reduction per 4 MB array."""
    return float(arr.sum())


def shared_array_sum(arrays: Any, index: int) -> float:
    """``big_items`` for mpire's ``shared_objects``: the list is shared, the item is an index."""
    return float(arrays[index].sum())


def make_array(index: int, nbytes: int) -> Any:
    """``big_results``: a fresh float64 array of ``nbytes`` holding ``index``."""
    import numpy as np

    return np.full(nbytes // 8, float(index))


class ArrayMaker:
    """``make_array`` with the size bound, as a module-level class so every start method can import it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __call__(self, index: int) -> Any:
        return make_array(index, self.nbytes)


class Model:
    """``big_self``: an object holding a large float64 weight vector; ``predict`` reads one element."""

    def __init__(self, nbytes: int = SELF_BYTES) -> None:
        import numpy as np

        self.w = np.arange(nbytes // 8, dtype=np.float64)  # allocated once, no temporary copy

    def predict(self, i: int) -> float:
        return float(self.w[i % len(self.w)] * 2.0)


def shared_predict(model: Model, i: int) -> float:
    """``big_self`` for mpire's ``shared_objects``: the model is shared, the item is an index."""
    return model.predict(i)


def make_frame(rows: int = FRAME_ROWS) -> Any:
    """``dataframe``: a few columns, deterministic content."""
    import numpy as np
    import pandas as pd

    index = np.arange(rows)
    return pd.DataFrame(
        {
            "key": index % FRAME_KEYS,
            "a": index.astype(np.float64),
            "b": (index % 7).astype(np.float64),
            "c": index % 13,
        }
    )


def split_frame(frame: Any, chunks: int = FRAME_CHUNKS) -> list[Any]:
    """``chunks`` row ranges as separate (copied) DataFrames, as ``np.array_split`` users get."""
    bounds = frame_bounds(len(frame), chunks)
    return [frame.iloc[start:stop].copy() for start, stop in bounds]


def frame_bounds(rows: int, chunks: int = FRAME_CHUNKS) -> list[tuple[int, int]]:
    step = -(-rows // chunks)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def group_agg(chunk: Any) -> Any:
    """``dataframe``: one groupby-aggregate per chunk."""
    return chunk.groupby("key").agg(a_sum=("a", "sum"), b_mean=("b", "mean"), c_max=("c", "max"))


def shared_group_agg(frame: Any, start: int, stop: int) -> Any:
    """``dataframe`` for mpire's ``shared_objects``: the frame is shared, the item is a row range
    (mpire unpacks a tuple item into arguments)."""
    return group_agg(frame.iloc[start:stop])
