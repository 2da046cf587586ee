"""The run-time NamedTuple stand-in (_records.py) builds what typing.NamedTuple builds, and
``import pickmap`` and a first call load only what they need (issue 8: import cost)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from pickmap._protocol import CallSpec, Lost, Stop, Task
from pickmap._records import NamedTuple as NamedTupleAtRunTime


def python_c(code: str) -> str:
    """What ``python -c code`` prints in a fresh interpreter (stripped); it must exit 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_records_have_their_fields_in_order_with_their_defaults():
    assert Task._fields == ("call_id", "seq", "start", "items")
    assert Lost._field_defaults == {"exitcode": None}
    assert Lost(1, "gone") == (1, "gone", None)
    assert Stop() == ()
    assert isinstance(Task(1, 2, 3, None), tuple)


def test_records_keep_their_methods_docstrings_and_names_and_pickle_by_reference():
    spec = CallSpec(7, "123-abcd", "stdlib", False, False, False, True)
    assert spec.caller_pid == 123  # a property from the class body
    assert spec.inner_threads == 0 and spec.log_levels is None
    assert CallSpec.__doc__ == "What a worker must know about a call besides its callable."
    assert CallSpec.__module__ == "pickmap._protocol" and CallSpec.__qualname__ == "CallSpec"
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert b"pickmap._protocol" in pickle.dumps(spec)  # by reference, not by value


def test_a_record_behaves_as_the_namedtuple_with_the_same_fields_and_defaults():
    import collections
    import copy

    from pickmap._records import NamedTuple

    class Point(NamedTuple):
        x: int
        y: int = 0
        label: str = ""

    Plain = collections.namedtuple("Point", ["x", "y", "label"], defaults=[0, ""])
    ours, theirs = Point(1, label="a"), Plain(1, label="a")
    assert ours == theirs and hash(ours) == hash(theirs) and repr(ours) == repr(theirs)
    assert Point._fields == Plain._fields and Point._field_defaults == Plain._field_defaults
    assert Point.__match_args__ == Plain.__match_args__
    assert Point.__new__.__defaults__ == Plain.__new__.__defaults__
    assert ours._asdict() == theirs._asdict() and ours.y == 0 and ours[2] == "a"
    replaced = ours._replace(y=5)
    assert replaced == (1, 5, "a") and type(replaced) is Point
    assert type(Point._make([1, 2, 3])) is Point and copy.deepcopy(ours) == ours
    for build in (lambda: Point(), lambda: Point(1, 2, 3, 4), lambda: Point(1, z=2)):
        with pytest.raises(TypeError):
            build()
    with pytest.raises(TypeError, match="Expected 3 arguments, got 1"):
        Point._make([1])
    with pytest.raises(ValueError, match="unexpected field names"):
        ours._replace(z=1)
    with pytest.raises(AttributeError):
        ours.x = 2  # type: ignore[misc]
    assert not hasattr(ours, "__dict__")


class Outer:
    class Inner(NamedTupleAtRunTime):  # a record nested in a class pickles by its qualname
        a: int
        b: int = 2


class Empty(NamedTupleAtRunTime):
    pass


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_records_nested_in_a_class_or_without_fields_pickle_at_every_protocol(protocol):
    for record in (Outer.Inner(1), Empty(), Stop(), Task(1, 2, 3, b"x")):
        loaded = pickle.loads(pickle.dumps(record, protocol=protocol))
        assert loaded == record and type(loaded) is type(record)
    assert Outer.Inner.__qualname__ == "Outer.Inner" and repr(Empty()) == "Empty()"


@pytest.mark.skipif(sys.version_info < (3, 13), reason="copy.replace() is new in 3.13")
def test_copy_replace_changes_a_records_fields():
    import copy

    assert copy.replace(Outer.Inner(1), b=5) == (1, 5)  # type: ignore[attr-defined]


def test_a_field_name_starting_with_an_underscore_is_refused_as_namedtuple_does():
    from pickmap._records import NamedTuple

    with pytest.raises(ValueError, match="underscore"):

        class Bad(NamedTuple):
            _cls: int


def test_a_field_without_a_default_after_one_with_a_default_is_refused():
    from pickmap._records import NamedTuple

    with pytest.raises(TypeError, match="without a default"):

        class Bad(NamedTuple):
            a: int = 0
            b: int


def test_importing_pickmap_does_not_import_typing():
    # ~6 ms of a ~25 ms import (issue 8): annotations are strings, records come from _records.
    assert python_c("import sys, pickmap; print('typing' in sys.modules)") == "False"


def test_a_first_call_imports_neither_multiprocessing_connection_nor_tempfile_nor_socket():
    # socket.py: ~4 ms of a first fork call (enum, selectors); the worker pipes are _socket's.
    code = (
        "import sys, pickmap\n"
        "from pickmap import _shm\n"
        "assert pickmap.pmap(abs, [-1, -2], workers=2, backend='stdlib') == [1, 2]\n"
        "print(sorted({'multiprocessing.connection', 'tempfile', 'socket'} & set(sys.modules)))\n"
        "assert pickmap.explain(abs, [-1, -2], backend='stdlib').start_method == 'fork'\n"
        "guessed = _shm._temp_dir()  # where tempfile would put its files, without importing it\n"
        "import tempfile\n"
        "print(guessed == tempfile.gettempdir())\n"
    )
    assert python_c(code).split() == ["[]", "True"]


def test_what_a_fork_server_imports_before_its_first_fork_leaves_out_pickle_socket_and_signal():
    # The server's boot is a threaded caller's first-call latency (issue 8: threads row):
    # pickle.py, socket.py and signal.py would add ~5 ms with re, enum and selectors.
    code = (
        "import sys\n"
        "from pickmap import _fork, _settings, _worker\n"
        "_settings.supported_start_methods()  # the caller's check before it starts the server\n"
        "print(sorted({'pickle', 'socket', 'signal', 'enum', 're', 'typing'} & set(sys.modules)))\n"
    )
    assert python_c(code) == "[]"


def test_threads_that_first_touch_worker_crashed_error_at_once_all_get_one_class():
    code = (
        "import threading, pickle, pickmap\n"
        "barrier, seen = threading.Barrier(8), []\n"
        "def touch():\n"
        "    barrier.wait()\n"
        "    seen.append(pickmap.WorkerCrashedError)\n"
        "threads = [threading.Thread(target=touch) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "error = seen[0]('gone', exitcode=-9, indices=[1])\n"
        "assert isinstance(error, pickmap.WorkerCrashedError)\n"
        "pickle.loads(pickle.dumps(error))\n"
        "print(len({id(c) for c in seen}))\n"
    )
    assert python_c(code) == "1"


def test_dir_of_the_package_lists_the_names_imported_on_first_use():
    import pickmap

    listed = dir(pickmap)
    assert {"pmap", "imap", "explain", "Executor", "WorkerCrashedError", "shutdown"} <= set(listed)
    assert set(pickmap.__all__) <= set(listed)
