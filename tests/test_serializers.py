"""Serializers: protocol-5 out-of-band buffers on every rung, the zero-copy
trial load, the private dispatch table, and the by-reference trap."""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

import pickmap
from pickmap.probe import choose, try_backend
from pickmap.serializers import (
    OOB_MIN_BYTES,
    Pickled,
    copies_locks,
    get_serializer,
    main_references,
)

np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

SERIALIZERS = ("stdlib", "cloudpickle", "dill")
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ELEMENTS = 200_000  # 1.6 MB of float64, well above OOB_MIN_BYTES


def _c_array() -> Any:
    return np.arange(ELEMENTS, dtype=np.float64)


def _f_array() -> Any:
    array = np.asfortranarray(np.arange(ELEMENTS, dtype=np.float64).reshape(400, 500))
    assert array.flags.f_contiguous and not array.flags.c_contiguous
    return array


def _frame() -> Any:
    return pd.DataFrame(
        {"x": np.arange(ELEMENTS, dtype=np.float64), "n": np.arange(ELEMENTS, dtype=np.int64)}
    )


def _large_bytes() -> bytes:
    return bytes(range(256)) * (ELEMENTS // 256)


def _large_bytearray() -> bytearray:
    return bytearray(_large_bytes())


KINDS: dict[str, Callable[[], Any]] = {
    "c-array": _c_array,
    "f-array": _f_array,
    "dataframe": _frame,
    "bytes": _large_bytes,
    "bytearray": _large_bytearray,
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            type(b) is np.ndarray
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b)
    return type(a) is type(b) and a == b


def _memory_of(obj: Any) -> list[Any]:
    """The numpy arrays whose memory ``obj``'s data lives in."""
    if isinstance(obj, pd.DataFrame):
        return [obj[column].to_numpy() for column in obj.columns]
    return [obj]


class Model:
    """A method's ``self`` that carries its data in arrays."""

    def __init__(self, elements: int = ELEMENTS) -> None:
        self.weights = np.linspace(0.0, 1.0, elements)
        self.bias = np.ones(elements // 2)

    def predict(self, index: int) -> float:
        return float(self.weights[index] + self.bias[index])

    def can_write_weights(self, _: int) -> bool:
        return bool(self.weights.flags.writeable)


def run_python(code: str, cwd: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done.stdout


# --------------------------------------------------------------------------- out of band
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SERIALIZERS)
def test_a_large_buffer_travels_out_of_band_and_loads_equal(name: str, kind: str) -> None:
    serializer = get_serializer(name)
    obj = KINDS[kind]()
    pickled = serializer.dump(obj)
    assert pickled.buffers, "nothing went out of band"
    assert len(pickled.data) < OOB_MIN_BYTES  # the stream holds opcodes, not the data
    assert all(b.ndim == 1 and b.format == "B" and b.contiguous for b in pickled.buffers)
    assert pickled.nbytes == len(pickled.data) + sum(b.nbytes for b in pickled.buffers)
    assert _equal(obj, serializer.load(pickled))
    # A worker gets fresh buffers (a mapping, a received frame), never the caller's objects.
    fresh = Pickled(pickled.data, tuple(memoryview(bytearray(b)) for b in pickled.buffers))
    assert _equal(obj, serializer.load(fresh))


@pytest.mark.parametrize("kind", ["c-array", "f-array", "dataframe"])
@pytest.mark.parametrize("name", SERIALIZERS)
def test_out_of_band_buffers_are_views_of_the_original_memory(name: str, kind: str) -> None:
    obj = KINDS[kind]()
    pickled = get_serializer(name).dump(obj)
    for array in _memory_of(obj):
        views = [np.frombuffer(b, dtype=np.uint8) for b in pickled.buffers]
        assert any(np.shares_memory(view, array) for view in views)


@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
@pytest.mark.parametrize("name", SERIALIZERS)
def test_large_bytes_are_carried_as_a_view_of_the_object_itself(name: str, kind: str) -> None:
    obj = KINDS[kind]()
    pickled = get_serializer(name).dump({"payload": obj})
    assert [b.obj for b in pickled.buffers] == [obj] and pickled.buffers[0].obj is obj


@pytest.mark.parametrize("name", SERIALIZERS)
def test_small_buffers_stay_in_band(name: str) -> None:
    serializer = get_serializer(name)
    small = (np.arange(1000.0), b"b" * 1000, bytearray(1000))
    pickled = serializer.dump(small)
    assert pickled.buffers == ()
    loaded = serializer.load(pickled)
    assert all(_equal(a, b) for a, b in zip(small, loaded, strict=False))


@pytest.mark.parametrize("name", SERIALIZERS)
def test_non_contiguous_arrays_round_trip_unchanged(name: str) -> None:
    serializer = get_serializer(name)
    base = np.arange(4 * ELEMENTS, dtype=np.float64).reshape(800, -1)
    views = (base[::2], base[:, ::3], base.T[::2])
    assert not any(v.flags.c_contiguous or v.flags.f_contiguous for v in views)
    pickled = serializer.dump(views)
    for original, loaded in zip(views, serializer.load(pickled), strict=False):
        assert _equal(original, loaded)
    for original, trial in zip(views, serializer.trial_load(pickled), strict=False):
        assert _equal(original, trial)
        # numpy copied it to pickle it: never a view of the wrong bytes
        assert not np.shares_memory(trial, base)


@pytest.mark.parametrize("name", SERIALIZERS)
def test_an_object_referenced_twice_keeps_its_identity_out_of_band(name: str) -> None:
    array = _c_array()
    first, second = get_serializer(name).load(get_serializer(name).dump([array, array]))
    assert first is second and _equal(array, first)


def test_the_identity_serializer_passes_the_object_itself() -> None:
    serializer = get_serializer("identity")
    obj = _c_array()
    assert (
        serializer.dump(obj) is obj
        and serializer.load(obj) is obj
        and serializer.trial_load(obj) is obj
    )


# --------------------------------------------------------------------------- zero-copy trial
@pytest.mark.parametrize("kind", ["c-array", "f-array", "dataframe"])
@pytest.mark.parametrize("name", SERIALIZERS)
def test_the_trial_load_reuses_the_dumped_memory_read_only(name: str, kind: str) -> None:
    obj = KINDS[kind]()
    serializer = get_serializer(name)
    trial = serializer.trial_load(serializer.dump(obj))
    assert _equal(obj, trial)
    for original, loaded in zip(_memory_of(obj), _memory_of(trial), strict=False):
        assert np.shares_memory(original, loaded)
    # probing cannot write into the caller's arrays
    assert not any(a.flags.writeable for a in _memory_of(trial))
    if not isinstance(obj, pd.DataFrame):  # pandas decides its own arrays' flags
        assert obj.flags.writeable


@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
@pytest.mark.parametrize("name", SERIALIZERS)
def test_the_trial_load_of_large_bytes_is_the_original_object(name: str, kind: str) -> None:
    obj = KINDS[kind]()
    serializer = get_serializer(name)
    assert serializer.trial_load(serializer.dump([obj]))[0] is obj


@pytest.mark.parametrize("name", SERIALIZERS)
def test_a_real_load_of_bytearray_never_aliases_the_buffer_it_was_given(name: str) -> None:
    serializer = get_serializer(name)
    pickled = serializer.dump([_large_bytearray()])
    received = bytearray(pickled.buffers[0])
    loaded = serializer.load(Pickled(pickled.data, (memoryview(received),)))[0]
    assert loaded == received and loaded is not received


def test_probing_a_method_of_an_object_holding_300_mb_copies_none_of_it(tmp_path: Any) -> None:
    (tmp_path / "holder.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            class Holder:
                def __init__(self, nbytes):
                    self.weights = np.ones(nbytes // 8)
                    self.blob = b"z" * (nbytes // 4)

                def predict(self, x):
                    return float(self.weights[x]) + len(self.blob)
            """
        )
    )
    out = run_python(
        """
        import holder, pickmap

        def peak_mb():
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) // 1024 for l in status if l.startswith("VmHWM"))

        h = holder.Holder(300 << 20)
        before = peak_mb()
        plan = pickmap.explain(h.predict, [1])
        print(plan.backend, all(v.ok for v in plan.verdicts), peak_mb() - before)
        """,
        cwd=str(tmp_path),
    )
    backend, all_ok, growth_mb = out.split()
    assert (backend, all_ok) == ("stdlib", "True")
    assert int(growth_mb) < 100, f"probing grew the caller's peak memory by {growth_mb} MB"


# --------------------------------------------------------------------------- the probe picks stdlib
def test_the_probe_picks_stdlib_for_a_numpy_ufunc() -> None:
    assert choose(np.sqrt, [4.0], use_cache=False)[0] == "stdlib"


def test_the_probe_picks_stdlib_for_a_bound_method_of_an_object_holding_arrays() -> None:
    model = Model()
    name, pickled, _, verdicts = choose(model.predict, [3], use_cache=False)
    assert name == "stdlib" and verdicts[0].ok
    assert pickled.nbytes - len(pickled.data) == model.weights.nbytes + model.bias.nbytes
    assert "out of band" in verdicts[0].reason


def test_a_numpy_verdict_is_ok_where_a_picklebuffer_used_to_break_the_trial() -> None:
    out = run_python(
        """
        import numpy as np, pickmap
        a = np.ones(10000)
        print(pickmap.explain(a.sum, [1]).verdicts[0])
        """
    )
    assert out.startswith("stdlib: round trip ok")


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_callable_holding_arrays_runs_in_fresh_workers_on_read_only_shared_arrays(
    start_method: str,
) -> None:
    model = Model()
    indices = [0, 17, ELEMENTS // 2 - 1]
    kwargs: dict[str, Any] = {"backend": "stdlib", "start_method": start_method, "workers": 2}
    assert pickmap.pmap(model.predict, indices, **kwargs) == list(map(model.predict, indices))
    # The callable's arrays are views of one shared copy (docs/explanation/failures.md: read-only in workers).
    assert pickmap.pmap(model.can_write_weights, [0, 1], **kwargs) == [False, False]


# --------------------------------------------------------------------------- issue 9, case 1: the dispatch table
class _NeedsARegisteredReducer:
    """Pickles only through a copyreg registration (its own reduce refuses)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("register a reducer with copyreg")


def _rebuild_needs_a_reducer(value: int) -> _NeedsARegisteredReducer:
    return _NeedsARegisteredReducer(value)


def test_copyreg_registrations_made_after_import_are_seen_by_the_stdlib_pickler() -> None:
    serializer = get_serializer("stdlib")
    with pytest.raises(TypeError):
        serializer.dump(_NeedsARegisteredReducer(1))
    copyreg.pickle(_NeedsARegisteredReducer, lambda obj: (_rebuild_needs_a_reducer, (obj.value,)))
    try:
        assert serializer.load(serializer.dump(_NeedsARegisteredReducer(7))).value == 7
        # plain pickle reads it
        assert pickle.loads(serializer.dump(_NeedsARegisteredReducer(8)).data).value == 8
    finally:
        del copyreg.dispatch_table[_NeedsARegisteredReducer]


class _HasAPrivateMethod:
    def __double(self, x: int) -> int:
        return 2 * x


def test_pickling_never_changes_the_global_copyreg_table() -> None:
    before = dict(copyreg.dispatch_table)
    model = Model(1000)
    for name in SERIALIZERS:
        serializer = get_serializer(name)
        serializer.load(serializer.dump(model.predict))
    assert copyreg.dispatch_table == before
    assert types.MethodType not in copyreg.dispatch_table
    # Our bound-method reducer stays private: plain pickle still names a private
    # method by its unmangled name, which does not load.
    private = _HasAPrivateMethod()._HasAPrivateMethod__double  # type: ignore[attr-defined]
    assert get_serializer("stdlib").load(get_serializer("stdlib").dump(private))(2) == 4
    with pytest.raises(AttributeError):
        pickle.loads(pickle.dumps(private))


def test_a_ufunc_is_carried_by_stdlib_when_numpy_is_imported_after_pickmap() -> None:
    out = run_python(
        """
        import pickmap, numpy
        print(pickmap.explain(numpy.sqrt, [4.0]).backend)
        print(pickmap.pmap(numpy.sqrt, [4.0, 9.0], backend="stdlib", start_method="spawn"))
        """
    )
    assert out.split("\n")[:2] == ["stdlib", "[np.float64(2.0), np.float64(3.0)]"]


# --------------------------------------------------------------------------- issue 9, case 2: __main__ itself
def test_a_reference_to_the_main_module_falls_to_a_backend_that_carries_it() -> None:
    out = run_python(
        """
        import __main__ as m, pickmap
        C = 5
        f = lambda x: x + m.C
        plan = pickmap.explain(f, [1])
        print(plan.backend)
        print(plan.verdict("cloudpickle").reason)
        print(plan.verdict("dill").ok)
        print(pickmap.pmap(f, [1], start_method="spawn"), list(map(f, [1])))
        """
    )
    backend, cloudpickle_reason, dill_ok, results = out.strip().split("\n")
    assert backend == "thread"
    assert "imports the __main__ module itself" in cloudpickle_reason
    assert dill_ok == "False"  # dill carries __main__ by importing it in the worker: refused too
    assert results == "[6] [6]"


def test_a_main_lambda_that_does_not_touch_the_module_still_goes_by_value() -> None:
    out = run_python(
        """
        import pickmap
        C = 5
        f = lambda x: x + C
        print(pickmap.explain(f, [1]).backend, pickmap.pmap(f, [1, 2], start_method="spawn"))
        """
    )
    assert out.strip() == "cloudpickle [6, 7]"


class _ImportsMain:
    def __reduce__(self) -> Any:
        import importlib

        return importlib.import_module, ("__main__",)


def test_main_references_finds_an_import_of_the_main_module() -> None:
    data = get_serializer("stdlib").dump(_ImportsMain()).data
    assert main_references(data) == ["__main__"]


def test_main_references_ignores_main_as_plain_data() -> None:
    data = pickle.dumps({"__module__": "__main__", "__name__": "__mp_main__"}, protocol=5)
    assert main_references(data) == []


def test_main_references_finds_a_main_global_by_name() -> None:
    data = pickle.dumps(("__main__", "f"), protocol=5) + b""  # as data: nothing
    assert main_references(data) == []
    by_name = b"\x80\x04\x8c\x08__main__\x94\x8c\x01f\x94\x93\x94."  # STACK_GLOBAL __main__ f
    assert main_references(by_name) == ["__main__.f"]


def test_a_trap_found_once_is_found_again_from_the_remembered_scan(monkeypatch) -> None:
    from pickmap import probe

    by_name = b"\x80\x04\x8c\x08__main__\x94\x8c\x01f\x94\x93\x94."  # STACK_GLOBAL __main__ f
    walks: list[bytes] = []

    def counting(data: bytes) -> list[str]:
        walks.append(data)
        return main_references(data)

    monkeypatch.setattr(probe, "main_references", counting)
    monkeypatch.setattr(probe, "_SCANNED", {})
    first = probe._trap(by_name, "the callable")
    again = probe._trap(bytes(by_name), "the callable")  # an equal stream, a new object
    assert first == again and first is not None and "__main__.f" in first
    assert walks == [by_name]  # the second call read the remembered result
    assert probe._trap(b"\x80\x04K\x01.", "the callable") is None  # plain data: no trap


def test_the_by_reference_checks_read_only_the_stream_not_the_buffers() -> None:
    raw = (b"__main__ _create_lock \x8c\x08__main__\x93" * (OOB_MIN_BYTES // 16))[
        : 4 * OOB_MIN_BYTES
    ]
    for name in SERIALIZERS:
        pickled = get_serializer(name).dump(raw)
        assert pickled.buffers and b"__main__" not in pickled.data
        assert main_references(pickled.data) == [] and not copies_locks(pickled.data)
        verdict, _, _ = try_backend(name, Model(1000).predict, [raw])
        assert verdict.ok, verdict


def test_copies_locks_still_finds_a_lock_dill_would_copy() -> None:
    data = get_serializer("dill").dump({"lock": threading.Lock()}).data
    assert copies_locks(data)


def test_pickled_streams_load_with_plain_pickle_when_nothing_is_out_of_band() -> None:
    pickled = get_serializer("stdlib").dump({"a": [1, 2, 3], "b": "text"})
    assert pickled.buffers == () and pickle.load(io.BytesIO(pickled.data)) == {
        "a": [1, 2, 3],
        "b": "text",
    }
