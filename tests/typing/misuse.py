"""Calls ``mypy --strict`` must reject: each line marked ``# error`` has a type
error that tests/test_typing.py expects mypy to report on that line."""

from __future__ import annotations

import pickmap


def label(number: int) -> str:
    return f"#{number}"


def add(a: int, b: float) -> float:
    return a + b


pickmap.pmap(label, ["not an int"])  # error
pickmap.pmap(add, [1])  # error
pickmap.pmap(label, [1], return_exceptions=True, workers="4")  # error
pickmap.pmap(label, [1], no_such_option=True)  # error
count: list[int] = pickmap.pmap(label, [1])  # error
pickmap.imap(label, [b"bytes"])  # error
with pickmap.Executor() as executor:
    executor.submit(add, "x", 2.0)  # error
    executor.submit(label)  # error
