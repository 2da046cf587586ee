"""The one adapter between the engine and anything with ``submit() -> Future``.

Every executor-like backend (a user's ``concurrent.futures.Executor``, the
``ppe`` backend, a dask client) sends self-contained ``Job`` records; this
worker submits each to ``run_job`` and, from the future's done-callback,
posts the replies to a :class:`~pickmap.backends._mailbox.Mailbox` the engine
waits on. A future that fails instead of returning — the executor's process
died (``BrokenProcessPool``), it was cancelled, the cluster lost it — becomes
a ``Lost`` reply naming the chunk, which the engine raises as
``WorkerCrashedError``.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Sequence

from .. import _wire
from .._protocol import Job, Lost, Message
from .._worker import run_job
from ._mailbox import Mailbox
from .base import Worker

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ("FuturesWorker",)

Submit = Callable[..., "concurrent.futures.Future[Any]"]


class FuturesWorker(Worker):
    """``submit(run_job, job)`` per task. ``blobs``: the executor pickles what it carries."""

    def __init__(self, submit: Submit, *, blobs: bool) -> None:
        self._submit = submit
        self._blobs = blobs
        self._mailbox = Mailbox()
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self.waitable = self._mailbox

    def send(self, messages: Sequence[Message]) -> None:
        for job in messages:
            assert isinstance(job, Job), "a self-contained worker takes Job records only"
            seq = job.task.seq
            work: Any = _wire.to_blob([job]) if self._blobs else job
            try:
                future = self._submit(run_job, work)
            except Exception as exc:
                self._mailbox.post(
                    [Lost(seq, f"the executor refused the task: {type(exc).__name__}: {exc}")]
                )
                continue
            self._futures[seq] = future
            future.add_done_callback(functools.partial(self._done, seq))

    def _done(self, seq: int, future: concurrent.futures.Future[Any]) -> None:
        self._futures.pop(seq, None)
        try:
            if future.cancelled():
                self._mailbox.post([Lost(seq, "its future was cancelled")])
                return
            error = future.exception()
            if error is not None:
                self._mailbox.post(
                    [
                        Lost(
                            seq,
                            f"{type(error).__name__}: {error}",
                            getattr(error, "exitcode", None),
                        )
                    ]
                )
                return
            replies = future.result()
            self._mailbox.post(_wire.from_blob(replies) if self._blobs else replies)
        except BaseException as failure:
            self._mailbox.post(
                [Lost(seq, f"its reply could not be read: {type(failure).__name__}: {failure}")]
            )

    def receive(self) -> list[Message]:
        return self._mailbox.take()

    def kill(self) -> None:
        """Cancel what has not started; a running task is left to the executor's owner."""
        for future in list(self._futures.values()):
            future.cancel()
        self._futures.clear()
        self._mailbox.close()
