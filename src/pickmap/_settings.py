"""Worker count, start method and idle timeout: argument, else environment, else default.

The environment is read at call time, so ``PICKMAP_WORKERS=4 python app.py``
and ``os.environ[...] = ...`` between calls both work.

Default start method: ``fork`` where the platform has it and this process runs
a single thread — or its only other threads are OpenBLAS's pool, which numpy
starts at import and which OpenBLAS itself quiesces around ``fork()`` (a
``pthread_atfork`` handler), so ``import numpy`` does not cost the fork fast
path; ``forkserver`` when any other thread exists (forking a multi-threaded
process can copy a lock held by another thread into the child, the reason
Python 3.14 moved its Linux default away from fork); ``spawn`` where neither
exists. fork starts a worker in about a millisecond and needs nothing
re-imported; pickmap never relies on fork to carry the callable (the probe
rejects ``__main__`` references), so a call that works under fork also works
under spawn and forkserver.

Inner threads: each worker limits the BLAS/OpenMP pools it has loaded to
``usable CPUs // workers`` threads (at least 1), through threadpoolctl, so
``workers`` processes each running a matrix product do not oversubscribe the
machine. ``inner_threads=N`` or ``PICKMAP_INNER_THREADS=N`` sets N; ``0`` (or
``off``) leaves the pools alone.
A forked worker inherits the limit: the caller holds its own pools at it while
the call forks workers (``backends/_process._cap_pools_for_fork``).
"""

from __future__ import annotations

import os
import sys
import threading

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

ENV_WORKERS = "PICKMAP_WORKERS"
ENV_START_METHOD = "PICKMAP_START_METHOD"
ENV_IDLE_TIMEOUT = "PICKMAP_IDLE_TIMEOUT"
ENV_INNER_THREADS = "PICKMAP_INNER_THREADS"
ENV_MAX_TASKS = "PICKMAP_MAX_TASKS_PER_WORKER"
START_METHODS = ("fork", "spawn", "forkserver")
DEFAULT_IDLE_TIMEOUT = 300.0


def supported_start_methods() -> tuple[str, ...]:
    """The start methods this platform has, as ``multiprocessing.get_all_start_methods()``
    says, without importing ``multiprocessing`` (~5 ms a first call need not pay)."""
    if sys.platform == "win32":
        return ("spawn",)
    import _socket  # socket.py's C half: socket.py costs ~3 ms, before the fork server starts

    fds_travel = hasattr(_socket, "SCM_RIGHTS") and hasattr(_socket.socket, "sendmsg")
    return ("fork", "spawn", "forkserver") if fds_travel else ("fork", "spawn")


def _thread_count() -> int:
    # /proc counts threads started by C libraries too (BLAS pools, ...); the
    # task directory's link count is threads + 2, read with a single stat.
    # Python's own count can be the larger: a C thread that called into Python
    # and exited keeps its entry, and it counts as a thread here (forkserver).
    try:
        return max(os.stat("/proc/self/task").st_nlink - 2, threading.active_count())
    except OSError:
        return threading.active_count()


# libraries whose threads are quiesced around fork() by the library itself
_FORK_SAFE_POOLS = ("openblas",)
_fork_safe_cache: dict[int, bool] = {}
_pool_controller: Any = None  # the last threadpoolctl view made (see pool_controller)
_pool_controller_seen: tuple[bool, ...] = ()  # _pool_modules() when it was made

POOL_MODULES = ("numpy", "scipy", "torch", "sklearn")  # what loads BLAS/OpenMP pools


def _pool_modules() -> tuple[bool, ...]:
    return tuple(module in sys.modules for module in POOL_MODULES)


def blas_pools_loaded() -> bool:
    """Whether a module that loads BLAS/OpenMP pools is imported (else there is nothing to cap)."""
    return any(_pool_modules())


def pool_controller(*, fresh: bool = False) -> Any:
    """threadpoolctl's ``ThreadpoolController`` for this process's BLAS/OpenMP pools.

    Shared by the fork-safety check and the cap a fork call puts on the pools
    (``backends._process``): with numpy and pandas loaded, threadpoolctl's
    own scan of ~100 libraries takes ~7 ms and the narrowed one
    (:func:`_controller_of_pool_named_libraries`) ~2 ms. It is
    made again when ``fresh`` or when one of the modules that load pools
    (numpy, scipy, torch, sklearn) was imported since; a library loaded any
    other way after the scan is not seen. ImportError without threadpoolctl.
    """
    global _pool_controller, _pool_controller_seen
    seen = _pool_modules()
    if _pool_controller is None or fresh or seen != _pool_controller_seen:
        from threadpoolctl import ThreadpoolController

        controller = _controller_of_pool_named_libraries(ThreadpoolController)
        if controller is None:
            controller = ThreadpoolController()
        _pool_controller, _pool_controller_seen = controller, seen
    return _pool_controller


def _controller_of_pool_named_libraries(controller_class: Any) -> Any:
    """threadpoolctl's scan, handed only the loaded libraries whose file name a pool's can be.

    threadpoolctl resolves the symlinks in the path of every loaded library
    (~100 with numpy and pandas: ~800 ``lstat`` calls, ~7 ms) and then
    matches the file name against its pools' prefixes. On Linux it reads the
    paths from ``/proc/self/maps``, where the kernel already gives each file's
    resolved path, so matching the names first finds the same libraries at a
    fraction of the cost; threadpoolctl still makes each controller (and
    checks its symbols) itself. A library deleted on disk since it was
    loaded (`` (deleted)`` after its path) is skipped, as threadpoolctl's own
    scan of ``/proc/self/maps`` skips it: under its old name threadpoolctl
    would cache whatever file is there now. This uses threadpoolctl internals
    (``_ALL_CONTROLLERS``, ``_from_controllers``, ``_make_controller_from_path``);
    ``None``, for the full scan, where they are not as expected or off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import threadpoolctl

        prefixes = tuple(
            prefix.encode()
            for known in threadpoolctl._ALL_CONTROLLERS
            for prefix in known.filename_prefixes
        )
        with open("/proc/self/maps", "rb") as maps:
            text = maps.read()
        lowered, candidates = text.lower(), set()
        for prefix in prefixes:  # a find per prefix, not a loop over ~600 lines
            at = lowered.find(b"/" + prefix)
            while at >= 0:
                end = text.find(b"\n", at) % (len(text) + 1)  # -1 (no newline): to the end
                line = text[text.rfind(b"\n", 0, at) + 1 : end]
                path = line[line.find(b" /") + 1 :]
                name = path.rpartition(b"/")[2].lower()
                if name.startswith(prefix) and b".so" in name and not path.endswith(b" (deleted)"):
                    candidates.add(path.decode())
                at = lowered.find(b"/" + prefix, end)
        controller = controller_class._from_controllers([])
        for candidate in sorted(candidates):
            try:
                controller._make_controller_from_path(candidate)
            except OSError:  # one that will not open (threadpoolctl before 3.8 lets it through)
                continue
        controller._warn_if_incompatible_openmp()
    except Exception:  # threadpoolctl internals not as expected: its own full scan
        return None
    return controller


def _only_fork_safe_threads(threads: int) -> bool:
    """Whether every thread but the main one belongs to a BLAS pool that is safe to fork."""
    if threading.active_count() != 1:
        return False  # a Python thread: it may hold any lock
    known = _fork_safe_cache.get(threads)
    if known is not None:
        return known
    safe = False
    if "numpy" in sys.modules or "scipy" in sys.modules:
        try:
            # fresh: a new thread count may come with a library loaded since the last scan
            pools = pool_controller(fresh=True).info()
        except ImportError:
            pools = None
        if pools is not None:
            others = [p for p in pools if p.get("internal_api") not in _FORK_SAFE_POOLS]
            # A pool of n threads runs n - 1 of its own beside the caller's.
            pooled = sum(max(0, int(p.get("num_threads", 1)) - 1) for p in pools)
            safe = not others and threads - 1 <= pooled
    _fork_safe_cache[threads] = safe
    return safe


def default_start_method() -> tuple[str, str]:
    """``(start method, why)`` when neither an argument nor the environment says."""
    supported = supported_start_methods()
    if "fork" in supported and sys.platform != "darwin":
        threads = _thread_count()
        if threads == 1:
            return "fork", "this process runs a single thread"
        if _only_fork_safe_threads(threads):
            return (
                "fork",
                "its only other threads are an OpenBLAS pool, which OpenBLAS quiesces around fork()",
            )
        fallback = "forkserver" if "forkserver" in supported else "spawn"
        return (
            fallback,
            f"this process runs {threads} threads, and forking a multi-threaded process is unsafe",
        )
    return ("forkserver" if "forkserver" in supported else "spawn"), "fork is not available here"


def resolve_start_method(argument: str | None) -> str:
    source = "start_method="
    value = argument
    if value is None:
        value = os.environ.get(ENV_START_METHOD, "").strip() or None
        source = f"the environment variable {ENV_START_METHOD}"
    supported = supported_start_methods()
    if value is None:
        if threading.active_count() > 1:
            # What default_start_method() says of any process running Python threads, without
            # its stat of /proc/self/task (~12 us of every call from a threaded caller).
            return "forkserver" if "forkserver" in supported else "spawn"
        return default_start_method()[0]
    if value not in supported:
        raise ValueError(
            f"unknown start method {value!r} (from {source}); valid start methods on this platform: "
            f"{', '.join(supported)}"
        )
    return value


def resolve_workers(argument: int | None, default: Callable[[], int]) -> int:
    """``workers=``, else ``PICKMAP_WORKERS``, else ``default()`` (asked only then)."""
    if argument is not None:
        return check_positive_int("workers", argument)
    raw = os.environ.get(ENV_WORKERS, "").strip()
    if not raw:
        return default()
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"the environment variable {ENV_WORKERS} must be a whole number >= 1, not {raw!r}"
        )
    return value


def resolve_idle_timeout() -> float:
    raw = os.environ.get(ENV_IDLE_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_IDLE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:  # nan too
        raise ValueError(
            f"the environment variable {ENV_IDLE_TIMEOUT} must be a number of seconds > 0, not {raw!r}"
        )
    return value


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_inner_threads(argument: int | None, workers: int) -> int:
    """Threads each worker's BLAS/OpenMP pools may use; 0: leave them alone."""
    source = "inner_threads="
    value: object = argument
    if value is None:
        raw = os.environ.get(ENV_INNER_THREADS, "").strip().lower()
        if not raw:
            return max(1, usable_cpus() // workers)
        source = f"the environment variable {ENV_INNER_THREADS}"
        value = 0 if raw == "off" else (int(raw) if raw.isdigit() else raw)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{source} must be a whole number >= 0 (0 or 'off': leave BLAS pools alone), not {value!r}"
        )
    return value


def resolve_max_tasks(argument: int | None) -> int | None:
    """Items a worker process runs before it is replaced (None: no limit)."""
    if argument is not None:
        return check_positive_int("max_tasks_per_worker", argument)
    raw = os.environ.get(ENV_MAX_TASKS, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"the environment variable {ENV_MAX_TASKS} must be a whole number >= 1, not {raw!r}"
        )
    return int(raw)


def check_retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"retries must be a whole number >= 0, not {value!r} ({type(value).__name__})"
        )
    if value < 0:
        raise ValueError(f"retries must be >= 0, not {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a whole number >= 1, not {value!r} ({type(value).__name__})"
        )
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
