"""Records tasks emit with logging in workers reach the caller's handlers; pickmap logs its decisions."""

from __future__ import annotations

import logging
import os

import pytest

import pickmap
from pickmap import pmap

pytestmark = pytest.mark.timeout(60)


def log_and_square(x: int) -> int:
    logging.getLogger("task.logs").warning("item %d seen", x)
    return x * x


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    root = logging.getLogger()
    handler = Capture()
    before = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(before)


def test_records_from_workers_reach_the_callers_handlers_with_the_workers_pid(backend, captured):
    if backend.name == "dask":
        pytest.skip("a cluster's workers log through dask (client.forward_logging()), see _logs.py")
    assert pmap(log_and_square, range(6), chunksize=2, **backend.kwargs) == [
        x * x for x in range(6)
    ]
    seen = [r for r in captured.records if r.name == "task.logs"]
    assert sorted(r.getMessage() for r in seen) == [f"item {x} seen" for x in range(6)]
    assert all(r.levelno == logging.WARNING for r in seen)
    if backend.processes:
        assert all(r.process != os.getpid() for r in seen)  # sent by the worker that ran the item


def test_pickmap_records_its_decisions_at_debug(captured):
    pmap(abs, range(4), backend="stdlib", workers=2)
    decisions = [r.getMessage() for r in captured.records if r.name == "pickmap"]
    assert any("backend stdlib (from argument), 2 workers" in message for message in decisions), (
        decisions
    )


def log_info_noisy(x: int) -> int:
    logging.getLogger("noisy").info("noisy %d", x)
    logging.getLogger("task.logs").info("kept %d", x)
    return x


def test_the_callers_level_for_a_named_logger_applies_to_worker_records(captured):
    logging.getLogger("noisy").setLevel(logging.WARNING)
    try:
        pmap(log_info_noisy, range(3), backend="stdlib", workers=2, start_method="spawn")
    finally:
        logging.getLogger("noisy").setLevel(logging.NOTSET)
    names = [r.name for r in captured.records if r.name in ("noisy", "task.logs")]
    assert names.count("task.logs") == 3 and "noisy" not in names


def log_info_to_myapp(x: int) -> int:
    logging.getLogger("myapp").info("info %d", x)
    return x


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_logger_set_below_the_root_level_lets_its_worker_records_through(captured, method):
    # Root at WARNING, myapp at INFO: the caller handles myapp's INFO records, so the
    # workers must send them, whether they inherited the levels (fork) or not.
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    logging.getLogger("myapp").setLevel(logging.INFO)
    pickmap.shutdown()  # fresh workers: under fork they would inherit these levels
    try:
        pmap(log_info_to_myapp, range(4), backend="stdlib", workers=2, start_method=method)
    finally:
        logging.getLogger("myapp").setLevel(logging.NOTSET)
    seen = sorted(r.getMessage() for r in captured.records if r.name == "myapp")
    assert seen == [f"info {x}" for x in range(4)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_level_the_caller_resets_is_reset_in_warm_workers_too(captured, method):
    pickmap.shutdown()
    logging.getLogger("myapp").setLevel(logging.ERROR)
    try:
        pmap(log_info_to_myapp, range(2), backend="stdlib", workers=2, start_method=method)
        assert not [r for r in captured.records if r.name == "myapp"]  # ERROR: INFO dropped
    finally:
        logging.getLogger("myapp").setLevel(logging.NOTSET)
    # The same warm workers, and the caller now handles myapp's INFO (root DEBUG).
    pmap(log_info_to_myapp, range(2), backend="stdlib", workers=2, start_method=method)
    seen = sorted(r.getMessage() for r in captured.records if r.name == "myapp")
    assert seen == ["info 0", "info 1"]


@pytest.mark.parametrize("backend", ["cloudpickle", "ppe"])
def test_a_forked_worker_never_prints_a_record_twice(backend, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "logs_once.py"
    script.write_text(
        "import logging, pickmap\n"
        "def f(x):\n"
        "    logging.getLogger('task').warning('record %d', x)\n"
        "    return x\n"
        "if __name__ == '__main__':\n"
        "    logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        f"    pickmap.pmap(f, range(3), backend={backend!r}, start_method='fork', workers=2)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("record")]
    assert sorted(lines) == ["record 0", "record 1", "record 2"], done.stderr
