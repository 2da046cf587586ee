"""Worker count, start method and idle timeout: argument, else environment, else default.

The environment is read at call time, so ``PICKMAP_WORKERS=4 python app.py``
and ``os.environ[...] = ...`` between calls both work.

Default start method: ``fork`` where the platform has it and this process runs
a single thread; ``forkserver`` when other threads exist (forking a
multi-threaded process can copy a lock held by another thread into the child,
the reason Python 3.14 moved its Linux default away from fork); ``spawn``
where neither exists. fork starts a worker in about a millisecond and needs
nothing re-imported; pickmap never relies on fork to carry the callable
(the probe rejects ``__main__`` references), so a call that works under fork
also works under spawn and forkserver.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading

ENV_WORKERS = "PICKMAP_WORKERS"
ENV_START_METHOD = "PICKMAP_START_METHOD"
ENV_IDLE_TIMEOUT = "PICKMAP_IDLE_TIMEOUT"
START_METHODS = ("fork", "spawn", "forkserver")
DEFAULT_IDLE_TIMEOUT = 300.0


def _thread_count() -> int:
    # /proc counts threads started by C libraries too (BLAS pools, ...); the
    # task directory's link count is threads + 2, read with a single stat.
    try:
        return os.stat("/proc/self/task").st_nlink - 2
    except OSError:
        return threading.active_count()


def resolve_start_method(argument: str | None) -> str:
    source = "start_method="
    value = argument
    if value is None:
        value = os.environ.get(ENV_START_METHOD, "").strip() or None
        source = f"the environment variable {ENV_START_METHOD}"
    supported = tuple(m for m in START_METHODS if m in multiprocessing.get_all_start_methods())
    if value is None:
        if "fork" in supported and sys.platform != "darwin" and _thread_count() == 1:
            return "fork"
        return "forkserver" if "forkserver" in supported else "spawn"
    if value not in supported:
        raise ValueError(
            f"unknown start method {value!r} (from {source}); valid start methods on this platform: "
            f"{', '.join(supported)}"
        )
    return value


def resolve_workers(argument: int | None, default: int) -> int:
    if argument is not None:
        return check_positive_int("workers", argument)
    raw = os.environ.get(ENV_WORKERS, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"the environment variable {ENV_WORKERS} must be a whole number >= 1, not {raw!r}")
    return value


def resolve_idle_timeout() -> float:
    raw = os.environ.get(ENV_IDLE_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_IDLE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ValueError(f"the environment variable {ENV_IDLE_TIMEOUT} must be a number of seconds > 0, not {raw!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number >= 1, not {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, not {value}")
    return value


def check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout must be a number of seconds > 0 or None, not {value!r}")
    if not value > 0:
        raise ValueError(f"timeout must be > 0 seconds (or None for no limit), not {value}")
    return float(value)
