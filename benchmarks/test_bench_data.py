"""Small versions of compare.py's data rows (issue 8), pickmap only, on a warm pool.

The sizes are a tenth or less of compare.py's so the suite stays quick; what
they track is the steady state of moving arrays: items in (``big_items``),
results out (``big_results``), and a large ``self`` reused across calls
(``big_self``: after the first call the object should not travel again).
Peers, fresh processes, CPU and memory are compare.py's job.
"""

from __future__ import annotations

from typing import Any

import pytest
from workloads import ArrayMaker, Model, array_sum

from pickmap import pmap

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(300)

WORKERS = 2
MB = 2**20
ITEMS = 16
ITEM_BYTES = 1 * MB
SELF_BYTES = 40 * MB
SELF_ITEMS = 200


@pytest.fixture(scope="module")
def arrays() -> list[Any]:
    return [np.full(ITEM_BYTES // 8, float(i)) for i in range(ITEMS)]


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(SELF_BYTES)


def test_big_items_sums_16_arrays_of_1_mb(benchmark, arrays: list[Any]) -> None:
    benchmark.group = "data: 16 x 1 MB arrays in, a float out"
    expected = [float(a.sum()) for a in arrays]
    pmap(array_sum, arrays[:2], workers=WORKERS)  # start the workers, cache the verdict
    result = benchmark.pedantic(
        pmap, args=(array_sum, arrays), kwargs={"workers": WORKERS}, rounds=5, warmup_rounds=1
    )
    assert result == expected


def test_big_results_returns_16_arrays_of_1_mb(benchmark) -> None:
    benchmark.group = "data: 16 ints in, a 1 MB array out"
    maker = ArrayMaker(ITEM_BYTES)
    data = list(range(ITEMS))
    pmap(maker, data[:2], workers=WORKERS)
    result = benchmark.pedantic(
        pmap, args=(maker, data), kwargs={"workers": WORKERS}, rounds=5, warmup_rounds=1
    )
    assert len(result) == ITEMS
    assert all(
        r.shape == (ITEM_BYTES // 8,) and r[0] == i and r[-1] == i for i, r in enumerate(result)
    )


def test_big_self_calls_a_method_of_a_40_mb_object_again(benchmark, model: Model) -> None:
    benchmark.group = "data: bound method of a 40 MB object, 200 items, repeated calls"
    data = list(range(SELF_ITEMS))
    expected = [model.predict(i) for i in data]
    # the first call ships the object; the timed ones need not
    pmap(model.predict, data[:2], workers=WORKERS)
    result = benchmark.pedantic(
        pmap, args=(model.predict, data), kwargs={"workers": WORKERS}, rounds=5, warmup_rounds=1
    )
    assert result == expected
