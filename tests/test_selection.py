"""Selection order: backend= argument, then PICKMAP_BACKEND, then the probe; settings from the environment."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import zoo

import pickmap
from pickmap import BackendUnavailableError, SerializationError, UnknownBackendError, explain, pmap
from pickmap.backends.base import Backend

pytestmark = pytest.mark.timeout(60)


def test_argument_wins_over_environment(clean_env):
    clean_env.setenv("PICKMAP_BACKEND", "thread")
    assert explain(zoo.square, [1], backend="serial").backend == "serial"
    assert explain(zoo.square, [1], backend="serial").source == "argument"


def test_environment_wins_over_probe_and_is_read_at_call_time(clean_env):
    assert explain(zoo.square, [1]).source == "probe"
    clean_env.setenv("PICKMAP_BACKEND", "thread")
    plan = explain(zoo.square, [1])
    assert (plan.backend, plan.source) == ("thread", "environment")
    assert pmap(zoo.square, [1, 2]) == [1, 4]


@pytest.mark.parametrize("value", ["auto", "", "  "])
def test_auto_or_empty_means_probe(clean_env, value):
    clean_env.setenv("PICKMAP_BACKEND", value)
    assert explain(zoo.square, [1]).source == "probe"


def test_explicit_auto_argument_ignores_the_environment(clean_env):
    clean_env.setenv("PICKMAP_BACKEND", "thread")
    assert explain(zoo.square, [1], backend="auto").source == "probe"


def test_pathos_is_an_alias_of_dill():
    assert explain(zoo.square, [1], backend="pathos").backend == "dill"


def test_unknown_backend_argument_lists_valid_names():
    with pytest.raises(UnknownBackendError) as caught:
        pmap(zoo.square, [1], backend="mpi")
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    for name in ("stdlib", "cloudpickle", "dill", "thread", "serial"):
        assert name in message
    assert "PICKMAP_BACKEND" not in message


def test_unknown_backend_from_environment_names_the_variable(clean_env):
    clean_env.setenv("PICKMAP_BACKEND", "nope")
    with pytest.raises(UnknownBackendError, match="PICKMAP_BACKEND"):
        pmap(zoo.square, [1])


def test_forced_backend_that_cannot_carry_raises_never_falls_back(clean_env):
    closure = zoo.make_closure(1)
    with pytest.raises(SerializationError) as caught:
        pmap(closure, [1], backend="stdlib")
    assert isinstance(caught.value, pickle.PicklingError)
    assert caught.value.backend == "stdlib"
    assert "cloudpickle" in caught.value.capable
    clean_env.setenv("PICKMAP_BACKEND", "stdlib")
    with pytest.raises(SerializationError, match="PICKMAP_BACKEND"):
        pmap(closure, [1])


def test_workers_from_environment(clean_env):
    clean_env.setenv("PICKMAP_WORKERS", "3")
    assert explain(zoo.square, [1]).workers == 3
    # documented: serial always uses 1
    assert explain(zoo.square, [1], backend="serial").workers == 1
    clean_env.setenv("PICKMAP_WORKERS", "zero")
    with pytest.raises(ValueError, match="PICKMAP_WORKERS"):
        pmap(zoo.square, [1])


def test_a_backends_default_worker_count_is_asked_only_when_nothing_else_says(clean_env):
    # dask's default asks the cluster its size: workers= or PICKMAP_WORKERS spares that.
    from pickmap._settings import resolve_workers

    asked: list[int] = []

    def default() -> int:
        asked.append(1)
        return 5

    assert resolve_workers(2, default) == 2
    clean_env.setenv("PICKMAP_WORKERS", "3")
    assert resolve_workers(None, default) == 3
    assert asked == []
    clean_env.delenv("PICKMAP_WORKERS")
    assert resolve_workers(None, default) == 5
    assert asked == [1]


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "soon"])
def test_an_idle_timeout_that_is_not_a_positive_number_is_refused(clean_env, raw):
    clean_env.setenv("PICKMAP_IDLE_TIMEOUT", raw)
    with pytest.raises(ValueError, match="PICKMAP_IDLE_TIMEOUT must be a number of seconds > 0"):
        pmap(zoo.square, [1])


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_start_method_from_environment(clean_env, method):
    clean_env.setenv("PICKMAP_START_METHOD", method)
    assert explain(zoo.square, [1]).start_method == method
    assert pmap(zoo.square, [2, 3]) == [4, 9]


def test_bad_start_method_lists_the_valid_ones(clean_env):
    with pytest.raises(ValueError, match="fork, spawn, forkserver"):
        pmap(zoo.square, [1], start_method="thread")
    clean_env.setenv("PICKMAP_START_METHOD", "vfork")
    with pytest.raises(ValueError, match="PICKMAP_START_METHOD"):
        pmap(zoo.square, [1])


def test_a_python_thread_means_forkserver_even_where_only_blas_threads_would_allow_fork(clean_env):
    import threading

    import numpy  # noqa: F401 - its OpenBLAS pool alone would allow fork (tested in a fresh process below)

    from pickmap._settings import default_start_method, resolve_start_method

    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        # the per-call shortcut (no stat of /proc) and the full answer `doctor` explains agree
        assert resolve_start_method(None) == default_start_method()[0] == "forkserver"
    finally:
        stop.set()
        helper.join()


def test_registry_lists_and_registers_backends():
    assert set(pickmap.available_backends()) >= {
        "stdlib",
        "cloudpickle",
        "dill",
        "thread",
        "serial",
    }

    class Mine(Backend):
        name = "mine"
        serializer = "identity"
        processes = False
        start_methods = False

        def start_worker(self, start):
            from pickmap.backends.serial import InlineWorker

            return InlineWorker()

    pickmap.register_backend("mine", Mine)
    try:
        with pytest.raises(ValueError, match="already registered"):
            pickmap.register_backend("mine", Mine)
        pickmap.register_backend("mine", Mine, clobber=True)
        assert pmap(zoo.square, range(4), backend="mine") == [0, 1, 4, 9]
    finally:
        from pickmap import registry

        registry._REGISTRY.pop("mine", None)
        registry._INSTANCES.pop("mine", None)


def test_missing_package_gives_install_hint():
    from pickmap import registry

    pickmap.register_backend(
        "ghost", "pickmap_no_such_module.sub:Nothing", install_hint="pip install ghost"
    )
    try:
        assert "ghost" not in pickmap.available_backends()
        with pytest.raises(BackendUnavailableError, match="pip install ghost") as caught:
            pmap(zoo.square, [1], backend="ghost")
        assert isinstance(caught.value, ImportError)
    finally:
        registry._REGISTRY.pop("ghost", None)


def test_nested_pmap_inside_a_worker_runs_in_place():
    assert pmap(zoo.nested_pmap, [3, 4, 5], backend="stdlib", workers=2) == [5, 14, 30]


def _run_fresh(code: str) -> str:
    """``code`` in a fresh interpreter with no PICKMAP_/BLAS settings; its stdout."""
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PICKMAP_", "OPENBLAS", "OMP_"))
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_numpy_keeps_the_fork_default_and_workers_limit_their_blas_pool(clean_env):
    code = (
        "import numpy, pickmap, threadpoolctl\n"
        "from pickmap._settings import _thread_count\n"
        "def pools(_):\n"
        "    return [p['num_threads'] for p in threadpoolctl.threadpool_info()]\n"
        "if __name__ == '__main__':\n"
        "    print(_thread_count() > 1, pickmap.explain(abs, [1]).start_method)\n"
        "    print(pickmap.pmap(pools, [0, 1], workers=2, chunksize=1))\n"
        "    print(pickmap.pmap(pools, [0], workers=2, inner_threads=0))\n"
    )
    stdout = _run_fresh(code)
    threads_line, limited, untouched = stdout.strip().splitlines()
    cpus = len(os.sched_getaffinity(0))
    assert threads_line == ("True fork" if cpus > 1 else "False fork")
    assert limited == str([[max(1, cpus // 2)]] * 2)
    assert untouched == str([[cpus]])


def test_a_first_call_with_numpy_loaded_scans_the_loaded_libraries_for_blas_pools_once(clean_env):
    # The scan is ~7 ms with numpy and pandas loaded: the fork-safety check and the cap on
    # the pools while forking share one threadpoolctl controller.
    code = (
        "import numpy, pickmap, threadpoolctl\n"
        "from pickmap import _settings\n"
        "made = []\n"
        "class Counted(threadpoolctl.ThreadpoolController):\n"
        "    def __init__(self):\n"
        "        made.append(1)\n"
        "        super().__init__()\n"
        "threadpoolctl.ThreadpoolController = Counted\n"
        "named = _settings._controller_of_pool_named_libraries\n"
        "def counted(cls):\n"
        "    found = named(cls)\n"
        "    made.extend([1] if found is not None else [])\n"
        "    return found\n"
        "_settings._controller_of_pool_named_libraries = counted\n"
        "if __name__ == '__main__':\n"
        "    assert pickmap.pmap(abs, [-1, -2, -3], workers=2, backend='stdlib') == [1, 2, 3]\n"
        "    print(pickmap.explain(abs, [1]).start_method, len(made))\n"
    )
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: OpenBLAS starts no thread, nothing is scanned or capped")
    assert _run_fresh(code).split() == ["fork", "1"]


def test_the_scan_of_pool_named_libraries_finds_what_threadpoolctls_full_scan_finds(
    clean_env, tmp_path
):
    # It matches file names in /proc/self/maps before threadpoolctl makes controllers, where
    # threadpoolctl resolves every library's symlinks first, and its older versions take the
    # loader's names (dl_iterate_phdr): a BLAS loaded through a link of another name must be
    # found all the same. One deleted from disk since it was loaded is skipped, as
    # threadpoolctl's own scan of /proc/self/maps (3.8) skips it; older ones, from the loader's
    # list, still see it (the safe side: an unseen pool's threads make fork look unsafe).
    pytest.importorskip("threadpoolctl")
    code = (
        "import ctypes, os, shutil, sys, numpy, threadpoolctl\n"
        "from pickmap import _settings\n"
        "Controller = threadpoolctl.ThreadpoolController\n"
        "def by_path(controller):\n"
        "    return sorted(controller.info(), key=lambda pool: pool['filepath'])\n"
        "def scans():\n"
        "    loader = Controller._from_controllers([])\n"
        "    loader._find_libraries_with_dl_iterate_phdr()\n"
        "    named = _settings._controller_of_pool_named_libraries(Controller)\n"
        "    return by_path(named), by_path(loader), by_path(Controller())\n"
        "named, loader, full = scans()\n"
        "assert named == loader == full and full, (named, loader, full)\n"
        "blas = full[0]['filepath']\n"
        "link = os.path.join(sys.argv[1], 'libalias.so')\n"
        "shutil.copy(blas, os.path.join(sys.argv[1], 'libopenblas_copy.so'))\n"
        "os.symlink('libopenblas_copy.so', link)\n"
        "ctypes.CDLL(link)\n"
        "named, loader, full = scans()\n"
        "assert named == loader == full and len(full) == 2, (named, loader, full)\n"
        "shutil.copy(blas, os.path.join(sys.argv[1], 'libopenblas_gone.so'))\n"
        "ctypes.CDLL(os.path.join(sys.argv[1], 'libopenblas_gone.so'))\n"
        "os.unlink(os.path.join(sys.argv[1], 'libopenblas_gone.so'))\n"
        "named, loader, full = scans()\n"
        "assert len(named) == 2 and all(pool in full for pool in named), (named, full)\n"
        "print(sorted(os.path.basename(p['filepath']) for p in named))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PICKMAP_", "OPENBLAS"))}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "libopenblas_copy.so" in done.stdout


def test_without_the_threadpoolctl_internals_it_uses_the_pool_scan_is_threadpoolctls_own(
    monkeypatch,
):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from pickmap import _settings

    expected = threadpoolctl.ThreadpoolController().info()
    monkeypatch.delattr(threadpoolctl, "_ALL_CONTROLLERS")
    assert _settings._controller_of_pool_named_libraries(threadpoolctl.ThreadpoolController) is None
    monkeypatch.undo()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _settings._controller_of_pool_named_libraries(threadpoolctl.ThreadpoolController) is None
    monkeypatch.undo()
    # only the narrowed scan uses it: the full scan still works without it
    monkeypatch.delattr(threadpoolctl.ThreadpoolController, "_from_controllers")
    assert _settings._controller_of_pool_named_libraries(threadpoolctl.ThreadpoolController) is None
    assert _settings.pool_controller(fresh=True).info() == expected


def test_the_shared_pool_controller_is_made_again_once_a_module_that_loads_pools_is_imported(
    monkeypatch,
):
    # The cap a fork call puts on the pools uses it: it must see a library imported after
    # an earlier scan (explain(), an earlier call), not only what the first scan saw.
    import types

    from pickmap import _settings

    pytest.importorskip("threadpoolctl")
    first = _settings.pool_controller()
    assert _settings.pool_controller() is first
    absent = next((m for m in _settings.POOL_MODULES if m not in sys.modules), None)
    if absent is None:
        pytest.skip("every module that loads pools is imported already")
    monkeypatch.setitem(sys.modules, absent, types.ModuleType(absent))
    again = _settings.pool_controller()
    assert again is not first and _settings.pool_controller() is again


def test_a_worker_forked_with_numpy_loaded_starts_no_blas_thread_and_the_caller_keeps_its_pool(
    clean_env,
):
    # The worker inherits the limit (the caller holds its pool capped while it forks): had
    # the worker set it itself, OpenBLAS would restart its pool with a spinning thread.
    code = (
        "import os, numpy, pickmap, threadpoolctl\n"
        "def threads(_):\n"
        "    return len(os.listdir('/proc/self/task'))\n"
        "if __name__ == '__main__':\n"
        "    print(pickmap.explain(abs, [1]).start_method)\n"
        "    print(pickmap.pmap(threads, [0, 1], workers=2, chunksize=1))\n"
        "    print([p['num_threads'] for p in threadpoolctl.threadpool_info()])\n"
    )
    stdout = _run_fresh(code)
    method, in_workers, caller_pools = stdout.strip().splitlines()
    cpus = len(os.sched_getaffinity(0))
    assert method == "fork"
    assert in_workers == "[1, 1]"  # the worker's one thread: no BLAS thread, and no pipe reader
    assert caller_pools == str([cpus])


def test_the_callers_blas_cap_lasts_until_the_last_call_that_forked_under_it_ends(clean_env):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable CPU: the pools are at 1 thread already, nothing is capped")
    code = (
        "import types, numpy, threadpoolctl\n"
        "from pickmap.backends._process import _cap_pools_for_fork, release_pool_cap\n"
        "def start(call_id):\n"
        "    spec = types.SimpleNamespace(id=call_id, inner_threads=1)\n"
        "    return types.SimpleNamespace(inheritance=types.SimpleNamespace(spec=spec))\n"
        "def counts():\n"
        "    return [p['num_threads'] for p in threadpoolctl.threadpool_info()]\n"
        "before = counts()\n"
        "assert _cap_pools_for_fork(start(1)) is not None\n"
        "assert _cap_pools_for_fork(start(2)) is not None\n"
        "capped = counts()\n"
        "release_pool_cap(1)\n"
        "one_left = counts()\n"
        "release_pool_cap(2)\n"
        "release_pool_cap(2)  # again, as after a Ctrl-C: nothing more to do\n"
        "print(before, capped, one_left, counts())\n"
    )
    stdout = _run_fresh(code)
    cpus = len(os.sched_getaffinity(0))
    assert stdout.split() == [f"[{cpus}]", "[1]", "[1]", f"[{cpus}]"]


def test_inner_threads_must_be_a_whole_number(clean_env):
    with pytest.raises(ValueError, match="inner_threads"):
        pmap(zoo.square, [1], inner_threads=-1)
    clean_env.setenv("PICKMAP_INNER_THREADS", "lots")
    with pytest.raises(ValueError, match="PICKMAP_INNER_THREADS"):
        pmap(zoo.square, [1])


def test_a_free_threaded_interpreter_prefers_threads_and_explain_says_why(clean_env, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    plan = explain(zoo.square, [1])
    assert plan.backend == "thread"
    assert "GIL is disabled" in str(plan)
    assert pmap(zoo.square, range(5)) == [0, 1, 4, 9, 16]
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    assert explain(zoo.square, [1]).backend == "stdlib"
