"""Progress bars and callbacks count items, not chunks, on every backend."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import zoo

from pickmap import imap, pmap

pytestmark = pytest.mark.timeout(60)
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def test_a_callback_receives_item_counts_that_add_up_with_large_chunks(backend):
    seen: list[int] = []
    assert pmap(zoo.square, range(1000), chunksize=250, progress=seen.append, **backend.kwargs) == [
        i * i for i in range(1000)
    ]
    assert sum(seen) == 1000 and max(seen) == 250  # a chunk of 250 moves it by 250


def test_imap_over_an_unsized_input_counts_up_without_a_total(backend):
    seen: list[int] = []
    got = list(
        imap(
            zoo.square,
            (i for i in range(300)),
            progress=seen.append,
            ordered=False,
            **backend.kwargs,
        )
    )
    assert sorted(got) == [i * i for i in range(300)] and sum(seen) == 300


def test_a_tqdm_bar_of_yours_is_updated_and_left_open():
    from tqdm import tqdm

    bar = tqdm(total=100, file=io.StringIO())
    pmap(zoo.square, range(100), chunksize=10, progress=bar, backend="thread")
    assert bar.n == 100 and not bar.disable
    bar.close()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_progress_true_draws_a_bar_on_stderr_that_ends_at_total(how):
    code = (
        "import pickmap\n"
        "if __name__ == '__main__':\n"
        f"    print(len(pickmap.pmap(abs, range(500), chunksize=100{', progress=True' if how == 'argument' else ''})))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PICKMAP_")}
    env["PYTHONPATH"] = SRC
    if how == "environment":
        env["PICKMAP_PROGRESS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "500"
    assert "500/500" in done.stderr, done.stderr


@pytest.mark.parametrize("value,error", [("yes please", TypeError), (42, TypeError)])
def test_a_bad_progress_value_is_a_clear_error(value, error):
    with pytest.raises(error, match="progress must be"):
        pmap(zoo.square, [1], progress=value)


def test_a_bad_progress_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PICKMAP_PROGRESS", "maybe")
    with pytest.raises(ValueError, match="PICKMAP_PROGRESS"):
        pmap(zoo.square, [1])
