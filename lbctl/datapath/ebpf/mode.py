"""The eBPF mode: tc programs on pod links, services in BPF maps (lbctl's own datapath)."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from lbctl.datapath.base import SyncResult, cleanup_other_modes
from lbctl.datapath.ebpf import dump, sock
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.reconcile import Reconciler
from lbctl.model.desired import desired_state
from lbctl.model.objects import DesiredState, ServicePortInfo

log = logging.getLogger("lbctl.mode")


class EbpfMode:
    """tc programs on pod links, BPF maps for services (the default)."""

    name = "ebpf"

    def __init__(self, cfg: ebpf.DatapathConfig = ebpf.DatapathConfig(), switch_modes: bool = True):
        """`switch_modes`: after the first sync, remove what the other modes left on this node
        (`lbctl run`); the demo, a guest on someone's node, passes False."""
        self.cfg = cfg
        self.switch_modes = switch_modes
        self.datapath: ebpf.EbpfDatapath | None = None
        self.reconciler: Reconciler | None = None
        self.attached: dict[int, str] = {}
        self.failed: dict[int, tuple[str, str]] = {}   # ifindex -> (name, why): retried every turn
        self.desired = DesiredState()
        self.problems: tuple = ()
        self._names: dict[int, str] | None = None   # last written for `lbctl dump maps`
        self._notes: dict[int, list[str]] = {}      # attach notes (a foreign filter), logged once
        self.sock: sock.SockLb | None = None        # sock-lb: socket programs (--cgroup-root)

    def start(self) -> None:
        self.datapath = ebpf.EbpfDatapath(self.cfg).load()
        self.sock = sock.start(self.cfg)   # sock-lb: host traffic, with --cgroup-root only
        self.reconciler = Reconciler(self.datapath.maps, self.cfg.max_services, self.cfg.max_backends)
        self._switched = False
        log.info("eBPF datapath loaded; %d services and %d backends restored from %s",
                 len(self.reconciler.services), len(self.reconciler.backend_ids), self.cfg.pin_dir)

    def _loaded(self) -> tuple[ebpf.EbpfDatapath, Reconciler]:
        if self.datapath is None or self.reconciler is None:
            raise RuntimeError("EbpfMode: start() first")
        return self.datapath, self.reconciler

    def sync(self, ports: Sequence[ServicePortInfo] | None = None) -> SyncResult:
        """Programs `ports`; with None, retries the last desired state (after a failed sync)."""
        _, reconciler = self._loaded()
        if ports is not None:
            self.desired, self.problems = desired_state(ports, self.cfg.node_name,
                                                        self._holders(reconciler))
        result = reconciler.sync(self.desired)
        if self.sock:   # sock-lb: UDP sockets connected to removed backends are destroyed
            self.sock.after_sync(self._loaded()[0].maps, result)
        if not reconciler.dirty:
            self._write_names(reconciler)
            if not self._switched and self.switch_modes and (result.errors or self.failed):
                log.info("the other modes' objects stay until every service is programmed and every "
                         "link attached (%d error(s), %d link(s) pending)", len(result.errors), len(self.failed))
            elif not self._switched:
                # Switching modes: only now that this datapath is attached and programmed
                # everywhere are the other modes' objects removed, so that services never go
                # unserved (tc DNATs before netfilter: the two coexist meanwhile).
                if self.switch_modes:
                    cleanup_other_modes(self.name, self.cfg.pin_dir)
                self._switched = True
        return result

    def _holders(self, reconciler: Reconciler) -> dict:
        """Which service port holds each frontend now, so that a second Service claiming a live VIP
        never takes it: the last desired state, or after a restart the names file of the maps."""
        if self.desired.services:
            return {fe: entry.name for fe, entry in self.desired.services.items()}
        names = dump.read_names(self.cfg.pin_dir)
        return {fe: names[ps.service_id] for fe, ps in reconciler.services.items() if ps.service_id in names}

    def resync(self) -> SyncResult:
        """The periodic full resync: pins removed behind our back are restored, then the maps are
        read back and every difference from the desired state repaired."""
        datapath, reconciler = self._loaded()
        repinned = ebpf.repin(datapath)
        if repinned:
            log.warning("pinned maps %s were removed by someone else: pinned again under %s",
                        ", ".join(repinned), self.cfg.pin_dir)
        if not os.path.exists(dump.state_file(self.cfg.pin_dir)):
            self._names = None          # removed (`lbctl cleanup --force`): written again
        result = reconciler.resync(self.desired)
        if self.sock:   # sock-lb: links removed behind our back are made again
            self.sock.verify()
        if not reconciler.dirty:
            self._write_names(reconciler)
        return result

    def _write_names(self, reconciler: Reconciler) -> None:
        """The service names `lbctl dump maps` shows, written when they change."""
        names = reconciler.service_names(self.desired)
        if names != self._names:
            try:
                dump.write_names(self.cfg.pin_dir, names)
            except OSError as exc:   # /run full or read-only: only `dump maps` loses its names
                log.warning("could not write the service names for `lbctl dump maps` to %s: %s; "
                            "trying again at the next sync", dump.state_file(self.cfg.pin_dir), exc)
                return
            self._names = names

    @property
    def needs_retry(self) -> bool:
        return self.reconciler is not None and self.reconciler.dirty

    def dump(self) -> dict:
        return dump.collect(self.cfg.pin_dir)

    # --- links ---------------------------------------------------------------------------------

    def attach_links(self, ipr, verify: bool = False) -> None:
        """Attaches to every matching link not yet done, forgets vanished ones. With `verify`
        (at start and on the periodic scan), also re-attaches where our filters were removed
        behind our back, and detaches from links that no longer match --devices (a restart
        with other patterns)."""
        present = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if ebpf.matches(name, self.cfg.devices):
                present[link["index"]] = name
        for index, name in present.items():
            if index not in self.attached:
                self._attach(ipr, index, name)
            elif verify and not ebpf.is_attached(ipr, index, self.cfg.tc_name):
                log.warning("our filters on %s were removed by someone else: attaching again", name)
                self._attach(ipr, index, name)
        for index in set(self.attached) - set(present):
            log.info("link %s is gone", self.attached.pop(index))
        for index in set(self.failed) - set(present):
            log.info("link %s is gone (its attach had failed)", self.failed.pop(index)[0])
            self._notes.pop(index, None)
        if verify:
            for index, name in ebpf.attached_links(ipr, self.cfg.tc_name):
                if index not in present and ebpf.detach(ipr, index, self.cfg.tc_name):
                    log.info("detached from %s: it no longer matches %s", name, ",".join(self.cfg.devices))

    @property
    def pending_links(self) -> bool:
        """Links whose attach failed: the agent retries them on every turn."""
        return bool(self.failed)

    def _attach(self, ipr, index: int, name: str) -> None:
        try:
            datapath, _ = self._loaded()
            notes = ebpf.attach(ipr, index, datapath.prog_fd, datapath.egress_fd, self.cfg.tc_name)
        except Exception as exc:  # a link that vanished meanwhile, a busy device, a bug
            why = str(exc) or type(exc).__name__
            if self.failed.get(index) != (name, why):   # each reason logged once
                log.warning("could not attach to %s (ifindex %d): %s; retrying every turn",
                            name, index, why)
            self.failed[index] = (name, why)
            return
        self.attached[index] = name
        retried = self.failed.pop(index, None)
        log.info("attached to %s (ifindex %d)%s", name, index, " after all" if retried else "")
        if notes != self._notes.get(index):
            for note in notes:
                log.warning("%s: %s", name, note)
            self._notes[index] = notes

    # --- the end ---------------------------------------------------------------------------------

    def stop(self, detach: bool) -> None:
        if detach:
            log.info("removed %d datapath object(s): filters and pinned maps",
                     len(self.cleanup(self.cfg)))
        else:
            log.info("exiting; programs stay attached and maps pinned under %s "
                     "(`lbctl cleanup` removes them)", self.cfg.pin_dir)
        if self.sock is not None:
            self.sock.close()
        if self.datapath is not None:
            self.datapath.close()

    @classmethod
    def cleanup(cls, cfg: ebpf.DatapathConfig = ebpf.DatapathConfig()) -> list[str]:
        links = ebpf.detach_all(cfg.tc_name)
        sockets = sock.cleanup(cfg.pin_dir)   # sock-lb: cgroup links, lb4_reverse_sk
        maps = ebpf.remove_pins(cfg.pin_dir)
        dump.remove_names(cfg.pin_dir)
        return [f"tc filter on {name}" for name in links] + sockets + [f"pinned map {m}" for m in maps]
