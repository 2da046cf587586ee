"""``dill`` (alias ``pathos``): pathos' ``multiprocess`` processes and dill serialization.

dill carries the most (interactive sessions, some generators' code objects,
more exotic closures) and is the slowest serializer, hence last before threads
in the probe's ladder.
"""

from __future__ import annotations

from ._process import ProcessBackend


class DillBackend(ProcessBackend):
    name = "dill"
    serializer = "dill"
    process_package = "multiprocess"
