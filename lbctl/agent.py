"""`lbctl run`: source -> desired state -> diff -> maps, and links followed as they come and go.

One thread, one loop: poll the source (cheap when nothing changed), sync when it yields a new
snapshot, and wait on the netlink link-event socket until the next poll. A failed sync is
retried from a fresh read of the maps on the next turn.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass

from . import dump, ebpf
from .desired import desired_state, service_ports
from .model import DesiredState, Problem
from .reconcile import Reconciler, SyncResult

log = logging.getLogger("lbctl.agent")

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTMGRP_LINK = 1
LINK_RESYNC_SECONDS = 30.0   # full link scan, in case netlink events were lost (ENOBUFS)


@dataclass
class AgentOptions:
    interval: float = 1.0             # seconds between source polls
    detach_on_exit: bool = False      # False: leave programs attached and maps pinned on exit


class Agent:
    def __init__(self, source, cfg: ebpf.DatapathConfig, options: AgentOptions = AgentOptions()):
        self.source = source
        self.cfg = cfg
        self.options = options
        self.datapath: ebpf.EbpfDatapath | None = None
        self.reconciler: Reconciler | None = None
        self.desired = DesiredState()
        self.attached: dict[int, str] = {}
        self.synced = threading.Event()       # set after the first successful sync
        self.syncs = 0
        self._reported: set[str] = set()

    # --- pieces -------------------------------------------------------------------------------

    def report(self, problems) -> None:
        """Logs each problem once while it lasts (not on every poll), and when it is gone."""
        now = {str(p) for p in problems}
        for text in sorted(now - self._reported):
            log.error("%s", text)
        for text in sorted(self._reported - now):
            log.info("resolved: %s", text)
        self._reported = now

    def sync_snapshot(self, snapshot) -> SyncResult:
        desired, problems = desired_state(service_ports(snapshot))
        self.report(list(snapshot.problems) + list(problems))
        self.desired = desired
        return self.sync()

    def sync(self) -> SyncResult:
        started = time.monotonic()
        result = self.reconciler.sync(self.desired)
        self.syncs += 1
        if not result.errors:
            dump.write_names(self.cfg.pin_dir, self.reconciler.service_names(self.desired))
            self.synced.set()
        if result.changed or result.errors:
            log.info("sync: %s in %.1f ms (%d services programmed)", result,
                     (time.monotonic() - started) * 1000, len(self.reconciler.services))
        return result

    def scan_links(self, ipr) -> None:
        """Attaches to every matching link not yet done, forgets vanished ones."""
        present = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if ebpf.matches(name, self.cfg.devices):
                present[link["index"]] = name
        for index, name in present.items():
            if index not in self.attached:
                self.attach(ipr, index, name)
        for index in set(self.attached) - set(present):
            log.info("link %s is gone", self.attached.pop(index))

    def attach(self, ipr, index: int, name: str) -> None:
        try:
            ebpf.attach(ipr, index, self.datapath.prog_fd, self.cfg.tc_name)
            self.attached[index] = name
            log.info("attached to %s (ifindex %d)", name, index)
        except Exception as exc:  # a link that vanished meanwhile, or a busy device
            log.warning("could not attach to %s (ifindex %d): %s", name, index, exc)

    def link_event(self, ipr, msg) -> None:
        name = msg.get_attr("IFLA_IFNAME")
        index = msg["index"]
        if msg["header"]["type"] == RTM_DELLINK:
            if self.attached.pop(index, None):
                log.info("link %s is gone", name)
        elif msg["header"]["type"] == RTM_NEWLINK and name and ebpf.matches(name, self.cfg.devices):
            if index not in self.attached:
                self.attach(ipr, index, name)

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, max_seconds: float | None = None) -> None:
        from pyroute2 import IPRoute

        stop = stop or threading.Event()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        self.datapath = ebpf.EbpfDatapath(self.cfg).load()
        try:
            self.reconciler = Reconciler(self.datapath.maps, self.cfg.max_services,
                                         self.cfg.max_backends)
            log.info("datapath loaded; %d services and %d backends restored from %s",
                     len(self.reconciler.services), len(self.reconciler.backend_ids), self.cfg.pin_dir)
            with IPRoute() as ipr, IPRoute() as events:
                events.bind(groups=RTMGRP_LINK)
                self.scan_links(ipr)
                last_scan = time.monotonic()
                while not stop.is_set():
                    if deadline and time.monotonic() > deadline:
                        break
                    snapshot = self.source.poll()
                    if snapshot is not None:
                        self.sync_snapshot(snapshot)
                    elif self.reconciler.dirty:
                        self.sync()
                    ready, _, _ = select.select([events.fileno()], [], [], self.options.interval)
                    if ready:
                        try:
                            for msg in events.get():
                                self.link_event(ipr, msg)
                        except OSError as exc:  # ENOBUFS: events lost, rescan below
                            log.warning("link events lost (%s): rescanning links", exc)
                            last_scan = 0.0
                    if time.monotonic() - last_scan > LINK_RESYNC_SECONDS:
                        self.scan_links(ipr)
                        last_scan = time.monotonic()
        finally:
            if self.options.detach_on_exit:
                names = ebpf.detach_all(self.cfg.tc_name)
                ebpf.remove_pins(self.cfg.pin_dir)
                dump.remove_names(self.cfg.pin_dir)
                log.info("detached from %d link(s) and unpinned maps", len(names))
            else:
                log.info("exiting; programs stay attached and maps pinned under %s "
                         "(`lbctl cleanup` removes them)", self.cfg.pin_dir)
            self.datapath.close()
