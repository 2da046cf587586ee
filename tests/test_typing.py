"""pmap, imap and pickmap.Executor are generic in the callable's return type, as
``mypy --strict`` sees them from a user's code (tests/typing/usage.py)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
USAGE = os.path.join(HERE, "typing", "usage.py")
MISUSE = os.path.join(HERE, "typing", "misuse.py")


def _expectations() -> dict[int, str]:
    with open(USAGE, encoding="utf-8") as file:
        return {
            number: match.group(1).strip()
            for number, line in enumerate(file, start=1)
            if (match := re.search(r"reveal_type\(.*# expect: (.+)$", line))
        }


def _marked_lines(path: str) -> set[int]:
    with open(path, encoding="utf-8") as file:
        return {
            number for number, line in enumerate(file, start=1) if line.rstrip().endswith("# error")
        }


def _mypy(path: str, cache: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", cache, path],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _short(type_text: str) -> str:
    # mypy names builtins and some stdlib classes by their full path in some versions
    return re.sub(r"\b(?:builtins|concurrent\.futures\._base)\.", "", type_text)


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("mypy")
    done = _mypy(USAGE, str(tmp_path_factory.mktemp("mypy-cache")))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_typed_user_file_passes_mypy_strict(mypy_output: str) -> None:
    assert "Success" in mypy_output or "error" not in mypy_output


def test_pmap_of_an_int_to_str_function_is_a_list_of_str(mypy_output: str) -> None:
    revealed = {
        int(number): _short(text)
        for number, text in re.findall(
            r'usage\.py:(\d+): note: Revealed type is "(.+)"', mypy_output
        )
    }
    expected = _expectations()
    assert expected, "no reveal_type lines found in tests/typing/usage.py"
    assert revealed == expected


def test_the_typed_usage_file_also_runs() -> None:
    done = subprocess.run(
        [sys.executable, USAGE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "list" in done.stderr  # typing.reveal_type prints to stderr at run time


def test_mypy_rejects_wrong_item_types_arities_options_and_executor_arguments(
    tmp_path: pathlib.Path,
) -> None:
    pytest.importorskip("mypy")
    done = _mypy(MISUSE, str(tmp_path))
    flagged = {int(n) for n in re.findall(r"misuse\.py:(\d+): error:", done.stdout)}
    assert done.returncode == 1, done.stdout + done.stderr
    assert flagged == _marked_lines(MISUSE), done.stdout
