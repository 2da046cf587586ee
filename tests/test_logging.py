"""Records tasks emit with logging in workers reach the caller's handlers; pickmap logs its decisions."""

from __future__ import annotations

import logging
import os

import pytest

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
    assert pmap(log_and_square, range(6), chunksize=2, **backend.kwargs) == [x * x for x in range(6)]
    seen = [r for r in captured.records if r.name == "task.logs"]
    assert sorted(r.getMessage() for r in seen) == [f"item {x} seen" for x in range(6)]
    assert all(r.levelno == logging.WARNING for r in seen)
    if backend.processes:
        assert all(r.process != os.getpid() for r in seen)  # sent by the worker that ran the item


def test_pickmap_records_its_decisions_at_debug(captured):
    pmap(abs, range(4), backend="stdlib", workers=2)
    decisions = [r.getMessage() for r in captured.records if r.name == "pickmap"]
    assert any("backend stdlib (from argument), 2 workers" in message for message in decisions), decisions
