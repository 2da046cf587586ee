"""How messages cross: frames on a pipe, out-of-band buffers, shared memory, self-contained blobs.

A *payload* (``serializers.Pickled``) is pickle bytes plus buffers. A buffer
is a ``memoryview`` of the producer's memory, or a ``_shm.Segment`` once it
has been written to shared memory (:func:`share`). Three ways across:

- **pipe frames** (pickmap's own worker processes): a batch of records is
  pickled with protocol 5 and every buffer kept out of band; one frame is
  ``[u64 control length][control: (buffer sizes, pickle)][raw buffers...]``.
  Buffers are written from the producer's memory as they are — never joined
  into one bytes object, never copied into a pickle. The caller's side is
  non-blocking (:class:`Outbox`, :class:`FrameReader`): it never waits on a
  write, so deadlines and deaths are checked while a large chunk is sent. A
  worker reads with a blocking ``FrameReader`` and writes with :func:`write_frame`.
- **shared memory**: a payload's buffers of 64 KiB or more, when they add up
  to :data:`SHARE_MIN_BYTES`, become one segment before framing; only their names cross the pipe, and the reader
  maps them (:func:`resolve`). Read-only for a call's callable (shared by
  every worker and kept across calls), private copy-on-write for items and
  results.
- **blobs** (:func:`to_blob`/:func:`from_blob`): one self-contained ``bytes``
  for an executor or a cluster, which pickles the task itself.
"""

from __future__ import annotations

import _pickle as pickle  # pickle.py's C half: a worker starts without pickle.py (re, enum)
import collections
import os
import struct
from collections.abc import Iterable, Sequence

from . import _shm
from ._protocol import Message
from .serializers import Pickled

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any


__all__ = (
    "SHARE_MIN_BYTES",
    "FrameReader",
    "Outbox",
    "from_blob",
    "resolve",
    "share",
    "to_blob",
)

#: A payload whose out-of-band buffers add up to this much sends them through shared
#: memory instead of the pipe (one segment), counting each of SHARE_BUFFER_MIN_BYTES or more.
SHARE_MIN_BYTES = 256 * 1024
#: Smaller buffers stay on the pipe: a segment costs ~0.1 ms to make, map and remove.
#: A per-buffer threshold of SHARE_MIN_BYTES sent a DataFrame chunk of two 250 kB
#: blocks by pipe; through a segment the dataframe row ran ~10% faster.
SHARE_BUFFER_MIN_BYTES = 64 * 1024
#: Pickle bytes this large travel out of band too (a big list of floats, in-band data).
_DATA_OOB_BYTES = 64 * 1024
_PREFIX = struct.Struct("!Q")


# --------------------------------------------------------------------------- pickling records
def _reduce_view(view: memoryview) -> tuple[Any, tuple[Any, ...]]:
    return memoryview, (pickle.PickleBuffer(view),)


def _reduce_pickled(payload: Pickled) -> tuple[Any, tuple[Any, ...]]:
    data: bytes | pickle.PickleBuffer = payload.data
    if len(payload.data) >= _DATA_OOB_BYTES:
        data = pickle.PickleBuffer(payload.data)
    return Pickled, (data, tuple(payload.buffers))


_RECORD_REDUCERS: dict[type, Any] = {memoryview: _reduce_view, Pickled: _reduce_pickled}


class _RecordPickler(pickle.Pickler):
    dispatch_table = _RECORD_REDUCERS


def _dump_records(messages: Sequence[Message], buffers: list[pickle.PickleBuffer] | None) -> bytes:
    import io

    stream = io.BytesIO()
    callback = None if buffers is None else buffers.append
    _RecordPickler(stream, protocol=5, buffer_callback=callback).dump(list(messages))
    return stream.getvalue()


def encode(messages: Sequence[Message]) -> list[memoryview | bytes]:
    """One frame holding ``messages``: the pieces to write, in order."""
    buffers: list[pickle.PickleBuffer] = []
    head = _dump_records(messages, buffers)
    raws = [b.raw() for b in buffers]
    control = pickle.dumps(([r.nbytes for r in raws], head), protocol=5)
    return [_PREFIX.pack(len(control)) + control, *raws]


# --------------------------------------------------------------------------- shared memory
def _to_share(payload: Any) -> list[int]:
    """Which of ``payload``'s buffers go to a segment: none, or those of
    :data:`SHARE_BUFFER_MIN_BYTES` or more when they add up to :data:`SHARE_MIN_BYTES`."""
    if not isinstance(payload, Pickled):
        return []
    large = [
        i
        for i, b in enumerate(payload.buffers)
        if isinstance(b, memoryview) and b.nbytes >= SHARE_BUFFER_MIN_BYTES
    ]
    total = sum(payload.buffers[i].nbytes for i in large)
    return large if total >= SHARE_MIN_BYTES else []


def has_large(payload: Any) -> bool:
    """Whether ``payload`` has buffers worth a shared-memory segment."""
    return bool(_to_share(payload))


def share(payload: Any, *, transient: bool, writer: str) -> Any:
    """``payload`` with its large buffers moved to one shared-memory segment (once).

    Returns ``payload`` unchanged when nothing is large or no segment could be
    written (then the pipe carries the bytes).
    """
    large = _to_share(payload)
    if not large:
        return payload
    views = [
        payload.buffers[i].cast("B") if payload.buffers[i].format != "B" else payload.buffers[i]
        for i in large
    ]
    segments = _shm.write(views, caller_pid=_caller_pid(), writer=writer, reader_unlinks=transient)
    if segments is None:
        return payload
    buffers: list[Any] = list(payload.buffers)
    for i, segment in zip(large, segments, strict=False):
        buffers[i] = segment
    return Pickled(payload.data, tuple(buffers))


_CALLER_PID: int | None = None


def _caller_pid() -> int:
    return _CALLER_PID if _CALLER_PID is not None else os.getpid()


def set_caller_pid(pid: int) -> None:
    """In a worker: segments it writes are named after the caller, for the caller's sweeps."""
    global _CALLER_PID
    _CALLER_PID = pid


def segment_paths(payload: Any) -> list[str]:
    if not isinstance(payload, Pickled):
        return []
    buffers: tuple[Any, ...] = payload.buffers  # views, and segments once shared
    return sorted({b.path for b in buffers if isinstance(b, _shm.Segment)})


class Mappings:
    """The segments a reader has mapped. Kept ones (callables) stay mapped across calls,
    so a warm worker does not map and fault in a 400 MB ``self`` again."""

    def __init__(self, keep: int = 4) -> None:
        self._kept: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._keep = keep

    def resolve(self, payload: Any) -> Any:
        """``payload`` with every segment replaced by a view of its mapping."""
        if not isinstance(payload, Pickled) or not any(
            isinstance(b, _shm.Segment) for b in payload.buffers
        ):
            return payload
        opened: dict[str, Any] = {}
        buffers = []
        for buffer in payload.buffers:
            if not isinstance(buffer, _shm.Segment):
                buffers.append(buffer)
                continue
            mapping = opened.get(buffer.path) or self._kept.get(buffer.path)
            if mapping is None:
                mapping = _shm.map_segment(buffer.path, writable=buffer.reader_unlinks)
                if buffer.reader_unlinks:
                    _shm.unlink([buffer.path])  # the mapping outlives the name
                else:
                    self._kept[buffer.path] = mapping
                    while len(self._kept) > self._keep:
                        self._kept.popitem(last=False)
            elif buffer.path in self._kept:
                self._kept.move_to_end(buffer.path)
            opened[buffer.path] = mapping
            buffers.append(_shm.view(mapping, buffer))
        return Pickled(payload.data, tuple(buffers))


def resolve(payload: Any) -> Any:
    """Map a payload's segments once, without keeping them (the caller, for results)."""
    return _ONE_SHOT.resolve(payload)


_ONE_SHOT = Mappings(keep=0)


# --------------------------------------------------------------------------- the caller's side: never blocks
class Outbox:
    """Frames waiting to be written to a non-blocking descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._pieces: collections.deque[memoryview] = collections.deque()

    def put(self, messages: Sequence[Message]) -> None:
        for piece in encode(messages):
            view = (
                memoryview(piece).cast("B") if not isinstance(piece, bytes) else memoryview(piece)
            )
            if view.nbytes:
                self._pieces.append(view)
        self.flush()

    @property
    def pending(self) -> bool:
        return bool(self._pieces)

    def flush(self) -> None:
        """Write what the descriptor takes now. ``OSError`` if the reader is gone."""
        while self._pieces:
            try:
                written = os.writev(self.fd, list(self._pieces)[:64])
            except BlockingIOError:
                return
            while written:
                head = self._pieces[0]
                if written >= head.nbytes:
                    written -= head.nbytes
                    self._pieces.popleft()
                else:
                    self._pieces[0] = head[written:]
                    written = 0


class FrameReader:
    """Reads frames as bytes arrive: from a non-blocking descriptor (the caller's side), or
    from a blocking one (a worker's), where :meth:`read` waits for the next frame.

    Each read fills what the frame needs next and, in the same system call, a
    scratch buffer with whatever follows, so a frame of small records costs
    one ``readv``; a large buffer is read straight into its own memory.
    """

    _SCRATCH_BYTES = 1 << 16

    def __init__(self, fd: int, *, blocking: bool = False) -> None:
        self.fd = fd
        self.blocking = blocking
        self._scratch = memoryview(bytearray(self._SCRATCH_BYTES))
        self._ahead = self._scratch[:0]  # read past the current target, not consumed yet
        self._need: list[memoryview] = []  # targets still to fill, in order
        self._stage = "prefix"
        self._prefix = bytearray(_PREFIX.size)
        self._control = bytearray()
        self._head = b""
        self._raws: list[bytearray] = []
        self._begin(memoryview(self._prefix))

    def _begin(self, target: memoryview) -> None:
        self._need = [target] if target.nbytes else []

    @property
    def buffered(self) -> bool:
        """Bytes already read from the descriptor wait here: no need to poll it first."""
        return self._ahead.nbytes > 0

    def read(self) -> list[Message]:
        """Every message complete now. ``EOFError`` when the writer closed the pipe."""
        messages: list[Message] = []
        while True:
            if not self._need:
                done = self._advance()
                if done is not None:
                    messages.extend(done)
                    if self.blocking:
                        # one frame at a time: a worker answers each before it reads on,
                        # so a crash in the next loses none of its replies
                        return messages
                continue
            target = self._need[0]
            if self._ahead.nbytes:
                got = min(self._ahead.nbytes, target.nbytes)
                target[:got] = self._ahead[:got]
                self._ahead = self._ahead[got:]
            else:
                try:
                    got = os.readv(self.fd, [target, self._scratch])
                except BlockingIOError:
                    return messages
                except OSError:  # ECONNRESET: the worker exited with our last write unread
                    if messages:
                        return messages
                    raise EOFError from None
                if got == 0:
                    if messages:
                        return messages
                    raise EOFError
                if got > target.nbytes:
                    self._ahead = self._scratch[: got - target.nbytes]
                    got = target.nbytes
            if got >= target.nbytes:
                self._need.pop(0)
            else:
                self._need[0] = target[got:]

    def _advance(self) -> list[Message] | None:
        if self._stage == "prefix":
            (length,) = _PREFIX.unpack(self._prefix)
            self._control = bytearray(length)
            self._stage = "control"
            self._begin(memoryview(self._control))
            return None
        if self._stage == "control":
            sizes, self._head = pickle.loads(self._control)
            self._raws = [bytearray(size) for size in sizes]
            self._stage = "raws"
            self._need = [memoryview(r) for r in self._raws if len(r)]
            return None
        messages: list[Message] = pickle.loads(self._head, buffers=self._raws)
        self._stage, self._raws, self._head = "prefix", [], b""
        self._begin(memoryview(self._prefix))
        return messages


# --------------------------------------------------------------------------- the worker's side: blocking writes
def write_frame(fd: int, messages: Sequence[Message]) -> None:
    """Write one frame to a blocking descriptor."""
    pieces = [memoryview(p).cast("B") for p in encode(messages)]
    pieces = [p for p in pieces if p.nbytes]
    while pieces:
        written = os.writev(fd, pieces[:64])
        while written:
            if written >= pieces[0].nbytes:
                written -= pieces.pop(0).nbytes
            else:
                pieces[0] = pieces[0][written:]
                written = 0


# --------------------------------------------------------------------------- self-contained blobs
def to_blob(messages: Iterable[Message]) -> bytes:
    """One ``bytes`` holding the records and their buffers (for an executor to carry)."""
    return _dump_records(list(messages), None)


def from_blob(blob: bytes) -> list[Message]:
    messages: list[Message] = pickle.loads(blob)
    return messages
