"""Datapath modes behind one small interface, so the same desired state can be programmed as
eBPF, iptables, nftables or IPVS and compared side by side.

A mode is given every service port with its endpoints (``ServicePortInfo``, the output of
``lbctl.model.desired.service_ports``) and makes the kernel match it:

    start()                 load / check kernel support; recover state left by a previous run
    sync(ports)             apply the whole desired state (the mode decides what actually changes)
    problems                what the last sync could not program, one Problem per object
    resync()                re-read the kernel and repair whatever differs from the last desired
                            state (entries removed or changed behind the agent's back); the agent
                            calls it every --sync-period (kube-proxy's syncPeriod). Optional: a
                            mode without it is given sync(None) (IPVS diffs against the kernel
                            on every sync)
    dump() -> dict          what the kernel holds, as plain data
    stop(detach)            release resources; with detach, also remove every kernel object
    cleanup()               (class method) remove this mode's kernel objects, whoever made them

Modes that attach to links (eBPF) also have ``attach_links(ipr)``, called at start and whenever
links come or go, and ``pending_links`` (links whose attach failed), retried on every turn.
Modes with deferred kernel work (nftables deletes stale chains a second after unlinking them)
have ``housekeeping()``, which the agent calls between syncs.

Switching modes on a node: the objects the other modes left are removed
(``cleanup_other_modes``) only once the new mode serves: the kube-proxy modes in start(), once
they know they can run; eBPF after its first sync that programmed every service with every link
attached. A mode that cannot start leaves the previous one serving.

    mode        class                                   kernel objects
    ebpf        lbctl.datapath.ebpf.mode.EbpfMode                tc filters, pinned maps
    iptables    lbctl.datapath.kubeproxy.iptables_mode           KUBE-* chains (nat, filter), jump rules
    nftables    lbctl.datapath.kubeproxy.nftables_mode           table ip kube-proxy
    ipvs        lbctl.datapath.kubeproxy.ipvs                    IPVS services, kube-ipvs0, ipsets, chains
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lbctl.model.objects import ServicePortInfo

log = logging.getLogger("lbctl.mode")

MODES = ("ebpf", "iptables", "nftables", "ipvs")
DEFAULT_PIN_DIR = "/sys/fs/bpf/lbctl"   # where the eBPF mode pins its maps


class DatapathError(RuntimeError):
    """A problem an operator can fix; the message says how."""


@dataclass
class SyncResult:
    added: int = 0
    updated: int = 0
    removed: int = 0
    backends_added: int = 0
    backends_removed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed or self.backends_added
                    or self.backends_removed)

    def __str__(self) -> str:
        return (f"services +{self.added} ~{self.updated} -{self.removed}, "
                f"backends +{self.backends_added} -{self.backends_removed}"
                + (f", {len(self.errors)} error(s)" if self.errors else ""))


class Mode(Protocol):
    name: str
    problems: tuple

    def start(self) -> None: ...

    def sync(self, ports: Sequence[ServicePortInfo]) -> SyncResult: ...

    def dump(self) -> dict: ...

    def stop(self, detach: bool) -> None: ...


# --- switching modes -----------------------------------------------------------------------------


def cleanup_mode(name: str, ebpf_pin_dir: str = DEFAULT_PIN_DIR) -> list[str]:
    """Removes the kernel objects of datapath mode ``name``; returns what was removed."""
    if name == "ebpf":
        from lbctl.datapath.ebpf.loader import DatapathConfig
        from lbctl.datapath.ebpf.mode import EbpfMode
        return EbpfMode.cleanup(DatapathConfig(pin_dir=ebpf_pin_dir))
    if name == "iptables":
        from lbctl.datapath.kubeproxy.iptables_mode import IptablesMode
        return IptablesMode.cleanup()
    if name == "nftables":
        from lbctl.datapath.kubeproxy.nftables_mode import NftablesMode
        return NftablesMode.cleanup()
    if name == "ipvs":
        from lbctl.datapath.kubeproxy.ipvs import IpvsMode
        return list(IpvsMode.cleanup())
    raise ValueError(f"unknown mode {name!r} (one of {', '.join(MODES)})")


def cleanup_other_modes(keep: str, ebpf_pin_dir: str = DEFAULT_PIN_DIR) -> list[str]:
    """Removes what every mode but ``keep`` left on this node (switching modes).

    A failure is logged and does not stop the new mode: leftovers of another mode are reported
    by name, and `lbctl cleanup` removes them.
    """
    removed: list[str] = []
    for name in MODES:
        if name == keep:
            continue
        try:
            found = cleanup_mode(name, ebpf_pin_dir)
        except Exception as exc:
            log.warning("%s mode: could not remove the %s mode's objects (%s); `lbctl cleanup` "
                        "removes them", keep, name, exc)
            continue
        if found:
            log.info("%s mode: removed %d object(s) left by the %s mode", keep, len(found), name)
            for what in found:
                log.debug("removed %s", what)
        removed += found
    return removed
