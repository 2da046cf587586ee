"""Every kind of callable users hit: what the probe picks, and that the result equals map()."""

from __future__ import annotations

import functools
import operator

import pytest
import zoo

from pickmap import explain, pmap

pytestmark = pytest.mark.timeout(60)

DATA = [1, 2, 3, 4]

# (label, callable factory, backend the probe must pick)
ZOO = [
    ("builtin function", lambda: abs, "stdlib"),
    ("module function", lambda: zoo.square, "stdlib"),
    ("bound method", lambda: zoo.Scaler(2).scale, "stdlib"),
    ("private bound method self.__f", lambda: zoo.Scaler(2).private(), "stdlib"),
    ("bound method via an alias", zoo.aliased_method, "stdlib"),
    ("MethodType(module function, obj)", zoo.rebound_method, "stdlib"),
    ("staticmethod", lambda: zoo.Scaler.static, "stdlib"),
    ("classmethod", lambda: zoo.Scaler.clsm, "stdlib"),
    ("callable instance", lambda: zoo.Scaler(2), "stdlib"),
    ("functools.partial", lambda: zoo.partial_pow, "stdlib"),
    ("operator.itemgetter-like", lambda: operator.neg, "stdlib"),
    ("builtin bound method", lambda: (10).__add__, "stdlib"),
    ("lambda", lambda: zoo.make_lambda(3), "cloudpickle"),
    ("closure", lambda: zoo.make_closure(5), "cloudpickle"),
    ("nested function", zoo.make_nested, "cloudpickle"),
    ("partial of a lambda", lambda: functools.partial(zoo.make_lambda(2)), "cloudpickle"),
    ("closure holding a lock", zoo.make_lock_closure, "thread"),
    ("closure holding a generator", zoo.make_generator_holder, "thread"),
]


@pytest.mark.parametrize("label, factory, expected", ZOO, ids=[z[0] for z in ZOO])
def test_probe_pick_and_result(label, factory, expected):
    func = factory()
    plan = explain(func, DATA)
    assert plan.backend == expected, str(plan)
    assert plan.source == "probe"
    assert pmap(func, DATA) == list(map(func, DATA))


def test_initializer_decides_too():
    from pickmap.probe import choose

    init = zoo.make_lambda(1)
    assert explain(zoo.square, DATA).backend == "stdlib"
    # A lambda initializer needs cloudpickle, so it moves the call down the ladder.
    assert choose(zoo.square, DATA[:1], (init, (1,)), use_cache=False)[0] == "cloudpickle"
    assert pmap(zoo.square, DATA, initializer=init, initargs=(1,)) == [1, 4, 9, 16]


def test_items_decide_too_lambdas_as_items_need_cloudpickle():
    items = [zoo.make_lambda(k) for k in range(3)]
    plan = explain(operator.methodcaller("__call__", 2), items)
    assert plan.backend == "cloudpickle", str(plan)
    assert pmap(operator.methodcaller("__call__", 2), items) == [0, 2, 4]


def test_plan_lists_a_one_line_reason_per_backend():
    plan = explain(zoo.make_lock_closure(), DATA)
    stdlib = plan.verdict("stdlib")
    assert stdlib is not None and not stdlib.ok
    cloud = plan.verdict("cloudpickle")
    assert cloud is not None and "cannot pickle '_thread.lock' object" in cloud.reason
    assert "\n" not in cloud.reason
    dill = plan.verdict("dill")
    assert dill is not None and not dill.ok and "threading lock" in dill.reason
    assert plan.backend == "thread"
    text = str(plan)
    assert "dill" in text and "->" in text


def test_plain_pickle_fails_where_pickmap_stdlib_works():
    """The bug pickmap exists for: plain pickle dumps self.__f but cannot load it."""
    import pickle

    method = zoo.Scaler(2).private()
    with pytest.raises(AttributeError, match="__private"):
        pickle.loads(pickle.dumps(method))
    assert pmap(method, [1], backend="stdlib") == [3]


def test_probe_never_mutates_the_callers_objects():
    import copyreg

    before = dict(copyreg.dispatch_table)
    original = zoo.Scaler.scale
    explain(zoo.Scaler(1).scale, DATA)
    explain(zoo.make_closure(1), DATA)
    assert dict(copyreg.dispatch_table) == before
    assert zoo.Scaler.scale is original


def test_a_later_item_holding_a_lock_is_refused_not_copied():
    import threading

    from pickmap import SerializationError

    held = threading.Lock()
    with pytest.raises(SerializationError) as caught:
        pmap(zoo.square, [1, held], backend="dill", chunksize=1)
    assert caught.value.index == 1 and "thread" in caught.value.capable


def test_an_initializer_does_not_pin_the_functions_verdict():
    pmap(zoo.add, [1], [2], initializer=zoo.make_lambda(1), initargs=(0,))
    assert explain(zoo.add, [1], [2]).backend == "stdlib"
    from pickmap.probe import choose

    assert choose(zoo.add, [(1, 2)])[0] == "stdlib"
