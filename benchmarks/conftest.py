"""pytest-benchmark suite for pickmap. Not part of the normal test run
(``testpaths = ["tests"]``, and ``--benchmark-disable`` in addopts); run it with

    python -m pytest benchmarks --benchmark-enable

Without ``--benchmark-enable`` each benchmark runs once, as a smoke test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import workloads`

import workloads

import pickmap


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_pools() -> Iterator[None]:
    yield
    pickmap.shutdown()


@pytest.fixture(scope="session")
def big_holder() -> workloads.BigHolder:
    """An object holding 50 MB of bytes (built once: os.urandom is slow)."""
    return workloads.BigHolder()
