"""What the probe's ladder costs: stdlib -> cloudpickle -> dill.

The probe makes a real round trip (``dumps`` then the trial ``loads``) with
each rung's serializer until one works, and the winner's bytes are what the
workers receive. So the ladder order should put the cheapest serializer first
and fall back to the costlier ones only when needed: these benchmarks show
the cost of each rung on small and on large payloads, and the cost of the
probe itself, cold and with a cached verdict.
"""

from __future__ import annotations

import functools
import pickle

import cloudpickle
import dill
import pytest
from workloads import BigHolder, make_closure, square

from pickmap.probe import choose, try_backend

pytestmark = pytest.mark.timeout(900)

SERIALIZERS = ("stdlib", "cloudpickle", "dill")
SMALL_TUPLE = (1, 2.5, "abc", None, (3, 4), b"xy")
INTS_100K = list(range(100_000))

# The plain libraries, as the probe's rungs use them (protocol 5; dill with
# recurse=True as pickmap's dill backend does).
_LIBRARY = {
    "stdlib": (lambda obj: pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), pickle.loads),
    "cloudpickle": (lambda obj: cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL), pickle.loads),
    "dill": (lambda obj: dill.dumps(obj, pickle.HIGHEST_PROTOCOL, recurse=True), dill.loads),
}


def _library_round_trip(name: str, obj: object) -> object:
    dumps, loads = _LIBRARY[name]
    return loads(dumps(obj))


def _probe_rung(name: str, obj: object) -> object:
    """One rung of pickmap's ladder: dumps, trial loads and the __main__ check."""
    verdict = try_backend(name, obj, [])[
        0
    ]  # (verdict, payload, ...): index, the tail has grown before
    assert verdict.ok, verdict
    return obj


# "library": the plain serializer's dumps + loads; "probe": the same rung as
# pickmap's probe runs it (its own pickler subclass, trial loads, __main__ scan).
VIA = {"library": _library_round_trip, "probe": _probe_rung}
ROUNDS_FOR_BIG = {"rounds": 5, "warmup_rounds": 1}


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_small_function(benchmark, serializer: str, via: str) -> None:
    benchmark.group = "round trip: module-level function"
    assert benchmark(VIA[via], serializer, square)(3) == 9


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_small_tuple(benchmark, serializer: str, via: str) -> None:
    benchmark.group = "round trip: small tuple"
    assert benchmark(VIA[via], serializer, SMALL_TUPLE) == SMALL_TUPLE


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_big_object_50mb(benchmark, serializer: str, via: str, big_holder: BigHolder) -> None:
    benchmark.group = "round trip: object holding 50 MB of bytes"
    copy = benchmark.pedantic(VIA[via], args=(serializer, big_holder), **ROUNDS_FOR_BIG)
    assert len(copy.data) == len(big_holder.data)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_bound_method_50mb(benchmark, serializer: str, via: str, big_holder: BigHolder) -> None:
    benchmark.group = "round trip: bound method of an object holding 50 MB"
    copy = benchmark.pedantic(VIA[via], args=(serializer, big_holder.method), **ROUNDS_FOR_BIG)
    assert copy(1) == big_holder.method(1)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_list_100k_ints(benchmark, serializer: str, via: str) -> None:
    benchmark.group = "round trip: list of 100k small ints"
    assert benchmark(VIA[via], serializer, INTS_100K) == INTS_100K


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("serializer", ("cloudpickle", "dill"))
def test_closure(benchmark, serializer: str, via: str) -> None:
    benchmark.group = "round trip: lambda closure (stdlib cannot)"
    assert benchmark(VIA[via], serializer, make_closure(3))(2) == 6


# --------------------------------------------------------------------------- the probe itself
def test_probe_cold_module_function(benchmark) -> None:
    """A fresh object every round, so the verdict cache never helps: stdlib wins on the first rung."""
    benchmark.group = "probe: choose()"
    setup = lambda: ((functools.partial(square), [1]), {})  # noqa: E731
    name = benchmark.pedantic(choose, setup=setup, rounds=200, warmup_rounds=5)[0]
    assert name == "stdlib"


def test_probe_cold_closure(benchmark) -> None:
    """A fresh closure every round: stdlib fails, cloudpickle wins on the second rung."""
    benchmark.group = "probe: choose()"
    setup = lambda: ((make_closure(3), [1]), {})  # noqa: E731
    name = benchmark.pedantic(choose, setup=setup, rounds=200, warmup_rounds=5)[0]
    assert name == "cloudpickle"


def test_probe_cached_module_function(benchmark) -> None:
    """choose() twice on the same function: the second call reuses the verdict (microseconds)."""
    benchmark.group = "probe: choose()"
    first = choose(square, [1])
    again = benchmark(choose, square, [1])
    # choose() -> (backend, callable payload, ..., verdicts): one verdict means the cache answered
    assert again[0] == first[0] == "stdlib" and len(again[-1]) == 1


def test_probe_cached_closure(benchmark) -> None:
    benchmark.group = "probe: choose()"
    closure = make_closure(3)
    first = choose(closure, [1])
    again = benchmark(choose, closure, [1])
    assert again[0] == first[0] == "cloudpickle" and len(again[-1]) == 1


def test_probe_cached_bound_method_50mb(benchmark, big_holder: BigHolder) -> None:
    """Cached, but the call still needs the callable's bytes: one 50 MB dumps, no trial loads."""
    benchmark.group = "probe: choose(), 50 MB bound method"
    choose(big_holder.method, [1])
    chosen = benchmark.pedantic(choose, args=(big_holder.method, [1]), rounds=5, warmup_rounds=1)
    assert chosen[0] == "stdlib" and _size(chosen[1]) > 50 * 2**20


def test_probe_cold_bound_method_50mb(benchmark) -> None:
    """Cold: a fresh 50 MB object each round, so dumps + trial loads + the __main__ scan."""
    benchmark.group = "probe: choose(), 50 MB bound method"
    setup = lambda: ((BigHolder().method, [1]), {})  # noqa: E731
    chosen = benchmark.pedantic(choose, setup=setup, rounds=5)
    assert chosen[0] == "stdlib" and _size(chosen[1]) > 50 * 2**20


def _size(payload: object) -> int:
    """Bytes in a probe payload: a ``Pickled`` (its stream and out-of-band buffers), bytes, or parts."""
    nbytes = getattr(payload, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return len(payload) if isinstance(payload, (bytes, bytearray)) else sum(map(len, payload))
