"""The eBPF mode: services in BPF maps; tc programs on pod links, XDP and tc on the uplinks,
two constant netfilter rules for the marks (lbctl's own datapath).

Which link gets which program:

    pod links (--devices, veth*)        tc ingress + egress (a pod's requests, replies to pods)
    uplinks (--uplink-devices, default  XDP (native, else generic) + the uplink's tc ingress and
    the default route's interface)      egress; tc alone when XDP does not attach. Which one
                                        serves each uplink is logged once and shown by dump.

kube-proxy's settings the datapath needs (``ProxySettings``: --cluster-cidr, --masquerade-all,
--masquerade-bit, --node-ip, --nodeport-addresses) reach it two ways: the NodePort addresses
become frontends (the desired state), the rest is the lb4_config map the mode writes at start
and checks at every resync. The masquerade and drop rules are lbctl.datapath.ebpf.rules.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lbctl.datapath.base import DatapathError, SyncResult, cleanup_other_modes
from lbctl.datapath.ebpf import dump, rules, shared, sock
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.reconcile import Reconciler
from lbctl.datapath.kubeproxy import common
from lbctl.model.desired import DesiredCache, NodeAddresses
from lbctl.model.objects import DesiredState, Frontend, ServicePortInfo

log = logging.getLogger("lbctl.mode")

CONFIG = "lb4_config"


@dataclass(frozen=True)
class ProxySettings:
    """kube-proxy's flags that change what the eBPF datapath does (lbctl.cli.config declares
    them once for every mode).

    ``node_ips``: --node-ip, the primary first (() = none given: the NodePort addresses are the
    host's own, and loadBalancerSourceRanges admit no node IP); ``nodeport_addresses``:
    --nodeport-addresses CIDRs or ("primary",), () = every local IPv4 address of the node, as
    iptables mode; ``cluster_cidr``: --cluster-cidr (ClusterIP traffic from outside it is
    masqueraded, uplink traffic from inside it is internal); ``masquerade_bit``: the mark bit
    of traffic to masquerade (14: 0x4000); ``node_port_range``: kube-apiserver's
--service-node-port-range, which the masquerade's source ports stay out of (lbctl.datapath.ebpf.rules)."""

    node_ips: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    cluster_cidr: str | None = None
    masquerade_all: bool = False
    masquerade_bit: int = 14
    node_port_range: tuple[int, int] = (30000, 32767)   # --service-node-port-range: masquerade ports avoid it

    @property
    def masquerade_mark(self) -> int:
        return 1 << self.masquerade_bit

    @property
    def drop_mark(self) -> int:
        return shared.const("LB_MARK_DROP_DEFAULT")

    @property
    def ipv4_cluster_cidr(self) -> str | None:
        """The IPv4 CIDR of --cluster-cidr (comma-separated, dual-stack), as kube-proxy picks
        the one of its family; None without one."""
        detector = common.local_detector(self.cluster_cidr, 4)
        return str(detector.cidr) if detector.cidr is not None else None

    def config_value(self, drop_rule: bool = False) -> bytes:
        """lb4_config[0] for these settings; `drop_rule`: the constant drop rule is in place, so
        the datapath leaves drops to it as marks (KUBE-MARK-DROP) instead of dropping itself."""
        return shared.config_value(self.ipv4_cluster_cidr, self.masquerade_all,
                                   self.masquerade_mark, self.drop_mark, drop_rule)

    def node_addresses(self, node_name: str, host: Sequence[str]) -> NodeAddresses:
        """The NodePort addresses among the node's (``host``: its local IPv4 addresses; the
        node IPs count as local too) as kube-proxy's --nodeport-addresses picks them, and the
        primary node IP."""
        node = common.node_view(node_name, (*self.node_ips, *host), 4)
        chosen = common.nodeport_addresses(self.nodeport_addresses, node, self.node_ips).node_ips(node)
        primary = next((ip for ip in self.node_ips if common.family_of(ip) == 4), None)
        return NodeAddresses(nodeport_ips=tuple(str(ip) for ip in chosen), node_ip=primary)


def host_ipv4_addresses() -> list[str]:
    """Every IPv4 address on this network namespace's interfaces (one netlink dump)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = {addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
                 for addr in ipr.get_addr(family=socket.AF_INET)}
    return sorted(a for a in found if a)


def default_uplinks() -> tuple[str, ...]:
    """The interface of the default route (the node's way to other nodes and outside, kind's
    eth0), or () without one. Asking the routing table sends no packet."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst="1.1.1.1")
            indexes = [r.get_attr("RTA_OIF") for r in routes if r.get_attr("RTA_OIF")]
            names = [link.get_attr("IFLA_IFNAME") for index in indexes for link in ipr.get_links(index)]
    except (OSError, NetlinkError):   # ENETUNREACH: no default route
        return ()
    return tuple(dict.fromkeys(n for n in names if n))


class EbpfMode:
    """tc programs on pod links, XDP and tc on uplinks, BPF maps for services (the default)."""

    name = "ebpf"

    def __init__(self, cfg: ebpf.DatapathConfig = ebpf.DatapathConfig(), switch_modes: bool = True,
                 settings: ProxySettings = ProxySettings(), runner=None,
                 addresses: Callable[[], Sequence[str]] = host_ipv4_addresses):
        """`switch_modes`: after the first sync, remove what the other modes left on this node
        (`lbctl run`); the demo, a guest on someone's node, passes False. `runner`: where the
        nft commands of the mark rules run (tests: a network namespace). `addresses`: the
        node's local IPv4 addresses (tests: a fixed list)."""
        self.cfg = cfg
        self.switch_modes = switch_modes
        self.settings = settings
        self.datapath: ebpf.EbpfDatapath | None = None
        self.reconciler: Reconciler | None = None
        self.attached: dict[int, str] = {}
        self.uplinks: dict[int, tuple[str, str]] = {}    # ifindex -> (name, how it is served)
        self.failed: dict[int, tuple[str, str]] = {}   # ifindex -> (name, why): retried every turn
        self.desired = DesiredState()
        self.problems: tuple = ()
        self.rules: rules.MarkRuleSet | None = None     # made by start()
        self._runner = runner
        self._addresses = addresses
        self._ports: Sequence[ServicePortInfo] = ()
        self._cache = DesiredCache()                # entries of unchanged service ports, reused
        self._changed: frozenset[Frontend] | None = None   # since the last sync; None: all
        self._node = NodeAddresses()
        self._node_changed = False
        self._names: tuple | None = None   # (reconciler, names_version) written for `lbctl dump maps`
        self._notes: dict[int, list[str]] = {}      # attach notes (a foreign filter), logged once
        self._drop_rule = False                     # the constant drop rule is installed
        self.sock: sock.SockLb | None = None        # sock-lb: socket programs (--cgroup-root)

    def start(self) -> None:
        self.datapath = ebpf.EbpfDatapath(self.cfg).load()
        self.sock = sock.start(self.cfg)   # sock-lb: host traffic, with --cgroup-root only
        self.reconciler = Reconciler(self.datapath.maps, self.cfg.max_services, self.cfg.max_backends)
        self._switched = False
        self._write_config()
        self.rules = rules.MarkRuleSet(rules.MarkRules(rules.table_name(self.cfg.pin_dir),
                                                       self.settings.masquerade_mark, self.settings.drop_mark,
                                                       rules.masquerade_ports(self.settings.node_port_range)),
                                       self._runner)
        try:
            self.rules.ensure()
        except DatapathError:
            self.datapath.close()
            raise
        self._drop_rule = True        # the rule is in: drops leave as marks from now on
        self._write_config()
        self._node = self._node_addresses()
        log.info("eBPF datapath loaded; %d services and %d backends restored from %s; marks "
                 "masquerade %#x, drop %#x (nft table ip %s); NodePorts on %s",
                 len(self.reconciler.services), len(self.reconciler.backend_ids), self.cfg.pin_dir,
                 self.settings.masquerade_mark, self.settings.drop_mark, self.rules.rules.table,
                 ", ".join(self._node.nodeport_ips) or "no address")

    def _write_config(self) -> bool:
        """lb4_config[0] as the settings say; True if it had to be written."""
        maps = self.datapath.maps if self.datapath is not None else {}
        if CONFIG not in maps:
            return False
        want = self.settings.config_value(self._drop_rule)
        if maps[CONFIG].lookup(shared.u32(0)) == want:
            return False
        maps[CONFIG].update(shared.u32(0), want)
        return True

    def _node_addresses(self) -> NodeAddresses:
        """The node's NodePort addresses now (they follow the host's interfaces); the last known
        ones if they cannot be read."""
        try:
            host = list(self._addresses())
        except OSError as exc:
            log.warning("could not read the node's addresses (%s): NodePorts stay on %s", exc,
                        ", ".join(self._node.nodeport_ips) or "no address")
            return self._node
        return self.settings.node_addresses(self.cfg.node_name, host)

    def _loaded(self) -> tuple[ebpf.EbpfDatapath, Reconciler]:
        if self.datapath is None or self.reconciler is None:
            raise RuntimeError("EbpfMode: start() first")
        return self.datapath, self.reconciler

    def sync(self, ports: Sequence[ServicePortInfo] | None = None) -> SyncResult:
        """Programs `ports`; with None, the last ones again (after a failed sync, or when the
        node's addresses changed)."""
        _, reconciler = self._loaded()
        self._refresh_desired(reconciler, ports)
        result = reconciler.sync(self.desired, self._changed)
        self._changed = frozenset()
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

    def _refresh_desired(self, reconciler: Reconciler, ports: Sequence[ServicePortInfo] | None) -> None:
        """The desired state from `ports` (or the last ones) and the node's addresses now."""
        node = self._node_addresses()
        if ports is None and node == self._node and not self._node_changed:
            return
        if node != self._node:
            log.info("NodePort addresses: %s (were %s)", ", ".join(node.nodeport_ips) or "none",
                     ", ".join(self._node.nodeport_ips) or "none")
        self._node, self._node_changed = node, False
        if ports is not None:
            self._ports = ports
        holders = self._holders(reconciler) if self._cache.empty else None
        self._changed = None   # until the cache says what changed (it may raise)
        self.desired, self.problems, changed = self._cache.update(
            self._ports, self.cfg.node_name, self._node, self.cfg.maglev_table_size, holders)
        self._changed = changed

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
        self._repair_rules()
        if self._write_config():
            log.warning("the datapath's settings (%s) differed from the flags: written again", CONFIG)
        self._refresh_desired(reconciler, None)
        result = reconciler.resync(self.desired)
        self._changed = frozenset()
        if self.sock:   # sock-lb: links removed behind our back are made again
            self.sock.verify()
        if not reconciler.dirty:
            self._write_names(reconciler)
        return result

    def _write_names(self, reconciler: Reconciler) -> None:
        """The service names `lbctl dump maps` shows, written when they change."""
        if (reconciler, reconciler.names_version) != self._names:
            try:
                dump.write_names(self.cfg.pin_dir, reconciler.names)
            except OSError as exc:   # /run full or read-only: only `dump maps` loses its names
                log.warning("could not write the service names for `lbctl dump maps` to %s: %s; "
                            "trying again at the next sync", dump.state_file(self.cfg.pin_dir), exc)
                return
            self._names = (reconciler, reconciler.names_version)

    def _repair_rules(self) -> None:
        """The mark rules, put back if someone removed or changed them (`nft flush ruleset`).
        A failure is logged and tried again at the next resync: the maps keep serving."""
        if self.rules is None:
            return
        try:
            if self.rules.ensure():
                log.warning("the masquerade and drop rules (nft table ip %s) were missing or changed: "
                            "installed again", self.rules.rules.table)
            self._drop_rule = True
        except DatapathError as exc:
            self._drop_rule = False   # until the rule is back, the datapath drops by itself
            log.error("%s; trying again at the next resync", exc)

    @property
    def needs_retry(self) -> bool:
        """A failed sync, or new node addresses (NodePorts to move): the agent syncs again."""
        return self.reconciler is not None and (self.reconciler.dirty or self._node_changed)

    def dump(self) -> dict:
        return dump.collect(self.cfg.pin_dir, tc_name=self.cfg.tc_name)

    # --- links ---------------------------------------------------------------------------------

    def attach_links(self, ipr, verify: bool = False) -> None:
        """Attaches to every matching link not yet done, forgets vanished ones: pod links
        (--devices) get the pod programs, uplinks (--uplink-devices; a link matching both is an
        uplink) XDP and the uplink's tc programs. With `verify` (at start and on the periodic
        scan), also re-attaches where our programs were removed behind our back, detaches from
        links that no longer match (a restart with other patterns), and notices new node
        addresses (the NodePorts follow them at the next turn)."""
        present: dict[int, str] = {}
        uplinks: set[int] = set()
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if ebpf.matches(name, self.cfg.uplink_devices):
                present[link["index"]] = name
                uplinks.add(link["index"])
            elif ebpf.matches(name, self.cfg.devices):
                present[link["index"]] = name
        for index, name in present.items():
            uplink = index in uplinks
            if index in self.attached and (index in self.uplinks) != uplink:
                self.attached.pop(index)           # it changed role (a restart, new patterns)
                self.uplinks.pop(index, None)
            if index not in self.attached:
                self._attach(ipr, index, name, uplink)
            elif verify and not self._still_attached(ipr, index, uplink):
                log.warning("our programs on %s were removed by someone else: attaching again", name)
                self._attach(ipr, index, name, uplink)
        for index in set(self.attached) - set(present):
            log.info("link %s is gone", self.attached.pop(index))
            self.uplinks.pop(index, None)
        for index in set(self.failed) - set(present):
            log.info("link %s is gone (its attach had failed)", self.failed.pop(index)[0])
            self._notes.pop(index, None)
        if verify:
            for index, name in ebpf.attached_links(ipr, self.cfg.tc_name):
                if index not in present and ebpf.detach(ipr, index, self.cfg.tc_name):
                    log.info("detached from %s: it no longer matches %s", name,
                             ",".join((*self.cfg.devices, *self.cfg.uplink_devices)))
            if self.reconciler is not None and self._node_addresses() != self._node:
                self._node_changed = True

    def _still_attached(self, ipr, index: int, uplink: bool) -> bool:
        if not uplink:
            return ebpf.is_attached(ipr, index, self.cfg.tc_name)
        mode = ebpf.uplink_mode(ipr, index, self.cfg.tc_name)
        return mode is not None and mode == self.uplinks[index][1]

    @property
    def pending_links(self) -> bool:
        """Links whose attach failed: the agent retries them on every turn."""
        return bool(self.failed)

    def _attach(self, ipr, index: int, name: str, uplink: bool = False) -> None:
        try:
            datapath, _ = self._loaded()
            if uplink:
                done = ebpf.attach_uplink(ipr, index, datapath, self.cfg.tc_name, xdp=self.cfg.xdp)
                notes, how = list(done.notes), done.mode
            else:
                notes, how = ebpf.attach(ipr, index, datapath.prog_fd, datapath.egress_fd, self.cfg.tc_name), ""
        except Exception as exc:  # a link that vanished meanwhile, a busy device, a bug
            why = str(exc) or type(exc).__name__
            if self.failed.get(index) != (name, why):   # each reason logged once
                log.warning("could not attach to %s (ifindex %d): %s; retrying every turn",
                            name, index, why)
            self.failed[index] = (name, why)
            return
        self.attached[index] = name
        retried = self.failed.pop(index, None)
        if uplink:
            before = self.uplinks.get(index)
            self.uplinks[index] = (name, how)
            if before is None or before[1] != how:       # once per link and mode
                log.info("uplink %s (ifindex %d) served by %s%s", name, index, _UPLINK_MODES.get(how, how),
                         " after all" if retried else "")
        else:
            log.info("attached to %s (ifindex %d)%s", name, index, " after all" if retried else "")
        if notes != self._notes.get(index):
            for note in notes:
                log.warning("%s: %s", name, note)
            self._notes[index] = notes

    # --- the end ---------------------------------------------------------------------------------

    def stop(self, detach: bool) -> None:
        if detach:
            log.info("removed %d datapath object(s): filters, pinned maps and mark rules",
                     len(self.cleanup(self.cfg, self._runner)))
        else:
            log.info("exiting; programs stay attached and maps pinned under %s "
                     "(`lbctl cleanup` removes them)", self.cfg.pin_dir)
        if self.sock is not None:
            self.sock.close()
        if self.datapath is not None:
            self.datapath.close()

    @classmethod
    def cleanup(cls, cfg: ebpf.DatapathConfig = ebpf.DatapathConfig(), runner=None) -> list[str]:
        """Every object of the eBPF mode for this pin dir: filters and XDP programs, pinned
        maps, the names file, the mark rules (`lbctl cleanup`, and a switch to another mode)."""
        links = ebpf.detach_all(cfg.tc_name)
        sockets = sock.cleanup(cfg.pin_dir)   # sock-lb: cgroup links, lb4_reverse_sk
        maps = ebpf.remove_pins(cfg.pin_dir)
        dump.remove_names(cfg.pin_dir)
        marks = rules.remove(rules.table_name(cfg.pin_dir), runner)
        return ([f"tc filter on {name}" for name in links] + sockets
                + [f"pinned map {m}" for m in maps] + marks)


_UPLINK_MODES = {"xdp-native": "XDP (native, in the driver) and tc",
                 "xdp-generic": "XDP (generic: the driver has no native XDP) and tc",
                 "tc": "tc only (XDP did not attach)"}
