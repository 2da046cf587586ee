"""pickmap against its peers, in one run, each measurement in a fresh process.

    python benchmarks/compare.py                        # everything, median of 3
    python benchmarks/compare.py --only first_call,many_calls --repeat 5
    python benchmarks/compare.py --libs pickmap,pool --json out.json --chart none

For every (workload, library, repetition) this starts a new interpreter running
``run_one.py``, which times one workload with one library and prints one JSON
line. Repetitions are interleaved (every workload and library once, then again)
so a burst of background load hits every library rather than one. The result
is the median of the repetitions that succeeded.

Prints the machine, Python and library versions and the exact command, then
markdown tables (seconds, ratios pickmap / peer, targets met or not) and writes
a grouped bar chart (``--chart``, default ``docs/performance.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
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

PEERS = tuple(lib for lib in LIBS if lib != "pickmap")
LABELS = {
    "pickmap": "pickmap",
    "serial": "serial map",
    "pool": "Pool.map",
    "ppe": "ProcessPoolExecutor",
    "joblib": "joblib",
    "pathos": "pathos",
    "mpire": "mpire",
}
DESCRIPTIONS = {
    "trivial": "200k items, `x*x` (module-level function)",
    "big_method": "bound method of an object holding 50 MB, 2k items",
    "cpu": "48 pure-Python tasks of ~20 ms",
    "first_call": "8 trivial items, first call in a fresh process (pool start included)",
    "first_call+import": "the same, plus the user's import statement (derived from the first_call runs)",
    "many_calls": "50 consecutive calls of 8 items; peers make a pool in each call (`with Pool(2) as p:`), teardown timed",
    "many_calls_reused": "50 consecutive calls of 8 items; peers reuse one pool for all calls",
    "lambda_closure": "`lambda x: x * k` closing over a local, 20k items",
}
PACKAGES = ("pickmap", "cloudpickle", "dill", "multiprocess", "pathos", "joblib", "mpire", "matplotlib")


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
            return json.loads(line[len(RESULT_MARKER):])
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


def _run_isolated(command: list[str], env: dict[str, str], timeout: float) -> tuple[str, str, int | None, bool]:
    """Run in a new session, so the measurement and every worker it started form one
    process group: a timeout kills all of them, and nothing left behind (an orphaned
    pool worker still chewing a 50 MB task) can slow the next measurement down."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        stdout, stderr = process.communicate()
        timed_out = True
    leftovers = _kill_group(process.pid, grace=2.0)
    if leftovers:
        stderr += f"\n[compare.py] killed {leftovers} process(es) the measurement left behind"
    return stdout, stderr, process.returncode if not timed_out else None, timed_out


# Bytecode cache for the measurements. Some environments set
# PYTHONDONTWRITEBYTECODE=1; an editable install (pickmap here) then has no .pyc
# at all and recompiles its source at every import, which a user installing a
# wheel never pays. The children write and reuse .pyc under this prefix instead
# (outside the source tree); a warm-up run per library fills it.
PYCACHE = Path(tempfile.gettempdir()) / "pickmap-bench-pycache"


def measure(lib: str, workload: str, cpu_loops: int, timeout: float) -> Run:
    command = [
        sys.executable, str(HERE / "run_one.py"),
        "--lib", lib, "--workload", workload, "--cpu-loops", str(cpu_loops),
    ]  # fmt: skip
    env = dict(os.environ)
    # Workers started by spawn-like methods (loky) must import `workloads` too.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    for name in ("PICKMAP_BACKEND", "PICKMAP_WORKERS", "PICKMAP_START_METHOD", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)  # measure the defaults, whatever the caller's shell says
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    stdout, stderr, code, timed_out = _run_isolated(command, env, timeout)
    result = _last_result(stdout)
    if result is None:
        if timed_out:
            return Run("timeout", error=f"no result within {timeout:g} s (killed)")
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return Run("crashed", error=f"exit code {code}: {tail[:300]}")
    info = {k: v for k, v in result.items() if k not in ("lib", "workload", "status", "seconds", "error")}
    if "left behind" in stderr:
        info["left_processes"] = True
    if timed_out:
        info["exit_hung"] = True  # the result was printed, then the interpreter did not exit
    return Run(result["status"], result.get("seconds"), result.get("error"), info)


def with_import(run: Run) -> Run:
    """The same measurement, counting the import statement the user writes too."""
    if run.seconds is None:
        return run
    return Run(run.status, run.seconds + float(run.info.get("import_s") or 0.0), run.error, run.info)


# --------------------------------------------------------------------------- aggregation
@dataclass
class Cell:
    runs: list[Run]

    @property
    def ok_seconds(self) -> list[float]:
        return [r.seconds for r in self.runs if r.status == "ok" and r.seconds is not None]

    @property
    def median(self) -> float | None:
        good = self.ok_seconds
        return statistics.median(good) if good else None

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


def ratio(cells: dict[str, Cell], lib: str) -> float | None:
    mine, theirs = cells.get("pickmap"), cells.get(lib)
    if mine is None or theirs is None or mine.median is None or theirs.median is None or theirs.median == 0:
        return None
    return mine.median / theirs.median


def fmt_ratio(cells: dict[str, Cell], lib: str, workload: str) -> str:
    value = ratio(cells, lib)
    if value is not None:
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    theirs = cells.get(lib)
    if theirs is None:
        return "—"
    if theirs.median is None:
        return f"peer {show_status(theirs.status, workload)}"
    return "pickmap " + show_status(cells["pickmap"].status, workload) if "pickmap" in cells else "—"


# --------------------------------------------------------------------------- targets
@dataclass
class Target:
    workload: str
    text: str
    # (peer, bound): met when pickmap / peer <= bound
    bounds: tuple[tuple[str, float], ...]


TARGETS = (
    Target("trivial", "pickmap <= Pool.map", (("pool", 1.0),)),
    Target("big_method", "pickmap <= 1.2 x mpire and >= 4x faster than Pool.map", (("mpire", 1.2), ("pool", 0.25))),
    Target("cpu", "pickmap <= 0.55 x serial", (("serial", 0.55),)),
    Target("first_call", "pickmap <= 1.5 x Pool.map", (("pool", 1.5),)),
    Target("many_calls", "pickmap <= 0.25 x ProcessPoolExecutor", (("ppe", 0.25),)),
    Target("lambda_closure", "pickmap <= pathos", (("pathos", 1.0),)),
)


def evaluate(target: Target, cells: dict[str, Cell]) -> tuple[str, str]:
    """``(measured, verdict)``; verdict is ``met``, ``MISSED`` or why it cannot be judged."""
    parts, verdict = [], "met"
    for peer, bound in target.bounds:
        if peer not in cells or "pickmap" not in cells:
            return "not measured", "not measured"
        value = ratio(cells, peer)
        if value is None:
            mine = cells["pickmap"]
            if mine.median is None:
                return f"pickmap {show_status(mine.status, target.workload)}", "MISSED"
            return f"{LABELS[peer]} {show_status(cells[peer].status, target.workload)}", "n/a"
        parts.append(f"{value:.2f} x {LABELS[peer]} (needs <= {bound:g})")
        if value > bound:
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


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return f"{rev}{' + uncommitted changes in src/' if dirty else ''}" if rev else "unknown"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- report
def table(header: list[str], rows: list[list[str]], *, numeric: bool = True) -> str:
    rule = "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: dict[str, dict[str, Cell]], libs: list[str], meta: dict[str, Any]) -> str:
    out = ["## Workloads\n"]
    out.extend(f"- `{w}`: {DESCRIPTIONS[w]}" for w in results)
    out.append("")
    out.append(f"## Seconds (median of {meta['repeat']} fresh-process runs; lower is better)\n")
    rows = [[f"`{w}`", *(fmt_seconds(cells.get(lib), w) for lib in libs)] for w, cells in results.items()]
    out.append(table(["workload", *(LABELS[lib] for lib in libs)], rows))
    if any(cell.partial for cells in results.values() for cell in cells.values()):
        out.append("\n† some repetitions did not succeed; the median is over those that did.")
    out.append("")

    peers = [lib for lib in libs if lib != "pickmap"]
    if "pickmap" in libs and peers:
        out.append("## Ratios: pickmap / peer (below 1: pickmap is faster)\n")
        rows = [[f"`{w}`", *(fmt_ratio(cells, lib, w) for lib in peers)] for w, cells in results.items()]
        out.append(table(["workload", *(LABELS[lib] for lib in peers)], rows))
        out.append("")

        out.append("## Targets\n")
        rows = []
        for target in TARGETS:
            if target.workload in results:
                measured, verdict = evaluate(target, results[target.workload])
                rows.append([f"`{target.workload}`", target.text, measured, f"**{verdict}**" if verdict == "MISSED" else verdict])
        out.append(table(["workload", "target", "measured", "verdict"], rows, numeric=False))
        out.append("")

    out.append("## Spread (fastest – slowest repetition, seconds)\n")
    rows = []
    for w, cells in results.items():
        row = [f"`{w}`"]
        for lib in libs:
            good = cells[lib].ok_seconds if lib in cells else []
            row.append(f"{fmt_value(min(good))}–{fmt_value(max(good))}" if good else "—")
        rows.append(row)
    out.append(table(["workload", *(LABELS[lib] for lib in libs)], rows))
    out.append("")

    notes = []
    for w, cells in results.items():
        pm = cells.get("pickmap")
        if pm is not None:
            backends = sorted({r.info.get("backend") for r in pm.runs if r.info.get("backend")})
            if backends:
                notes.append(f"- `{w}`: pickmap chose backend {', '.join(backends)}")
    for w, cells in results.items():
        for lib, cell in cells.items():
            if cell.median is None or cell.partial:
                statuses = ", ".join(show_status(r.status, w) for r in cell.runs)
                notes.append(f"- `{w}` / {LABELS[lib]}: {statuses} — {cell.error}")
            if any(r.info.get("exit_hung") for r in cell.runs):
                notes.append(f"- `{w}` / {LABELS[lib]}: the interpreter did not exit after printing its result")
            if any(r.info.get("left_processes") for r in cell.runs):
                notes.append(f"- `{w}` / {LABELS[lib]}: left processes running after it exited (killed by compare.py)")
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
        f"- {WORKERS} workers for every library; each measurement in a fresh interpreter (after one unrecorded warm-up "
        f"run per library; bytecode cached); timeout {meta['timeout']:g} s each",
        *([f"- cpu workload: spin({meta['cpu_loops']}) calibrated to {meta['cpu_task_ms']:.1f} ms per task here"]
          if meta["cpu_loops"] > 1 else []),
        f"- load average at start: {meta['load_start']}",
        "- timed: pool creation (pickmap: first pmap) up to the last results in hand; the import statement a user "
        "writes (counted only in first_call+import), building the data and the final teardown are excluded; what a "
        "library imports lazily on first use (multiprocessing.pool inside Pool(), pickmap's backend modules) is included",
        "- ProcessPoolExecutor: default `ex.map(f, data)` (chunksize=1), as most users call it; "
        "joblib: `Parallel(n_jobs=2)(delayed(f)(x) ...)` (loky; its executor is reused between calls in both "
        "many_calls rows, `with Parallel(...)` in many_calls_reused); many_calls: Pool/PPE/pathos/mpire create and "
        "close a pool in every call (teardown timed); many_calls_reused: one pool (mpire keep_alive=True) for all calls",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- chart
def chart(results: dict[str, dict[str, Cell]], libs: list[str], path: Path, meta: dict[str, Any]) -> None:
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
                ax.text(x, floor * 1.15, show_status(cell.status, w), rotation=90, ha="center", va="bottom",
                        fontsize=7, color=colors(i))  # fmt: skip
                continue
            xs.append(x)
            heights.append(cell.median)
        ax.bar(xs, heights, width, label=LABELS[lib], color=colors(i),
               edgecolor="black" if lib == "pickmap" else None, linewidth=1.2 if lib == "pickmap" else 0)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor, top=max(values) * 2.5 if values else 1.0)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("seconds (median, log scale; lower is better)")
    ax.set_title(f"pickmap vs peers — {WORKERS} workers, {meta['cpu']}, Python {meta['python']}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(libs), loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False)
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
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process repetitions per cell (median; default 3)")
    parser.add_argument("--only", type=lambda v: _names(v, WORKLOADS, "workload"), default=list(WORKLOADS),
                        help=f"comma-separated workloads (default all: {','.join(WORKLOADS)})")  # fmt: skip
    parser.add_argument("--libs", type=lambda v: _names(v, LIBS, "library"), default=list(LIBS),
                        help=f"comma-separated libraries (default all: {','.join(LIBS)})")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    parser.add_argument("--chart", default=str(ROOT / "docs" / "performance.png"),
                        help="bar chart path (default docs/performance.png); 'none' to skip")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit per measurement, seconds (default 120)")
    parser.add_argument("--retry-timeouts", action="store_true",
                        help="repeat cells that timed out (default: a timeout is final, to save minutes)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    libs = sorted(args.libs, key=LIBS.index)
    only = sorted(args.only, key=WORKLOADS.index)

    print("calibrating the cpu workload...", file=sys.stderr, flush=True)
    cpu_loops = workloads.calibrate_spin() if "cpu" in only else 1
    began = time.perf_counter()
    workloads.spin(cpu_loops)
    task_ms = (time.perf_counter() - began) * 1e3

    meta: dict[str, Any] = {
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], ROOT) if argv is None else "benchmarks/compare.py",
                               *(sys.argv[1:] if argv is None else argv)]),  # fmt: skip
        "executable": sys.executable,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "versions": versions(),
        "git": git_revision(),
        "repeat": args.repeat,
        "timeout": args.timeout,
        "cpu_loops": cpu_loops,
        "cpu_task_ms": task_ms,
        "load_start": load_average(),
    }
    print(header(meta), flush=True)

    # Warm-up, not recorded: fills the bytecode cache and the OS file cache.
    for lib in libs:
        warm = measure(lib, "first_call", 1, args.timeout)
        print(f"[warm-up] {lib:<8} {warm.status}", file=sys.stderr, flush=True)

    runs: dict[str, dict[str, list[Run]]] = {w: {lib: [] for lib in libs} for w in only}
    total = args.repeat * len(only) * len(libs)
    done = 0
    wall = time.perf_counter()
    for rep in range(args.repeat):
        for w in only:
            for lib in libs:
                done += 1
                previous = runs[w][lib]
                if previous and previous[0].status == "timeout" and not args.retry_timeouts:
                    continue
                run = measure(lib, w, cpu_loops, args.timeout)
                previous.append(run)
                shown = f"{run.seconds:.3f} s" if run.status == "ok" and run.seconds is not None else run.status
                print(f"[{done}/{total}] rep {rep + 1} {w:<15} {lib:<8} {shown}", file=sys.stderr, flush=True)
    meta["wall_seconds"] = time.perf_counter() - wall
    meta["load_end"] = load_average()

    meta["git_end"] = git_revision()
    if meta["git_end"] != meta["git"]:
        print(f"WARNING: pickmap's source changed during the run ({meta['git']} -> {meta['git_end']})", file=sys.stderr)
    results = {}
    for w in only:
        results[w] = {lib: Cell(runs[w][lib]) for lib in libs}
        if w == "first_call":
            results["first_call+import"] = {lib: Cell([with_import(r) for r in runs[w][lib]]) for lib in libs}
    print(report(results, libs, meta))
    print(f"load average at end: {meta['load_end']}; the whole run took {meta['wall_seconds']:.0f} s")
    if meta["git_end"] != meta["git"]:
        print(f"WARNING: pickmap's source changed during the run: git {meta['git']} at start, {meta['git_end']} at end")

    if args.chart and args.chart.lower() != "none":
        path = Path(args.chart)
        chart(results, libs, path, meta)
        shown = path.resolve()
        print(f"chart: {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}")
    if args.json:
        payload = {
            "meta": meta,
            "results": {
                w: {
                    lib: {
                        "median": cell.median,
                        "status": cell.status,
                        "runs": [{"status": r.status, "seconds": r.seconds, "error": r.error, **r.info} for r in cell.runs],
                    }
                    for lib, cell in cells.items()
                }
                for w, cells in results.items()
            },
            "targets": {
                t.workload: dict(zip(("measured", "verdict"), evaluate(t, results[t.workload])))
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
