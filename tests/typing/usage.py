"""A user's typed code: ``mypy --strict`` on this file must pass, and the revealed
types are checked by tests/test_typing.py (each ``reveal_type`` line carries the
type it expects in a comment; ``builtins.`` and module prefixes are dropped).
It also runs: ``python tests/typing/usage.py``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import reveal_type

import pickmap


def label(number: int) -> str:
    return f"#{number}"


def add(a: int, b: float) -> float:
    return a + b


def triple(a: int, b: str, c: bytes) -> tuple[int, str, bytes]:
    return a, b, c


class Model:
    def predict(self, row: list[float]) -> float:
        return sum(row)


labels: list[str] = pickmap.pmap(label, [1, 2, 3])
reveal_type(pickmap.pmap(label, [1]))  # expect: list[str]
reveal_type(pickmap.pmap(add, [1], [2.5]))  # expect: list[float]
reveal_type(pickmap.pmap(triple, [1], ["a"], [b"x"]))  # expect: list[tuple[int, str, bytes]]
reveal_type(pickmap.pmap(Model().predict, [[1.0, 2.0]], workers=2))  # expect: list[float]
reveal_type(pickmap.pmap(label, [1], return_exceptions=True))  # expect: list[str | BaseException]
reveal_type(pickmap.imap(label, range(3)))  # expect: typing.Iterator[str]
unordered = pickmap.imap(label, range(3), ordered=False, chunksize=4)
reveal_type(unordered)  # expect: typing.Iterator[str]
stream: Iterator[float] = pickmap.imap(add, [1, 2], [0.5, 0.5])

with pickmap.Executor(workers=2) as executor:
    reveal_type(executor.submit(label, 1))  # expect: Future[str]
    reveal_type(executor.map(label, [1, 2]))  # expect: typing.Iterator[str]
