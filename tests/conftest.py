"""Shared fixtures. The ``backend`` fixture is built from the registry: every
installed backend, and for process backends every start method this platform
has, so a new backend is covered by the conformance suite by registering it."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import pytest

import pickmap
from pickmap.registry import get_backend, registered_backends

START_METHODS = tuple(m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods())


@dataclass(frozen=True)
class BackendCase:
    name: str
    start_method: str | None

    @property
    def kwargs(self) -> dict[str, object]:
        return {"backend": self.name, "start_method": self.start_method, "workers": 2}

    @property
    def isolated(self) -> bool:
        return get_backend(self.name).isolated

    def __str__(self) -> str:
        return f"{self.name}-{self.start_method}" if self.start_method else self.name


def _cases() -> list[object]:
    cases: list[object] = []
    installed = pickmap.available_backends()
    for name in registered_backends():
        if name not in installed:
            cases.append(pytest.param(BackendCase(name, None), marks=pytest.mark.skip(f"{name} not installed")))
            continue
        methods = START_METHODS if get_backend(name).isolated else (None,)
        cases.extend(BackendCase(name, method) for method in methods)
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
