"""pmap throughput per backend and warm small-call latency.

Every benchmark runs on a warm pool: one untimed call first starts the
workers and caches the probe's verdict, so what is measured is the steady
state a long-running program sees. Cold starts are measured by compare.py,
in fresh processes.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
from workloads import square

import pickmap
from pickmap import pmap

pytestmark = pytest.mark.timeout(180)  # a pickmap hang fails the test instead of stalling the run

WORKERS = 2
TRIVIAL = list(range(200_000))
TRIVIAL_EXPECTED = [x * x for x in TRIVIAL]
SMALL = list(range(8))
SMALL_EXPECTED = [x * x for x in SMALL]
BACKENDS = [
    "auto",
    *(
        b
        for b in ("stdlib", "cloudpickle", "dill", "thread", "serial")
        if b in pickmap.available_backends()
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_trivial_200k(benchmark, backend: str) -> None:
    benchmark.group = "pmap: 200k items x*x, warm pool"
    kwargs = {"backend": backend, "workers": WORKERS}
    pmap(square, TRIVIAL[:1000], **kwargs)  # start the workers, cache the verdict
    result = benchmark.pedantic(
        pmap, args=(square, TRIVIAL), kwargs=kwargs, rounds=5, warmup_rounds=1
    )
    assert result == TRIVIAL_EXPECTED


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_small_call(benchmark, backend: str) -> None:
    benchmark.group = "warm call latency: 8 items x*x"
    kwargs = {"backend": backend, "workers": WORKERS}
    pmap(square, SMALL, **kwargs)
    assert benchmark(pmap, square, SMALL, **kwargs) == SMALL_EXPECTED


# References: the same warm call on the stdlib pools, created once (as a user would).
def test_warm_small_call_pool_reference(benchmark) -> None:
    benchmark.group = "warm call latency: 8 items x*x"
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.map(square, SMALL)
        assert benchmark(pool.map, square, SMALL) == SMALL_EXPECTED


def test_warm_small_call_ppe_reference(benchmark) -> None:
    benchmark.group = "warm call latency: 8 items x*x"
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork")) as executor:
        list(executor.map(square, SMALL))
        assert benchmark(lambda: list(executor.map(square, SMALL))) == SMALL_EXPECTED
