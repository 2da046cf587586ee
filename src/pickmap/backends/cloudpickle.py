"""``cloudpickle``: processes whose callable, items and results travel with cloudpickle.

Carries lambdas, closures, nested functions and ``__main__`` functions by
value. Loading uses the C unpickler, so only the dumping side pays for
cloudpickle's Python-level pickler.
"""

from __future__ import annotations

from ._process import ProcessBackend


class CloudpickleBackend(ProcessBackend):
    name = "cloudpickle"
    serializer = "cloudpickle"
