"""Shared fixtures. The ``backend`` fixture is built from the registry: every
installed backend, and for backends whose start methods apply every start
method this platform has, so a new backend is covered by the conformance
suite by registering it — plus user executors passed as ``backend=``
(ProcessPoolExecutor, ThreadPoolExecutor, loky's reusable executor)."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import pickmap
from pickmap.registry import get_backend, registered_backends

START_METHODS = tuple(
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
)


def _loky_executor() -> Any:
    import loky

    return loky.get_reusable_executor(max_workers=2)


#: User executors the conformance suite runs on: name -> factory (made once per session).
EXECUTORS: dict[str, Callable[[], Any]] = {
    "user-ProcessPoolExecutor": lambda: concurrent.futures.ProcessPoolExecutor(2),
    "user-ThreadPoolExecutor": lambda: concurrent.futures.ThreadPoolExecutor(2),
    "user-loky": _loky_executor,
}
_MADE: dict[str, Any] = {}


def executor(name: str) -> Any:
    if name not in _MADE:
        _MADE[name] = EXECUTORS[name]()
    return _MADE[name]


@dataclass(frozen=True)
class BackendCase:
    name: str
    start_method: str | None

    @property
    def is_executor(self) -> bool:
        return self.name in EXECUTORS

    @property
    def backend(self) -> Any:
        """What ``backend=`` gets: a registered name, or a user's executor."""
        return executor(self.name) if self.is_executor else self.name

    @property
    def kwargs(self) -> dict[str, object]:
        return {"backend": self.backend, "start_method": self.start_method, "workers": 2}

    @property
    def processes(self) -> bool:
        if self.is_executor:
            return "Thread" not in self.name
        return get_backend(self.name).processes

    @property
    def sticky(self) -> bool:
        """pickmap owns the workers and retires them as it sees fit (executors keep theirs)."""
        return not self.is_executor and get_backend(self.name).sticky

    def __str__(self) -> str:
        return f"{self.name}-{self.start_method}" if self.start_method else self.name


def _cases() -> list[object]:
    cases: list[object] = []
    installed = pickmap.available_backends()
    for name in registered_backends():
        if name not in installed:
            cases.append(
                pytest.param(
                    BackendCase(name, None), marks=pytest.mark.skip(f"{name} not installed")
                )
            )
            continue
        methods = START_METHODS if get_backend(name).start_methods else (None,)
        cases.extend(BackendCase(name, method) for method in methods)
    for name in EXECUTORS:
        missing = name == "user-loky" and importlib.util.find_spec("loky") is None
        marks = [pytest.mark.skip("loky not installed")] if missing else []
        cases.append(pytest.param(BackendCase(name, None), marks=marks))
    return cases


# A backend written in one file of its own (tests/onefile_backend.py), registered the
# way a user would: the conformance suite runs on it with no change to src/.
pickmap.register_backend("test-mp-pool", "onefile_backend:PoolBackend")

BACKEND_CASES = _cases()


@pytest.fixture(params=BACKEND_CASES, ids=str)
def backend(request: pytest.FixtureRequest) -> BackendCase:
    if request.param.name == "dask":
        # The registered name finds its cluster through PICKMAP_DASK_ADDRESS: point it at the fixture's.
        cluster = request.getfixturevalue("dask_cluster")
        request.getfixturevalue("monkeypatch").setenv("PICKMAP_DASK_ADDRESS", cluster.address)
        cluster.wait_for_workers()
    return request.param


# --------------------------------------------------------------------------- a real dask cluster
TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(TESTS), "src")
DASK_WORKERS = 2


@dataclass
class DaskCluster:
    """A ``dask scheduler`` and two ``dask worker --nthreads 1`` processes on 127.0.0.1."""

    address: str
    client: Any
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def wait_for_workers(self, count: int = DASK_WORKERS) -> None:
        """Both workers connected (a killed one is restarted by its nanny)."""
        self.client.wait_for_workers(count, timeout=60)

    def worker_pids(self) -> set[int]:
        self.wait_for_workers()
        return set(self.client.run(os.getpid).values())


def _start(args: list[str], log: Any) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([TESTS, SRC, os.environ.get("PYTHONPATH", "")])
    )
    # one retry: KilledWorker after two deaths
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
    # Its own session (process group), so teardown kills nannies and their workers together.
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    distributed = pytest.importorskip("distributed")
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    with open(folder / "cluster.log", "wb") as log:
        processes = [
            _start(
                [
                    "distributed.cli.dask_scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(scheduler_file),
                ],
                log,
            )
        ]
        client = None
        try:
            deadline = time.monotonic() + 60
            while not scheduler_file.exists() or not scheduler_file.read_text().strip():
                assert processes[0].poll() is None, (folder / "cluster.log").read_text()
                assert time.monotonic() < deadline, "the dask scheduler did not start within 60 s"
                time.sleep(0.05)
            address = json.loads(scheduler_file.read_text())["address"]
            for _ in range(DASK_WORKERS):
                # --death-timeout: a worker whose scheduler is gone exits on its own.
                processes.append(
                    _start(
                        [
                            "distributed.cli.dask_worker",
                            address,
                            "--nthreads",
                            "1",
                            "--no-dashboard",
                            "--host",
                            "127.0.0.1",
                            "--death-timeout",
                            "30",
                        ],
                        log,
                    )
                )
            client = distributed.Client(address, timeout=30, set_as_default=False)
            cluster = DaskCluster(address, client, processes)
            cluster.wait_for_workers()
            yield cluster
        finally:
            from pickmap.backends.dask import close_owned

            close_owned()  # pickmap's own clients, before their scheduler goes
            if client is not None:
                client.close()
            _stop(processes)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "PICKMAP_BACKEND",
        "PICKMAP_WORKERS",
        "PICKMAP_START_METHOD",
        "PICKMAP_IDLE_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's PICKMAP_BACKEND must not silently change what tests test.
    monkeypatch.delenv("PICKMAP_BACKEND", raising=False)
    monkeypatch.delenv("PICKMAP_WORKERS", raising=False)
    monkeypatch.delenv("PICKMAP_START_METHOD", raising=False)
    monkeypatch.delenv("PICKMAP_PROGRESS", raising=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pickmap.shutdown()
    for made in _MADE.values():
        made.shutdown(wait=True)
    _MADE.clear()


def _uses_dask(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("backend") if callspec is not None else None
    return "dask" in item.nodeid.split("::")[0] or getattr(case, "name", None) == "dask"


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    # Importing distributed installs tblib's copyreg reducers for every exception
    # class, process-wide, which changes how exceptions pickle for pickmap and
    # multiprocessing alike. The tests that need it run last, so every other test
    # sees the standard library's pickling.
    items.sort(key=_uses_dask)
