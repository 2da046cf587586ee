"""The contract every backend keeps, run on every backend and start method."""

from __future__ import annotations

import itertools

import pytest
import zoo

import pickmap
from pickmap import RemoteTraceback, imap, pmap

pytestmark = pytest.mark.timeout(60)


def test_same_as_builtin_map(backend):
    data = list(range(257))
    assert pmap(zoo.square, data, **backend.kwargs) == list(map(zoo.square, data))


def test_several_iterables_stop_at_the_shortest(backend):
    assert pmap(zoo.add, range(10), range(100, 105), **backend.kwargs) == [100, 102, 104, 106, 108]


def test_empty_input_returns_empty_list(backend):
    assert pmap(zoo.square, [], **backend.kwargs) == []
    assert list(imap(zoo.square, iter(()), **backend.kwargs)) == []


def test_generator_input_of_unknown_length(backend):
    data = (i for i in range(1000))
    assert pmap(zoo.square, data, **backend.kwargs) == [i * i for i in range(1000)]


@pytest.mark.parametrize("chunksize", [1, 7, 10_000])
def test_chunksize_does_not_change_results(backend, chunksize):
    assert pmap(zoo.square, range(50), chunksize=chunksize, **backend.kwargs) == [
        i * i for i in range(50)
    ]


def test_imap_ordered_streams_in_input_order(backend):
    assert list(imap(zoo.square, range(100), **backend.kwargs)) == [i * i for i in range(100)]


def test_imap_unordered_yields_every_result_once(backend):
    assert sorted(imap(zoo.square, range(100), ordered=False, **backend.kwargs)) == [
        i * i for i in range(100)
    ]


def test_imap_over_an_endless_generator_is_lazy(backend):
    results = imap(zoo.square, itertools.count(), **backend.kwargs)
    assert list(itertools.islice(results, 25)) == [i * i for i in range(25)]
    results.close()  # cancels what is still running
    assert pmap(zoo.square, range(3), **backend.kwargs) == [0, 1, 4]


def test_exception_comes_back_as_itself_with_the_index(backend):
    with pytest.raises(ValueError, match="bad item 13") as caught:
        pmap(zoo.fail_on, [13] * 30, range(30), **backend.kwargs)
    notes = getattr(caught.value, "__notes__", [])
    assert any("item 13" in note for note in notes), notes
    if backend.processes:
        assert isinstance(caught.value.__cause__, RemoteTraceback)
        assert "fail_on" in caught.value.__cause__.tb


def test_imap_ordered_yields_results_before_the_failing_item(backend):
    seen = []
    with pytest.raises(ValueError):
        for value in imap(zoo.fail_on, [5] * 10, range(10), chunksize=1, **backend.kwargs):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


def test_return_exceptions_collects_them_in_place(backend):
    results = pmap(zoo.fail_on, [2] * 5, range(5), return_exceptions=True, **backend.kwargs)
    assert results[:2] == [0, 1] and results[3:] == [3, 4]
    assert isinstance(results[2], ValueError)


def test_pool_still_works_after_an_exception(backend):
    with pytest.raises(ValueError):
        pmap(zoo.fail_on, [0] * 5, range(5), **backend.kwargs)
    assert pmap(zoo.square, range(5), **backend.kwargs) == [0, 1, 4, 9, 16]


def test_initializer_runs_for_this_call_only(backend):
    with_init = pmap(
        zoo.initialized_tags,
        range(4),
        initializer=zoo.initialize,
        initargs=("A",),
        **backend.kwargs,
    )
    assert all("A" in tags for tags in with_init)
    # Workers that ran an initializer are retired: nothing leaks into later calls
    # (an executor's processes are its owner's: there the initializer's effects stay).
    if backend.processes and backend.sticky:
        assert all(tags == [] for tags in pmap(zoo.initialized_tags, range(4), **backend.kwargs))


def test_bound_and_private_bound_methods(backend):
    scaler = zoo.Scaler(4)
    assert pmap(scaler.scale, range(5), **backend.kwargs) == [0, 4, 8, 12, 16]
    assert pmap(scaler.private(), range(3), **backend.kwargs) == [4, 5, 6]


def test_closures_and_lambdas_travel_on_capable_backends(backend):
    closure = zoo.make_closure(7)
    if backend.name == "stdlib":
        with pytest.raises(pickmap.SerializationError, match="cloudpickle"):
            pmap(closure, range(3), **backend.kwargs)
    else:
        assert pmap(closure, range(3), **backend.kwargs) == [7, 8, 9]


def test_large_items_and_results(backend):
    blobs = [bytes([i]) * 300_000 for i in range(6)]
    assert pmap(len, blobs, **backend.kwargs) == [300_000] * 6


def test_return_exceptions_with_an_exception_that_cannot_travel(backend):
    results = pmap(
        zoo.raise_unpicklable_exception, range(3), return_exceptions=True, **backend.kwargs
    )
    assert len(results) == 3
    assert all(isinstance(r, BaseException) for r in results)
    if backend.processes:
        assert all(isinstance(r, pickmap.WorkerError) for r in results)


def test_large_chunks_and_large_results_never_deadlock(backend):
    # Caller writing a big chunk while the worker writes a big result: the caller
    # never blocks on its write and keeps reading, so the worker's write completes.
    import copy

    blobs = [bytes(300_000)] * 8
    assert pmap(copy.copy, blobs, chunksize=1, **backend.kwargs) == blobs
