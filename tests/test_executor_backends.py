"""User executors as backends (``backend=<Executor>``) and the ``ppe`` backend: what only they add
to the conformance suite — faults inside an executor pickmap does not own, timeouts that wait only,
executors never shut down by pickmap, and the one-file backend documented in docs/how-to/write-a-backend.md."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import textwrap
import time

import faults
import pytest
import zoo

import pickmap
from pickmap import TaskTimeoutError, WorkerCrashedError, pmap

pytestmark = pytest.mark.timeout(60)

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _sleep_then(seconds: float, x: int) -> int:
    time.sleep(seconds)
    return x


@pytest.fixture
def executor():
    made = concurrent.futures.ProcessPoolExecutor(2)
    yield made
    made.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(made, "_processes", None) or {}).values()):
        process.kill()


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_worker_killed_inside_a_users_executor_is_a_crash_error_naming_the_chunk(executor, how):
    with pytest.raises(WorkerCrashedError) as caught:
        pmap(faults.CrashOn(3, how), range(6), chunksize=1, backend=executor)
    assert isinstance(caught.value, concurrent.futures.BrokenExecutor)
    # A ProcessPoolExecutor fails every task in flight when one process dies and
    # cannot say which one killed it: the error names the first lost chunk.
    assert caught.value.indices and set(caught.value.indices) <= set(range(6))
    assert "BrokenProcessPool" in str(caught.value) and "item" in str(caught.value)


def test_a_timeout_on_an_executor_raises_promptly_and_leaves_the_executor_to_its_owner(executor):
    began = time.monotonic()
    with pytest.raises(TaskTimeoutError) as caught:
        pmap(_sleep_then, [5.0, 0.0], [0, 1], timeout=0.5, backend=executor)
    assert caught.value.index == 0
    assert time.monotonic() - began < 4  # a hang guard, not a speed: the stuck task runs for 5 s
    assert "left to its executor" in str(caught.value)
    assert executor.submit(abs, -7).result(timeout=30) == 7  # still the user's, still working


def test_pickmap_never_shuts_down_an_executor_it_did_not_create(executor):
    assert pmap(zoo.square, range(10), backend=executor) == [i * i for i in range(10)]
    pickmap.shutdown()
    assert executor.submit(abs, -1).result(timeout=30) == 1


def test_a_hundred_thousand_items_go_as_chunks_on_an_executor(executor):
    submitted = []
    submit = executor.submit

    def counting_submit(*args, **kwargs):
        submitted.append(1)
        return submit(*args, **kwargs)

    executor.submit = counting_submit
    try:
        assert pmap(zoo.square, range(100_000), backend=executor) == [i * i for i in range(100_000)]
    finally:
        del executor.submit
    assert len(submitted) < 1000  # chunks, not items


def test_lambdas_and_private_methods_travel_on_a_stdlib_process_pool_executor(executor):
    scaler = zoo.Scaler(3)
    offset = 10
    assert pmap(lambda x: x + offset, range(4), backend=executor) == [10, 11, 12, 13]
    assert pmap(scaler.private(), range(3), backend=executor) == [3, 4, 5]


def test_a_main_function_runs_on_a_spawn_executor(tmp_path):
    script = tmp_path / "main_on_executor.py"
    script.write_text(
        textwrap.dedent(
            """
        import concurrent.futures, multiprocessing, pickmap
        def double(x):
            return 2 * x
        if __name__ == "__main__":
            with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
                print(pickmap.pmap(double, range(5), backend=ex))
        """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.path.join(ROOT, "src")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0, 2, 4, 6, 8]"


def test_a_nested_pmap_inside_an_executor_task_runs_in_place(executor):
    assert pmap(zoo.nested_pmap, [3, 4], backend=executor) == [5, 14]
    assert pmap(zoo.nested_pmap, [3, 4], backend=concurrent.futures.ThreadPoolExecutor(2)) == [
        5,
        14,
    ]


def test_explain_names_the_executor_and_its_capabilities(executor):
    plan = pickmap.explain(zoo.square, [1], backend=executor)
    assert plan.backend.startswith("executor:ProcessPoolExecutor@") and plan.source == "argument"
    assert plan.verdicts[-1].ok


def test_the_ppe_backend_is_registered_and_explained_but_not_on_the_ladder():
    assert "ppe" in pickmap.available_backends()
    assert "ppe" not in pickmap.registry.LADDER
    assert pickmap.explain(lambda x: x, [1], backend="ppe").backend == "ppe"


def test_the_docs_write_your_own_backend_example_is_the_tested_one_file_backend():
    with open(os.path.join(ROOT, "docs", "how-to", "write-a-backend.md"), encoding="utf-8") as file:
        docs = file.read()
    section = docs[docs.index("# Write your own backend") :]
    shown = re.search(r"```python\n(.*?)```", section, re.S)
    assert shown is not None
    with open(os.path.join(TESTS, "onefile_backend.py"), encoding="utf-8") as file:
        assert shown.group(1) == file.read()
    assert pmap(zoo.square, range(20), backend="test-mp-pool") == [i * i for i in range(20)]
