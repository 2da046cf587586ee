"""``pickmap.Executor`` against the ``concurrent.futures.Executor`` contract.

Written after the shape of CPython's ``test_concurrent_futures`` executor,
map, wait and shutdown tests, run on a process backend chosen by the probe,
on cloudpickle, on threads and serially; then what only pickmap adds:
callables ``ProcessPoolExecutor`` cannot send, crashes, unpicklable
exceptions, and interpreter exit.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, CancelledError, wait
from typing import Any

import faults
import pytest

import pickmap
from pickmap.executor import Executor

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
TESTS = os.path.dirname(os.path.abspath(__file__))

# "probe": the default (the probe picks stdlib processes for these module-level functions).
BACKENDS = ("probe", "cloudpickle", "thread", "serial")


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def divide(a: float, b: float) -> float:
    return a / b


def sleep_and_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def pid_of(_: Any = None) -> int:
    return os.getpid()


def die(kind: str) -> None:
    faults.fault(kind, "inside an Executor task")  # refuses to kill anything but a pickmap worker


def signal_then_wait(started: threading.Event, release: threading.Event) -> bool:
    started.set()
    return release.wait(30)


def record(
    log: list[str],
    name: str,
    started: threading.Event | None = None,
    release: threading.Event | None = None,
) -> None:
    log.append(name)
    if started is not None and release is not None:
        started.set()
        release.wait(30)


def make_lock(_: Any = None) -> threading.Lock:
    return threading.Lock()


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled: ``__init__`` wants two arguments and gets one."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def raise_locked(message: str) -> None:
    raise LockedError(message)


def raise_two_argument(code: int) -> None:
    raise TwoArgumentError(code, "detail")


_initialized: list[Any] = []


def remember(value: Any) -> None:
    _initialized.append(value)


def initialized(_: Any = None) -> list[Any]:
    return list(_initialized)


def make_executor(name: str, **kwargs: Any) -> Executor:
    kwargs.setdefault("workers", 2)
    return Executor(backend=None if name == "probe" else name, **kwargs)


@pytest.fixture(params=BACKENDS)
def executor(request: pytest.FixtureRequest) -> Iterator[Executor]:
    executor = make_executor(request.param)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def thread_executor() -> Iterator[Executor]:
    executor = Executor(backend="thread", workers=2)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- submit
def test_it_is_a_concurrent_futures_executor() -> None:
    assert issubclass(Executor, concurrent.futures.Executor)


def test_submit_returns_a_future_with_the_result(executor: Executor) -> None:
    future = executor.submit(pow, 2, 8)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=30) == 256


def test_submit_passes_positional_and_keyword_arguments(executor: Executor) -> None:
    future = executor.submit(capture, 1, 2, fn=3, self=4)
    assert future.result(timeout=30) == ((1, 2), {"fn": 3, "self": 4})


def test_each_of_many_submissions_gets_its_own_result(executor: Executor) -> None:
    futures = [executor.submit(mul, i, 10) for i in range(50)]
    assert [f.result(timeout=30) for f in futures] == [i * 10 for i in range(50)]


def test_submissions_of_different_callables_interleaved_get_their_own_results(
    executor: Executor,
) -> None:
    futures = [executor.submit(mul if i % 2 else capture, i, 3) for i in range(20)]
    expected = [i * 3 if i % 2 else ((i, 3), {}) for i in range(20)]
    assert [f.result(timeout=30) for f in futures] == expected


def test_an_exception_from_fn_is_the_futures_exception_and_others_are_unaffected(
    executor: Executor,
) -> None:
    good_before = executor.submit(divide, 1, 1)
    bad = executor.submit(divide, 1, 0)
    good_after = executor.submit(divide, 4, 2)
    assert isinstance(bad.exception(timeout=30), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        bad.result()
    assert (good_before.result(timeout=30), good_after.result(timeout=30)) == (1.0, 2.0)


def test_an_exception_from_a_worker_process_carries_the_workers_traceback() -> None:
    with Executor(backend="stdlib", workers=1) as executor:
        error = executor.submit(divide, 1, 0).exception(timeout=30)
    assert isinstance(error, ZeroDivisionError)
    assert isinstance(error.__cause__, pickmap.RemoteTraceback)
    assert "in divide" in error.__cause__.tb and "return a / b" in error.__cause__.tb
    assert any("divide" in note for note in error.__notes__)


def test_an_exception_from_a_thread_is_the_very_object_raised(thread_executor: Executor) -> None:
    error = thread_executor.submit(raise_locked, "kept").exception(timeout=30)
    assert isinstance(error, LockedError) and str(error) == "kept"
    assert error.__traceback__ is not None and error.__cause__ is None


def test_a_base_exception_from_fn_reaches_its_future(executor: Executor) -> None:
    assert isinstance(executor.submit(sys.exit, 3).exception(timeout=30), SystemExit)
    assert executor.submit(mul, 2, 2).result(timeout=30) == 4


def test_as_completed_yields_a_quick_task_before_a_slow_one_submitted_earlier(
    thread_executor: Executor,
) -> None:
    release = threading.Event()
    slow = thread_executor.submit(release.wait, 30)
    quick = thread_executor.submit(release.wait, 0)  # same callable: both in one pickmap call
    try:
        done, not_done = wait([slow, quick], timeout=30, return_when=FIRST_COMPLETED)
        assert done == {quick} and not_done == {slow}
    finally:
        release.set()
    assert slow.result(timeout=30) is True


def test_a_queued_future_can_be_cancelled_and_never_runs(thread_executor: Executor) -> None:
    release = threading.Event()
    ran: list[int] = []
    blocker = thread_executor.submit(release.wait, 30)
    # A different callable waits for the blocker's group to end, so it is still queued.
    queued = thread_executor.submit(ran.append, 1)
    try:
        assert queued.cancel()
    finally:
        release.set()
    assert blocker.result(timeout=30) is True
    thread_executor.shutdown(wait=True)
    assert queued.cancelled() and ran == []
    with pytest.raises(CancelledError):
        queued.result(timeout=0)


def test_a_callable_submitted_while_its_group_runs_waits_behind_another_waiting_callable() -> None:
    log: list[str] = []
    started, release = threading.Event(), threading.Event()
    with Executor(backend="serial") as executor:  # one task at a time: the order is the schedule
        executor.submit(record, log, "first", started, release)
        assert started.wait(30)
        executor.submit(log.append, "other callable")
        executor.submit(record, log, "same callable, later")
        release.set()
    assert log == ["first", "other callable", "same callable, later"]


def test_a_callable_fed_while_its_group_runs_goes_behind_a_waiting_callable() -> None:
    log: list[str] = []
    blocker_started, blocker_release = threading.Event(), threading.Event()
    first_started, first_release = threading.Event(), threading.Event()
    with Executor(backend="serial") as executor:
        executor.submit(signal_then_wait, blocker_started, blocker_release)
        assert blocker_started.wait(30)
        # Queued together behind the blocker: one group for `record`, then `log.append`.
        executor.submit(record, log, "first", first_started, first_release)
        executor.submit(record, log, "second")
        executor.submit(log.append, "other callable")
        blocker_release.set()
        assert first_started.wait(30)
        executor.submit(record, log, "fed while its group runs")
        first_release.set()
    assert log == ["first", "second", "other callable", "fed while its group runs"]


def test_submit_refuses_something_that_is_not_callable(executor: Executor) -> None:
    with pytest.raises(TypeError, match="callable"):
        executor.submit(42, 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- map
@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_returns_results_in_input_order(executor: Executor, chunksize: int) -> None:
    assert list(executor.map(pow, range(10), [2] * 10, chunksize=chunksize)) == [
        i**2 for i in range(10)
    ]


def test_map_stops_at_the_shortest_iterable(executor: Executor) -> None:
    assert list(executor.map(mul, range(10), range(3))) == [0, 1, 4]


def test_map_of_an_empty_iterable_yields_nothing(executor: Executor) -> None:
    assert list(executor.map(mul, [], [])) == []


@pytest.mark.parametrize("chunksize", [1, 2])
def test_an_exception_from_fn_reraises_from_map_at_that_item(
    executor: Executor, chunksize: int
) -> None:
    results = executor.map(divide, [1, 2, 3, 4], [1, 1, 0, 1], chunksize=chunksize)
    assert next(results) == 1.0
    assert next(results) == 2.0
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout_raises_timeout_error_when_a_result_is_late() -> None:
    with Executor(backend="stdlib", workers=2) as executor:
        results = executor.map(sleep_and_return, [0, 1.0], ["quick", "slow"], timeout=0.2)
        assert next(results) == "quick"
        with pytest.raises(TimeoutError):
            next(results)


def test_map_timeout_with_chunks_raises_timeout_error() -> None:
    with Executor(backend="thread", workers=2) as executor:
        results = executor.map(sleep_and_return, [0, 0, 1.0, 0], "abcd", timeout=0.2, chunksize=2)
        assert [next(results), next(results)] == ["a", "b"]
        with pytest.raises(TimeoutError):
            next(results)


def test_closing_map_early_cancels_the_tasks_that_have_not_started(
    thread_executor: Executor,
) -> None:
    release = threading.Event()
    ran: list[int] = []
    blocker = thread_executor.submit(release.wait, 30)
    results = thread_executor.map(ran.append, range(20))  # queued behind the blocker's group
    results.close()
    release.set()
    thread_executor.shutdown(wait=True)
    assert blocker.result() is True and ran == []


def test_map_rejects_a_chunksize_below_one(executor: Executor) -> None:
    with pytest.raises(ValueError):
        executor.map(mul, [1], [2], chunksize=0)


# --------------------------------------------------------------------------- shutdown
def test_submit_after_shutdown_raises_runtime_error(executor: Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(pow, 2, 5)


def test_map_after_shutdown_raises_runtime_error(executor: Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(pow, [2], [5])


def test_the_context_manager_shuts_down_and_waits() -> None:
    with Executor(backend="stdlib", workers=2) as executor:
        futures = [executor.submit(sleep_and_return, 0.2, i) for i in range(3)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2]
    with pytest.raises(RuntimeError):
        executor.submit(pow, 2, 2)


def test_shutdown_wait_waits_for_running_and_queued_tasks(executor: Executor) -> None:
    futures = [executor.submit(sleep_and_return, 0.1, i) for i in range(5)]
    other = executor.submit(mul, 6, 7)  # another callable: queued behind the first group
    executor.shutdown(wait=True)
    assert all(f.done() for f in [*futures, other])
    assert [f.result() for f in futures] == list(range(5)) and other.result() == 42


def test_shutdown_without_wait_returns_and_the_tasks_still_finish() -> None:
    executor = Executor(backend="thread", workers=1)
    release = threading.Event()
    future = executor.submit(release.wait, 30)
    executor.shutdown(wait=False)
    assert not future.done()
    release.set()
    assert future.result(timeout=30) is True
    executor.shutdown(wait=True)


def test_shutdown_twice_is_harmless(executor: Executor) -> None:
    executor.submit(mul, 1, 1).result(timeout=30)
    executor.shutdown()
    executor.shutdown()


def test_hang_issue12364_many_short_tasks_then_shutdown(executor: Executor) -> None:
    futures = [executor.submit(time.sleep, 0.01) for _ in range(30)]
    executor.shutdown()
    for future in futures:
        assert future.result(timeout=0) is None


@pytest.mark.parametrize("name", ["probe", "thread"])
def test_shutdown_cancel_futures_cancels_pending_ones(name: str) -> None:
    executor = make_executor(name, workers=2)
    futures = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    # Only what pickmap had taken (a few per worker) runs; most must be cancelled.
    assert len(cancelled) > 20
    for future in futures:
        if not future.cancelled():
            assert future.done() and future.exception() is None


def test_cancel_futures_never_runs_the_cancelled_tasks(thread_executor: Executor) -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []
    blocker = thread_executor.submit(signal_then_wait, started, release)
    assert started.wait(30)  # running: cancel_futures must leave it alone
    queued = [thread_executor.submit(ran.append, i) for i in range(10)]
    thread_executor.shutdown(wait=False, cancel_futures=True)
    release.set()
    thread_executor.shutdown(wait=True)
    assert blocker.result() is True
    assert all(f.cancelled() for f in queued) and ran == []


# --------------------------------------------------------------------------- callables ProcessPoolExecutor cannot send
class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __scale(self, x: int) -> tuple[int, int]:
        return x * self.factor, os.getpid()

    def public(self, x: int) -> int:
        return x + self.factor

    def run(self, executor: Executor) -> list[tuple[int, int]]:
        return [f.result(timeout=30) for f in [executor.submit(self.__scale, i) for i in range(4)]]


def test_a_private_bound_method_runs_in_worker_processes_on_the_default_backend() -> None:
    with Executor(workers=2) as executor:
        results = Scaler(3).run(executor)
    assert [value for value, _ in results] == [0, 3, 6, 9]
    # The probe can carry it (stdlib with its dispatch table): not a fallback to threads.
    assert all(pid != os.getpid() for _, pid in results)


def test_a_lambda_and_a_closure_run_in_worker_processes_on_the_default_backend() -> None:
    offset = 100

    def closure(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    with Executor(workers=2) as executor:
        by_lambda = executor.submit(lambda x: (x * 2, os.getpid()), 21).result(timeout=30)
        by_closure = list(executor.map(closure, range(3)))
    assert by_lambda[0] == 42 and by_lambda[1] != os.getpid()
    assert [value for value, _ in by_closure] == [100, 101, 102]
    assert all(pid != os.getpid() for _, pid in by_closure)


def test_each_submitted_callable_gets_its_own_probe_verdict() -> None:
    lock = threading.Lock()

    def holds_a_lock(x: int) -> tuple[int, int]:
        with lock:  # a copy of this lock in another process would guard nothing: threads
            return x, os.getpid()

    with Executor(workers=2) as executor:
        in_thread = executor.submit(holds_a_lock, 1)
        in_process = executor.submit(pid_of)
        assert in_thread.result(timeout=30) == (1, os.getpid())
        assert in_process.result(timeout=30) != os.getpid()


@pytest.mark.parametrize("name", ["thread", "serial"])
def test_the_thread_and_serial_backends_run_in_this_process(name: str) -> None:
    with Executor(backend=name, workers=2) as executor:
        assert executor.submit(pid_of).result(timeout=30) == os.getpid()
        assert list(executor.map(Scaler(2).public, range(3))) == [2, 3, 4]


def test_initializer_runs_in_the_worker_before_its_tasks() -> None:
    with Executor(
        backend="stdlib", workers=1, initializer=remember, initargs=("ready",)
    ) as executor:
        assert executor.submit(initialized).result(timeout=30) == ["ready"]
    assert _initialized == []  # it ran in the worker, not here


def test_the_constructor_rejects_bad_arguments_at_once() -> None:
    with pytest.raises(pickmap.UnknownBackendError):
        Executor(backend="no-such-backend")
    with pytest.raises(ValueError):
        Executor(workers=0)
    with pytest.raises(ValueError):
        Executor(timeout=-1)
    with pytest.raises(ValueError):
        Executor(start_method="teleport")
    with pytest.raises(TypeError):
        Executor(initializer=42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("kind", ["exit", "sigkill"])
def test_a_killed_worker_raises_worker_crashed_error_and_the_executor_keeps_working(
    kind: str,
) -> None:
    with Executor(backend="stdlib", workers=2) as executor:
        crashed = executor.submit(die, kind)
        error = crashed.exception(timeout=30)
        assert isinstance(error, pickmap.WorkerCrashedError) and isinstance(error, BrokenExecutor)
        # Not broken for later work: pickmap starts fresh workers.
        assert executor.submit(mul, 6, 7).result(timeout=30) == 42
        assert list(executor.map(mul, range(3), range(3))) == [0, 1, 4]


def test_a_task_over_the_timeout_raises_task_timeout_error_and_later_tasks_run() -> None:
    with Executor(backend="stdlib", workers=1, timeout=0.5) as executor:
        late = executor.submit(faults.fault, "hang")
        error = late.exception(timeout=30)
        assert isinstance(error, pickmap.TaskTimeoutError) and isinstance(error, TimeoutError)
        assert executor.submit(mul, 2, 3).result(timeout=30) == 6


def test_an_exception_that_cannot_be_pickled_arrives_as_worker_error() -> None:
    with Executor(backend="stdlib", workers=1) as executor:
        error = executor.submit(raise_locked, "with a lock").exception(timeout=30)
        assert isinstance(error, pickmap.WorkerError)
        assert "LockedError" in error.exc_repr and "with a lock" in error.exc_repr
        assert "raise LockedError(message)" in error.remote_traceback
        assert executor.submit(mul, 2, 3).result(timeout=30) == 6


def test_an_exception_that_cannot_be_rebuilt_arrives_as_worker_error() -> None:
    with Executor(backend="stdlib", workers=1) as executor:
        error = executor.submit(raise_two_argument, 7).exception(timeout=30)
    assert isinstance(error, pickmap.WorkerError)
    assert "TwoArgumentError" in error.exc_repr and "7: detail" in error.exc_repr


def test_an_unpicklable_exception_on_the_thread_backend_arrives_as_itself(
    thread_executor: Executor,
) -> None:
    assert isinstance(
        thread_executor.submit(raise_two_argument, 7).exception(timeout=30), TwoArgumentError
    )


def test_a_result_that_cannot_travel_raises_serialization_error_and_later_tasks_run() -> None:
    with Executor(backend="stdlib", workers=1) as executor:
        error = executor.submit(make_lock).exception(timeout=30)
        assert isinstance(error, pickmap.SerializationError)
        assert executor.submit(mul, 2, 3).result(timeout=30) == 6


# --------------------------------------------------------------------------- real interpreters
def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC, TESTS, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_garbage_collecting_an_executor_without_shutdown_lets_its_thread_finish_and_exit() -> None:
    done = run_python(
        """
        import gc, threading, weakref
        from pickmap.executor import Executor
        from test_executor import sleep_and_return
        executor = Executor(workers=2)
        future = executor.submit(sleep_and_return, 0.3, "finished")
        collected = weakref.ref(executor)
        del executor
        gc.collect()
        print(collected() is None, future.result(timeout=30))
        [thread] = [t for t in threading.enumerate() if t.name == "pickmap.Executor"] or [None]
        if thread is not None:
            thread.join(timeout=20)
        print("thread alive:", thread is not None and thread.is_alive())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True finished", "thread alive: False"]


def test_leaving_the_interpreter_without_shutdown_finishes_queued_work_and_exits() -> None:
    done = run_python(
        """
        import sys
        from pickmap.executor import Executor
        from test_executor import sleep_and_return
        executor = Executor(workers=2)   # still referenced at exit
        future = executor.submit(sleep_and_return, 0.3, "finished")
        future.add_done_callback(lambda f: print(f.result(), flush=True))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["finished"]


def test_submit_from_an_atexit_hook_raises_runtime_error() -> None:
    done = run_python(
        """
        import atexit
        from pickmap.executor import Executor
        executor = Executor(backend="thread")
        def late():
            try:
                executor.submit(abs, -1)
            except RuntimeError as exc:
                print("runtime-error:", exc)
        atexit.register(late)
        """
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == "runtime-error: cannot schedule new futures after interpreter shutdown"
    )


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_main_module_functions_and_lambdas_work_from_a_script(tmp_path: Any, method: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from pickmap.executor import Executor

            def in_main(x):
                return x * 3, os.getpid()

            if __name__ == "__main__":
                with Executor(workers=2, start_method={method!r}) as executor:
                    results = list(executor.map(in_main, range(4)))
                    by_lambda = executor.submit(lambda: os.getpid()).result(timeout=30)
                print([value for value, _ in results])
                print(all(pid != os.getpid() for _, pid in results), by_lambda != os.getpid())
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[0, 3, 6, 9]", "True True"]
