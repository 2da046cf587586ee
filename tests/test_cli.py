"""``python -m pickmap``: doctor and explain in real child interpreters, and the doctor's parts in-process.

The in-process tests never run the BLAS check: importing numpy starts threads,
and a multi-threaded test process would get forkserver instead of fork for
every later test.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import pickmap
from pickmap import _cli, _settings, registry

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
MARKS = ("✓", "!", "✗")
CONCERNS = ("Python", "start method", "usable CPUs", "/dev/shm", "BLAS/OpenMP thread pools")

# What a fresh process registers (the test suite adds its own one-file backend in conftest.py).
BUILT_IN = [name for name in registry.registered_backends() if not name.startswith("test-")]


def run_cli(
    *args: str, extra_path: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    paths = [str(SRC), str(TESTS), *([str(extra_path)] if extra_path else [])]
    child_env["PYTHONPATH"] = os.pathsep.join(paths)
    child_env["PYTHONIOENCODING"] = "utf-8"
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pickmap", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env,
    )


def concern_lines(stdout: str) -> list[str]:
    """The marked lines: everything between the header and the summary that is not indented."""
    lines = stdout.splitlines()
    return [line for line in lines[1:-1] if not line.startswith(" ")]


def described(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


# --------------------------------------------------------------------------- doctor, in a child interpreter
def test_doctor_marks_every_concern_and_every_backend_and_exits_0_when_nothing_is_broken() -> None:
    done = run_cli("doctor")
    assert done.returncode == 0, described(done)
    assert done.stderr == ""
    lines = concern_lines(done.stdout)
    assert all(line[0] in MARKS and line[1] == " " for line in lines), lines
    assert not any(line.startswith("✗") for line in lines)
    titles = [line[2:] for line in lines]
    for concern in CONCERNS:
        assert sum(title.startswith(concern) for title in titles) == 1, (concern, titles)
    for name in BUILT_IN:
        assert sum(title.startswith(f"backend {name}:") for title in titles) == 1, (name, titles)
    assert len(lines) == len(CONCERNS) + len(BUILT_IN)


def test_doctor_summary_counts_the_marks_it_printed() -> None:
    done = run_cli("doctor")
    lines = concern_lines(done.stdout)
    passed, warnings = sum(line[0] == "✓" for line in lines), sum(line[0] == "!" for line in lines)
    summary = done.stdout.splitlines()[-1]
    assert summary.startswith(f"{passed} check{'s' if passed != 1 else ''} passed"), summary
    assert (f"{warnings} warning" in summary) == (warnings > 0), summary


def test_doctor_puts_the_fix_under_every_warning() -> None:
    lines = run_cli("doctor").stdout.splitlines()
    for index, line in enumerate(lines):
        if line[:1] in ("!", "✗"):
            assert lines[index + 1].startswith("    ") and lines[index + 1].strip(), lines


def test_doctor_exits_1_and_says_how_to_fix_a_bad_start_method_variable() -> None:
    done = run_cli("doctor", env={"PICKMAP_START_METHOD": "sideways"})
    assert done.returncode == 1, described(done)
    lines = done.stdout.splitlines()
    broken = [i for i, line in enumerate(lines) if line.startswith("✗")]
    assert len(broken) == 1 and lines[broken[0]].startswith("✗ start method:"), lines
    assert "sideways" in lines[broken[0]]
    assert "PICKMAP_START_METHOD" in lines[broken[0] + 1] and lines[broken[0] + 1].startswith(
        "    "
    )
    assert lines[-1].endswith("1 problem"), lines[-1]


def test_doctor_verbose_adds_the_details_behind_the_lines() -> None:
    plain, verbose = run_cli("doctor"), run_cli("doctor", "-v")
    assert verbose.returncode == plain.returncode == 0, described(verbose)
    assert concern_lines(verbose.stdout) == [
        line for line in verbose.stdout.splitlines()[1:-1] if line[:1] in MARKS
    ]
    details = [line for line in verbose.stdout.splitlines() if line.startswith("    • ")]
    assert not any(line.startswith("    • ") for line in plain.stdout.splitlines())
    text = "\n".join(details)
    assert "interpreter: " + sys.executable in text
    assert "threads in this process" in text
    assert "cfs_quota_us" in text or "cpu.max" in text or "no cgroup CPU quota file" in text
    assert "shared-memory segment there" in text
    for name in BUILT_IN:
        assert "registered as" in text and name in text


def test_doctor_reports_numpy_as_absent_without_importing_it() -> None:
    # sys.modules["numpy"] = None is how Python marks a module as not importable.
    code = "import sys; sys.modules['numpy'] = None; from pickmap._cli import main; sys.exit(main(['doctor']))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env.update(PYTHONPATH=str(SRC), PYTHONIOENCODING="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, described(done)
    assert "✓ BLAS/OpenMP thread pools: numpy is not installed" in done.stdout


def test_doctor_falls_back_to_ascii_marks_on_an_ascii_terminal() -> None:
    done = run_cli("doctor", env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, described(done)
    assert all(line[0] in "+!x" for line in concern_lines(done.stdout)), done.stdout


# --------------------------------------------------------------------------- explain, in a child interpreter
def test_explain_prints_the_plan_for_a_module_level_function() -> None:
    done = run_cli("explain", "zoo:square", "--items", "[3, 4]")
    assert done.returncode == 0, described(done)
    assert done.stdout.splitlines()[0].startswith("backend: stdlib (from probe;")
    for name in registry.LADDER:
        assert re.search(rf"^  (->|ok|no|!>) {name} ", done.stdout, re.MULTILINE), done.stdout


def test_explain_chooses_cloudpickle_for_an_attribute_holding_a_lambda(tmp_path: Path) -> None:
    (tmp_path / "cli_lambdas.py").write_text("double = lambda x: 2 * x\n")
    done = run_cli("explain", "cli_lambdas:double", extra_path=tmp_path)
    assert done.returncode == 0, described(done)
    assert done.stdout.splitlines()[0].startswith("backend: cloudpickle (from probe;")
    assert re.search(r"^  no stdlib ", done.stdout, re.MULTILINE), done.stdout


def test_explain_evaluates_items_in_the_module_namespace() -> None:
    # make_lambda is a name in zoo: a lambda among the items rules out the stdlib pickler.
    done = run_cli("explain", "zoo:square", "--items", "[make_lambda(2)]")
    assert done.returncode == 0, described(done)
    assert re.search(r"^  no stdlib +item: ", done.stdout, re.MULTILINE), done.stdout


def test_explain_follows_a_backend_argument() -> None:
    done = run_cli("explain", "zoo:Scaler.static", "--backend", "thread")
    assert done.returncode == 0, described(done)
    assert done.stdout.splitlines()[0].startswith("backend: thread (from argument;")


BAD_INPUT = {
    "unknown module": (
        ["explain", "no_such_module_here:f"],
        "no module named 'no_such_module_here'",
    ),
    "no colon": (["explain", "zoo"], "MODULE:QUALNAME"),
    "missing attribute": (
        ["explain", "zoo:no_such_function"],
        "zoo has no attribute 'no_such_function'",
    ),
    "missing nested attribute": (
        ["explain", "zoo:Scaler.nope"],
        "zoo.Scaler has no attribute 'nope'",
    ),
    "local name": (["explain", "zoo:make_lambda.<locals>.<lambda>"], "inside a function"),
    "not callable": (["explain", "zoo:_INITIALIZED"], "is a list, not a callable"),
    "syntax error in items": (["explain", "zoo:square", "--items", "[1,"], "SyntaxError"),
    "undefined name in items": (["explain", "zoo:square", "--items", "nothing_here"], "NameError"),
    "items not iterable": (["explain", "zoo:square", "--items", "3"], "is an int, not iterable"),
    "unknown backend": (
        ["explain", "zoo:square", "--backend", "warp"],
        "unknown pickmap backend 'warp'",
    ),
    "module failing to import": (
        ["explain", "cli_broken:f"],
        "raised RuntimeError: broken on purpose",
    ),
    "module missing a dependency": (["explain", "cli_needs_missing:f"], "no_such_dependency_here"),
}


@pytest.mark.parametrize("args, expected", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_explain_reports_bad_input_on_one_line_with_exit_status_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "cli_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    (tmp_path / "cli_needs_missing.py").write_text("import no_such_dependency_here\n")
    done = run_cli(*args, extra_path=tmp_path)
    assert done.returncode == 2, described(done)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pickmap: error: "), done.stderr
    assert expected in lines[0]


def test_explain_names_the_environment_variable_when_it_holds_an_unknown_backend() -> None:
    done = run_cli("explain", "zoo:square", env={"PICKMAP_BACKEND": "warp"})
    assert done.returncode == 2, described(done)
    assert done.stderr.startswith("pickmap: error: ") and "PICKMAP_BACKEND" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_lists_both_commands() -> None:
    done = run_cli("--help")
    assert done.returncode == 0, described(done)
    assert done.stdout.startswith("usage: python -m pickmap")
    assert "doctor" in done.stdout and "explain" in done.stdout


def test_no_command_prints_usage_and_exits_2() -> None:
    done = run_cli()
    assert done.returncode == 2, described(done)
    assert done.stderr.startswith("usage: python -m pickmap") and "doctor" in done.stderr


# --------------------------------------------------------------------------- cgroup CPU quota
@pytest.mark.parametrize(
    "text, cpus",
    [("max 100000", None), ("150000 100000", 1.5), ("50000 100000", 0.5), ("max", None)],
)
def test_cpu_max_parses_quota_over_period(text: str, cpus: float | None) -> None:
    assert _cli.parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    "quota, period, cpus",
    [("-1", "100000", None), ("200000", "100000", 2.0), ("25000", "50000", 0.5)],
)
def test_cfs_quota_parses_v1_numbers(quota: str, period: str, cpus: float | None) -> None:
    assert _cli.parse_cfs_quota(quota, period) == cpus


def write_proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_v2_quota_is_read_from_cpu_max(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    cpus, read = _cli.read_cpu_quota(tmp_path, write_proc_cgroup(tmp_path, "0::/\n"))
    assert cpus == 1.5
    assert read == [f"{tmp_path / 'cpu.max'}: 150000 100000"]


def test_v2_max_means_no_quota_but_the_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    cpus, read = _cli.read_cpu_quota(tmp_path, write_proc_cgroup(tmp_path, "0::/\n"))
    assert cpus is None and len(read) == 1


def test_v2_parent_quota_limits_the_process_cgroup(tmp_path: Path) -> None:
    (tmp_path / "box" / "app").mkdir(parents=True)
    (tmp_path / "box" / "cpu.max").write_text("100000 100000\n")
    (tmp_path / "box" / "app" / "cpu.max").write_text("300000 100000\n")
    cpus, read = _cli.read_cpu_quota(tmp_path, write_proc_cgroup(tmp_path, "0::/box/app\n"))
    assert cpus == 1.0 and len(read) == 2


def test_v1_quota_is_read_from_the_cpu_controller_named_in_proc_cgroup(tmp_path: Path) -> None:
    controller = tmp_path / "cpu,cpuacct" / "job"
    controller.mkdir(parents=True)
    (controller / "cpu.cfs_quota_us").write_text("50000\n")
    (controller / "cpu.cfs_period_us").write_text("100000\n")
    proc = write_proc_cgroup(tmp_path, "4:memory:/job\n3:cpu,cpuacct:/job\n0::/\n")
    cpus, read = _cli.read_cpu_quota(tmp_path, proc)
    assert cpus == 0.5
    assert read == [f"{controller / 'cpu.cfs_quota_us'}: 50000, cpu.cfs_period_us: 100000"]


def test_v1_quota_of_minus_one_means_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    cpus, read = _cli.read_cpu_quota(tmp_path, tmp_path / "no-proc-file")
    assert cpus is None and len(read) == 1


def test_no_cgroup_files_and_unreadable_ones_mean_no_quota(tmp_path: Path) -> None:
    assert _cli.read_cpu_quota(tmp_path, tmp_path / "no-proc-file") == (None, [])
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert _cli.read_cpu_quota(tmp_path, tmp_path / "no-proc-file") == (None, [])


def test_a_quota_below_the_affinity_mask_warns_with_a_worker_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli, "_affinity", lambda: (4, "affinity mask: [0, 1, 2, 3]"))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    check = _cli.check_cpus(tmp_path, tmp_path / "no-proc-file")
    assert check.status == _cli.WARN
    assert check.summary.startswith("usable CPUs: 2 (affinity 4 of")
    assert "PICKMAP_WORKERS=2" in check.fix


def test_no_quota_keeps_the_affinity_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli, "_affinity", lambda: (4, "affinity mask: [0, 1, 2, 3]"))
    check = _cli.check_cpus(tmp_path, tmp_path / "no-proc-file")
    assert check.status == _cli.OK and check.summary.startswith("usable CPUs: 4 ")


# --------------------------------------------------------------------------- the other checks, in-process
@pytest.mark.skipif("forkserver" not in _settings.START_METHODS, reason="needs forkserver")
@pytest.mark.skipif(sys.platform == "darwin", reason="fork is never the default on macOS")
@pytest.mark.parametrize("threads, method", [(1, "fork"), (3, "forkserver")])
def test_start_method_line_names_the_thread_count_behind_the_default(
    monkeypatch: pytest.MonkeyPatch, threads: int, method: str
) -> None:
    monkeypatch.setattr(_settings, "_thread_count", lambda: threads)
    check = _cli.check_start_method()
    assert check.status == _cli.OK
    assert check.summary.startswith(f"start method: {method} by default")
    assert f"runs {threads} thread" in check.summary


def test_a_small_dev_shm_warns_with_the_docker_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker_default = types.SimpleNamespace(f_blocks=16384, f_bavail=16000, f_frsize=4096)  # 64 MiB
    monkeypatch.setattr(os, "statvfs", lambda path: docker_default)
    check = _cli.check_shm(str(tmp_path))
    assert check.status == _cli.WARN
    assert "64 MiB" in check.summary and "writable" in check.summary
    assert "docker run --shm-size=" in check.fix


def test_a_missing_shm_directory_is_reported(tmp_path: Path) -> None:
    check = _cli.check_shm(str(tmp_path / "absent"))
    assert "not present" in check.summary
    assert check.status == (_cli.WARN if sys.platform.startswith("linux") else _cli.OK)


def ghost_entry() -> object:
    return registry._Entry(
        "ghost_backend_pkg.mod:GhostBackend", "pip install ghost-backend", ("ghost_backend_pkg",)
    )


def test_a_backend_whose_package_is_missing_is_broken_with_its_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(registry._REGISTRY, "ghost", ghost_entry())
    check = _cli.check_backend("ghost", pickmap.available_backends())
    assert check.status == _cli.BROKEN
    assert check.summary == "backend ghost: not installed (needs ghost_backend_pkg)"
    assert check.fix == "pip install ghost-backend"


def test_doctor_exits_1_when_a_registered_backend_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(registry._REGISTRY, "ghost", ghost_entry())
    # Not the real BLAS check: importing numpy here would make this test process multi-threaded.
    monkeypatch.setattr(
        _cli, "check_thread_pools", lambda: _cli.Check(_cli.OK, "BLAS/OpenMP thread pools: skipped")
    )
    out = io.StringIO()
    assert _cli.doctor(verbose=False, out=out) == 1
    lines = out.getvalue().splitlines()
    index = lines.index("✗ backend ghost: not installed (needs ghost_backend_pkg)")
    assert lines[index + 1] == "    pip install ghost-backend"
    assert lines[-1].endswith(", 1 problem")


def test_installed_backends_name_their_serializer_and_package_versions() -> None:
    installed = pickmap.available_backends()
    if "dill" not in installed:
        pytest.skip("dill backend not installed")
    from importlib.metadata import version

    check = _cli.check_backend("dill", installed)
    assert check.status == _cli.OK
    assert (
        f"dill {version('dill')}" in check.summary
        and f"multiprocess {version('multiprocess')}" in check.summary
    )
    assert "serializer dill" in check.summary


def test_summary_counts_passes_warnings_and_problems() -> None:
    checks = [_cli.Check(_cli.OK, "a"), _cli.Check(_cli.OK, "b"), _cli.Check(_cli.WARN, "c", "fix")]
    assert _cli.summarize(checks) == "2 checks passed, 1 warning"
    assert (
        _cli.summarize([*checks, _cli.Check(_cli.BROKEN, "d", "fix")])
        == "2 checks passed, 1 warning, 1 problem"
    )
