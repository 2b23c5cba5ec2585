"""`lbctl run`: source -> desired state -> mode (diff -> kernel), links followed as they come.

One thread, one loop: poll the source (cheap when nothing changed), sync the mode when the
source yields a new snapshot, and wait on the netlink link-event socket, and on the source's
own wake-up (``fileno()``: the Kubernetes source's watch events), until the next poll.

Changes are tracked as kube-proxy's BoundedFrequencyRunner does it: a change after a quiet
period is synced at once; changes that come faster than ``min_sync_period`` wait for it and
coalesce into one sync of the newest snapshot. Each sync is incremental: the service ports of
services whose objects did not change are reused (``PortsCache``), the eBPF mode's desired state
is computed only for the service ports that did (``DesiredCache``), and the reconciler visits
only the frontends whose desired entry differs, writing only the map entries that do. The
snapshots' trigger times (the Kubernetes source's EndpointSlice last-change-trigger-times) are
queued with each snapshot and observed once programmed (kubeproxy_network_programming_duration_seconds).
A failed sync is retried on the next turn from a fresh read of the kernel, and every
``sync_period`` (kube-proxy's syncPeriod) the mode re-reads the kernel and repairs whatever
changed behind the agent's back.

A source that cannot be read at all (``SourceUnavailable``) never means "no services": at
start the agent refuses to start before touching the kernel; later it keeps everything
programmed and polls again every interval, logging the outage once and its end.
"""
from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lbctl.datapath.base import SyncResult
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.model.desired import PortsCache, service_ports
from lbctl.sources.base import SourceUnavailable

log = logging.getLogger("lbctl.agent.loop")

RTMGRP_LINK = 1


@dataclass
class AgentOptions:
    interval: float = 1.0             # seconds between source polls
    detach_on_exit: bool = False      # False: leave the datapath serving on exit
    link_rescan: float = 30.0         # seconds between full link scans that also verify filters
    sync_period: float = 30.0         # seconds between full resyncs that re-read the kernel
    min_sync_period: float = 0.0      # at most one sync of changes per this many seconds


class Agent:
    def __init__(self, source, cfg: ebpf.DatapathConfig | None = None,
                 options: AgentOptions = AgentOptions(), mode=None,
                 clock: Callable[[], float] = time.monotonic, observer=None):
        self.source = source
        self.observer = observer   # lbctl.agent.status.Operations: health, metrics, status file
        self.mode = mode or EbpfMode(cfg or ebpf.DatapathConfig())
        self.options = options
        self.clock = clock
        self.synced = threading.Event()       # set after the first successful sync
        self.syncs = 0
        self.resyncs = 0
        self._reported: set[str] = set()
        self._unavailable: str | None = None  # the source's outage, while it lasts
        self._programmed = False              # a snapshot was given to the mode
        self._retry_delay = 0.0               # backoff of the retries of a failed sync
        self._next_retry = 0.0
        self._next_resync = clock() + options.sync_period   # reset when the mode starts
        self._ports = PortsCache()            # service ports of unchanged services, reused
        self._held = None                     # a snapshot waiting for min_sync_period
        self._last_sync: float | None = None  # when the last sync of a snapshot started

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
        self._held = None
        self._last_sync = self.clock()
        ports = service_ports(snapshot, self._ports)
        result = self.mode.sync(ports)
        self._programmed = True
        self.report(list(snapshot.problems) + list(self.mode.problems))
        return self._done(result, started, kind="change", ports=ports)

    def retry(self) -> SyncResult:
        started = time.monotonic()
        return self._done(self.mode.sync(None), started, kind="retry")

    def resync(self) -> SyncResult:
        """Reads the kernel back and repairs any difference from the last desired state."""
        started = time.monotonic()
        self._next_resync = self.clock() + self.options.sync_period   # also when this one fails
        resync = getattr(self.mode, "resync", None)
        result = resync() if resync is not None else self.mode.sync(None)
        self.resyncs += 1
        if result.changed:
            log.warning("resync (%s): the kernel differed from what was programmed; repaired: %s",
                        self.mode.name, result)
        return self._done(result, started, quiet=True, kind="resync")

    def _done(self, result: SyncResult, started: float, quiet: bool = False, kind: str = "change",
              ports=None) -> SyncResult:
        """After a sync of a snapshot, a retry, or (quiet) a resync: `syncs` counts the first two
        (what a change waits for), `resyncs` the last."""
        if not quiet:
            self.syncs += 1
        for error in result.errors:
            log.error("sync: %s", error)
        if getattr(self.mode, "needs_retry", False):
            # a failed sync is retried with backoff (interval, doubling, at most sync_period):
            # each retry re-reads the maps, which a kernel that keeps refusing must not cost each turn
            self._retry_delay = min(max(self.options.interval, 2 * self._retry_delay), self.options.sync_period)
            self._next_retry = self.clock() + self._retry_delay
        else:
            self._retry_delay = 0.0
            self.synced.set()
        if (result.changed and not quiet) or result.errors:
            log.info("sync (%s): %s in %.1f ms", self.mode.name, result,
                     (time.monotonic() - started) * 1000)
        if self.observer is not None:
            ok = not result.errors and not getattr(self.mode, "needs_retry", False)
            self.observer.synced(kind, result, time.monotonic() - started, ok, ports, sorted(self._reported))
        return result

    def run(self, stop: threading.Event | None = None, max_seconds: float | None = None) -> None:
        """Runs until `stop` is set (or `max_seconds` passed). Raises SourceUnavailable, before
        touching the kernel, when the source cannot be read at start."""
        from pyroute2 import IPRoute

        stop = stop or threading.Event()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        # First the source: a directory that is not there must not start the mode, whose
        # start removes what other modes left and whose first sync would empty the datapath.
        first = self.source.poll()
        if first is not None and self.observer is not None:
            self.observer.queued(first.trigger_times)
        wake = self.source.fileno() if hasattr(self.source, "fileno") else None
        watches_links = hasattr(self.mode, "attach_links")
        housekeeping = getattr(self.mode, "housekeeping", None)   # deferred kernel work (nftables)
        self.mode.start()
        self._next_resync = self.clock() + self.options.sync_period
        clean_exit = False
        try:
            with IPRoute() as ipr, link_events() as events:
                if watches_links:
                    self.mode.attach_links(ipr, verify=True)
                last_scan = time.monotonic()
                while not stop.is_set():
                    if deadline and time.monotonic() > deadline:
                        break
                    self.turn(housekeeping, first=first)
                    first = None
                    waits = ([events] if watches_links else []) + ([wake] if wake is not None else [])
                    ready, _, _ = select.select(waits, [], [], self._wait())
                    if not watches_links:
                        continue
                    ready = [r for r in ready if r is events]
                    # A link appeared or vanished (or events were lost): rescan. Link events
                    # are rare (a pod starting or stopping), a scan is one netlink dump. Links
                    # whose attach failed are tried again on every turn.
                    if time.monotonic() - last_scan > self.options.link_rescan:
                        self.mode.attach_links(ipr, verify=True)
                        last_scan = time.monotonic()
                    elif (ready and drain(events)) or getattr(self.mode, "pending_links", False):
                        self.mode.attach_links(ipr)
            clean_exit = True
        finally:
            # After a crash the datapath stays as it is, serving: detaching would take every
            # service down on the node because of a bug in the control plane.
            self.mode.stop(self.options.detach_on_exit and clean_exit)

    def turn(self, housekeeping=None, first=None) -> None:
        """One poll (or the snapshot `first`, read before the mode started) and, if needed, one
        sync; every sync_period, a resync. An unexpected error is logged and the loop goes on:
        the programmed datapath keeps serving, and the next change is tried afresh."""
        try:
            snapshot = first if first is not None else self.poll()
            if snapshot is not None and not first and self._too_soon():
                self._held = snapshot             # synced when min_sync_period has passed
                snapshot = None
            elif snapshot is None and self._held is not None and not self._too_soon():
                snapshot = self._held
            if snapshot is not None:
                self.sync_snapshot(snapshot)
            elif self._held is not None:
                pass                              # a change waits: no retry or resync before it
            elif getattr(self.mode, "needs_retry", False):
                if self.clock() >= self._next_retry:
                    self.retry()
            elif self._programmed and self.clock() >= self._next_resync:
                self.resync()
            if housekeeping is not None:
                housekeeping()
        except Exception:
            log.exception("unexpected error in this turn; the datapath keeps its last state")

    def _too_soon(self) -> bool:
        """A sync of changes now would come sooner than min_sync_period after the last one."""
        return (self._last_sync is not None
                and self.clock() - self._last_sync < self.options.min_sync_period)

    def _wait(self) -> float:
        """How long the loop may sleep: until the next poll, or until a held change is due."""
        wait = self.options.interval
        if self._held is not None and self._last_sync is not None:
            wait = min(wait, max(0.0, self._last_sync + self.options.min_sync_period - self.clock()))
        return wait

    def poll(self):
        """The source's news, or None. An unreadable source keeps what is programmed: its
        outage is logged once, and once more when it ends."""
        try:
            snapshot = self.source.poll()
        except SourceUnavailable as exc:
            if str(exc) != self._unavailable:
                log.error("%s; keeping every service programmed as it is, reading again every "
                          "%gs", exc, self.options.interval)
                self._unavailable = str(exc)
            return None
        if self._unavailable is not None:
            log.info("resolved: %s", self._unavailable)
            self._unavailable = None
        if snapshot is not None and self.observer is not None:   # a change waits for a sync
            self.observer.queued(snapshot.trigger_times)
        return snapshot


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
