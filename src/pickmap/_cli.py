"""``python -m pickmap``: ``doctor`` (is this machine ready?) and ``explain`` (what would pmap do?).

``doctor`` prints one line per concern, in the style of ``flutter doctor``:
a mark (✓ fine, ! warning, ✗ broken), what was found, and for a warning or a
breakage the fix on the next line. ``-v`` adds the details behind each line.
It exits with status 1 when something is broken.

``explain MODULE:QUALNAME`` imports the module, finds the callable and prints
:func:`pickmap.explain`'s plan. Bad input is reported on one line starting
with ``pickmap: error:`` and exit status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import math
import os
import pickle
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import pickmap
from pickmap import _settings, registry

OK, WARN, BROKEN = "ok", "warning", "broken"
MARKS = {OK: "✓", WARN: "!", BROKEN: "✗"}
ASCII_MARKS = {OK: "+", WARN: "!", BROKEN: "x"}
MIN_PYTHON = (3, 11)
SHM_PATH = "/dev/shm"
SHM_LOW = 1 << 30  # Docker's default is 64 MiB; one shared array can exceed it
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


class Check(NamedTuple):
    """The outcome of one doctor concern."""

    status: str  # OK, WARN or BROKEN
    summary: str  # the line after the mark
    fix: str = ""  # for WARN and BROKEN: what to do about it
    details: tuple[str, ...] = ()  # shown with -v


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- doctor: one function per concern
def check_python() -> Check:
    version = platform.python_version()
    details = (
        f"interpreter: {sys.executable}",
        f"implementation: {platform.python_implementation()}",
    )
    if sys.version_info < MIN_PYTHON:
        wanted = ".".join(map(str, MIN_PYTHON))
        return Check(
            BROKEN,
            f"Python {version}: pickmap needs {wanted} or newer",
            f"install Python {wanted}+",
            details,
        )
    return Check(OK, f"Python {version}", details=details)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_start_method() -> Check:
    threads = _settings._thread_count()  # the count resolve_start_method bases its default on
    from_env = os.environ.get(_settings.ENV_START_METHOD, "").strip()
    try:
        method = _settings.resolve_start_method(None)
    except ValueError as exc:
        return Check(
            BROKEN,
            f"start method: {exc}",
            f"unset {_settings.ENV_START_METHOD} or set it to a valid one",
        )
    details = (
        f"threads in this process (entries in /proc/self/task): {threads}",
        (
            "fork is the default only while a process runs a single thread, or its only other threads "
            "are an OpenBLAS pool (which OpenBLAS quiesces around fork()); with any other thread, "
            "forkserver"
        ),
    )
    if from_env:
        return Check(
            OK, f"start method: {method} (set by {_settings.ENV_START_METHOD})", details=details
        )
    if method == "fork":
        why = f"this process runs {_plural(threads, 'thread')}, and forking a single-threaded process is safe"
    elif threads > 1:
        why = (
            f"this process runs {_plural(threads, 'thread')}: forking a multi-threaded process "
            "can copy a lock another thread holds into the worker"
        )
    elif method == "forkserver":
        why = "fork is not used on this platform"
    else:
        why = "this platform has neither fork nor forkserver"
    return Check(OK, f"start method: {method} by default ({why})", details=details)


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line: ``"max 100000"`` -> None, ``"150000 100000"`` -> 1.5."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000  # the kernel's default period
    return int(fields[0]) / period if period > 0 else None


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: no limit)."""
    quota, period = int(quota_text), int(period_text)
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroups(proc_cgroup: Path) -> tuple[str, dict[str, str]]:
    """This process's cgroup v2 path, and its v1 path per controller directory (e.g. ``cpu,cpuacct``)."""
    v2_path = "/"
    v1_paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2_path, v1_paths
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_paths[controllers] = path
    return v2_path, v1_paths


def _self_and_ancestors(mount: Path, own: str) -> list[Path]:
    # A parent's quota limits its children, so every level up to the mount counts.
    directory = mount / own.strip("/")
    found = [directory]
    while directory != mount and mount in directory.parents:
        directory = directory.parent
        found.append(directory)
    return found


def read_cpu_quota(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> tuple[float | None, list[str]]:
    """The tightest cgroup CPU quota over this process's cgroup and its ancestors (v2 and v1).

    Returns ``(CPUs, or None for no quota, the files read and what they held)``.
    """
    v2_path, v1_paths = _own_cgroups(proc_cgroup)
    limits: list[float] = []
    read: list[str] = []
    for directory in _self_and_ancestors(root, v2_path):
        cpu_max = directory / "cpu.max"
        try:
            text = cpu_max.read_text().strip()
            limit = parse_cpu_max(text)
        except (OSError, ValueError, IndexError):
            continue
        read.append(f"{cpu_max}: {text}")
        limits += [limit] if limit is not None else []
    # Without /proc/self/cgroup naming a cpu controller, look where v1 usually mounts it.
    mounts = {controllers: root / controllers for controllers in v1_paths or {"cpu": "/"}}
    for controllers, mount in mounts.items():
        for directory in _self_and_ancestors(mount, v1_paths.get(controllers, "/")):
            quota_file, period_file = (
                directory / "cpu.cfs_quota_us",
                directory / "cpu.cfs_period_us",
            )
            try:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
                limit = parse_cfs_quota(quota, period)
            except (OSError, ValueError):
                continue
            read.append(f"{quota_file}: {quota}, {period_file.name}: {period}")
            limits += [limit] if limit is not None else []
    return (min(limits) if limits else None), read


def _affinity() -> tuple[int, str]:
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
        return count, f"no affinity mask on this platform; os.cpu_count(): {count}"
    return len(cpus), f"affinity mask (os.sched_getaffinity): {sorted(cpus)}"


def check_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Check:
    affinity, affinity_detail = _affinity()
    quota, files_read = read_cpu_quota(root, proc_cgroup)
    # A quota of 1.5 CPUs keeps two workers mostly busy: round up, as joblib's loky does.
    effective = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))
    quota_text = "no cgroup CPU quota" if quota is None else f"cgroup CPU quota {quota:g}"
    summary = (
        f"usable CPUs: {effective} (affinity {affinity} of {os.cpu_count()} CPUs, {quota_text})"
    )
    details = (affinity_detail, *(files_read or [f"no cgroup CPU quota file found under {root}"]))
    if effective < affinity:
        fix = (
            f"pickmap starts one worker per CPU of the affinity mask ({affinity}) by default, more than the "
            f"quota runs at once: set {_settings.ENV_WORKERS}={effective} (or pass workers={effective})"
        )
        return Check(WARN, summary, fix, details)
    return Check(OK, summary, details=details)


def _size(count: int) -> str:
    if count >= 1 << 30:
        return f"{count / (1 << 30):.1f} GiB"
    return f"{count / (1 << 20):.0f} MiB"


def _can_write(directory: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=directory):  # unnamed on Linux, removed on close
            return True
    except OSError:
        return False


def check_shm(path: str = SHM_PATH) -> Check:
    details = (
        (
            "pickmap puts the buffers of 64 KiB or more (numpy arrays, bytes) of a callable, a "
            "chunk's items or its results in one shared-memory segment there when they add up to "
            f"256 KiB, mapped by the reader; when it is missing or full they go to "
            f"{tempfile.gettempdir()}, then through the pipe, with one warning"
        ),
    )
    try:
        stats = os.statvfs(path)
    except OSError:
        # macOS has no /dev/shm, and that is normal
        status = WARN if sys.platform.startswith("linux") else OK
        fix = f"segments go to {tempfile.gettempdir()} instead; mount a tmpfs on {path} for memory-speed ones"
        return Check(status, f"{path}: not present", fix if status == WARN else "", details)
    size, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    writable = _can_write(path)
    summary = (
        f"{path}: {_size(size)}, {_size(free)} free, {'writable' if writable else 'NOT writable'}"
    )
    if not writable:
        fix = f"pickmap falls back to {tempfile.gettempdir()}; make {path} writable (mode 1777, as a tmpfs)"
        return Check(WARN, summary, fix, details)
    if size < SHM_LOW:
        fix = (
            "under 1 GiB (Docker's default is 64 MiB) is small for large callables and shared arrays: "
            "docker run --shm-size=2g ..., compose: shm_size: 2g, Kubernetes: an emptyDir with medium: Memory "
            "mounted at /dev/shm"
        )
        return Check(WARN, summary, fix, details)
    if free < SHM_LOW:
        return Check(
            WARN, summary, f"under 1 GiB free: look for stale files with ls -la {path}", details
        )
    return Check(OK, summary, details=details)


def check_thread_pools() -> Check:
    title = "BLAS/OpenMP thread pools"
    if importlib.util.find_spec("numpy") is None:
        return Check(OK, f"{title}: numpy is not installed, nothing to inspect")
    if importlib.util.find_spec("threadpoolctl") is None:
        return Check(OK, f"{title}: not inspected (pip install threadpoolctl to list them)")
    threads_before = _settings._thread_count()
    try:
        importlib.import_module("numpy")  # loads the BLAS library that threadpoolctl then finds
        pools = importlib.import_module("threadpoolctl").threadpool_info()
    except Exception as exc:  # a broken numpy or BLAS install
        return Check(
            WARN,
            f"{title}: importing numpy failed ({type(exc).__name__}: {exc})",
            "reinstall numpy",
        )
    started = _settings._thread_count() - threads_before
    found = "; ".join(
        f"{pool.get('internal_api')} {pool.get('version')} ({pool.get('user_api')}, "
        f"{_plural(int(pool.get('num_threads', 0)), 'thread')})"
        for pool in pools
    )
    details = [", ".join(f"{key}={value}" for key, value in pool.items()) for pool in pools]
    if started > 0:
        method, why = _settings.default_start_method()
        details.append(
            f"importing numpy started {_plural(started, 'thread')} here; a program that imports it "
            f"before its first pmap call still gets {method} by default: {why}"
        )
    details.append(
        "each worker limits these pools to usable CPUs // workers threads (inner_threads=, "
        f"{_settings.ENV_INNER_THREADS}; 0 or off leaves them alone)"
    )
    return Check(OK, f"{title}: {found or 'none loaded by numpy'}", details=tuple(details))


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    # The distribution can be named differently from the module it installs.
    for distribution in importlib.metadata.packages_distributions().get(module, []):
        return importlib.metadata.version(distribution)
    return "(version unknown)"


def _is_missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def check_backend(name: str, installed: Sequence[str]) -> Check:
    entry = registry.registration(name)
    registered_as = entry.factory if isinstance(entry.factory, str) else repr(entry.factory)
    if name not in installed:
        missing = next((m for m in entry.requires if _is_missing(m)), "?")
        hint = entry.install_hint or f"pip install {missing}"
        return Check(
            BROKEN,
            f"backend {name}: not installed (needs {missing})",
            hint,
            (f"registered as {registered_as}",),
        )
    try:
        backend = registry.get_backend(name)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        fix = f"check the register_backend({name!r}, ...) call, or reinstall pickmap for a built-in backend"
        return Check(
            BROKEN, f"backend {name}: cannot be loaded ({type(exc).__name__}: {first_line})", fix
        )
    try:
        # a cluster's address and size: this connects, within its timeout
        runs_on = backend.describe()
        workers = backend.default_workers()
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        fix = "fix or unset the setting the message names"
        return Check(
            BROKEN,
            f"backend {name}: cannot reach its workers ({type(exc).__name__}: {first_line})",
            fix,
        )
    process_package = getattr(backend, "process_package", "multiprocessing")
    if runs_on:
        runs_in = runs_on
    elif backend.processes and not backend.sticky:
        runs_in = "the processes of a ProcessPoolExecutor it owns"
    elif backend.processes:
        runs_in = f"processes via {process_package}"
    else:
        runs_in = "the calling thread" if backend.max_workers == 1 else "threads in this process"
    packages = list(entry.requires)
    if (
        backend.processes
        and backend.sticky
        and process_package not in packages
        and process_package not in sys.stdlib_module_names
    ):
        packages.append(process_package)
    if backend.serializer == "identity":
        carries = "nothing serialized"
    elif packages:
        carries = (
            f"serializer {backend.serializer} ({', '.join(f'{p} {_version(p)}' for p in packages)})"
        )
    else:
        carries = f"serializer {backend.serializer} (standard library, pickle protocol {pickle.HIGHEST_PROTOCOL})"
    if backend.max_workers is not None:
        workers = min(workers, backend.max_workers)
    details = (
        f"registered as {registered_as}",
        f"default workers: {workers}",
        "capabilities: "
        + ", ".join(
            f"{flag} {'yes' if on else 'no'}" for flag, on in backend.capabilities().items()
        ),
    )
    return Check(OK, f"backend {name}: {runs_in}, {carries}", details=details)


def run_checks() -> list[Check]:
    # The start method comes before the thread pools: importing numpy starts threads,
    # which would change the answer for this process.
    checks = [check_python(), check_start_method(), check_cpus(), check_shm(), check_thread_pools()]
    installed = pickmap.available_backends()
    checks += [check_backend(name, installed) for name in registry.registered_backends()]
    return checks


def summarize(checks: Sequence[Check]) -> str:
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, BROKEN)}
    parts = [f"{_plural(counts[OK], 'check')} passed"]
    parts += [_plural(counts[WARN], "warning")] if counts[WARN] else []
    parts += [_plural(counts[BROKEN], "problem")] if counts[BROKEN] else []
    return ", ".join(parts)


def _marks_for(stream: TextIO) -> tuple[dict[str, str], str]:
    # An ASCII-only terminal (PYTHONIOENCODING=ascii, an old console) gets ASCII marks, not a crash;
    # a stream without an encoding (io.StringIO) holds any text.
    try:
        "✓✗•".encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS, "-"
    return MARKS, "•"


def doctor(verbose: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # read at call time: tests and callers may have replaced sys.stdout
    marks, bullet = _marks_for(out)
    hint = "" if verbose else "; -v for details"
    print(f"pickmap {pickmap.__version__} doctor{hint}", file=out)
    checks = run_checks()
    for check in checks:
        print(f"{marks[check.status]} {check.summary}", file=out)
        if check.fix:
            print(f"    {check.fix}", file=out)
        if verbose:
            for detail in check.details:
                print(f"    {bullet} {detail}", file=out)
    print(summarize(checks), file=out)
    return 1 if any(check.status == BROKEN for check in checks) else 0


# --------------------------------------------------------------------------- explain
def _a(thing: object) -> str:
    name = type(thing).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(
                f"no module named {exc.name!r}: run from the directory that holds it, or add that directory "
                "to PYTHONPATH"
            ) from None
        raise UsageError(
            f"importing {name!r} failed: {_first_line(exc)}; install what it needs"
        ) from None
    except (Exception, SystemExit) as exc:  # the module's own code failed (or called sys.exit)
        raise UsageError(
            f"importing {name!r} raised {_first_line(exc)}; `python -c 'import {name}'` must work"
        ) from None


def resolve(module: Any, qualname: str) -> Any:
    found = module
    parts = qualname.split(".")
    for index, part in enumerate(parts):
        if part == "<locals>":
            raise UsageError(
                f"{qualname!r} lives inside a function and cannot be reached by name; "
                "explain a module-level attribute that holds it"
            )
        try:
            found = getattr(found, part)
        except Exception:
            owner = ".".join([module.__name__, *parts[:index]])
            raise UsageError(
                f"{owner} has no attribute {part!r}; check the name (it is case-sensitive)"
            ) from None
    return found


def load_callable(target: str) -> tuple[Callable[..., Any], Any]:
    """``(callable, its module)`` for ``MODULE:QUALNAME``."""
    module_name, colon, qualname = target.partition(":")
    if not colon or not module_name or not qualname:
        raise UsageError(
            f"expected MODULE:QUALNAME such as mypackage.tasks:Worker.run, not {target!r}"
        )
    module = import_module(module_name)
    func = resolve(module, qualname)
    if not callable(func):
        raise UsageError(
            f"{target} is {_a(func)}, not a callable; name a function or callable object"
        )
    return func, module


def evaluate_items(expression: str, module: Any) -> Any:
    # A copy of the namespace: an expression like (x := ...) must not change the module.
    try:
        # the user's own command line, as `python -c` is
        items = eval(expression, dict(vars(module)))
    except Exception as exc:  # SyntaxError included
        raise UsageError(
            f"--items {expression!r} failed: {_first_line(exc)}; pass a Python expression such as '[1, 2]'"
        ) from None
    try:
        iter(items)
    except TypeError:
        raise UsageError(
            f"--items {expression!r} is {_a(items)}, not iterable; pass a list such as '[{expression}]'"
        ) from None
    return items


def explain_target(target: str, expression: str, backend: str | None) -> str:
    func, module = load_callable(target)
    items = evaluate_items(expression, module)
    try:
        return str(pickmap.explain(func, items, backend=backend))
    except (
        pickmap.PickmapError,
        ValueError,
        TypeError,
    ) as exc:  # unknown backend, bad PICKMAP_* values
        raise UsageError(str(exc).strip().splitlines()[0]) from None


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pickmap",
        description="pickmap's command line: check this machine, or explain a call.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor_parser = commands.add_parser(
        "doctor",
        help="check Python, start method, CPUs, /dev/shm, BLAS pools and backends",
        description="One line per concern (✓ fine, ! warning, ✗ broken), with the fix below it. "
        "Exit status 1 when something is broken.",
    )
    doctor_parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the details behind each line"
    )
    explain_parser = commands.add_parser(
        "explain",
        help="print which backend pmap would choose for a callable, and why",
        description="Import MODULE, find QUALNAME in it and print pickmap.explain()'s plan: the backend, "
        "where the choice came from, and every backend's verdict with its reason.",
    )
    explain_parser.add_argument(
        "target", metavar="MODULE:QUALNAME", help="e.g. mypackage.tasks:Worker.run"
    )
    explain_parser.add_argument(
        "--items",
        default="[0]",
        metavar="EXPR",
        help="sample items: a Python expression, evaluated with the module's names available (default: [0])",
    )
    explain_parser.add_argument(
        "--backend", metavar="NAME", help="a backend to try instead of the probe's choice"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor(args.verbose)
    if args.command == "explain":
        try:
            print(explain_target(args.target, args.items, args.backend))
        except UsageError as exc:
            print(f"pickmap: error: {exc}", file=sys.stderr)
            return 2
        return 0
    # no command: a usage error, as argparse treats a missing argument
    parser.print_help(sys.stderr)
    return 2
