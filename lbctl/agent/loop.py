"""`lbctl run`: source -> desired state -> mode (diff -> kernel), links followed as they come.

One thread, one loop: poll the source (cheap when nothing changed), sync the mode when the
source yields a new snapshot, and wait on the netlink link-event socket until the next poll.
A failed sync is retried on the next turn from a fresh read of the kernel.
"""
from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass

from lbctl.datapath.base import SyncResult
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.model.desired import service_ports

log = logging.getLogger("lbctl.agent.loop")

RTMGRP_LINK = 1


@dataclass
class AgentOptions:
    interval: float = 1.0             # seconds between source polls
    detach_on_exit: bool = False      # False: leave the datapath serving on exit
    link_rescan: float = 30.0         # seconds between full link scans that also verify filters


class Agent:
    def __init__(self, source, cfg: ebpf.DatapathConfig | None = None,
                 options: AgentOptions = AgentOptions(), mode=None):
        self.source = source
        self.mode = mode or EbpfMode(cfg or ebpf.DatapathConfig())
        self.options = options
        self.synced = threading.Event()       # set after the first successful sync
        self.syncs = 0
        self._reported: set[str] = set()

    def report(self, problems) -> None:
        """Logs each problem once while it lasts (not on every poll), and when it is gone."""
        now = {str(p) for p in problems}
        for text in sorted(now - self._reported):
            log.error("%s", text)
        for text in sorted(self._reported - now):
            log.info("resolved: %s", text)
        self._reported = now

    def sync_snapshot(self, snapshot) -> SyncResult:
        started = time.monotonic()
        result = self.mode.sync(service_ports(snapshot))
        self.report(list(snapshot.problems) + list(self.mode.problems))
        return self._done(result, started)

    def retry(self) -> SyncResult:
        return self._done(self.mode.sync(None), time.monotonic())

    def _done(self, result: SyncResult, started: float) -> SyncResult:
        self.syncs += 1
        for error in result.errors:
            log.error("sync: %s", error)
        if not getattr(self.mode, "needs_retry", False):
            self.synced.set()
        if result.changed or result.errors:
            log.info("sync (%s): %s in %.1f ms", self.mode.name, result,
                     (time.monotonic() - started) * 1000)
        return result

    def run(self, stop: threading.Event | None = None, max_seconds: float | None = None) -> None:
        from pyroute2 import IPRoute

        stop = stop or threading.Event()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        watches_links = hasattr(self.mode, "attach_links")
        housekeeping = getattr(self.mode, "housekeeping", None)   # deferred kernel work (nftables)
        self.mode.start()
        clean_exit = False
        try:
            with IPRoute() as ipr, link_events() as events:
                if watches_links:
                    self.mode.attach_links(ipr, verify=True)
                last_scan = time.monotonic()
                while not stop.is_set():
                    if deadline and time.monotonic() > deadline:
                        break
                    self.turn(housekeeping)
                    if not watches_links:
                        stop.wait(self.options.interval)
                        continue
                    ready, _, _ = select.select([events], [], [], self.options.interval)
                    # A link appeared or vanished (or events were lost): rescan. Link events
                    # are rare (a pod starting or stopping), a scan is one netlink dump.
                    if time.monotonic() - last_scan > self.options.link_rescan:
                        self.mode.attach_links(ipr, verify=True)
                        last_scan = time.monotonic()
                    elif ready and drain(events):
                        self.mode.attach_links(ipr)
            clean_exit = True
        finally:
            # After a crash the datapath stays as it is, serving: detaching would take every
            # service down on the node because of a bug in the control plane.
            self.mode.stop(self.options.detach_on_exit and clean_exit)

    def turn(self, housekeeping=None) -> None:
        """One poll and, if needed, one sync. An unexpected error is logged and the loop goes
        on: the programmed datapath keeps serving, and the next change is tried afresh."""
        try:
            snapshot = self.source.poll()
            if snapshot is not None:
                self.sync_snapshot(snapshot)
            elif getattr(self.mode, "needs_retry", False):
                self.retry()
            if housekeeping is not None:
                housekeeping()
        except Exception:
            log.exception("unexpected error in this turn; the datapath keeps its last state")


@contextlib.contextmanager
def link_events():
    """A netlink socket subscribed to link notifications (RTMGRP_LINK), non-blocking."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> bool:
    """Reads every pending notification; True if there was any (or some were lost)."""
    seen = False
    while True:
        try:
            if not sock.recv(1 << 16):
                return seen
            seen = True
        except BlockingIOError:
            return seen
        except OSError as exc:  # ENOBUFS: the kernel dropped events; a rescan catches up
            log.warning("link events lost (%s): rescanning links", exc)
            seen = True
