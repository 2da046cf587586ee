"""Shared-memory segments: large buffers written once, mapped (not copied) by the reader.

A segment is a file on tmpfs (``/dev/shm``), else in the temp directory; its
name is ``pickmap-<caller pid>-<writer>-<n>`` so that anything a dead caller
left behind can be found and removed (:func:`sweep_dead`, run once per
process on first use). Who removes a segment:

- items and results: the *reader*, right after mapping it (the mapping
  outlives the name), so nothing is left even if the caller is then killed;
- a callable's buffers: the caller, when its ship-once entry dies (the object
  is gone or changed), or at exit — a ``SIGKILL`` or ``SIGTERM`` leaves those
  behind until the next pickmap process sweeps them.

When neither directory can take a segment (read-only, full: Docker's default
``/dev/shm`` is 64 MB), :func:`write` returns ``None`` and the caller sends
the bytes through the pipe instead; a warning says so once.
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import sys
import threading
from collections.abc import Iterable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any, NamedTuple
else:
    from ._records import NamedTuple

__all__ = ("Segment", "map_segment", "pid_alive", "segment_dirs", "sweep_dead", "unlink", "write")

PREFIX = "pickmap-"
_counter = itertools.count()
_lock = threading.Lock()
_dirs: list[str] | None = None
_warned = False
_swept = False
#: Segments this process made and must remove (callables); items and results are removed by their readers.
_OWNED: set[str] = set()


class Segment(NamedTuple):
    """Where a buffer lives: ``size`` bytes at ``offset`` in the file ``path``."""

    path: str
    offset: int
    size: int
    reader_unlinks: bool  # items and results: the reader removes it once mapped


def segment_dirs() -> list[str]:
    """Candidate directories, best first: tmpfs, then the temp directory."""
    global _dirs
    if _dirs is None:
        found = [d for d in ("/dev/shm", _temp_dir()) if os.path.isdir(d) and os.access(d, os.W_OK)]
        _dirs = list(dict.fromkeys(found))
        if os.path.isdir("/dev/shm") and "/dev/shm" not in _dirs:
            _warn_once(PermissionError("/dev/shm is not writable"))
    return _dirs


def _temp_dir() -> str:
    """``tempfile.gettempdir()``, without importing tempfile (~5 ms: shutil, bz2, lzma, random)
    in a first call that has not: the first writable of the places it looks at, in its order."""
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        return str(tempfile.gettempdir())  # it may have been told (tempfile.tempdir)
    candidates = [os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")]
    candidates += ["/tmp", "/var/tmp", "/usr/tmp", os.getcwd()]
    for directory in candidates:
        if directory and os.path.isdir(directory) and os.access(directory, os.W_OK):
            return os.path.abspath(directory)
    return os.getcwd()


def _warn_once(error: OSError) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    import warnings

    from . import _logs

    _logs.warning(
        "could not use shared memory (%s): large buffers go through the temp directory or the pipe",
        error,
    )

    warnings.warn(
        f"pickmap could not use shared memory ({error}); large buffers go through the temp directory "
        f"or the pipe instead (slower). Give /dev/shm room, e.g. `docker run --shm-size=2g`",
        RuntimeWarning,
        stacklevel=4,
    )


def write(
    buffers: list[memoryview], *, caller_pid: int, writer: str, reader_unlinks: bool
) -> list[Segment] | None:
    """Write ``buffers`` into one new segment; their locations, or ``None`` if no directory could take them."""
    sweep_dead()
    total = sum(b.nbytes for b in buffers)
    name = f"{PREFIX}{caller_pid}-{writer}-{next(_counter)}"
    for directory in list(segment_dirs()):
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as error:
            _warn_once(error)
            continue
        try:
            with os.fdopen(fd, "wb") as file:
                # Reserve the space first: a full tmpfs fails here, not with SIGBUS on a later read.
                os.posix_fallocate(file.fileno(), 0, max(total, 1))
                for buffer in buffers:
                    file.write(buffer)
        except OSError as error:
            _remove(path)
            _warn_once(error)
            continue
        if not reader_unlinks:
            _OWNED.add(path)
        segments, offset = [], 0
        for buffer in buffers:
            segments.append(Segment(path, offset, buffer.nbytes, reader_unlinks))
            offset += buffer.nbytes
        return segments
    return None


# Before 3.13 an mmap object keeps a duplicate of the file's descriptor open
# while it lives: results a caller keeps would each hold one, and a few
# thousand would exhaust the process's descriptors. There, a writable segment
# (items, results: read once, by one reader) is mapped through libc instead
# (see _DescriptorFreeMapper), else read into memory.
_MAP_WITHOUT_FD = sys.version_info >= (3, 13)


def progress_segment(writer: str, size: int = 16) -> tuple[str, mmap.mmap]:
    """A small zeroed segment both sides map shared and writable (a worker's progress slot).

    Its own file, not multiprocessing's shared heap: the heap grows by arenas
    that each hold a descriptor for the life of the process, and needs
    ``/dev/shm``. The worker removes the name once it has mapped it.
    """
    sweep_dead()
    name = f"{PREFIX}{os.getpid()}-{writer}-{next(_counter)}"
    for directory in segment_dirs():
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            continue
        try:
            os.write(fd, bytes(size))
            return path, mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except OSError:
            _remove(path)
        finally:
            os.close(fd)
    # No directory takes it (a read-only or full /dev/shm and temp dir): an
    # anonymous memfd, which the worker opens through /proc while we keep it open.
    fd = os.memfd_create("pickmap-progress")
    os.write(fd, bytes(size))
    path = f"/proc/{os.getpid()}/fd/{fd}"
    _MEMFDS[path] = fd
    return path, mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)


_MEMFDS: dict[str, int] = {}  # progress slots without a directory: /proc path -> our descriptor


def map_progress(path: str, size: int = 16) -> mmap.mmap:
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_WRITE)
    if not path.startswith("/proc/"):
        _remove(path)
    return mapping


def map_segment(path: str, *, writable: bool) -> Any:
    """A whole segment as a buffer: a read-only mapping, or private writable memory
    (copy-on-write mapping where an mmap can drop its descriptor, else one read)."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if not writable:
            return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
        if _MAP_WITHOUT_FD:
            return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY, trackfd=False)  # type: ignore[call-arg]
        mapper = _descriptor_free_mapper()
        if mapper is not None:
            try:
                return mapper.map(file.fileno(), size)
            except OSError:
                pass  # address space or map count exhausted: the read below still works
        buffer = bytearray(size)
        file.readinto(buffer)
        return buffer


class _DescriptorFreeMapper:
    """Copy-on-write mappings that hold no descriptor, through libc's ``mmap`` (Python < 3.13).

    Reading a 4 MB result into memory costs the reader a copy and the page
    faults of fresh memory; a mapping costs neither until a page is touched.
    The buffer handed out is a ``memoryview`` of a ctypes array at the
    mapping's address: every view, slice or numpy array made from it keeps
    that array alive, and the mapping is unmapped when the array goes. The
    array type's length is rounded up to one of a few sizes per doubling,
    because ctypes keeps every array type it makes; the buffer and its views
    are sliced to the file's size, so they never reach the pages past its
    end (only the ctypes array itself, their ``.obj``, spans them).
    """

    def __init__(self) -> None:
        import ctypes
        import weakref

        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = (
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        )
        self._munmap = libc.munmap
        self._munmap.restype = ctypes.c_int
        self._munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        self._failed = ctypes.c_void_p(-1).value
        self._protection, self._flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
        self._ctypes = ctypes
        self._finalize = weakref.finalize

    def map(self, fd: int, size: int) -> memoryview:
        length = _rounded_length(size)
        address = self._mmap(None, length, self._protection, self._flags, fd, 0)
        if address is None or address == self._failed:
            error = self._ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        try:
            owner = (self._ctypes.c_ubyte * length).from_address(address)
            unmap = self._finalize(owner, self._munmap, address, length)
        # Not BaseException, on purpose: a KeyboardInterrupt here may come after finalize
        # registered, and unmapping then would unmap twice; before, it leaks one mapping.
        except Exception:
            self._munmap(address, length)
            raise
        unmap.atexit = False  # not at exit: a view another exit handler uses must keep its pages
        return memoryview(owner).cast("B")[:size]  # never the pages past the file's end


def _rounded_length(size: int) -> int:
    """``size`` rounded up to whole pages, then to 4, 5, 6 or 7 times a power of two pages."""
    pages = -(-max(size, 1) // mmap.PAGESIZE)
    if pages > 4:
        step = 1 << (pages.bit_length() - 3)
        pages = -(-pages // step) * step
    return pages * mmap.PAGESIZE


_mapper: _DescriptorFreeMapper | None = None
_mapper_failed = False


def _descriptor_free_mapper() -> _DescriptorFreeMapper | None:
    """The libc mapper, made on first use; ``None`` where ctypes or libc's ``mmap`` is not to be had."""
    global _mapper, _mapper_failed
    if _mapper is None and not _mapper_failed:
        try:
            _mapper = _DescriptorFreeMapper()
        except (ImportError, OSError, AttributeError):
            _mapper_failed = True
    return _mapper


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def unlink(paths: Iterable[str]) -> None:
    for path in list(paths):
        _OWNED.discard(path)
        fd = _MEMFDS.pop(path, None)
        if fd is not None:
            os.close(fd)
        else:
            _remove(path)


def _ours() -> Iterable[tuple[str, str]]:
    """``(path, name after the prefix)`` of every pickmap segment in the candidate directories."""
    for directory in segment_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(PREFIX):
                yield os.path.join(directory, name), name[len(PREFIX) :]


def unlink_writer(caller_pid: int, writer: str) -> None:
    """Remove what one writer (a worker that died) may have left."""
    stem = f"{caller_pid}-{writer}-"
    for path, rest in list(_ours()):
        if rest.startswith(stem):
            _remove(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead() -> None:
    """Remove segments (and old spill files) whose caller process no longer exists. Once per process."""
    global _swept
    if _swept:
        return
    with _lock:
        if _swept:
            return
        _swept = True
        for path, rest in list(_ours()):
            pid_text = rest.partition("-")[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                _remove(path)


def _forget_in_child() -> None:
    global _swept
    _OWNED.clear()  # the parent owns those; a forked worker must not remove them at its exit
    _swept = True  # the parent swept already


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(lambda: unlink(_OWNED))


def view(mapping: Any, segment: Segment) -> memoryview:
    return memoryview(mapping)[segment.offset : segment.offset + segment.size]
