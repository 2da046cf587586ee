"""Shared fixtures. The ``backend`` fixture is built from the registry: every
installed backend, and for backends whose start methods apply every start
method this platform has, so a new backend is covered by the conformance
suite by registering it — plus user executors passed as ``backend=``
(ProcessPoolExecutor, ThreadPoolExecutor, loky's reusable executor)."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import pickmap
from pickmap.registry import get_backend, registered_backends

START_METHODS = tuple(m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods())


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
            cases.append(pytest.param(BackendCase(name, None), marks=pytest.mark.skip(f"{name} not installed")))
            continue
        methods = START_METHODS if get_backend(name).start_methods else (None,)
        cases.extend(BackendCase(name, method) for method in methods)
    for name in EXECUTORS:
        missing = name == "user-loky" and importlib.util.find_spec("loky") is None
        marks = [pytest.mark.skip("loky not installed")] if missing else []
        cases.append(pytest.param(BackendCase(name, None), marks=marks))
    return cases


BACKEND_CASES = _cases()


@pytest.fixture(params=BACKEND_CASES, ids=str)
def backend(request: pytest.FixtureRequest) -> BackendCase:
    return request.param


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("PICKMAP_BACKEND", "PICKMAP_WORKERS", "PICKMAP_START_METHOD", "PICKMAP_IDLE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's PICKMAP_BACKEND must not silently change what tests test.
    monkeypatch.delenv("PICKMAP_BACKEND", raising=False)
    monkeypatch.delenv("PICKMAP_WORKERS", raising=False)
    monkeypatch.delenv("PICKMAP_START_METHOD", raising=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pickmap.shutdown()
    for made in _MADE.values():
        made.shutdown(wait=True)
    _MADE.clear()
