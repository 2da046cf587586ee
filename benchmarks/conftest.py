"""pytest-benchmark suite for pickmap. Not part of the normal test run
(``testpaths = ["tests"]``, and ``--benchmark-disable`` in addopts); run it with

    python -m pytest benchmarks --benchmark-enable

Without ``--benchmark-enable`` each benchmark runs once, as a smoke test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import workloads`

import pickmap  # noqa: E402
import workloads  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_pools() -> Iterator[None]:
    yield
    pickmap.shutdown()


@pytest.fixture(scope="session")
def big_holder() -> workloads.BigHolder:
    """An object holding 50 MB of bytes (built once: os.urandom is slow)."""
    return workloads.BigHolder()
