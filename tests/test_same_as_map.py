"""Same results as ``map`` (issue 9, cases 3-6): class identity under dill, a
``StopIteration`` raised by the function, an input that raises mid-way, and
module globals changed between calls. Cases 1 and 2 (copyreg registrations
made after import, a reference to the ``__main__`` module) are covered in
``test_serializers.py``: ``test_copyreg_registrations_made_after_import_are_seen_by_the_stdlib_pickler``,
``test_a_ufunc_is_carried_by_stdlib_when_numpy_is_imported_after_pickmap`` and
``test_a_reference_to_the_main_module_falls_to_a_backend_that_carries_it``.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import faults
import pytest
from conftest import START_METHODS

import pickmap
from pickmap import explain, imap, pmap
from pickmap.registry import available_backends, get_backend
from pickmap.serializers import get_serializer

pytestmark = pytest.mark.timeout(60)


# =========================================================================== case 3: dill and local classes
def test_a_class_dumped_in_two_pickles_loads_as_the_same_class():
    local = type("Local", (), {"value": 3})
    dill = get_serializer("dill")
    first, second = dill.load(dill.dump(local)), dill.load(dill.dump(local()))
    # In the process that dumped it, the id resolves to the original class.
    assert first is local and type(second) is local


@pytest.mark.parametrize("method", START_METHODS)
def test_the_callables_class_and_the_items_class_are_one_in_a_dill_worker(method):
    P = type("P", (), {})
    a = P()
    r = weakref.ref(a)  # a weakref: only dill carries it, so the probe picks dill
    f = lambda x: (isinstance(x, P), r() is a)  # noqa: E731
    assert explain(f, [P()]).backend == "dill"
    expected = list(map(f, [P()]))
    assert expected == [(True, True)]
    assert pmap(f, [P(), P()], start_method=method, workers=2, chunksize=1) == [
        (True, True),
        (True, True),
    ]


@pytest.mark.parametrize("method", START_METHODS)
def test_a_dataclass_returned_by_a_dill_worker_is_an_instance_of_the_callers_class(method):
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    def shifted(point: Point) -> Point:
        assert isinstance(point, Point)
        return Point(point.x + 1, point.y)

    got = pmap(
        shifted,
        [Point(1, 2), Point(3, 4), Point(5, 6)],
        backend="dill",
        start_method=method,
        workers=2,
        chunksize=1,
    )
    assert got == [Point(2, 2), Point(4, 4), Point(6, 6)]
    assert all(type(point) is Point for point in got)


# =========================================================================== case 4: StopIteration in the function
def _exhausted_second():
    return [iter([1]), iter([]), iter([3])]


@pytest.mark.parametrize(
    "extra", [{}, {"timeout": 30}, {"chunksize": 3}], ids=["plain", "timed", "one-chunk"]
)
def test_stop_iteration_from_the_function_is_a_runtime_error_naming_the_item(backend, extra):
    kwargs = {"chunksize": 1, **backend.kwargs, **extra}
    with pytest.raises(RuntimeError, match="next raised StopIteration on item 1") as caught:
        pmap(next, _exhausted_second(), **kwargs)
    assert not isinstance(caught.value, StopIteration)
    assert any("item 1" in note for note in getattr(caught.value, "__notes__", []))


def test_stop_iteration_never_ends_an_imap_loop_early(backend):
    got = []
    with pytest.raises(RuntimeError, match="StopIteration on item 1"):
        for value in imap(next, _exhausted_second(), chunksize=1, **backend.kwargs):
            got.append(value)
    assert got == [1]


def test_stop_iteration_with_return_exceptions_is_the_items_result_in_place(backend):
    got = pmap(next, _exhausted_second(), chunksize=1, return_exceptions=True, **backend.kwargs)
    assert got[0] == 1 and got[2] == 3 and len(got) == 3
    assert isinstance(got[1], RuntimeError) and "StopIteration on item 1" in str(got[1])


# =========================================================================== case 5: the input raises
def test_imap_yields_every_result_before_an_input_that_raises(backend):
    it = imap(abs, (10 // (3 - i) for i in range(10)), chunksize=1, **backend.kwargs)
    assert [next(it), next(it), next(it)] == [3, 5, 10]
    with pytest.raises(ZeroDivisionError):
        next(it)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_imap_yields_the_thousand_results_before_the_input_broke(backend, ordered):
    got = []
    with pytest.raises(faults.InputBroke, match="after 1000 items"):
        for value in imap(
            faults.square, faults.breaks_after(1000), ordered=ordered, **backend.kwargs
        ):
            got.append(value)
    assert (got if ordered else sorted(got)) == [x * x for x in range(1000)]


def test_pmap_raises_the_inputs_exception_after_running_what_came_before(backend):
    with pytest.raises(faults.InputBroke, match="after 1000 items"):
        pmap(faults.square, faults.breaks_after(1000), **backend.kwargs)


def test_a_function_error_before_the_broken_input_wins(backend):
    for call in (pmap, lambda *a, **k: list(imap(*a, **k))):
        with pytest.raises(faults.Boom):
            call(
                faults.CrashOn(5, "raise"), faults.breaks_after(1000), chunksize=1, **backend.kwargs
            )


# =========================================================================== case 6: module globals
STICKY_PROCESS_BACKENDS = [
    name
    for name in available_backends()
    if get_backend(name).processes and get_backend(name).sticky
]
IN_MEMORY_BACKENDS = [name for name in available_backends() if not get_backend(name).processes]


@pytest.fixture
def offset(monkeypatch):
    monkeypatch.setattr(faults, "OFFSET", 0)
    pickmap.shutdown()  # no worker from another test with another OFFSET
    yield
    pickmap.shutdown()  # no worker keeps this test's OFFSET either


@pytest.mark.parametrize("name", STICKY_PROCESS_BACKENDS)
def test_warm_fork_workers_keep_the_module_state_they_were_forked_with(name, offset):
    kw = {"backend": name, "start_method": "fork", "workers": 2, "chunksize": 1}
    assert pmap(faults.add_offset, [1, 2], **kw) == [1, 2]
    faults.set_offset(5)
    assert pmap(faults.add_offset, [1, 2], **kw) == [1, 2]  # documented: warm workers do not see it
    pickmap.shutdown()
    assert pmap(faults.add_offset, [1, 2], **kw) == [
        6,
        7,
    ]  # fresh forks copy the process as it is now


@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
@pytest.mark.parametrize("name", STICKY_PROCESS_BACKENDS)
def test_spawned_workers_see_the_module_as_imported_not_as_changed(name, method, offset):
    faults.set_offset(5)
    kw = {"backend": name, "start_method": method, "workers": 2, "chunksize": 1}
    assert pmap(faults.add_offset, [1, 2], **kw) == [1, 2]  # documented: a fresh import, OFFSET = 0


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("name", STICKY_PROCESS_BACKENDS)
def test_passing_the_value_is_the_remedy_for_changed_module_state(name, method, offset):
    kw = {"backend": name, "start_method": method, "workers": 2, "chunksize": 1}
    pmap(faults.add_offset, [1, 2], **kw)  # warm workers
    faults.set_offset(5)
    assert pmap(functools.partial(faults.add, 5), [1, 2], **kw) == [6, 7]
    assert pmap(faults.add_offset, [1, 2], initializer=faults.set_offset, initargs=(5,), **kw) == [
        6,
        7,
    ]


@pytest.mark.parametrize("name", IN_MEMORY_BACKENDS)
def test_thread_and_serial_workers_see_module_state_as_it_is_now(name, offset):
    assert pmap(faults.add_offset, [1, 2], backend=name, workers=2) == [1, 2]
    faults.set_offset(5)
    assert pmap(faults.add_offset, [1, 2], backend=name, workers=2) == [6, 7]
