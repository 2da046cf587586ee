"""The classic failure, fixed: Pool.map(self.f, ...) inside a class.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import functools
import threading

from pickmap import explain, pmap


class SomeClass:
    def __init__(self) -> None:
        self.offset = 10

    def f(self, x: int) -> int:
        return x * x + self.offset

    def __private(self, x: int) -> int:  # name-mangled: plain pickle cannot load it back
        return -x

    def go(self) -> list[int]:
        return pmap(self.f, range(10))

    def go_private(self) -> list[int]:
        return pmap(self.__private, range(5))


def module_function(x: int) -> int:
    return x + 1


def main() -> None:
    print("SomeClass().go()         ->", SomeClass().go())
    print("SomeClass().go_private() ->", SomeClass().go_private())

    scale = 3
    lock = threading.Lock()
    kinds = {
        "builtin (abs)": abs,
        "module-level function in __main__": module_function,
        "bound method self.f": SomeClass().f,
        "lambda closure": lambda x: x * scale,
        "functools.partial(pow, 2)": functools.partial(pow, 2),
        "closure holding a lock": lambda x: (lock, x)[1],
    }
    for label, func in kinds.items():
        plan = explain(func, [1, 2, 3])
        print(f"\n{label}: pmap would use {plan.backend!r}")
        print(plan)
        assert pmap(func, [1, 2, 3]) == list(map(func, [1, 2, 3]))


if __name__ == "__main__":
    main()
