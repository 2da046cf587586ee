"""Callables and helpers for the tests, in an importable module so that
spawn/forkserver workers can load them by reference."""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy


def square(x):
    return x * x


def add(x, y):
    return x + y


def fail_on(bad, x):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def pid_and_square(x):
    return os.getpid(), x * x


def pid_of(_):
    return os.getpid()


def sleep_then(seconds, x):
    time.sleep(seconds)
    return x


class Scaler:
    def __init__(self, k=3):
        self.k = k

    def scale(self, x):
        return x * self.k

    def __private(self, x):
        return x + self.k

    def private(self):
        return self.__private

    @staticmethod
    def static(x):
        return x - 1

    @classmethod
    def clsm(cls, x):
        return (cls.__name__, x)

    def __call__(self, x):
        return x * 10


def _outside(self, x):
    return x * 100 + self.k


def rebound_method(k=3):
    """A bound method whose function is not an attribute of the class."""
    import types

    return types.MethodType(_outside, Scaler(k))


def aliased_method():
    """A bound method reachable only under another name."""
    obj = Aliased()
    return obj.renamed


class Aliased:
    def original(self, x):
        return -x

    renamed = original
    del original


def make_closure(k):
    def closure(x):
        return x + k

    return closure


def make_lambda(k):
    return lambda x: x * k


def make_nested():
    def outer(x):
        def inner(y):
            return y * 2

        return inner(x) + 1

    return outer


def make_lock_closure():
    lock = threading.Lock()

    def locked(x):
        with lock:
            return x + 1

    return locked


def make_generator_holder():
    gen = (i for i in range(3))

    def uses_generator(x):
        return (gen is not None, x)

    return uses_generator


partial_pow = functools.partial(pow, 2)


# --- initializer support: the state it sets must not leak into later calls
_INITIALIZED = []


def initialize(tag):
    _INITIALIZED.append(tag)


def initialized_tags(_):
    return list(_INITIALIZED)


def nested_pmap(x):
    import pickmap

    return sum(pickmap.pmap(square, range(x)))


# Counts how often the callable is unpickled in a worker.
class CountsLoads:
    loads_in_this_process = 0

    def __init__(self, payload=b""):
        self.payload = payload

    def __reduce__(self):
        return (_rebuild_counted, (self.payload,))

    def __call__(self, x):
        return (os.getpid(), CountsLoads.loads_in_this_process)


def _rebuild_counted(payload):
    CountsLoads.loads_in_this_process += 1
    return CountsLoads(payload)


class Big:
    """Holds a buffer large enough for shared memory."""

    def __init__(self, size=3 * 2**20):
        self.data = numpy.frombuffer(os.urandom(size), dtype=numpy.uint8).copy()
        self.offset = 0

    def size_plus(self, x):
        return len(self.data) + x

    def first_byte_plus_offset(self, x):
        return int(self.data[0]) + self.offset + x

    def fail(self, x):
        raise ValueError(x)


class NeedsContext(Exception):
    """Cannot be rebuilt by unpickling: __init__ wants two arguments, passes one."""

    def __init__(self, message, context):
        super().__init__(message)
        self.context = context


def raise_unpicklable_exception(x):
    raise NeedsContext(f"item {x}", context={"x": x})


def interrupt_on(bad, x):
    if x == bad:
        raise KeyboardInterrupt
    return x


def filled_array(x):
    """A 6 MB float64 array of ``x``: a result large enough to travel through shared memory."""
    return numpy.full(6 << 17, float(x))
