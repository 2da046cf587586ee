"""The ``dask`` backend on a real cluster (the ``dask_cluster`` fixture in conftest.py):
what only a cluster adds to the conformance suite — finding the cluster, keys,
worker loss, cancellation, configuration errors."""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults
import pytest
import zoo

import pickmap
from pickmap import RemoteTraceback, WorkerCrashedError, explain, imap, pmap, registry
from pickmap.backends import dask as dask_backend
from pickmap.backends.dask import DaskBackend, DaskConnectionError, check_address

# distributed itself is imported by the dask_cluster fixture, not at collection:
# importing it installs tblib's exception reducers process-wide (see conftest.py).
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        importlib.util.find_spec("distributed") is None, reason="distributed not installed"
    ),
]


@pytest.fixture
def cluster(dask_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The session's cluster, found by ``backend="dask"`` through PICKMAP_DASK_ADDRESS."""
    monkeypatch.setenv("PICKMAP_DASK_ADDRESS", dask_cluster.address)
    dask_cluster.wait_for_workers()
    return dask_cluster


# --------------------------------------------------------------------------- run on the workers
class Counter:
    def __init__(self, step: int) -> None:
        self.step = step

    def up(self, x: int) -> int:
        return x + self.step

    def __down(self, x: int) -> int:
        return x - self.step

    def down(self) -> Callable[[int], int]:
        return self.__down


def index_and_pid(seconds: float, index: int) -> tuple[int, int]:
    time.sleep(seconds)
    return index, os.getpid()


class SlowFirst:
    """Item 0 finishes only once item 6 has started: items 1-5 are done on the other worker by then."""

    def __init__(self, folder: str) -> None:
        self.marker = os.path.join(folder, "item-6-started")

    def __call__(self, index: int) -> int:
        if index == 6:
            open(self.marker, "w").close()
        if index == 0:
            deadline = time.monotonic() + 20
            while not os.path.exists(self.marker) and time.monotonic() < deadline:
                time.sleep(0.01)
        return index


def count_run(path: str, x: int) -> int:
    with open(path, "a") as log:
        log.write(f"{x}\n")
    return x * 2


def kill_own_worker(_: int) -> None:
    faults.fault("sigkill", "in a dask task")  # refuses outside a pickmap task


def scheduled_tasks(client: Any) -> list[str]:
    """Keys pickmap put on the scheduler (chunks and call setups) that it still holds."""

    def keys(dask_scheduler: Any) -> list[str]:
        return [
            str(key)
            for key in dask_scheduler.tasks
            if str(key).startswith(("pickmap_task-", "pickmap_setup-"))
        ]

    return client.run_on_scheduler(keys)


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- callables
def test_a_bound_method_and_a_private_name_mangled_one_run_on_the_cluster(cluster):
    counter = Counter(5)
    assert pmap(counter.up, range(4), backend="dask") == [5, 6, 7, 8]
    assert pmap(counter.down(), range(4), backend="dask") == [-5, -4, -3, -2]


def test_a_lambda_runs_on_the_cluster(cluster):
    assert pmap(lambda x: x * 3, range(5), backend="dask") == [0, 3, 6, 9, 12]


def test_a_main_function_runs_on_the_cluster(cluster):
    code = textwrap.dedent(
        """
        import pickmap

        def triple(x):
            return 3 * x

        print(pickmap.pmap(triple, range(5), backend="dask"))
        """
    )
    env = dict(os.environ, PICKMAP_DASK_ADDRESS=cluster.address)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 3, 6, 9, 12]"


def test_a_hundred_thousand_trivial_items(cluster):
    assert pmap(zoo.square, range(100_000), backend="dask") == [i * i for i in range(100_000)]


def test_tasks_spread_over_both_workers(cluster):
    results = pmap(index_and_pid, [0.05] * 16, range(16), chunksize=1, backend="dask")
    assert [index for index, _ in results] == list(range(16))
    assert {pid for _, pid in results} == cluster.worker_pids()


def test_the_default_worker_count_is_the_clusters_thread_count(cluster):
    assert explain(zoo.square, range(3), backend="dask").workers == 2


# --------------------------------------------------------------------------- streaming
def test_unordered_streaming_from_a_generator_is_lazy_and_in_completion_order(cluster, tmp_path):
    pulled: list[int] = []

    def source():
        for index in itertools.count():
            pulled.append(index)
            yield index

    stream = imap(SlowFirst(str(tmp_path)), source(), ordered=False, chunksize=1, backend="dask")
    got = list(itertools.islice(stream, 30))
    stream.close()
    assert got[0] != 0  # item 0 sleeps while the other worker streams on
    assert len(set(got)) == 30
    assert len(pulled) < 60  # read a bounded way ahead of what was consumed


# --------------------------------------------------------------------------- errors
def test_an_exception_comes_back_as_itself_with_the_item_index_through_a_passed_client(
    dask_cluster,
):
    backend = DaskBackend(client=dask_cluster.client)
    with pytest.raises(ValueError, match="bad item 13") as caught:
        pmap(zoo.fail_on, [13] * 30, range(30), backend=backend)
    assert any("item 13" in note for note in caught.value.__notes__)
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "fail_on" in caught.value.__cause__.tb


def test_a_bare_client_passed_as_backend_becomes_the_dask_backend(dask_cluster):
    from pickmap.registry import select_backend

    chosen, source = select_backend(dask_cluster.client)
    assert isinstance(chosen, DaskBackend) and source == "argument"
    assert pmap(zoo.square, range(10), backend=dask_cluster.client) == [i * i for i in range(10)]


def test_a_worker_killed_mid_run_is_retried_by_dask_and_the_result_is_complete(cluster):
    victim = min(cluster.worker_pids())
    seen = []
    for index, pid in imap(index_and_pid, [0.2] * 20, range(20), chunksize=1, backend="dask"):
        seen.append((index, pid))
        if len(seen) == 2:
            os.kill(victim, signal.SIGKILL)
    assert [index for index, _ in seen] == list(range(20))
    assert any(pid != victim for _, pid in seen[2:])
    cluster.wait_for_workers()


def test_a_task_that_kills_every_worker_raises_worker_crashed_naming_the_chunk(cluster):
    with pytest.raises(WorkerCrashedError, match="KilledWorker") as caught:
        pmap(kill_own_worker, [7], backend="dask")
    assert "item 0" in str(caught.value) and tuple(caught.value.indices) == (0,)
    cluster.wait_for_workers()


def test_a_timeout_waits_only_it_raises_while_the_task_finishes_on_its_worker(cluster):
    with pytest.raises(pickmap.TaskTimeoutError, match="item 0") as caught:
        pmap(zoo.sleep_then, [1.5, 0.0], range(2), timeout=0.3, backend="dask")
    assert "cannot kill a task" in str(caught.value)


def test_ctrl_c_cancels_the_calls_futures_on_the_cluster(cluster):
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    interrupt = threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pmap(index_and_pid, [0.5] * 40, range(40), chunksize=1, backend="dask")
    finally:
        interrupt.cancel()
    assert eventually(lambda: scheduled_tasks(cluster.client) == []), scheduled_tasks(
        cluster.client
    )


def test_keys_are_unique_per_call_so_equal_inputs_run_again(cluster, tmp_path: Path):
    log = str(tmp_path / "runs.log")
    first = pmap(count_run, [log] * 5, range(5), chunksize=1, backend="dask")
    second = pmap(count_run, [log] * 5, range(5), chunksize=1, backend="dask")
    assert first == second == [0, 2, 4, 6, 8]
    assert sorted(Path(log).read_text().split()) == sorted(["0", "1", "2", "3", "4"] * 2)


def test_nothing_of_a_finished_call_is_left_on_the_scheduler(cluster):
    assert pmap(zoo.square, range(50), chunksize=5, backend="dask") == [i * i for i in range(50)]
    assert eventually(lambda: scheduled_tasks(cluster.client) == []), scheduled_tasks(
        cluster.client
    )


# --------------------------------------------------------------------------- finding the cluster
def test_the_client_active_in_the_process_is_used_when_no_address_is_set(dask_cluster, monkeypatch):
    monkeypatch.delenv("PICKMAP_DASK_ADDRESS", raising=False)
    import distributed

    with distributed.Client(dask_cluster.address, timeout=30) as active:
        assert DaskBackend().find_client(start=False) is active
        pids = {
            pid for _, pid in pmap(index_and_pid, [0.05] * 8, range(8), chunksize=1, backend="dask")
        }
    assert pids <= dask_cluster.worker_pids()


def test_a_local_cluster_starts_when_nothing_is_configured_and_closes_at_exit():
    code = textwrap.dedent(
        """
        import pickmap

        if __name__ == "__main__":
            print(pickmap.explain(abs, [1], backend="dask").runs_on)
            print(pickmap.pmap(abs, [-1, -2, -3], backend="dask"))
            print(pickmap.explain(abs, [1], backend="dask").runs_on)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICKMAP_", "DASK_"))}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    before, result, after = done.stdout.splitlines()
    assert before.startswith("a dask LocalCluster it starts on first use")
    assert result == "[1, 2, 3]"
    assert after.startswith("the dask scheduler at ")


def test_shutdown_closes_the_client_pickmap_made_and_the_next_call_reconnects(cluster):
    assert pmap(zoo.square, range(3), backend="dask") == [0, 1, 4]
    own = dask_backend._OWNED[cluster.address]
    pickmap.shutdown()
    assert own.status == "closed" and cluster.address not in dask_backend._OWNED
    assert pmap(zoo.square, range(3), backend="dask") == [0, 1, 4]


def test_explain_reports_the_scheduler_address_and_the_worker_and_thread_counts(cluster):
    plan = explain(zoo.square, range(3), backend="dask")
    assert plan.runs_on == f"the dask scheduler at {cluster.address} (2 workers, 2 threads)"
    assert f"runs on the dask scheduler at {cluster.address}" in str(plan)


def test_doctor_shows_the_scheduler_when_the_address_is_set(cluster):
    env = dict(os.environ, PICKMAP_DASK_ADDRESS=cluster.address)
    done = subprocess.run(
        [sys.executable, "-m", "pickmap", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(line for line in done.stdout.splitlines() if "backend dask:" in line)
    assert f"the dask scheduler at {cluster.address} (2 workers, 2 threads)" in line, done.stdout


# --------------------------------------------------------------------------- bad configuration
def test_an_unreachable_address_fails_fast_naming_the_address_and_the_variables(monkeypatch):
    with socket_nobody_listens_on() as address:
        monkeypatch.setenv("PICKMAP_DASK_ADDRESS", address)
        monkeypatch.setenv("PICKMAP_DASK_TIMEOUT", "0.5")
        with pytest.raises(DaskConnectionError) as caught:
            pmap(zoo.square, range(3), backend="dask")
    message = str(caught.value)
    assert (
        address in message
        and "PICKMAP_DASK_ADDRESS" in message
        and "PICKMAP_DASK_TIMEOUT" in message
    )
    assert isinstance(caught.value, ConnectionError) and isinstance(
        caught.value, pickmap.PickmapError
    )


class socket_nobody_listens_on:
    """A free port on 127.0.0.1, held closed for the test (nothing accepts on it)."""

    def __enter__(self) -> str:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        return f"tcp://127.0.0.1:{self._socket.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self._socket.close()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:8786",
        "tcp://127.0.0.1",
        "http://127.0.0.1:8786",
        "tcp://127.0.0.1:99999",
        "tcp://:8786",
    ],
)
def test_a_malformed_address_is_a_value_error_before_anything_connects(monkeypatch, address):
    monkeypatch.setenv("PICKMAP_DASK_ADDRESS", address)
    with pytest.raises(ValueError, match="PICKMAP_DASK_ADDRESS") as caught:
        pmap(zoo.square, range(3), backend="dask")
    assert not isinstance(caught.value, pickmap.PickmapError)
    assert address not in dask_backend._OWNED


@pytest.mark.parametrize(
    "address",
    [
        "tcp://127.0.0.1:8786",
        "tls://scheduler.example:8786",
        "tcp://[::1]:8786",
        "ucx://10.0.0.1:13337",
        "inproc://10.0.0.1/4242/1",
    ],
)
def test_well_formed_addresses_are_accepted(address):
    assert check_address(address) == address


def test_a_bad_timeout_is_a_value_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("PICKMAP_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    monkeypatch.setenv("PICKMAP_DASK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PICKMAP_DASK_TIMEOUT='soon'"):
        pmap(zoo.square, range(3), backend="dask")


def test_selecting_dask_without_distributed_raises_with_the_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "distributed" else real_find_spec(name, *args),
    )
    monkeypatch.setattr(registry, "_FOUND", set())
    monkeypatch.delitem(registry._INSTANCES, "dask", raising=False)
    assert "dask" not in pickmap.available_backends()
    with pytest.raises(
        pickmap.BackendUnavailableError, match=r'pip install "pickmap\[dask\]"'
    ) as caught:
        pmap(zoo.square, range(3), backend="dask")
    assert isinstance(caught.value, ImportError)
