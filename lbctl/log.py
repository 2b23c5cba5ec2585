"""Logging as kube-proxy's klog does it: `-v N` verbosity levels, one line per event, and a flood
of identical errors summarised instead of repeated.

Levels (klog's conventions, which kube-proxy follows):

    -v 0   (default) changes and problems: a service added, a sync that failed, a port that
           cannot be bound; warnings and errors
    -v 2   a summary line per sync (what changed, how long it took), servers opened and closed
    -v 4+  debugging: every decision, every object

``V(n)`` is the logging level of a message shown from ``-v n`` on: ``log.log(V(2), ...)``. Below
4 the levels sit just under INFO (INFO - n), from 4 on under DEBUG, so that plain
``log.debug`` is -v 4, as klog's V(4) is "debug".

An error that repeats (the same logger, level and text) is written once; the copies that follow
within ``window`` seconds are counted, and the next time the text is written, or when the
window is flushed, one line says how many were held back: "... (repeated 57 times in 60s)".
Normal states never reach this filter as errors: they are logged at INFO or below.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

DEBUG_FROM = 4          # -v 4 and above: debug


def V(n: int) -> int:
    """The logging level of a message shown at verbosity ``n`` and above."""
    if n <= 0:
        return logging.INFO
    if n < DEBUG_FROM:
        return logging.INFO - n
    return max(1, logging.DEBUG - (n - DEBUG_FROM))


class RepeatSummary(logging.Filter):
    """Holds back repeats of a warning or error within ``window`` seconds and says how many
    there were. Thread-safe (the HTTP servers log from their own threads)."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 min_level: int = logging.WARNING):
        super().__init__()
        self.window = window
        self.clock = clock
        self.min_level = min_level
        self._lock = threading.Lock()
        self._seen: dict[tuple, list] = {}      # key -> [first time, held back, a record]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or getattr(record, "_lbctl_summary", False):
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        summaries = []
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return False
            if entry is not None and entry[1]:
                summaries.append(self._summary(entry))
            self._seen[key] = [now, 0, record]
            summaries += self._expired(now)
        for summary in summaries:
            logging.getLogger(summary.name).handle(summary)
        return True

    def flush(self, everything: bool = True) -> None:
        """Writes the summaries of every window that has ended, or (at exit) of all."""
        with self._lock:
            summaries = self._expired(float("inf") if everything else self.clock())
        for summary in summaries:
            logging.getLogger(summary.name).handle(summary)

    def _expired(self, now: float) -> list[logging.LogRecord]:
        out = []
        for key, entry in list(self._seen.items()):
            if now - entry[0] >= self.window:
                if entry[1]:
                    out.append(self._summary(entry))
                del self._seen[key]
        return out

    def _summary(self, entry: list) -> logging.LogRecord:
        first, count, record = entry
        seconds = min(self.window, max(0.0, self.clock() - first))
        summary = logging.makeLogRecord(dict(
            name=record.name, levelno=record.levelno, levelname=record.levelname,
            msg="%s (repeated %d times in %ds)", args=(record.getMessage(), count, round(seconds)),
            _lbctl_summary=True))
        return summary


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (as logging's last resort does), not to the
    stream of the moment it was made: one that was replaced and closed since (a test's
    capture) would fail every later line."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_summary_filter: RepeatSummary | None = None
_handler: logging.Handler | None = None


def setup(verbosity: int = 0, window: float = 60.0) -> RepeatSummary:
    """Configures the root logger for `-v verbosity`; returns the repeat filter (flush it at exit)."""
    global _summary_filter, _handler
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    _summary_filter = RepeatSummary(window)
    handler.addFilter(_summary_filter)
    root = logging.getLogger()
    if _handler is not None:          # set up again (tests call main() many times): ours only
        root.removeHandler(_handler)
    _handler = handler
    root.addHandler(handler)
    root.setLevel(V(verbosity))
    for n in range(1, DEBUG_FROM):
        logging.addLevelName(V(n), "INFO")   # klog writes every V(n) line as "I"
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    return _summary_filter


def flush(everything: bool = True) -> None:
    """The summaries of held-back repeats: of every window (at exit), or of those that ended (the
    agent calls this after each sync, so that a flood that stopped is summarised without waiting
    for the next line)."""
    if _summary_filter is not None:
        _summary_filter.flush(everything)
