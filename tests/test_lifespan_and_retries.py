"""Worker lifespan (``max_tasks_per_worker``) and retries for lost workers (``retries``)."""

from __future__ import annotations

import collections
import os
import pathlib

import faults
import pytest
from conftest import START_METHODS

from pickmap import WorkerCrashedError, pmap

pytestmark = pytest.mark.timeout(60)


class CrashOnceOn:
    """``x * x``; the first time item ``bad`` runs (anywhere), its worker dies."""

    def __init__(self, bad: int, folder: str) -> None:
        self.bad = bad
        self.marker = os.path.join(folder, "crashed-once")

    def __call__(self, x: int) -> int:
        if x == self.bad and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(9)
        return x * x


class CountsRuns:
    """Raises on item ``bad`` and counts, in a file, how often it ran."""

    def __init__(self, bad: int, folder: str) -> None:
        self.bad = bad
        self.log = os.path.join(folder, "runs")

    def __call__(self, x: int) -> int:
        if x == self.bad:
            with open(self.log, "a") as file:
                file.write("x")
            raise ValueError(f"item {x} is bad")
        return x


@pytest.mark.parametrize("method", START_METHODS)
def test_a_worker_is_replaced_after_its_share_of_items(method):
    pids = pmap(
        faults.pid_of,
        range(20),
        backend="stdlib",
        workers=2,
        start_method=method,
        max_tasks_per_worker=3,
    )
    runs = collections.Counter(pids)
    assert max(runs.values()) <= 3 and len(runs) >= 7  # 20 items, at most 3 per worker


def test_the_lifespan_comes_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("PICKMAP_MAX_TASKS_PER_WORKER", "5")
    runs = collections.Counter(pmap(faults.pid_of, range(20), backend="stdlib", workers=2))
    assert max(runs.values()) <= 5
    monkeypatch.setenv("PICKMAP_MAX_TASKS_PER_WORKER", "none")
    with pytest.raises(ValueError, match="PICKMAP_MAX_TASKS_PER_WORKER"):
        pmap(faults.pid_of, range(2), backend="stdlib")


@pytest.mark.parametrize("method", START_METHODS)
def test_a_lost_worker_is_retried_and_the_result_is_complete(method, tmp_path):
    func = CrashOnceOn(5, str(tmp_path))
    got = pmap(
        func, range(12), backend="stdlib", workers=2, start_method=method, chunksize=2, retries=1
    )
    assert got == [x * x for x in range(12)]


def test_the_ppe_backend_retries_on_a_fresh_executor(tmp_path):
    func = CrashOnceOn(3, str(tmp_path))
    assert pmap(func, range(8), backend="ppe", workers=2, retries=1) == [x * x for x in range(8)]


def test_retries_run_out_with_every_attempts_exit_status(tmp_path):
    with pytest.raises(WorkerCrashedError) as caught:
        pmap(
            faults.CrashOn(4, "exit"), range(8), backend="stdlib", workers=2, chunksize=1, retries=2
        )
    message = str(caught.value)
    assert caught.value.indices == (4,)
    assert message.count("exit code 7") >= 3, message  # the two retries and the first attempt


def test_an_exception_from_the_function_is_never_retried(tmp_path):
    func = CountsRuns(3, str(tmp_path))
    with pytest.raises(ValueError, match="item 3 is bad"):
        pmap(func, range(6), backend="stdlib", workers=2, chunksize=1, retries=3)
    assert pathlib.Path(func.log).read_text() == "x"


@pytest.mark.parametrize("value,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_retries_and_lifespans_fail_before_any_worker_starts(value, error):
    with pytest.raises(error, match="retries"):
        pmap(abs, [1], retries=value)
    with pytest.raises((TypeError, ValueError), match="max_tasks_per_worker"):
        pmap(abs, [1], max_tasks_per_worker=0 if value == -1 else value)


@pytest.mark.parametrize("backend", ["cloudpickle", "ppe"])
def test_a_retried_chunk_with_large_items_still_has_its_items(backend, tmp_path):
    func = CrashOnceOnLength(str(tmp_path))
    assert pmap(func, [bytearray(4 << 20)], backend=backend, workers=1, retries=1) == [4 << 20]


class CrashOnceOnLength:
    """``len(item)``; the first attempt anywhere kills its worker."""

    def __init__(self, folder: str) -> None:
        self.marker = os.path.join(folder, "crashed-once")

    def __call__(self, item: bytearray) -> int:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(3)
        return len(item)
