"""Property: pmap(f, xs) == list(map(f, xs)) on every backend, for any input and chunking."""

from __future__ import annotations

import pytest
import zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pickmap import imap, pmap

pytestmark = pytest.mark.timeout(120)

values = st.lists(st.integers(min_value=-(10**6), max_value=10**6), max_size=60)
chunk = st.none() | st.integers(min_value=1, max_value=20)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(xs=values, chunksize=chunk)
def test_pmap_equals_map(backend, xs, chunksize):
    assert pmap(zoo.square, xs, chunksize=chunksize, **backend.kwargs) == list(map(zoo.square, xs))


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(xs=values, ys=values)
def test_two_iterables_equal_map(backend, xs, ys):
    assert pmap(zoo.add, xs, ys, **backend.kwargs) == list(map(zoo.add, xs, ys))


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(xs=values, chunksize=chunk)
def test_unordered_imap_is_a_permutation(backend, xs, chunksize):
    got = list(imap(zoo.square, iter(xs), ordered=False, chunksize=chunksize, **backend.kwargs))
    assert sorted(got) == sorted(map(zoo.square, xs))
