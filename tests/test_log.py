"""Logs as kube-proxy's klog: -v levels, and a flood of one error held back and summarised."""
from __future__ import annotations

import logging

from lbctl import log as logs
from lbctl.cli import main as cli


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_levels():
    assert logs.V(0) == logging.INFO
    assert logging.DEBUG < logs.V(3) < logs.V(2) < logs.V(1) < logging.INFO
    assert logs.V(4) == logging.DEBUG and logs.V(6) < logging.DEBUG


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def flood_logger(clock, window=60.0):
    logger = logging.getLogger("lbctl.test.flood")
    logger.propagate = False
    logger.handlers.clear()
    handler = Collect()
    summary = logs.RepeatSummary(window, clock=clock)
    handler.addFilter(summary)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, handler, summary


def test_a_flood_of_one_error_is_summarised():
    clock = Clock()
    logger, out, summary = flood_logger(clock)
    for _ in range(58):
        logger.error("sync: map lb4_services full")
        clock.now += 0.5
    logger.error("another error")
    logger.info("a normal line")
    logger.info("a normal line")
    assert out.lines == ["sync: map lb4_services full", "another error", "a normal line", "a normal line"]
    clock.now = 61
    logger.error("sync: map lb4_services full")
    assert out.lines[4:] == ["sync: map lb4_services full (repeated 57 times in 60s)",
                             "sync: map lb4_services full"]
    logger.error("sync: map lb4_services full")
    summary.flush()
    assert out.lines[-1] == "sync: map lb4_services full (repeated 1 times in 0s)"


def test_a_window_that_ends_quietly_is_summarised_with_the_next_line():
    clock = Clock()
    logger, out, _ = flood_logger(clock, window=10)
    logger.warning("link veth1 gone")
    logger.warning("link veth1 gone")
    clock.now = 30
    logger.warning("something else")
    assert out.lines == ["link veth1 gone", "link veth1 gone (repeated 1 times in 10s)", "something else"]


def test_a_flood_that_stopped_is_summarised_at_the_next_flush():
    clock = Clock()
    logger, out, summary = flood_logger(clock, window=10)
    for _ in range(3):
        logger.error("iptables-restore failed")
    summary.flush(everything=False)
    assert out.lines == ["iptables-restore failed"], "the window has not ended"
    clock.now = 11
    summary.flush(everything=False)
    assert out.lines == ["iptables-restore failed", "iptables-restore failed (repeated 2 times in 10s)"]


def test_v_flag_sets_the_level():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "2", "status"]).v == 2
    assert parser.parse_args(["run", "-v", "4"]).v == 4
    assert parser.parse_args(["run", "--v=3"]).v == 3
    assert parser.parse_args(["run"]).v == 0
    logs.setup(2)
    try:
        assert logging.getLogger().getEffectiveLevel() == logs.V(2)
        assert logging.getLogger("lbctl.x").isEnabledFor(logs.V(2))
        assert not logging.getLogger("lbctl.x").isEnabledFor(logs.V(3))
    finally:
        logs.setup(0)
