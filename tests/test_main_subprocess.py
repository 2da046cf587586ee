"""``__main__`` callables and environment variables, tested in real child interpreters.

``python -c`` has no file a spawn/forkserver worker could re-import, and a
script's functions defined under ``if __name__ == "__main__":`` do not exist in
the worker's copy of the module: both are where plain ``Pool.map`` raises
``Can't get attribute`` in the workers and hangs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import START_METHODS

pytestmark = pytest.mark.timeout(120)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def run_python_completed(
    args: list[str], env_extra: dict[str, str] | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A child interpreter with this checkout's pickmap and no PICKMAP_ variable of ours; it must exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=90, env=env, cwd=cwd
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done


def run_python(
    args: list[str], env_extra: dict[str, str] | None = None, cwd: str | None = None
) -> str:
    return run_python_completed(args, env_extra, cwd).stdout


DASH_C = textwrap.dedent(
    """
    import pickmap
    def f(x):
        return x * 2
    class A:
        def __init__(self): self.k = 5
        def __g(self, x): return x + self.k
        def go(self): return pickmap.pmap(self.__g, range(4))
    plan = pickmap.explain(f, [1])
    print(plan.backend, plan.start_method)
    print(pickmap.pmap(f, range(5)))
    print(A().go())
    print(pickmap.pmap(lambda x: -x, range(3)))
    """
)


@pytest.mark.parametrize("method", START_METHODS)
def test_python_dash_c(method):
    out = run_python(["-c", DASH_C], {"PICKMAP_START_METHOD": method}).splitlines()
    assert out[0] == f"cloudpickle {method}"
    assert out[1:] == ["[0, 2, 4, 6, 8]", "[5, 6, 7, 8]", "[0, -1, -2]"]


SCRIPT = textwrap.dedent(
    """
    import sys
    import pickmap

    def top_level(x):
        return x + 1

    class Worker:
        def __init__(self):
            self.k = 10
        def f(self, x):
            return x * self.k
        def go(self):
            return pickmap.pmap(self.f, range(10))

    if __name__ == "__main__":
        def inside_guard(x):          # does not exist when a spawn worker imports this file
            return x * 3
        print(pickmap.pmap(top_level, range(3)))
        print(pickmap.pmap(inside_guard, range(3)))
        print(Worker().go())
        # defined after the warm pool started: must still work
        exec("def late(x):\\n    return x - 1", globals())
        print(pickmap.pmap(late, range(3)))
        print(pickmap.explain(inside_guard, [1]).backend)
    """
)


@pytest.mark.parametrize("method", START_METHODS)
def test_script_with_main_guard(method, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = run_python(
        [str(script)], {"PICKMAP_START_METHOD": method}, cwd=str(tmp_path)
    ).splitlines()
    assert out == [
        "[1, 2, 3]",
        "[0, 3, 6]",
        "[0, 10, 20, 30, 40, 50, 60, 70, 80, 90]",
        "[-1, 0, 1]",
        "cloudpickle",
    ]


def test_environment_forces_backend_without_code_changes(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import threading, pickmap\n"
        "def where(_):\n    return threading.current_thread().name\n"
        "if __name__ == '__main__':\n"
        "    plan = pickmap.explain(where, [1])\n"
        "    print(plan.backend, plan.source)\n"
        "    print(set(pickmap.pmap(where, range(4))))\n"
    )
    out = run_python([str(script)], {"PICKMAP_BACKEND": "serial"}, cwd=str(tmp_path)).splitlines()
    assert out == ["serial environment", "{'MainThread'}"]


def test_bad_environment_value_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env.update(PYTHONPATH=SRC, PICKMAP_BACKEND="multiprocessing")
    done = subprocess.run(
        [sys.executable, "-c", "import pickmap; pickmap.pmap(abs, [1])"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert "UnknownBackendError" in done.stderr and "PICKMAP_BACKEND" in done.stderr
    assert "stdlib" in done.stderr


def test_interpreter_exits_promptly_with_warm_pools():
    code = "import pickmap\nprint(pickmap.pmap(abs, range(-3, 0)))\n"
    out = run_python(["-c", code], {"PICKMAP_START_METHOD": "spawn"})
    assert out.strip() == "[3, 2, 1]"


def test_worker_that_dies_while_starting_is_reported_not_hung(tmp_path):
    # The interpreter of a spawn worker exits before the worker runs any of pickmap's code.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif '--multiprocessing-fork' in sys.argv:\n    os._exit(3)\n"
    )
    script = tmp_path / "fragile.py"
    script.write_text("import pickmap\nprint(pickmap.pmap(abs, range(4)))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), SRC]), PICKMAP_START_METHOD="spawn")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode != 0
    assert "WorkerCrashedError" in done.stderr and "while starting" in done.stderr, done.stderr[
        -2000:
    ]


@pytest.mark.parametrize("method", [m for m in START_METHODS if m != "fork"])
def test_workers_never_re_run_the_main_script_so_no_guard_is_needed(method, tmp_path):
    # multiprocessing's own spawn/forkserver children import the main script
    # again; pickmap's do not: the script's top level runs once, here.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os, pickmap\n"
        "print('top level ran in', 'worker' if pickmap._worker.in_worker() else 'caller', flush=True)\n"
        "def f(x):\n    return x + 1\n"
        "print(pickmap.pmap(f, range(4), workers=2))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env.update(PYTHONPATH=SRC, PICKMAP_START_METHOD=method)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["top level ran in caller", "[1, 2, 3, 4]"]


INITIALIZER_SCRIPT = textwrap.dedent(
    """
    import sys
    import pickmap

    SCALE = None

    def init(value):
        global SCALE
        SCALE = value

    def scaled(x):
        return x * SCALE

    if __name__ == "__main__":
        backend = sys.argv[1]
        for value in (7, 8):  # the second call finds the workers warm
            print(pickmap.pmap(scaled, range(3), backend=backend, workers=2,
                               initializer=init, initargs=(value,)))
    """
)


@pytest.mark.parametrize("serializer", ["cloudpickle", "dill"])
@pytest.mark.parametrize("method", START_METHODS)
def test_a_main_initializer_sets_a_global_the_main_function_reads(tmp_path, method, serializer):
    # The Pool(initializer=...) idiom: under spawn and forkserver, and under fork
    # once workers are warm, both travel by value, and must share one namespace.
    script = tmp_path / "init_script.py"
    script.write_text(INITIALIZER_SCRIPT)
    out = run_python([str(script), serializer], {"PICKMAP_START_METHOD": method}).splitlines()
    assert out == ["[0, 7, 14]", "[0, 8, 16]"]


WRAPPED_INITIALIZER_SCRIPT = textwrap.dedent(
    """
    import functools
    import sys
    import pickmap

    SCALE = None

    def init(value):
        global SCALE
        SCALE = value

    class Scaler:
        def __call__(self, x):
            return x * SCALE

    def scaled(x, extra=0):
        return x * SCALE + extra

    if __name__ == "__main__":
        backend = sys.argv[1]
        cases = [
            (Scaler(), init),
            (functools.partial(scaled, extra=1), functools.partial(init)),
        ]
        for func, initializer in cases:
            print(pickmap.pmap(func, range(3), backend=backend, workers=2,
                               initializer=initializer, initargs=(5,)))
    """
)


@pytest.mark.parametrize("serializer", ["cloudpickle", "dill"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_main_callable_object_and_partial_initializer_share_the_scripts_namespace(
    tmp_path, method, serializer
):
    script = tmp_path / "wrapped_init.py"
    script.write_text(WRAPPED_INITIALIZER_SCRIPT)
    out = run_python([str(script), serializer], {"PICKMAP_START_METHOD": method}).splitlines()
    assert out == ["[0, 5, 10]", "[1, 6, 11]"]


# --------------------------------------------------------------------------- pickmap's own forks
HELPERS = textwrap.dedent(
    """
    import os, sys

    def stdin_text(_):
        return sys.stdin.read()

    def where(_):
        return os.getcwd()

    def server_pid():
        import pickmap._fork
        return pickmap._fork._server.pid
    """
)


def test_a_first_fork_call_imports_no_multiprocessing_and_its_workers_read_no_stdin(tmp_path):
    (tmp_path / "helpers.py").write_text(HELPERS)
    code = (
        "import sys, pickmap, helpers\n"
        "print(pickmap.pmap(helpers.stdin_text, [0, 1], start_method='fork', workers=2, chunksize=1))\n"
        "print('multiprocessing' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input="typed at the caller's terminal\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['', '']", "False"]


def test_a_first_fork_call_imports_none_of_the_costly_standard_modules():
    # Each is milliseconds of a first call (re brings enum, signal brings enum, typing
    # brings re); none is needed until something fails or is explained.
    code = (
        "import sys, pickmap\n"
        "print(pickmap.pmap(abs, [-1, -2], start_method='fork', workers=2, chunksize=1))\n"
        "print(sorted({'re', 'enum', 'signal', 'typing', 'multiprocessing'} & set(sys.modules)))\n"
    )
    assert run_python(["-S", "-c", code]).splitlines() == ["[1, 2]", "[]"]


def test_a_fork_server_worker_starts_in_the_callers_current_directory_and_path(tmp_path):
    (tmp_path / "helpers.py").write_text(HELPERS)
    later = tmp_path / "later"
    later.mkdir()
    (later / "only_here.py").write_text("import os\ndef where(_):\n    return os.getcwd()\n")
    code = (
        "import os, sys, pickmap, helpers\n"
        "print(pickmap.pmap(helpers.where, [0], start_method='forkserver', workers=1))\n"
        "os.chdir('later'); sys.path.insert(0, os.getcwd())\n"
        "import only_here\n"
        "print(pickmap.pmap(only_here.where, [0, 1], start_method='forkserver', workers=2, chunksize=1))\n"
    )
    out = run_python(["-c", code], cwd=str(tmp_path)).splitlines()
    assert out == [str([str(tmp_path)]), str([str(later)] * 2)]


def test_the_fork_server_exits_once_its_caller_has(tmp_path):
    (tmp_path / "helpers.py").write_text(HELPERS)
    code = (
        "import pickmap, helpers\n"
        "pickmap.pmap(helpers.where, [0, 1], start_method='forkserver', workers=2, chunksize=1)\n"
        "print(helpers.server_pid())\n"
    )
    pid = int(run_python(["-c", code], cwd=str(tmp_path)))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_fork_server_workers_start_despite_a_default_socket_timeout_a_removed_directory_and_a_killed_server(
    tmp_path,
):
    (tmp_path / "helpers.py").write_text(HELPERS)
    gone = tmp_path / "gone"
    gone.mkdir()
    code = (
        "import os, signal, socket, sys, pickmap, helpers\n"
        "sys.path.insert(0, os.getcwd())\n"
        "socket.setdefaulttimeout(5)  # makes new sockets non-blocking\n"
        "kw = dict(start_method='forkserver', chunksize=1)\n"
        "print(pickmap.pmap(abs, [-1, -2], workers=2, **kw))\n"
        "os.kill(helpers.server_pid(), signal.SIGKILL)\n"
        "print(pickmap.pmap(abs, [-3, -4, -5], workers=3, **kw))  # new workers, a new server\n"
        "os.chdir('gone'); os.rmdir(os.getcwd())\n"
        "print(pickmap.pmap(abs, [-6], workers=1, **kw))\n"
    )
    out = run_python(["-c", code], cwd=str(tmp_path)).splitlines()
    assert out == ["[1, 2]", "[3, 4, 5]", "[6]"]


def test_an_idle_timeout_beyond_what_poll_takes_means_workers_never_idle_out(tmp_path):
    (tmp_path / "helpers.py").write_text(HELPERS)
    code = "import pickmap, helpers\nprint(pickmap.pmap(abs, [-1, -2], workers=2, chunksize=1))\n"
    for timeout in ("1e10", "inf"):
        out = run_python(["-c", code], {"PICKMAP_IDLE_TIMEOUT": timeout}, cwd=str(tmp_path))
        assert out.splitlines() == ["[1, 2]"]


def test_spawn_workers_that_idle_out_leave_no_unclosed_socket_warning(tmp_path):
    # Under -X dev every ResourceWarning is shown. A spawn worker leaves through the
    # interpreter's shutdown, which reports a socket still open; fork and fork-server
    # workers leave with os._exit, which reports nothing either way.
    script = tmp_path / "idle.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            import time
            import pickmap

            def pid_of(x):
                return os.getpid()

            if __name__ == "__main__":
                first = set(pickmap.pmap(pid_of, range(4), start_method="spawn", chunksize=1))
                time.sleep(1.0)  # the workers idle out and exit
                second = set(pickmap.pmap(pid_of, range(4), start_method="spawn", chunksize=1))
                print("replaced" if not first & second else f"kept {first & second}")
            """
        )
    )
    done = run_python_completed(
        ["-X", "dev", "-W", "always::ResourceWarning", str(script)],
        {"PICKMAP_IDLE_TIMEOUT": "0.2"},
    )
    assert done.stdout.splitlines() == ["replaced"]  # so the first call's workers did exit
    assert "ResourceWarning" not in done.stderr, done.stderr


def test_what_the_caller_printed_before_a_fork_call_is_written_once(tmp_path):
    # Its stdout is a pipe here (block-buffered): a worker forked with the buffer unflushed
    # would write it a second time when it flushes on exit.
    (tmp_path / "helpers.py").write_text(HELPERS)
    code = (
        "import pickmap, helpers\n"
        "print('printed before the call')\n"
        "print(pickmap.pmap(abs, [-1, -2], start_method='fork', workers=2, chunksize=1))\n"
    )
    out = run_python(["-c", code], cwd=str(tmp_path)).splitlines()
    assert out == ["printed before the call", "[1, 2]"]


def test_a_fork_the_server_refuses_fails_that_worker_and_keeps_the_server(monkeypatch):
    import socket

    from pickmap import _fork

    class RefusingServer:
        def __init__(self):
            self.preloaded: set[str] = set()
            self.closed = False

        def fork(self, conn, request):
            raise _fork.ForkRefused(11, "pickmap's fork server could not fork a worker")

        def close(self, **_):
            self.closed = True

    server = RefusingServer()
    monkeypatch.setattr(_fork, "_server", server)
    a, b = socket.socketpair()
    with a, b, pytest.raises(_fork.ForkRefused):
        _fork.start_served_worker(b, set(), ("unused", 1.0, os.getpid()))
    assert _fork._server is server and not server.closed


def test_a_request_the_fork_server_cannot_read_ends_it_at_once_while_it_still_reaps_a_worker():
    import socket

    from pickmap import _fork, _shm

    server = _fork._Server()
    caller_end, worker_end = socket.socketpair()
    path, progress = _shm.progress_segment("p")
    worker = None
    try:
        worker = server.fork(
            worker_end, _fork.Request((), list(sys.path), os.getcwd(), path, 60.0, os.getpid())
        )
        worker_end.close()
        assert caller_end.recv(1)  # the worker's Ready: it runs, and the server must reap it
        read_end, write_end = os.pipe()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fork._FDS.pack(read_end, write_end))]
        server.sock.sendmsg([_fork._HEADER.pack(5) + b"junk!"], rights)  # not a pickle
        os.close(read_end)
        os.close(write_end)
        asked = time.monotonic()
        with pytest.raises(OSError, match="exited before it could start a worker"):
            server._reply()
        # at once, not once the server has reaped its live worker (up to _REAP_SECONDS)
        assert time.monotonic() - asked < _fork._REAP_SECONDS / 2
    finally:
        if worker is not None:
            worker.kill()
            worker.close()
        caller_end.close()
        server.close(kill=True)
        progress.close()
        _shm.unlink([path])
