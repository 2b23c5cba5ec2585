"""The eBPF mode: tc programs on pod links, services in BPF maps (lbctl's own datapath)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from lbctl.datapath.base import SyncResult, cleanup_other_modes
from lbctl.datapath.ebpf import dump
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.reconcile import Reconciler
from lbctl.model.desired import desired_state
from lbctl.model.objects import DesiredState, ServicePortInfo

log = logging.getLogger("lbctl.mode")


class EbpfMode:
    """tc programs on pod links, BPF maps for services (the default)."""

    name = "ebpf"

    def __init__(self, cfg: ebpf.DatapathConfig = ebpf.DatapathConfig()):
        self.cfg = cfg
        self.datapath: ebpf.EbpfDatapath | None = None
        self.reconciler: Reconciler | None = None
        self.attached: dict[int, str] = {}
        self.desired = DesiredState()
        self.problems: tuple = ()
        self._names: dict[int, str] | None = None   # last written for `lbctl dump maps`

    def start(self) -> None:
        self.datapath = ebpf.EbpfDatapath(self.cfg).load()
        self.reconciler = Reconciler(self.datapath.maps, self.cfg.max_services, self.cfg.max_backends)
        self._switched = False
        log.info("eBPF datapath loaded; %d services and %d backends restored from %s",
                 len(self.reconciler.services), len(self.reconciler.backend_ids), self.cfg.pin_dir)

    def sync(self, ports: Sequence[ServicePortInfo] | None = None) -> SyncResult:
        """Programs `ports`; with None, retries the last desired state (after a failed sync)."""
        if ports is not None:
            self.desired, self.problems = desired_state(ports, self.cfg.node_name)
        result = self.reconciler.sync(self.desired)
        if not self.reconciler.dirty:
            names = self.reconciler.service_names(self.desired)
            if names != self._names:
                dump.write_names(self.cfg.pin_dir, names)
                self._names = names
            if not self._switched:
                # Switching modes: only now that this datapath is attached and programmed are
                # the other modes' objects removed, so that services never go unserved.
                cleanup_other_modes(self.name, self.cfg.pin_dir)
                self._switched = True
        return result

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
        if verify:
            for index, name in ebpf.attached_links(ipr, self.cfg.tc_name):
                if index not in present and ebpf.detach(ipr, index, self.cfg.tc_name):
                    log.info("detached from %s: it no longer matches %s", name, ",".join(self.cfg.devices))

    def _attach(self, ipr, index: int, name: str) -> None:
        try:
            ebpf.attach(ipr, index, self.datapath.prog_fd, self.datapath.egress_fd, self.cfg.tc_name)
            self.attached[index] = name
            log.info("attached to %s (ifindex %d)", name, index)
        except Exception as exc:  # a link that vanished meanwhile, or a busy device
            log.warning("could not attach to %s (ifindex %d): %s", name, index, exc)

    # --- the end ---------------------------------------------------------------------------------

    def stop(self, detach: bool) -> None:
        if detach:
            log.info("removed %d datapath object(s): filters and pinned maps",
                     len(self.cleanup(self.cfg)))
        else:
            log.info("exiting; programs stay attached and maps pinned under %s "
                     "(`lbctl cleanup` removes them)", self.cfg.pin_dir)
        if self.datapath is not None:
            self.datapath.close()

    @classmethod
    def cleanup(cls, cfg: ebpf.DatapathConfig = ebpf.DatapathConfig()) -> list[str]:
        links = ebpf.detach_all(cfg.tc_name)
        maps = ebpf.remove_pins(cfg.pin_dir)
        dump.remove_names(cfg.pin_dir)
        return [f"tc filter on {name}" for name in links] + [f"pinned map {m}" for m in maps]
