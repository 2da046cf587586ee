"""pickmap against its peers, in one run, each measurement in a fresh process.

    python benchmarks/compare.py                        # everything (median of 3, 5 or 9 per row)
    python benchmarks/compare.py --only first_call,many_calls --repeat 5
    python benchmarks/compare.py --libs pickmap,pool --json out.json --chart none
    python benchmarks/compare.py --only big_items,threads --scale 0.05 --repeat 1 --chart none   # a quick check

For every (workload, library, repetition) this starts a new interpreter running
``run_one.py``, which times one workload with one library and prints one JSON
line. Repetitions are interleaved (every workload and library once, then again)
so a burst of background load hits every library rather than one, and the
order of the libraries within a row rotates from round to round (none is
always first after another's teardown). The result is the median of the
repetitions that succeeded: 3 by default for the original rows, 5 for the
rows of issues 8, 10 and 11, 9 for ``cpu``, whose target is a median of
paired rounds (``--repeat`` sets all).

Rows and what they need:

- the original rows (trivial ... lambda_closure) and, on ``trivial`` and
  ``lambda_closure``, pickmap's ``backend="cloudpickle"``, ``backend="ppe"``
  and ``backend=ProcessPoolExecutor(2)`` beside a plain ProcessPoolExecutor
  (issue 10);
- the data rows (issue 8), with numpy and pandas imported at the top of the
  measured script, each with a ``floor`` measurement of the same bytes; CPU
  seconds and peak memory of the caller and the workers (see run_one.py);
- ``first_call_installed`` (and ``_np``, numpy and pandas imported first):
  run with the interpreter of a temporary venv where pickmap is installed as
  a user installs it (``pip install <repo>``, not ``-e``), built once per run
  (``--installed-venv`` reuses one instead; ``none`` skips the rows);
- ``trivial_dask`` and ``warm8_dask`` (issue 11): compare.py starts a dask
  scheduler and two ``dask worker --nthreads 1`` on 127.0.0.1 (free ports, no
  dashboard) and stops them at the end; the measured process finds the
  cluster through ``PICKMAP_DASK_ADDRESS``;
- ``cpu`` also runs ``cpu_ceiling.py`` after each round and reports pickmap
  against Pool.map in paired rounds next to the ceiling's ratio.

A pickmap feature that does not exist yet (``backend="ppe"``, an executor,
``backend="dask"``) shows as ``fails`` in its cell, and works without edits
here once it lands.

Prints the machine, Python and library versions and the exact command, then
markdown tables (seconds, ratios pickmap / peer, targets met or not) and writes
a grouped bar chart (``--chart``, default ``docs/explanation/performance.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402
from run_one import LIBS, RESULT_MARKER, WORKERS, WORKLOADS  # noqa: E402

LABELS = {
    "pickmap": "pickmap",
    "serial": "serial map",
    "pool": "Pool.map",
    "ppe": "ProcessPoolExecutor",
    "joblib": "joblib",
    "pathos": "pathos",
    "mpire": "mpire",
    "mpire_shared": "mpire shared_objects",
    "pool_per_thread": "Pool per thread",
    "floor": "floor",
    "pickmap_cloudpickle": "pickmap cloudpickle",
    "pickmap_ppe": 'pickmap "ppe"',
    "pickmap_executor": "pickmap PPE(2)",
    "pickmap_dask": 'pickmap "dask"',
    "dask": "dask client.map",
}

# Which libraries run which row.
ORIGINAL_LIBS = ("pickmap", "serial", "pool", "ppe", "joblib", "pathos", "mpire")
ORIGINAL_ROWS = (
    "trivial",
    "big_method",
    "cpu",
    "first_call",
    "many_calls",
    "many_calls_reused",
    "lambda_closure",
)
BACKEND_ROWS = ("trivial", "lambda_closure")  # issue 10
BACKEND_LIBS = ("pickmap", "pickmap_cloudpickle", "pickmap_ppe", "pickmap_executor", "ppe")
DATA_ROWS = (
    "big_items",
    "big_results",
    "big_self",
    "big_self_x3",
    "dataframe",
    "threads",
    "first_call_installed",
    "first_call_installed_np",
)
DATA_LIBS = (
    "pickmap",
    "pool",
    "pool_per_thread",
    "ppe",
    "joblib",
    "mpire",
    "mpire_shared",
    "pathos",
)
INSTALLED_ROWS = ("first_call_installed", "first_call_installed_np")
DASK_ROWS = ("trivial_dask", "warm8_dask")  # issue 11
DASK_LIBS = ("pickmap_dask", "dask")
_DATA_PEERS = ("pickmap", "pool", "ppe", "joblib", "mpire", "pathos")
ROW_LIBS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(ORIGINAL_ROWS, ORIGINAL_LIBS),
    **dict.fromkeys(BACKEND_ROWS, ORIGINAL_LIBS + BACKEND_LIBS[1:-1]),
    "big_items": ("floor", *_DATA_PEERS, "mpire_shared"),
    "big_results": ("floor", *_DATA_PEERS),  # nothing to share: the data is the results
    "big_self": ("floor", *_DATA_PEERS, "mpire_shared"),
    "big_self_x3": ("floor", *_DATA_PEERS, "mpire_shared"),
    "dataframe": ("floor", *_DATA_PEERS, "mpire_shared"),
    "threads": (*_DATA_PEERS, "pool_per_thread"),
    **dict.fromkeys(INSTALLED_ROWS, _DATA_PEERS),
    **dict.fromkeys(DASK_ROWS, DASK_LIBS),
}
DEFAULT_REPEAT = {
    **dict.fromkeys(ORIGINAL_ROWS, 3),
    **dict.fromkeys((*BACKEND_ROWS, *DATA_ROWS, *DASK_ROWS), 5),
    # Its target is a median of per-round ratios, and one round's ratio spanned 0.65-1.54 on
    # this machine (the host's speed drifts within a second): 3 rounds decide by luck.
    "cpu": 9,
}
# Rows whose peers need more than --timeout: 100k dask tasks take about 3 minutes here.
MIN_TIMEOUT = {"trivial_dask": 600.0}
DESCRIPTIONS = {
    "trivial": "200k items, `x*x` (module-level function)",
    "big_method": "bound method of an object holding 50 MB, 2k items",
    "cpu": "48 pure-Python tasks of ~20 ms",
    "first_call": "8 trivial items, first call in a fresh process (pool start included)",
    "first_call+import": "the same, plus the user's import statement (derived from the first_call runs)",
    "many_calls": "50 consecutive calls of 8 items; peers make a pool in each call (`with Pool(2) as p:`), teardown timed",
    "many_calls_reused": "50 consecutive calls of 8 items; peers reuse one pool for all calls",
    "lambda_closure": "`lambda x: x * k` closing over a local, 20k items",
    "big_items": "64 float64 arrays of 4 MB, `arr.sum()` per item",
    "big_results": "64 ints in, a 4 MB float64 array out per item",
    "big_self": "bound method of an object holding a 400 MB float64 array, 2,000 items of one element each",
    "big_self_x3": "the same, three consecutive calls on the unchanged object (peers: a fresh pool per call; joblib's executor is reused)",
    "dataframe": "1M-row DataFrame (4 columns) in 64 chunks, a groupby-agg per chunk",
    "threads": "4 caller threads x 50 calls x 8 items (Pool.map, PPE, pathos: ONE pool shared by the threads; mpire and `Pool per thread`: a pool per thread)",
    "first_call_installed": "first_call with pickmap installed non-editable (temporary venv, `pip install <repo>`)",
    "first_call_installed_np": "the same, with numpy and pandas imported first",
    "trivial_dask": '100k trivial items on the 2-worker dask cluster: `pmap(..., backend="dask")` vs `client.gather(client.map(f, data))` (client connect included)',
    "warm8_dask": "a warm 8-item pmap vs one `client.submit(f, 1).result()` round trip (median of 20 warm calls)",
}
PACKAGES = (
    "pickmap",
    "cloudpickle",
    "dill",
    "multiprocess",
    "pathos",
    "joblib",
    "mpire",
    "numpy",
    "pandas",
    "distributed",
    "matplotlib",
)


# --------------------------------------------------------------------------- one measurement
@dataclass
class Run:
    status: str  # ok, fails, wrong, timeout, crashed
    seconds: float | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _last_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_group(pgid: int, grace: float = 0.0) -> int:
    """SIGKILL every process still in the group after ``grace`` seconds; how many there were."""
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)  # e.g. a resource tracker that exits on its own once its pipe closes
    if not _group_alive(pgid):
        return 0
    left = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    left += 1
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return left


SHM = Path("/dev/shm")


def _shm_entries() -> set[str]:
    try:
        return {entry.name for entry in SHM.iterdir()}
    except OSError:
        return set()


def _remove_shm_left_by(pids: set[int], before: set[str]) -> int:
    """Remove /dev/shm entries that appeared during a measurement and carry one of its
    process ids in their name (joblib's ``joblib_memmapping_folder_<pid>_...``, loky's
    ``sem.loky-<pid>-...``): what a killed process could not clean up. Entries of
    other processes on this shared machine are never touched."""
    removed = 0
    for name in _shm_entries() - before:
        if any(re.search(rf"(?<![0-9]){pid}(?![0-9])", name) for pid in pids):
            path = SHM / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
            removed += 1
    return removed


def _group_pids(pgid: int) -> set[int]:
    found = {pgid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.add(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def _run_isolated(
    command: list[str], env: dict[str, str], timeout: float
) -> tuple[str, str, int | None, bool]:
    """Run in a new session, so the measurement and every worker it started form one
    process group: a timeout kills all of them, and nothing left behind (an orphaned
    pool worker still chewing a 50 MB task) can slow the next measurement down.
    What killed processes leave in /dev/shm is removed (see ``_remove_shm_left_by``)."""
    shm_before = _shm_entries()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        killed = _group_pids(process.pid)
        _kill_group(process.pid)
        stdout, stderr = process.communicate()
        timed_out = True
    else:
        killed = _group_pids(process.pid) if _group_alive(process.pid) else set()
    leftovers = _kill_group(process.pid, grace=2.0)
    if leftovers:
        stderr += f"\n[compare.py] killed {leftovers} process(es) the measurement left behind"
    if timed_out or leftovers:
        removed = _remove_shm_left_by(killed | {process.pid}, shm_before)
        if removed:
            stderr += (
                f"\n[compare.py] removed {removed} /dev/shm entr(y/ies) the killed processes left"
            )
    return stdout, stderr, process.returncode if not timed_out else None, timed_out


# Bytecode cache for the measurements. Some environments set
# PYTHONDONTWRITEBYTECODE=1; an editable install (pickmap here) then has no .pyc
# at all and recompiles its source at every import, which a user installing a
# wheel never pays. The children write and reuse .pyc under this prefix instead
# (outside the source tree); a warm-up run per library fills it.
PYCACHE = Path(tempfile.gettempdir()) / "pickmap-bench-pycache"


@dataclass
class Setting:
    """How one row's measurements run: the interpreter, and what their environment adds."""

    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    # False for an installed pickmap: use the .pyc pip compiled, as a user does
    pycache: bool = True
    unavailable: str | None = None  # why this row cannot run (then every cell says so)


def measure(
    lib: str,
    workload: str,
    cpu_loops: int,
    timeout: float,
    scale: float = 1.0,
    setting: Setting | None = None,
) -> Run:
    setting = setting or Setting()
    if setting.unavailable:
        return Run("n/a", error=setting.unavailable)
    command = [
        setting.python,
        str(HERE / "run_one.py"),
        "--lib",
        lib,
        "--workload",
        workload,
        "--cpu-loops",
        str(cpu_loops),
        "--scale",
        repr(scale),
    ]
    env = dict(os.environ)
    # Workers started by spawn-like methods (loky) must import `workloads` too.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    for name in (
        "PICKMAP_BACKEND",
        "PICKMAP_WORKERS",
        "PICKMAP_START_METHOD",
        "PYTHONDONTWRITEBYTECODE",
    ):
        env.pop(name, None)  # measure the defaults, whatever the caller's shell says
    for name in ("PICKMAP_DASK_ADDRESS", "PICKMAP_BENCH_CLUSTER_PIDS"):
        env.pop(name, None)  # only the dask rows see a cluster
    if setting.pycache:
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    else:
        env.pop("PYTHONPYCACHEPREFIX", None)
    env.update(setting.env)
    stdout, stderr, code, timed_out = _run_isolated(command, env, timeout)
    result = _last_result(stdout)
    if result is None:
        if timed_out:
            return Run("timeout", error=f"no result within {timeout:g} s (killed)")
        # Progress bars (mpire) end their lines with \r: split on it too, and skip them.
        lines = [
            line
            for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and "it/s]" not in line
        ]
        if code == 0:
            return Run("crashed", error="the process exited (code 0) without printing its result")
        return Run("crashed", error=f"exit code {code}: {(lines or ['no output'])[-1][:300]}")
    info = {
        k: v
        for k, v in result.items()
        if k not in ("lib", "workload", "status", "seconds", "error")
    }
    if "left behind" in stderr:
        info["left_processes"] = True
    if timed_out:
        info["exit_hung"] = True  # the result was printed, then the interpreter did not exit
    return Run(result["status"], result.get("seconds"), result.get("error"), info)


def with_import(run: Run) -> Run:
    """The same measurement, counting the import statement the user writes too."""
    if run.seconds is None:
        return run
    return Run(
        run.status, run.seconds + float(run.info.get("import_s") or 0.0), run.error, run.info
    )


# --------------------------------------------------------------------------- an installed pickmap (first_call_installed)
def build_installed_venv(need_numpy: bool) -> tuple[Path, Path]:
    """A temporary venv with pickmap installed from this checkout as a user installs it
    (``pip install <repo>``: a built wheel, not ``-e``) and the peers of the first_call
    rows; ``(venv, its python)``. Built once per run; the caller removes it."""
    venv = Path(tempfile.mkdtemp(prefix="pickmap-bench-venv-"))
    python = venv / "bin" / "python"
    print(f"building {venv} (pip install {ROOT}, not editable)...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    packages = [str(ROOT), "joblib", "mpire", *(("numpy", "pandas") if need_numpy else ())]
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *packages],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install into {venv} failed: {done.stderr.strip()[-500:]}")
    check = subprocess.run(
        [str(python), "-c", "import pickmap, sys; print(pickmap.__file__)"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        timeout=60,
    )
    if str(ROOT) in check.stdout:
        raise RuntimeError(
            f"pickmap in {venv} resolves to the checkout ({check.stdout.strip()}), not an installed copy"
        )
    return venv, python


# --------------------------------------------------------------------------- a local dask cluster (issue 11)
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (from /proc: no psutil needed)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, ValueError, IndexError):
                pass
    found = list(roots)
    for pid in found:  # grows while iterating: breadth-first
        found.extend(
            child for child, parent in parents.items() if parent == pid and child not in found
        )
    return found


class DaskCluster:
    """``dask scheduler`` and two ``dask worker --nthreads 1`` on 127.0.0.1, free ports, no
    dashboard; each in its own session so stopping it stops its nanny's worker too."""

    def __init__(self, workers: int = WORKERS, connect_timeout: float = 60.0) -> None:
        self.workers = workers
        self.connect_timeout = connect_timeout
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="pickmap-bench-dask-"))
        self.address = ""
        self.pids: list[int] = []

    def _start(self, *args: str) -> None:
        log = open(self.scratch / f"{len(self.processes)}.log", "wb")  # noqa: SIM115 - closed with the directory
        env = dict(os.environ)
        # The workers unpickle `workloads.square` by reference: they must import it too.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
        self.processes.append(
            subprocess.Popen(
                [self._dask(), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.scratch,
                env=env,
                start_new_session=True,
            )
        )

    @staticmethod
    def _dask() -> str:
        beside = Path(sys.executable).with_name("dask")
        found = str(beside) if beside.exists() else shutil.which("dask")
        if not found:
            raise RuntimeError("the `dask` command is not installed (pip install distributed)")
        return found

    def __enter__(self) -> DaskCluster:
        try:
            from distributed import Client
        except ImportError as exc:
            raise RuntimeError("distributed is not installed (pip install distributed)") from exc
        port = _free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        try:
            self._start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
            for _ in range(self.workers):
                self._start(
                    "worker",
                    self.address,
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--local-directory",
                    str(self.scratch),
                )
            with Client(self.address, timeout=self.connect_timeout) as client:
                client.wait_for_workers(self.workers, timeout=self.connect_timeout)
            # The scheduler, the nannies and the worker processes the nannies started.
            self.pids = _descendants([process.pid for process in self.processes])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):  # workers first, then the scheduler
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(process.pid, grace=0.5)
            process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.processes.clear()

    def setting(self) -> Setting:
        return Setting(
            env={
                "PICKMAP_DASK_ADDRESS": self.address,
                "PICKMAP_BENCH_CLUSTER_PIDS": ",".join(map(str, self.pids)),
            }
        )


# --------------------------------------------------------------------------- cpu_ceiling.py in the same run
def run_ceiling(loops: int, rounds: int, timeout: float) -> tuple[list[float], list[float]] | None:
    """Per-round median task times (alone, both busy) from cpu_ceiling.py, or None if it failed."""
    command = [
        sys.executable,
        str(HERE / "cpu_ceiling.py"),
        "--rounds",
        str(rounds),
        "--loops",
        str(loops),
        "--no-fresh",
        "--json",
    ]
    stdout, _, code, timed_out = _run_isolated(command, dict(os.environ), timeout)
    if code != 0 or timed_out:
        return None
    data = json.loads(stdout.strip().splitlines()[-1])
    return data["alone"], data["both"]


# --------------------------------------------------------------------------- aggregation
@dataclass
class Cell:
    runs: list[Run]

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.status == "ok" and r.seconds is not None]

    @property
    def ok_seconds(self) -> list[float]:
        return [r.seconds for r in self.ok_runs if r.seconds is not None]

    @property
    def median(self) -> float | None:
        good = self.ok_seconds
        return statistics.median(good) if good else None

    def metric(self, name: str) -> float | None:
        """Median of one reported figure (``caller_cpu_s``, ``workers_peak_mb``...) over the good runs."""
        values = [float(r.info[name]) for r in self.ok_runs if r.info.get(name) is not None]
        return statistics.median(values) if values else None

    def by_round(self) -> dict[int, float]:
        return {
            int(r.info["round"]): r.seconds
            for r in self.ok_runs
            if "round" in r.info and r.seconds is not None
        }

    @property
    def status(self) -> str:
        """``ok`` if any repetition succeeded (the median uses those), else the first failure."""
        if self.ok_seconds:
            return "ok"
        return self.runs[0].status if self.runs else "not run"

    @property
    def partial(self) -> bool:
        return 0 < len(self.ok_seconds) < len(self.runs)

    @property
    def error(self) -> str | None:
        return next((r.error for r in self.runs if r.error), None)


def show_status(status: str, workload: str) -> str:
    if status == "timeout" and workload == "lambda_closure":
        return "hangs"
    return status


def fmt_seconds(cell: Cell | None, workload: str) -> str:
    if cell is None:
        return "—"
    if cell.median is None:
        return show_status(cell.status, workload)
    mark = "†" if cell.partial else ""
    return f"{fmt_value(cell.median)}{mark}"


def fmt_value(seconds: float) -> str:
    if seconds >= 0.1:
        return f"{seconds:.3f}"
    if seconds >= 0.001:
        return f"{seconds:.4f}"
    return f"{seconds:.1e}"


def fmt_metric(cell: Cell | None, name: str, workload: str, *, unit: str = "s") -> str:
    if cell is None:
        return "—"
    value = cell.metric(name)
    if value is None:
        return show_status(cell.status, workload) if cell.median is None else "—"
    return fmt_value(value) if unit == "s" else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def ratio(cells: dict[str, Cell], lib: str, mine: str = "pickmap") -> float | None:
    ours, theirs = cells.get(mine), cells.get(lib)
    if (
        ours is None
        or theirs is None
        or ours.median is None
        or theirs.median is None
        or theirs.median == 0
    ):
        return None
    return ours.median / theirs.median


def paired_ratios(cells: dict[str, Cell], lib: str, mine: str = "pickmap") -> list[float]:
    """``mine / lib`` round by round (both measured in the same round), for the rounds where both succeeded."""
    if mine not in cells or lib not in cells:
        return []
    ours, theirs = cells[mine].by_round(), cells[lib].by_round()
    return [ours[r] / theirs[r] for r in sorted(ours) if r in theirs and theirs[r] > 0]


def fmt_ratio(cells: dict[str, Cell], lib: str, workload: str, mine: str = "pickmap") -> str:
    value = ratio(cells, lib, mine)
    if value is not None:
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    theirs = cells.get(lib)
    if theirs is None:
        return "—"
    if theirs.median is None:
        return f"peer {show_status(theirs.status, workload)}"
    return f"{LABELS[mine]} " + show_status(cells[mine].status, workload) if mine in cells else "—"


@dataclass
class Ceiling:
    """cpu_ceiling.py's per-round medians, gathered over the whole run."""

    alone: list[float] = field(default_factory=list)
    both: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """What a zero-overhead 2-worker pool would reach on 48 tasks, x serial."""
        if not self.alone or not self.both:
            return None
        return statistics.median(self.both) / (2 * statistics.median(self.alone))


# --------------------------------------------------------------------------- targets
@dataclass
class Target:
    workload: str
    text: str
    # (peer, bound): met when mine / peer <= bound
    bounds: tuple[tuple[str, float], ...]
    mine: str = "pickmap"
    caller_mb: float | None = None  # and the caller's peak memory grows by at most this
    paired: bool = False  # ratios are the median of per-round ratios (same round), not of medians
    ceiling_margin: float | None = None  # and mine / serial <= margin x cpu_ceiling.py's ratio


TARGETS = (
    Target("trivial", "pickmap <= Pool.map", (("pool", 1.0),)),
    Target(
        "big_method",
        "pickmap <= 1.2 x mpire and >= 4x faster than Pool.map",
        (("mpire", 1.2), ("pool", 0.25)),
    ),
    Target(
        "cpu",
        "pickmap <= 1.0 x Pool.map in paired rounds, and x serial within 5% of cpu_ceiling.py's ratio "
        "(same run; replaces <= 0.55 x serial)",
        (("pool", 1.0),),
        paired=True,
        ceiling_margin=1.05,
    ),
    Target("first_call", "pickmap <= 1.5 x Pool.map", (("pool", 1.5),)),
    Target("many_calls", "pickmap <= 0.25 x ProcessPoolExecutor", (("ppe", 0.25),)),
    Target("lambda_closure", "pickmap <= pathos", (("pathos", 1.0),)),
    # issue 8
    Target(
        "big_items",
        "pickmap <= 0.35 x Pool.map and <= 0.6 x joblib",
        (("pool", 0.35), ("joblib", 0.6)),
    ),
    Target(
        "big_results",
        "pickmap <= 0.35 x Pool.map and <= 0.8 x mpire",
        (("pool", 0.35), ("mpire", 0.8)),
    ),
    Target(
        "big_self",
        "pickmap <= 0.5 x joblib and <= 2 x mpire; caller peak memory grows <= 100 MB",
        (("joblib", 0.5), ("mpire", 2.0)),
        caller_mb=100.0,
    ),
    Target("big_self_x3", "pickmap's three calls <= 2 x mpire's three calls", (("mpire", 2.0),)),
    Target("dataframe", "pickmap <= 1.0 x Pool.map", (("pool", 1.0),)),
    Target("threads", "pickmap <= 1.2 x one Pool.map shared by the threads", (("pool", 1.2),)),
    Target(
        "first_call_installed+import",
        "import + one 8-item call, installed pickmap <= 1.15 x Pool.map",
        (("pool", 1.15),),
    ),
    # issue 8 measures its rows "with numpy and pandas imported as a user's script would"
    Target(
        "first_call_installed_np+import",
        "the same with numpy and pandas imported first, installed pickmap <= 1.15 x Pool.map",
        (("pool", 1.15),),
    ),
    # issue 11
    Target(
        "trivial_dask",
        'pmap(backend="dask") <= 0.3 x client.gather(client.map(f, data))',
        (("dask", 0.3),),
        mine="pickmap_dask",
    ),
    Target(
        "warm8_dask",
        "warm 8-item pmap <= 3 x one client.submit(f, 1).result()",
        (("dask", 3.0),),
        mine="pickmap_dask",
    ),
)


def evaluate(
    target: Target, cells: dict[str, Cell], ceiling: Ceiling | None = None
) -> tuple[str, str]:
    """``(measured, verdict)``; verdict is ``met``, ``MISSED`` or why it cannot be judged."""
    parts, verdict = [], "met"
    mine = target.mine
    for peer, bound in target.bounds:
        if peer not in cells or mine not in cells:
            return "not measured", "not measured"
        if target.paired:
            pairs = paired_ratios(cells, peer, mine)
            value = statistics.median(pairs) if pairs else None
        else:
            value = ratio(cells, peer, mine)
        if value is None:
            ours = cells[mine]
            if ours.median is None:
                # A row that could not be set up (no cluster, no venv) is not a miss of pickmap's.
                return (
                    f"{LABELS[mine]} {show_status(ours.status, target.workload)}",
                    "n/a" if ours.status == "n/a" else "MISSED",
                )
            return f"{LABELS[peer]} {show_status(cells[peer].status, target.workload)}", "n/a"
        how = f"paired median of {len(pairs)} rounds: " if target.paired else ""
        parts.append(f"{how}{value:.2f} x {LABELS[peer]} (needs <= {bound:g})")
        if value > bound:
            verdict = "MISSED"
    if target.ceiling_margin is not None:
        pairs = paired_ratios(cells, "serial", mine)
        limit = ceiling.ratio if ceiling is not None else None
        if not pairs or limit is None:
            parts.append("x serial vs cpu_ceiling: not measured")
            verdict = "n/a" if verdict == "met" else verdict
        else:
            value = statistics.median(pairs)
            parts.append(
                f"{value:.3f} x serial vs ceiling {limit:.3f} (needs <= {target.ceiling_margin * limit:.3f})"
            )
            if value > target.ceiling_margin * limit:
                verdict = "MISSED"
    if target.caller_mb is not None:
        grown = cells[mine].metric("caller_peak_mb")
        if grown is None:
            parts.append("caller memory not measured")
        else:
            parts.append(f"caller +{grown:.0f} MB (needs <= {target.caller_mb:g})")
            if grown > target.caller_mb:
                verdict = "MISSED"
    return "; ".join(parts), verdict


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def src_tree() -> str:
    """The git tree of src/ plus its uncommitted diff: changes only when pickmap's source does."""
    try:
        tree = subprocess.run(
            ["git", "rev-parse", "HEAD:src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return f"{tree}:{hash(diff)}"
    except OSError:
        return "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return f"{rev}{' + uncommitted changes in src/' if dirty else ''}" if rev else "unknown"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- report
def table(header: list[str], rows: list[list[str]], *, numeric: bool = True) -> str:
    rule = (
        "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|"
    )
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    title: str
    rows: tuple[str, ...]
    libs: tuple[str, ...]
    mine: str = "pickmap"
    # the ratio table divides every column by this one (default: mine / peer)
    ratio_to: str | None = None
    resources: bool = False  # CPU and memory tables
    note: str = ""


SECTIONS = (
    Section("Original rows", (*ORIGINAL_ROWS, "first_call+import"), ORIGINAL_LIBS),
    Section(
        "Backends (issue 10): pickmap's ppe backend and a user's executor",
        BACKEND_ROWS,
        BACKEND_LIBS,
        ratio_to="pickmap_cloudpickle",
        note="`pickmap PPE(2)` is `pmap(f, data, backend=ProcessPoolExecutor(2))` with the executor created inside "
        "the timed region and shut down by the benchmark afterwards.",
    ),
    Section(
        "Data (issue 8)",
        (*DATA_ROWS, *(f"{w}+import" for w in INSTALLED_ROWS)),
        ("floor", *DATA_LIBS),
        resources=True,
        note="numpy and pandas are imported at the top of every measured script of these rows (so OpenBLAS "
        "threads exist before any pool does). `floor`: the fastest of one np.copyto, one socket write and "
        "one /dev/shm write of the row's bytes (see the floor table).",
    ),
    Section(
        "Dask (issue 11): the local 2-worker cluster",
        DASK_ROWS,
        DASK_LIBS,
        mine="pickmap_dask",
        resources=True,
        note="CPU and memory of the cluster (scheduler, nannies, workers) are read from /proc around the timed "
        "region; warm8_dask figures are per call.",
    ),
)


def _present(section: Section, results: dict[str, dict[str, Cell]]) -> tuple[list[str], list[str]]:
    rows = [w for w in section.rows if w in results]
    libs = [lib for lib in section.libs if any(lib in results[w] for w in rows)]
    return rows, libs


def _section_report(
    section: Section, results: dict[str, dict[str, Cell]], meta: dict[str, Any]
) -> list[str]:
    rows, libs = _present(section, results)
    if not rows or not libs:
        return []
    out = [f"## {section.title}\n"]
    if section.note:
        out += [section.note, ""]
    repeats = sorted({meta["repeats"].get(w.removesuffix("+import"), 0) for w in rows})
    out.append(
        f"### Seconds (median of {'/'.join(map(str, repeats))} fresh-process runs; lower is better)\n"
    )
    out.append(
        table(
            ["workload", *(LABELS[lib] for lib in libs)],
            [[f"`{w}`", *(fmt_seconds(results[w].get(lib), w) for lib in libs)] for w in rows],
        )
    )
    out.append("")

    base = section.ratio_to or section.mine
    others = [lib for lib in libs if lib != base and lib != "floor"]
    if base in libs and others:
        if section.ratio_to:
            out.append(f"### Ratios: each / {LABELS[base]} (below 1: faster than {LABELS[base]})\n")
            body = [
                [
                    f"`{w}`",
                    *(
                        fmt_ratio(results[w], base, w, mine=lib) if lib in results[w] else "—"
                        for lib in others
                    ),
                ]
                for w in rows
            ]
        else:
            out.append(f"### Ratios: {LABELS[base]} / peer (below 1: {LABELS[base]} is faster)\n")
            body = [
                [
                    f"`{w}`",
                    *(
                        fmt_ratio(results[w], lib, w, mine=base) if lib in results[w] else "—"
                        for lib in others
                    ),
                ]
                for w in rows
            ]
        out.append(table(["workload", *(LABELS[lib] for lib in others)], body))
        out.append("")

    if section.resources:
        measured = [lib for lib in libs if lib != "floor"]
        rows_measured = [w for w in rows if not w.endswith("+import")]
        cluster = section.mine == "pickmap_dask"
        figures = [
            ("caller_cpu_s", "s", "CPU seconds of the caller (user+sys, timed region)"),
            (
                "cluster_cpu_s" if cluster else "workers_cpu_s",
                "s",
                "CPU seconds of the cluster during the timed region"
                if cluster
                else "CPU seconds of the workers (RUSAGE_CHILDREN after the pool is joined: their whole life)",
            ),
            (
                "caller_peak_mb",
                "mb",
                "caller peak memory growth, MB (VmHWM over its value just before the timed region)",
            ),
            (
                "cluster_peak_mb" if cluster else "workers_peak_mb",
                "mb",
                "cluster peak memory growth, MB (largest VmHWM growth of one cluster process)"
                if cluster
                else "workers' peak RSS, MB (ru_maxrss of RUSAGE_CHILDREN: the largest single worker; fork workers "
                "count the pages they inherited)",
            ),
        ]
        for name, unit, title in figures:
            out.append(f"### {title}\n")
            out.append(
                table(
                    ["workload", *(LABELS[lib] for lib in measured)],
                    [
                        [
                            f"`{w}`",
                            *(
                                fmt_metric(results[w].get(lib), name, w, unit=unit)
                                for lib in measured
                            ),
                        ]
                        for w in rows_measured
                    ],
                )
            )
            out.append("")
        floors = [w for w in rows_measured if "floor" in results[w]]
        if floors:
            out.append("### The physical floor: moving the row's bytes once (seconds, median)\n")
            body = []
            for w in floors:
                cell = results[w]["floor"]
                best = cell.median
                peers = [
                    results[w][lib].median for lib in measured if lib != base and lib in results[w]
                ]
                peers = [v for v in peers if v is not None]
                mine = results[w].get(base)
                body.append(
                    [
                        f"`{w}`",
                        f"{(cell.metric('nbytes') or 0) / 2**20:.0f}",
                        fmt_metric(cell, "copyto_s", w),
                        fmt_metric(cell, "copyto_fresh_s", w),
                        fmt_metric(cell, "socket_s", w),
                        fmt_metric(cell, "shm_s", w),
                        f"{mine.median / best:.1f}" if mine and mine.median and best else "—",
                        f"{min(peers) / best:.1f}" if peers and best else "—",
                    ]
                )
            out.append(
                table(
                    [
                        "workload",
                        "MB",
                        "np.copyto",
                        "np.copyto (fresh pages)",
                        "socketpair write",
                        "/dev/shm write",
                        f"{LABELS[base]} / floor",
                        "best peer / floor",
                    ],
                    body,
                )
            )
            out.append(
                "\nfloor = the fastest of the four columns; np.copyto into memory already faulted in, "
                "the others into fresh pages.\n"
            )
    return out


def cpu_report(cells: dict[str, Cell], ceiling: Ceiling) -> list[str]:
    out = ["## cpu: paired rounds and cpu_ceiling.py (same run)\n"]
    vs_pool = paired_ratios(cells, "pool")
    vs_serial = paired_ratios(cells, "serial")
    pool_serial = paired_ratios(cells, "serial", mine="pool")
    rows = []
    for label, values in (
        ("pickmap / Pool.map", vs_pool),
        ("pickmap / serial", vs_serial),
        ("Pool.map / serial", pool_serial),
    ):
        if values:
            rows.append(
                [
                    label,
                    str(len(values)),
                    f"{statistics.median(values):.3f}",
                    f"{min(values):.3f}–{max(values):.3f}",
                ]
            )
    limit = ceiling.ratio
    if limit is not None:
        rows.append(
            [
                "cpu_ceiling.py: zero-overhead pool / serial",
                str(len(ceiling.alone)),
                f"{limit:.3f}",
                f"one busy {statistics.median(ceiling.alone) * 1e3:.1f} ms, both {statistics.median(ceiling.both) * 1e3:.1f} ms per task",
            ]
        )
    out.append(table(["ratio", "rounds", "median", "range / detail"], rows))
    if limit is not None and vs_serial:
        out.append(
            f"\npickmap x serial is {statistics.median(vs_serial) / limit:.3f} x the ceiling (target <= 1.05)."
        )
    out.append("")
    return out


def report(
    results: dict[str, dict[str, Cell]], meta: dict[str, Any], ceiling: Ceiling | None = None
) -> str:
    ceiling = ceiling or Ceiling()
    out = ["## Workloads\n"]
    for w in results:
        base = w.removesuffix("+import")
        text = (
            DESCRIPTIONS.get(w)
            or f"{DESCRIPTIONS.get(base, '')}; plus the user's import statement (derived from the {base} runs)"
        )
        out.append(f"- `{w}`: {text}")
    out.append("")
    for section in SECTIONS:
        out.extend(_section_report(section, results, meta))
    if any(cell.partial for cells in results.values() for cell in cells.values()):
        out.append("† some repetitions did not succeed; the median is over those that did.\n")
    if "cpu" in results:
        out.extend(cpu_report(results["cpu"], ceiling))

    rows = []
    for target in TARGETS:
        if target.workload in results:
            measured, verdict = evaluate(target, results[target.workload], ceiling)
            rows.append(
                [
                    f"`{target.workload}`",
                    target.text,
                    measured,
                    f"**{verdict}**" if verdict == "MISSED" else verdict,
                ]
            )
    if rows:
        out.append("## Targets\n")
        out.append(table(["workload", "target", "measured", "verdict"], rows, numeric=False))
        out.append("")

    out.append("## Spread (fastest – slowest repetition, seconds)\n")
    libs = [lib for lib in LIBS if any(lib in cells for cells in results.values())]
    body = []
    for w, cells in results.items():
        row = [f"`{w}`"]
        for lib in libs:
            good = cells[lib].ok_seconds if lib in cells else []
            row.append(f"{fmt_value(min(good))}–{fmt_value(max(good))}" if good else "—")
        body.append(row)
    out.append(table(["workload", *(LABELS[lib] for lib in libs)], body))
    out.append("")

    notes = []
    for w, cells in results.items():
        for lib, cell in cells.items():
            if not lib.startswith("pickmap"):
                continue
            chosen = sorted(
                {
                    f"{r.info['backend']}"
                    + (f" ({r.info['start_method']})" if r.info.get("start_method") else "")
                    for r in cell.runs
                    if r.info.get("backend")
                }
            )
            if chosen and lib == "pickmap":
                notes.append(f"- `{w}`: pickmap chose backend {', '.join(chosen)}")
            if w in INSTALLED_ROWS:
                origins = sorted(
                    {r.info["pickmap_from"] for r in cell.runs if r.info.get("pickmap_from")}
                )
                notes.append(f"- `{w}`: pickmap imported from {', '.join(origins) or 'unknown'}")
    for w, cells in results.items():
        for lib, cell in cells.items():
            if cell.median is None or cell.partial:
                statuses = ", ".join(show_status(r.status, w) for r in cell.runs)
                notes.append(f"- `{w}` / {LABELS[lib]}: {statuses} — {cell.error}")
            if any(r.info.get("exit_hung") for r in cell.runs):
                notes.append(
                    f"- `{w}` / {LABELS[lib]}: the interpreter did not exit after printing its result"
                )
            if any(r.info.get("left_processes") for r in cell.runs):
                notes.append(
                    f"- `{w}` / {LABELS[lib]}: left processes running after it exited (killed by compare.py)"
                )
    if notes:
        out.append("## Notes from this run\n")
        out.extend(notes)
        out.append("")
    return "\n".join(out)


def header(meta: dict[str, Any]) -> str:
    lines = [
        "# pickmap benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpu']}, {meta['cores']} usable cores, {meta['platform']}",
        f"- Python {meta['python']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- pickmap source: git {meta['git']}",
        *(
            [f"- installed pickmap (first_call_installed rows): {meta['installed_venv']}"]
            if meta.get("installed_venv")
            else []
        ),
        *([f"- dask cluster: {meta['dask']}"] if meta.get("dask") else []),
        *(
            [f"- data sizes and large item counts scaled by {meta['scale']:g} (--scale)"]
            if meta["scale"] != 1
            else []
        ),
        f"- {WORKERS} workers for every library; each measurement in a fresh interpreter (after one unrecorded warm-up "
        f"run per library; bytecode cached); the order of the libraries rotates from round to round; timeout "
        f"{meta['timeout']:g} s each",
        *(
            [
                f"- cpu workload: spin({meta['cpu_loops']}) calibrated to {meta['cpu_task_ms']:.1f} ms per task here"
            ]
            if meta["cpu_loops"] > 1
            else []
        ),
        f"- load average at start: {meta['load_start']}",
        "- timed: pool creation (pickmap: first pmap) up to the last results in hand; the import statement a user "
        "writes (counted only in the +import rows), building the data and the final teardown are excluded; what a "
        "library imports lazily on first use (multiprocessing.pool inside Pool(), pickmap's backend modules) is included",
        "- ProcessPoolExecutor: default `ex.map(f, data)` (chunksize=1), as most users call it; "
        "joblib: `Parallel(n_jobs=2)(delayed(f)(x) ...)` (loky, default auto-memmapping; its executor is reused between "
        "calls in the many_calls and big_self_x3 rows, `with Parallel(...)` in many_calls_reused); many_calls and "
        "big_self_x3: Pool/PPE/pathos/mpire create and close a pool in every call (teardown timed); many_calls_reused: "
        "one pool (mpire keep_alive=True) for all calls; mpire maps with concatenate_numpy_output=False (a list of "
        "arrays, as every other library returns) and gets DataFrame items as 1-tuples (it unpacks iterables into "
        "arguments); `mpire shared_objects`: `WorkerPool(2, shared_objects=obj)` "
        "with the large object shared and indices (or row ranges) mapped",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- chart
def chart(
    results: dict[str, dict[str, Cell]], libs: list[str], path: Path, meta: dict[str, Any]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    width = 0.8 / max(1, len(libs))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.7 * len(names) + 2), 5.2))
    values = [c.median for cells in results.values() for c in cells.values() if c.median]
    floor = min(values) / 3 if values else 1e-6
    colors = plt.get_cmap("tab10")
    for i, lib in enumerate(libs):
        xs, heights = [], []
        for j, w in enumerate(names):
            cell = results[w].get(lib)
            x = j + (i - (len(libs) - 1) / 2) * width
            if cell is None:
                continue
            if cell.median is None:
                ax.text(
                    x,
                    floor * 1.15,
                    show_status(cell.status, w),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color=colors(i),
                )
                continue
            xs.append(x)
            heights.append(cell.median)
        ax.bar(
            xs,
            heights,
            width,
            label=LABELS[lib],
            color=colors(i),
            edgecolor="black" if lib == "pickmap" else None,
            linewidth=1.2 if lib == "pickmap" else 0,
        )
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor, top=max(values) * 2.5 if values else 1.0)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("seconds (median, log scale; lower is better)")
    ax.set_title(
        f"pickmap vs peers — {WORKERS} workers, {meta['cpu']}, Python {meta['python']}", fontsize=10
    )
    ax.legend(
        fontsize=8, ncol=len(libs), loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def _names(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return names


def _settings(
    only: list[str], args: argparse.Namespace, stack: contextlib.ExitStack, meta: dict[str, Any]
) -> dict[str, Setting]:
    """The interpreter and environment of each row that needs more than the default."""
    settings: dict[str, Setting] = {}
    installed = [w for w in only if w in INSTALLED_ROWS]
    if installed:
        try:
            if args.installed_venv:
                venv = Path(args.installed_venv)
                python = venv / "bin" / "python"
            else:
                venv, python = build_installed_venv(
                    need_numpy="first_call_installed_np" in installed
                )
                stack.callback(shutil.rmtree, venv, ignore_errors=True)
            version = subprocess.run(
                [str(python), "-c", "import pickmap; print(pickmap.__version__, pickmap.__file__)"],
                capture_output=True,
                text=True,
                cwd=tempfile.gettempdir(),
                timeout=60,
            ).stdout.strip()
            meta["installed_venv"] = f"{venv} (pickmap {version})"
            setting = Setting(python=str(python), pycache=False)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            setting = Setting(unavailable=f"no installed venv: {exc}")
            meta["installed_venv"] = f"unavailable: {exc}"
        settings.update(dict.fromkeys(installed, setting))
    dask_rows = [w for w in only if w in DASK_ROWS]
    if dask_rows:
        print("starting a dask scheduler and two workers...", file=sys.stderr, flush=True)
        try:
            cluster = stack.enter_context(DaskCluster())
            setting = cluster.setting()
            meta["dask"] = (
                f"scheduler {cluster.address}, 2 x `dask worker --nthreads 1` (pids {','.join(map(str, cluster.pids))})"
            )
        except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
            setting = Setting(unavailable=f"no dask cluster: {exc}")
            meta["dask"] = f"unavailable: {exc}"
        settings.update(dict.fromkeys(dask_rows, setting))
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat",
        type=int,
        help="fresh-process repetitions per cell, every row (default: 3 for the original rows, 5 for "
        "the rows of issues 8, 10 and 11)",
    )
    parser.add_argument(
        "--only",
        type=lambda v: _names(v, WORKLOADS, "workload"),
        default=list(WORKLOADS),
        help=f"comma-separated workloads (default all: {','.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--libs",
        type=lambda v: _names(v, LIBS, "library"),
        default=list(LIBS),
        help=f"comma-separated libraries (default all: {','.join(LIBS)})",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    parser.add_argument(
        "--chart",
        default=str(ROOT / "docs" / "explanation" / "performance.png"),
        help="bar chart path (default docs/explanation/performance.png; the data rows go to <name>-data.png "
        "beside it); 'none' to skip",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="hard limit per measurement, seconds (default 120)",
    )
    parser.add_argument(
        "--retry-timeouts",
        action="store_true",
        help="repeat cells that timed out (default: a timeout is final, to save minutes)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply data sizes and large item counts (arrays, frame rows, 400 MB self, trivial and "
        "dask item counts) by this, for quick checks (default 1)",
    )
    parser.add_argument(
        "--installed-venv",
        metavar="PATH",
        help="for the first_call_installed rows, use this venv (pickmap installed non-editable) instead "
        "of building a temporary one",
    )
    parser.add_argument(
        "--ceiling-rounds",
        type=int,
        default=2,
        help="cpu_ceiling.py rounds after each round of the cpu row (default 2; 0 to skip)",
    )
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    libs = sorted(args.libs, key=LIBS.index)
    only = [
        w for w in sorted(args.only, key=WORKLOADS.index) if any(lib in libs for lib in ROW_LIBS[w])
    ]
    repeats = {w: args.repeat or DEFAULT_REPEAT[w] for w in only}
    # A SIGTERM unwinds like Ctrl-C, so the dask cluster and the temporary venv are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print("calibrating the cpu workload...", file=sys.stderr, flush=True)
    cpu_loops = workloads.calibrate_spin() if "cpu" in only else 1
    began = time.perf_counter()
    workloads.spin(cpu_loops)
    task_ms = (time.perf_counter() - began) * 1e3

    meta: dict[str, Any] = {
        "command": shlex.join(
            [
                "python",
                os.path.relpath(sys.argv[0], ROOT) if argv is None else "benchmarks/compare.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "executable": sys.executable,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "versions": versions(),
        "git": git_revision(),
        "src_tree": src_tree(),
        "repeat": args.repeat,
        "repeats": repeats,
        "scale": args.scale,
        "timeout": args.timeout,
        "cpu_loops": cpu_loops,
        "cpu_task_ms": task_ms,
        "load_start": load_average(),
    }
    ceiling = Ceiling()
    with contextlib.ExitStack() as stack:
        settings = _settings(only, args, stack, meta)
        print(header(meta), flush=True)

        # Warm-up, not recorded: fills the bytecode cache and the OS file cache.
        row_libs = {w: [lib for lib in ROW_LIBS[w] if lib in libs] for w in only}
        default_libs = {lib for w in only if w not in settings for lib in row_libs[w]}
        for lib in (lib for lib in ORIGINAL_LIBS if lib in default_libs):
            warm = measure(lib, "first_call", 1, args.timeout)
            print(f"[warm-up] {lib:<8} {warm.status}", file=sys.stderr, flush=True)
        if any(w in DATA_ROWS and w not in settings for w in only):  # numpy and pandas, once
            warm = measure("floor", "big_items", 1, args.timeout, 0.01)
            print(f"[warm-up] numpy+pandas {warm.status}", file=sys.stderr, flush=True)
        for w in (w for w in only if w in settings):
            if w in INSTALLED_ROWS or w == "warm8_dask":
                for lib in row_libs[w]:
                    warm = measure(lib, w, 1, args.timeout, args.scale, settings[w])
                    print(f"[warm-up] {w} {lib:<8} {warm.status}", file=sys.stderr, flush=True)

        runs: dict[str, dict[str, list[Run]]] = {w: {lib: [] for lib in row_libs[w]} for w in only}
        total = sum(repeats[w] * len(row_libs[w]) for w in only)
        done = 0
        wall = time.perf_counter()
        for rep in range(max(repeats.values(), default=0)):
            for w in only:
                if rep >= repeats[w]:
                    continue
                order = (
                    row_libs[w][rep % len(row_libs[w]) :] + row_libs[w][: rep % len(row_libs[w])]
                )
                for lib in order:
                    done += 1
                    previous = runs[w][lib]
                    if (
                        previous
                        and previous[0].status in ("timeout", "n/a")
                        and not args.retry_timeouts
                    ):
                        continue
                    timeout = max(args.timeout, MIN_TIMEOUT.get(w, 0.0))
                    run = measure(lib, w, cpu_loops, timeout, args.scale, settings.get(w))
                    run.info["round"] = rep
                    previous.append(run)
                    shown = (
                        f"{run.seconds:.3f} s"
                        if run.status == "ok" and run.seconds is not None
                        else run.status
                    )
                    print(
                        f"[{done}/{total}] rep {rep + 1} {w:<15} {lib:<19} {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
                if w == "cpu" and args.ceiling_rounds > 0:
                    measured = run_ceiling(cpu_loops, args.ceiling_rounds, args.timeout)
                    if measured is not None:
                        ceiling.alone += measured[0]
                        ceiling.both += measured[1]
                    print(
                        f"[ceiling] rep {rep + 1} {'ok' if measured else 'failed'}",
                        file=sys.stderr,
                        flush=True,
                    )
        meta["wall_seconds"] = time.perf_counter() - wall
    meta["load_end"] = load_average()

    meta["git_end"] = git_revision()
    src_changed = src_tree() != meta["src_tree"]
    if src_changed:
        print(
            f"WARNING: pickmap's source changed during the run ({meta['git']} -> {meta['git_end']})",
            file=sys.stderr,
        )
    results: dict[str, dict[str, Cell]] = {}
    for w in only:
        results[w] = {lib: Cell(runs[w][lib]) for lib in runs[w]}
        if w in ("first_call", *INSTALLED_ROWS):
            results[f"{w}+import"] = {
                lib: Cell([with_import(r) for r in runs[w][lib]]) for lib in runs[w]
            }
    print(report(results, meta, ceiling))
    print(
        f"load average at end: {meta['load_end']}; the whole run took {meta['wall_seconds']:.0f} s"
    )
    if src_changed:
        print(
            f"WARNING: pickmap's source changed during the run: git {meta['git']} at start, {meta['git_end']} at end"
        )

    if args.chart and args.chart.lower() != "none":
        path = Path(args.chart)
        for rows, chart_libs, target in (
            (
                [w for w in results if w in (*ORIGINAL_ROWS, "first_call+import")],
                ORIGINAL_LIBS,
                path,
            ),
            (
                [w for w in results if w in DATA_ROWS],
                ("floor", *DATA_LIBS),
                path.with_name(f"{path.stem}-data{path.suffix}"),
            ),
        ):
            subset = {
                w: {lib: c for lib, c in results[w].items() if lib in chart_libs} for w in rows
            }
            present = [lib for lib in chart_libs if any(lib in cells for cells in subset.values())]
            if subset and present:
                chart(subset, present, target, meta)
                shown = target.resolve()
                print(f"chart: {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}")
    if args.json:
        payload = {
            "meta": meta,
            "ceiling": {"alone": ceiling.alone, "both": ceiling.both, "ratio": ceiling.ratio},
            "results": {
                w: {
                    lib: {
                        "median": cell.median,
                        "status": cell.status,
                        "runs": [
                            {"status": r.status, "seconds": r.seconds, "error": r.error, **r.info}
                            for r in cell.runs
                        ],
                    }
                    for lib, cell in cells.items()
                }
                for w, cells in results.items()
            },
            "targets": {
                t.workload: dict(
                    zip(
                        ("measured", "verdict"),
                        evaluate(t, results[t.workload], ceiling),
                        strict=False,
                    )
                )
                for t in TARGETS
                if t.workload in results
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
