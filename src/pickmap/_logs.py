"""Logging: pickmap's own decisions, and records your tasks emit in workers, delivered to your handlers.

pickmap never imports :mod:`logging` itself (it costs 13 ms at import): its
decisions are recorded on the ``pickmap`` logger (DEBUG: backend and why,
start method, workers, chunk size, shared memory; WARNING: a fallback) once
your program has imported logging, which configuring it does.

Records a task emits with :mod:`logging` in a worker process travel back with
the chunk's reply and are handled by the caller's logger of the same name, so
your handlers, formatters and levels apply; ``record.process`` is the
worker's pid (``%(process)d`` in a format shows it). Workers forward records
at the level the caller's root logger has; while the caller has not
configured logging, workers do nothing with it. On a cluster (dask) nothing
is forwarded: use dask's own ``client.forward_logging()``.
"""

from __future__ import annotations

import collections
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see _records.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ("Forwarder", "caller_levels", "debug", "deliver", "install_forwarder", "warning")


def _logger() -> Any:
    logging = sys.modules.get("logging")
    return logging.getLogger("pickmap") if logging is not None else None


def debug(message: str, *args: Any) -> None:
    logger = _logger()
    if logger is not None and logger.isEnabledFor(10):
        logger.debug(message, *args)


def warning(message: str, *args: Any) -> None:
    logger = _logger()
    if logger is not None:
        logger.warning(message, *args)


def caller_levels() -> tuple[tuple[str, int], ...] | None:
    """When the caller has configured logging (a root handler): the root logger's level
    (named ``""``) and every logger's level the caller set, so a worker lets through the
    records the caller would handle, whatever the start method. None otherwise."""
    logging = sys.modules.get("logging")
    if logging is None or not logging.getLogger().handlers:
        return None
    levels = [("", int(logging.getLogger().getEffectiveLevel()))]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        level = getattr(logger, "level", logging.NOTSET)  # placeholders have none
        if level != logging.NOTSET:
            levels.append((name, int(level)))
    return tuple(levels)


class Forwarder:
    """A logging handler, made in a worker, that keeps records for the next reply."""

    def __init__(self) -> None:
        import logging

        class _Handler(logging.Handler):
            def emit(inner, record: Any) -> None:
                self.records.append(_plain(record))

        self.records: collections.deque[dict[str, Any]] = collections.deque()
        self.handler = _Handler()

    def take(self) -> list[dict[str, Any]]:
        taken = []
        while self.records:
            taken.append(self.records.popleft())
        return taken


def _plain(record: Any) -> dict[str, Any]:
    """The record as plain values: the message formatted, an exception as text."""
    import logging

    fields = dict(record.__dict__)
    fields["msg"] = record.getMessage()
    fields["args"] = None
    if record.exc_info:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
    fields["exc_info"] = None
    return {
        key: value
        for key, value in fields.items()
        if isinstance(value, (str, int, float, bool, type(None)))
    }


_installed: Forwarder | None = None
_applied: dict[str, int] = {}  # the levels this worker took from the caller for the last call


def install_forwarder(levels: tuple[tuple[str, int], ...]) -> Forwarder:
    """In a worker process: the root logger forwards to the caller (once). Handlers the
    process has (copies inherited from the caller by fork) are dropped: the caller's own
    handle the forwarded records, so nothing is printed twice."""
    global _installed
    import logging

    root = logging.getLogger()
    if _installed is None:
        _installed = Forwarder()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_installed.handler)
    wanted = dict(levels)
    # A logger the caller has since reset goes back to NOTSET, so a warm worker drops
    # nothing the caller now wants. Levels are assigned, and the loggers' caches
    # cleared once: setLevel clears every logger's cache on each call.
    changes = {name: wanted.get(name, logging.NOTSET) for name in {*wanted, *_applied}}
    changes = {name: level for name, level in changes.items() if _applied.get(name) != level}
    for name, level in changes.items():
        if name:
            logging.getLogger(name).level = level
    if changes:  # setLevel clears the loggers' caches, once for all of them
        root.setLevel(wanted.get("", root.level))
    _applied.clear()
    _applied.update(wanted)
    return _installed


def deliver(fields: dict[str, Any]) -> None:
    """In the caller: hand a worker's record to the caller's logger of that name."""
    import logging

    record = logging.makeLogRecord(fields)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):  # the caller's own level for that logger
        logger.handle(record)
