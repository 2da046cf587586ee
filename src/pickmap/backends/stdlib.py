"""``stdlib``: ``multiprocessing`` processes, the C pickler with a private dispatch table.

The cheapest process backend: the C pickler is the fastest serializer, and the
private table (``serializers.StdlibSerializer``) adds what plain
``Pool.map(self.f, ...)`` lacks — private (``self.__f``) and re-bound methods.
"""

from __future__ import annotations

from ._process import ProcessBackend


class StdlibBackend(ProcessBackend):
    name = "stdlib"
    serializer = "stdlib"
