"""kube-proxy v1.32's IPVS mode as an lbctl datapath mode.

What kube-proxy's IPVS proxier (``pkg/proxy/ipvs/proxier.go``) keeps in the kernel, and so what
this module keeps there:

- a dummy device ``kube-ipvs0`` holding every cluster IP, and every external and load-balancer
  IP that is not already a node address, as /32 (/128): IPVS hooks LOCAL_IN, so a service address
  must be local for IPVS to see its packets;
- one IPVS virtual server per service address, port and protocol (cluster IP, external IPs,
  load-balancer IPs, and every node address for a NodePort), scheduler ``rr``, ``persistent``
  with the affinity timeout for ``sessionAffinity: ClientIP``; one masquerading real server of
  weight 1 per endpoint. A virtual server without real servers is how "no endpoints" looks: the
  kernel's ``ip_vs_leave`` answers ICMP port unreachable for TCP and UDP alike;
- 17 ipsets (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, KUBE-NODE-PORT-TCP, ...) and a constant
  iptables-restore text that matches them: masquerade marks, source-range firewall, and the
  KUBE-IPVS-FILTER chain that rejects new connections to service addresses on ports no
  service uses.

Three layers, each usable alone:

``desired_ipvs(ports, cfg)`` and ``render_ipvs_iptables(desired, cfg)``
    pure functions: everything above as data and text, following syncProxyRules line by line.
``IpvsKernel`` (``LinuxKernel`` over pyroute2's IPVS, IPRoute and IPSet plus iptables-restore,
and the in-memory ``FakeKernel``)
    the narrow interface the mode writes through, so the reconciliation is tested without IPVS.
``IpvsMode``
    the Mode (see lbctl.datapath.base): every sync diffs desired state against what the kernel reports,
    so a restart or a failed sync converges on the next one.

Where lbctl deliberately differs from kube-proxy (each marked "deviation" below): when two
services claim the same virtual server the first by name keeps it (kube-proxy: the last one in
Go map order); a real server that comes back while draining gets its weight restored in place
(kube-proxy deletes and re-adds it, cutting its connections); a virtual server whose sync failed
keeps its address bound (kube-proxy unbinds it until the next sync); firewall-mark virtual
servers are never touched (they are not kube-proxy's).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import platform
import re
import shlex
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from lbctl.datapath.base import DatapathError, SyncResult
from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.common import ProxiedPort
from lbctl.model.objects import Problem, ServicePortInfo

log = logging.getLogger("lbctl.ipvs")

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"

# IPVS service flags (include/uapi/linux/ip_vs.h, kube-proxy's utilipvs.Flag*).
FLAG_PERSISTENT = 0x1      # sessionAffinity: ClientIP
FLAG_HASHED = 0x2          # set by the kernel on every service; stripped when read back
FLAG_SOURCE_HASH = 0x10    # IP_VS_SVC_F_SCHED1, which the "mh" scheduler needs

# Real server forwarding method: kube-proxy uses masquerading (IP_VS_CONN_F_MASQ = 0).
# pyroute2's IPVSDest defaults to 3 (direct routing), so it is always given explicitly.
FWD_MASQ = 0

PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}


# --- kube-proxy's ipsets (pkg/proxy/ipvs/ipset.go) ------------------------------------------------

HASH_IP = "hash:ip"
HASH_IP_PORT = "hash:ip,port"
HASH_IP_PORT_IP = "hash:ip,port,ip"
HASH_IP_PORT_NET = "hash:ip,port,net"
BITMAP_PORT = "bitmap:port"

LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# (name, type, comment) in kube-proxy's ipsetInfo order. The comment goes into the iptables rule
# matching the set (ipsets themselves are created without comments).
IPSET_INFO = (
    (LOOP_BACK, HASH_IP_PORT_IP, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    (CLUSTER_IP, HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"),
    (EXTERNAL_IP, HASH_IP_PORT, "Kubernetes service external ip + port for masquerade and filter purpose"),
    (EXTERNAL_IP_LOCAL, HASH_IP_PORT, "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER, HASH_IP_PORT, "Kubernetes service lb portal"),
    (LOAD_BALANCER_FW, HASH_IP_PORT, "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    (LOAD_BALANCER_LOCAL, HASH_IP_PORT, "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER_SOURCE_IP, HASH_IP_PORT_IP, "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    (LOAD_BALANCER_SOURCE_CIDR, HASH_IP_PORT_NET, "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    (NODE_PORT_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    (NODE_PORT_LOCAL_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    (NODE_PORT_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    (NODE_PORT_LOCAL_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    (NODE_PORT_SCTP, HASH_IP_PORT, "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    (NODE_PORT_LOCAL_SCTP, HASH_IP_PORT, "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    (HEALTH_CHECK_NODE_PORT, BITMAP_PORT, "Kubernetes health check node port"),
    (IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
)
_COMMENTS = {name: comment for name, _type, comment in IPSET_INFO}
_TYPES = {name: set_type for name, set_type, _comment in IPSET_INFO}


@dataclass(frozen=True)
class IpsetSpec:
    """One ipset as kube-proxy creates it (``ipset create NAME TYPE ... -exist``)."""

    name: str
    set_type: str
    family: str = "inet"            # inet | inet6; hash types only
    comment: str = ""               # used in the iptables rule that matches the set
    hash_size: int = 1024
    max_elem: int = 65536
    port_range: str = "0-65535"     # bitmap:port only

    def create_args(self) -> list[str]:
        """The ``ipset`` arguments kube-proxy's runner.createSet uses, for display."""
        args = ["create", self.name, self.set_type]
        if self.set_type == BITMAP_PORT:
            args += ["range", self.port_range]
        else:
            args += ["family", self.family, "hashsize", str(self.hash_size), "maxelem", str(self.max_elem)]
        return args + ["-exist"]


def set_name(base: str, family: int) -> str:
    """NewIPSet: the IPv6 proxier's sets are "KUBE-6-...", cut to ipset's 31 characters."""
    if family == 6 and base.startswith("KUBE-"):
        return base.replace("KUBE-", "KUBE-6-", 1)[:31]
    return base


def ipset_specs(family: int) -> list[IpsetSpec]:
    """All 17 sets of one family's proxier, in kube-proxy's order."""
    inet = "inet6" if family == 6 else "inet"
    return [IpsetSpec(set_name(name, family), set_type, inet, comment)
            for name, set_type, comment in IPSET_INFO]


# --- IPVS objects ----------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class VirtualServer:
    """An IPVS service (kube-proxy's utilipvs.VirtualServer); ``flags`` never include HASHED."""

    address: str
    port: int
    protocol: str                   # TCP | UDP | SCTP
    scheduler: str = DEFAULT_SCHEDULER
    flags: int = 0
    timeout: int = 0                # persistence timeout in seconds (ClientIP affinity)

    @property
    def key(self) -> tuple[str, int, str]:
        """What identifies a virtual server in the kernel; the rest can be updated in place."""
        return (self.address, self.port, self.protocol)

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    def __str__(self) -> str:
        """VirtualServer.String(): "10.0.0.1:80/TCP", "[fd00::1]:80/TCP"."""
        return f"{common.join_host_port(self.address, self.port)}/{self.protocol}"


@dataclass(frozen=True, order=True)
class RealServer:
    """An IPVS destination. Connection counts are what the kernel reports; they do not take
    part in comparisons (two listings of the same real server are equal)."""

    address: str
    port: int
    weight: int = 1
    active_conns: int = field(default=0, compare=False)
    inactive_conns: int = field(default=0, compare=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def __str__(self) -> str:
        return common.join_host_port(self.address, self.port)


def graceful_termination_needed(protocol: str) -> bool:
    """utilipvs.IsRsGracefulTerminationNeeded: only TCP real servers drain; UDP and SCTP ones are
    deleted at once (their flows are expired on the next packet, expire_nodest_conn=1)."""
    return protocol.upper() not in ("UDP", "SCTP")


# --- configuration -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IpvsConfig:
    """kube-proxy's IPVS-mode settings that change what it programs.

    ``node_name``: endpoints with this nodeName are local. ``node_ips``: the node's addresses,
    primary first (kube-proxy's nodeIP, used for loadBalancerSourceRanges); the mode reads the
    node's actual addresses from the kernel for NodePorts, the pure functions use these.
    ``nodeport_addresses``: CIDRs or ("primary",); empty means every node address.
    ``exclude_cidrs``: --ipvs-exclude-cidrs, virtual servers there are never deleted.
    ``random_fully``: iptables >= 1.6.2 (adds --random-fully to the MASQUERADE rule).
    ``ip_family``: 4 or 6, None for the primary node IP's family (kube-proxy runs one proxier per
    family; lbctl runs one). ``masquerade_mark``: None derives it from ``masquerade_bit`` as
    kube-proxy does ("0x00004000").
    ``graceful_check_interval``: seconds between checks of draining real servers (kube-proxy:
    one minute).
    """

    node_name: str = ""
    node_ips: tuple[str, ...] = ()
    cluster_cidr: str | None = None
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()
    scheduler: str = DEFAULT_SCHEDULER
    exclude_cidrs: tuple[str, ...] = ()
    strict_arp: bool = False
    random_fully: bool = False
    masquerade_bit: int = 14
    masquerade_mark: str | None = None
    ip_family: int | None = None
    dummy_device: str = DUMMY_DEVICE
    graceful_check_interval: float = 60.0

    @property
    def family(self) -> int:
        if self.ip_family in (4, 6):
            return self.ip_family
        return common.node_view(self.node_name, self.node_ips, None).family

    @property
    def mark(self) -> str:
        return self.masquerade_mark or common.masquerade_mark(self.masquerade_bit)


# --- desired state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredVirtualServer:
    virtual_server: VirtualServer
    real_servers: tuple[RealServer, ...]     # sorted; empty = ICMP port unreachable
    name: str                                # "ns/svc:port", kube-proxy's ServicePortName
    kind: str                                # cluster-ip | external-ip | load-balancer | node-port
    bind: bool                               # its address goes on kube-ipvs0


@dataclass(frozen=True)
class NoNodeAccess:
    """A load-balancer IP:port whose source ranges exclude the node: KUBE-IPVS-OUT-FILTER drops
    the node's own connections to it (kubernetes issue 119656)."""

    address: str
    protocol: str                            # lowercase
    port: int


@dataclass(frozen=True)
class IpvsDesired:
    """Everything one family's IPVS proxier keeps in the kernel, as plain data."""

    family: int
    virtual_servers: Mapping[tuple[str, int, str], DesiredVirtualServer] = field(default_factory=dict)
    addresses: frozenset[str] = frozenset()                           # on kube-ipvs0
    ipsets: Mapping[str, frozenset[str]] = field(default_factory=dict)  # every set, by real name
    no_node_access: tuple[NoNodeAccess, ...] = ()
    problems: tuple[Problem, ...] = ()

    def members(self, base: str) -> frozenset[str]:
        """The members of a set by its IPv4 name (KUBE-CLUSTER-IP for KUBE-6-CLUSTER-IP too)."""
        return self.ipsets.get(set_name(base, self.family), frozenset())


def hash_ip_port(ip: str, protocol: str, port: int) -> str:
    """ipset Entry.String() for hash:ip,port: "10.0.0.1,tcp:80"."""
    return f"{ip},{protocol}:{port}"


def desired_ipvs(ports: Iterable[ServicePortInfo], cfg: IpvsConfig,
                 node_addresses: Iterable[str] | None = None) -> IpvsDesired:
    """What kube-proxy's syncProxyRules programs for ``ports``: virtual servers with their real
    servers, the addresses on kube-ipvs0, every ipset's members.

    ``node_addresses`` are the addresses on the node's interfaces other than kube-ipvs0 (what
    kube-proxy reads with GetAllLocalAddressesExcept); None means ``cfg.node_ips``. They are where
    NodePorts listen, and an external or load-balancer IP that is one of them is not bound to
    kube-ipvs0. Service ports are walked in a fixed order (kube-proxy walks a Go map).
    """
    family = cfg.family
    builder = _DesiredBuilder(cfg, family, _local_addresses(
        cfg.node_ips if node_addresses is None else node_addresses, family))
    for proxied in common.proxied_ports(ports, family, cfg.node_name):
        builder.add(proxied)
    return builder.result()


def _local_addresses(addresses: Iterable[str], family: int) -> list[str]:
    """isValidForSet: same family, no loopback, no IPv6 link-local; sorted, unique."""
    found = set()
    for text in addresses:
        ip = common.parse_ip_sloppy(text)
        if ip is None or ip.version != family or ip.is_loopback or (ip.version == 6 and ip.is_link_local):
            continue
        found.add(ip)
    return [str(ip) for ip in sorted(found)]


class _DesiredBuilder:
    """syncProxyRules' per-service loop, collecting into plain dicts and sets."""

    def __init__(self, cfg: IpvsConfig, family: int, local: list[str]):
        self.cfg = cfg
        self.family = family
        self.local = set(local)
        node = common.NodeView(cfg.node_name, family, common.node_view(cfg.node_name, cfg.node_ips, family).node_ip,
                               tuple(ipaddress.ip_address(a) for a in local))
        self.node_ip = node.node_ip
        nodeports = common.nodeport_addresses(cfg.nodeport_addresses, node, cfg.node_ips)
        self.nodeport_ips = local if nodeports.match_all else [
            str(ip) for ip in nodeports.node_ips(node) if not ip.is_loopback]
        self.virtual_servers: dict[tuple[str, int, str], DesiredVirtualServer] = {}
        self.sets: dict[str, set[str]] = {name: set() for name, _t, _c in IPSET_INFO}
        self.no_node_access: list[NoNodeAccess] = []
        self.problems: list[Problem] = []

    def result(self) -> IpvsDesired:
        addresses = frozenset(d.virtual_server.address for d in self.virtual_servers.values() if d.bind)
        self.sets[IPVS_IPS] = set(addresses)
        return IpvsDesired(
            family=self.family,
            virtual_servers=dict(sorted(self.virtual_servers.items())),
            addresses=addresses,
            ipsets={set_name(name, self.family): frozenset(members) for name, members in self.sets.items()},
            no_node_access=tuple(self.no_node_access),
            problems=tuple(self.problems),
        )

    def add(self, p: ProxiedPort) -> None:
        view, proto = p.view, p.view.protocol
        # Hairpin: a local endpoint reaching itself through the service is masqueraded.
        for ep in p.endpoints:
            if ep.is_local:
                self.sets[LOOP_BACK].add(f"{ep.ip},{proto}:{ep.port},{ep.ip}")

        self.sets[CLUSTER_IP].add(hash_ip_port(view.cluster_ip, proto, view.port))
        self._virtual_server(p, view.cluster_ip, view.port, "cluster-ip", bind=True,
                             only_local=view.internal_policy_local)

        for ip in view.external_ips:
            target = EXTERNAL_IP_LOCAL if view.external_policy_local else EXTERNAL_IP
            self.sets[target].add(hash_ip_port(ip, proto, view.port))
            self._virtual_server(p, ip, view.port, "external-ip", bind=ip not in self.local,
                                 only_local=view.external_policy_local)

        for ip in view.load_balancer_vips:
            self._load_balancer_sets(view, ip)
            self._virtual_server(p, ip, view.port, "load-balancer", bind=ip not in self.local,
                                 only_local=view.external_policy_local)

        if view.node_port:
            if not self.nodeport_ips:
                # kube-proxy skips the rest of the service here, health check port included.
                self.problems.append(Problem(
                    f"Service {view.service_key}",
                    f"NodePort {view.node_port}/{proto.upper()} not programmed: no node address "
                    f"matches --nodeport-addresses {list(self.cfg.nodeport_addresses) or '(all)'}"))
                return
            self._node_port_sets(view)
            for ip in self.nodeport_ips:
                self._virtual_server(p, ip, view.node_port, "node-port", bind=False,
                                     only_local=view.external_policy_local)

        if view.health_check_node_port:
            self.sets[HEALTH_CHECK_NODE_PORT].add(str(view.health_check_node_port))

    def _load_balancer_sets(self, view: common.ServicePortView, ip: str) -> None:
        proto = view.protocol
        entry = hash_ip_port(ip, proto, view.port)
        self.sets[LOAD_BALANCER].add(entry)
        if view.external_policy_local:
            self.sets[LOAD_BALANCER_LOCAL].add(entry)
        if not view.load_balancer_source_ranges:
            return
        self.sets[LOAD_BALANCER_FW].add(entry)
        allow_from_node = False
        for cidr in view.load_balancer_source_ranges:
            self.sets[LOAD_BALANCER_SOURCE_CIDR].add(f"{entry},{cidr}")
            if self.node_ip is not None and self.node_ip in cidr:
                allow_from_node = True
        # The node reaches an LB IP it is a backend of directly (the IP is bound locally), with
        # the LB IP as source: allowed when the node's own IP is in the source ranges.
        if allow_from_node:
            self.sets[LOAD_BALANCER_SOURCE_IP].add(f"{entry},{ip}")
        else:
            self.no_node_access.append(NoNodeAccess(ip, proto, view.port))

    def _node_port_sets(self, view: common.ServicePortView) -> None:
        proto = view.protocol
        if proto == "sctp":
            # bitmap:port has no protocol, so SCTP node ports are ip,port entries per node IP.
            entries = [hash_ip_port(ip, proto, view.node_port) for ip in self.nodeport_ips]
            sets = (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP)
        else:
            entries = [str(view.node_port)]
            sets = (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP) if proto == "tcp" else (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP)
        self.sets[sets[0]].update(entries)
        if view.external_policy_local:
            self.sets[sets[1]].update(entries)

    def _virtual_server(self, p: ProxiedPort, address: str, port: int, kind: str, *,
                        bind: bool, only_local: bool) -> None:
        view = p.view
        flags, timeout = 0, 0
        if view.sticky_seconds is not None:
            flags, timeout = FLAG_PERSISTENT, view.sticky_seconds
        if self.cfg.scheduler == "mh":
            flags |= FLAG_SOURCE_HASH
        vs = VirtualServer(address, port, view.protocol.upper(), self.cfg.scheduler, flags, timeout)
        owner = self.virtual_servers.get(vs.key)
        if owner is not None:
            # Deviation: kube-proxy lets the last service in Go map order win; lbctl keeps the first
            # by name so the outcome does not depend on ordering, and says so.
            self.problems.append(Problem(
                f"Service {view.service_key}",
                f"{kind} {vs} is already used by {owner.name} ({owner.kind}); skipped"))
            return
        endpoints = _real_server_endpoints(p, only_local)
        real_servers = tuple(sorted({RealServer(ep.ip, ep.port) for ep in endpoints}))
        self.virtual_servers[vs.key] = DesiredVirtualServer(vs, real_servers, view.name_string, kind, bind)


def _real_server_endpoints(p: ProxiedPort, only_local: bool) -> tuple[common.EndpointView, ...]:
    """syncEndpoint's choice: local endpoints when the policy is Local and there are any, else the
    cluster endpoints. With externalTrafficPolicy=Local and no local endpoint that means the
    cluster endpoints (kubernetes PR 97081: pods on the node can still reach the service; an
    external client's reply is lost), where the iptables and nftables modes drop."""
    categories = p.categories
    if only_local and categories.local:
        return categories.local
    return categories.cluster


# --- iptables ------------------------------------------------------------------------------------------

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

# (table, chain) in kube-proxy's iptablesChains order: declared in every restore.
IPTABLES_CHAINS = (
    ("nat", KUBE_SERVICES),
    ("nat", KUBE_POSTROUTING),
    ("nat", KUBE_NODE_PORT),
    ("nat", KUBE_LOAD_BALANCER),
    ("nat", KUBE_MARK_MASQ),
    ("filter", KUBE_FORWARD),
    ("filter", KUBE_NODE_PORT),
    ("filter", KUBE_PROXY_FIREWALL),
    ("filter", KUBE_SOURCE_RANGES_FIREWALL),
    ("filter", KUBE_IPVS_FILTER),
    ("filter", KUBE_IPVS_OUT_FILTER),
)


@dataclass(frozen=True)
class JumpRule:
    """A rule kube-proxy keeps at the top of a built-in chain (iptablesJumpChain, EnsureRule
    Prepend). Not part of the restore text, which must not flush the built-in chains."""

    table: str
    chain: str          # built-in chain
    target: str
    comment: str

    @property
    def args(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", self.comment, "-j", self.target)


JUMP_RULES = (
    JumpRule("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    JumpRule("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    JumpRule("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    JumpRule("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)

# ipsetWithIptablesChain: (set, table, from chain, target, match directions, protocol match).
# The Local sets come before their catch-all sets: RETURN first, then mark for masquerade.
_SET_RULES = (
    (LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)


def _rule(*words: str) -> str:
    """kube-proxy's LineBuffer.Write: words joined by single spaces."""
    return " ".join(words)


def _comment(base: str) -> str:
    """IPSet.getComment(): the set's comment in double quotes, as iptables-restore wants it."""
    return f'"{_COMMENTS[base]}"'


def render_ipvs_iptables(desired: IpvsDesired, cfg: IpvsConfig) -> str:
    """The iptables-restore input (``--noflush``) kube-proxy v1.32's IPVS proxier writes.

    Constant apart from which sets are empty, ``cfg`` and the load-balancer IPs the node may not
    reach: per-service work happens in IPVS and ipsets. nat comes before filter, as kube-proxy
    concatenates its buffers. Rules that match empty sets are left out, as kube-proxy does, except
    the ones in KUBE-IPVS-FILTER and the health-check rule, which it always writes.
    """
    family = desired.family
    mark = cfg.mark

    def name(base: str) -> str:
        return set_name(base, family)

    def nonempty(base: str) -> bool:
        return bool(desired.members(base))

    nat = ["*nat", *(f":{c} - [0:0]" for t, c in IPTABLES_CHAINS if t == "nat")]
    filt = ["*filter", *(f":{c} - [0:0]" for t, c in IPTABLES_CHAINS if t == "filter")]

    nat.append(_rule("-A", KUBE_SERVICES, "-s", "::1/128" if family == 6 else "127.0.0.0/8", "-j", "RETURN"))
    for base, table, chain, target, match, proto in _SET_RULES:
        if not nonempty(base):
            continue
        words = ["-A", chain] + (["-p", proto] if proto else [])
        words += ["-m", "comment", "--comment", _comment(base), "-m", "set", "--match-set", name(base), match,
                  "-j", target]
        (nat if table == "nat" else filt).append(_rule(*words))

    if nonempty(CLUSTER_IP):
        words = ["-A", KUBE_SERVICES, "-m", "comment", "--comment", _comment(CLUSTER_IP),
                 "-m", "set", "--match-set", name(CLUSTER_IP)]
        detector = common.local_detector(cfg.cluster_cidr, family)
        if cfg.masquerade_all:
            words += ["dst,dst"]
        elif detector.implemented:
            # Off-cluster traffic to a cluster IP (a static route to the node) is masqueraded.
            words += ["dst,dst", "!", "-s", str(detector.cidr)]
        else:
            # No pod CIDR: masquerade node-originated traffic whose source is a service VIP (the
            # kernel picks a kube-ipvs0 address as source to reach a VIP).
            words += ["src,dst"]
        nat.append(_rule(*words, "-j", KUBE_MARK_MASQ))

    for base, masquerade in ((EXTERNAL_IP, True), (EXTERNAL_IP_LOCAL, False)):
        if not nonempty(base):
            continue
        words = ["-A", KUBE_SERVICES, "-m", "comment", "--comment", _comment(base),
                 "-m", "set", "--match-set", name(base), "dst,dst"]
        if masquerade:
            nat.append(_rule(*words, "-j", KUBE_MARK_MASQ))
        # Traffic from off the machine (not bridged from a pod, not from a local process), and
        # traffic to external IPs that happen to be local (GCE LB addresses), is accepted.
        nat.append(_rule(*words, "-m", "physdev", "!", "--physdev-is-in", "-m", "addrtype", "!",
                         "--src-type", "LOCAL", "-j", "ACCEPT"))
        nat.append(_rule(*words, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"))

    nat.append(_rule("-A", KUBE_SERVICES, "-m", "addrtype", "--dst-type", "LOCAL", "-j", KUBE_NODE_PORT))
    nat.append(_rule("-A", KUBE_LOAD_BALANCER, "-j", KUBE_MARK_MASQ))
    filt.append(_rule("-A", KUBE_SOURCE_RANGES_FIREWALL, "-j", "DROP"))
    for entry in desired.no_node_access:
        filt.append(_rule("-A", KUBE_IPVS_OUT_FILTER, "-s", entry.address, "-m", "ipvs", "--vaddr", entry.address,
                          "--vproto", entry.protocol, "--vport", str(entry.port), "-j", "DROP"))
    # acceptIPVSTraffic: accept what IPVS serves, in case later rules would block it.
    for base in (CLUSTER_IP, LOAD_BALANCER):
        if nonempty(base):
            nat.append(_rule("-A", KUBE_SERVICES, "-m", "set", "--match-set", name(base), "dst,dst", "-j", "ACCEPT"))

    filt.append(_rule("-A", KUBE_FORWARD, "-m", "comment", "--comment", '"kubernetes forwarding rules"',
                      "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT"))
    filt.append(_rule("-A", KUBE_FORWARD, "-m", "comment", "--comment", '"kubernetes forwarding conntrack rule"',
                      "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"))
    filt.append(_rule("-A", KUBE_NODE_PORT, "-m", "comment", "--comment", _comment(HEALTH_CHECK_NODE_PORT),
                      "-m", "set", "--match-set", name(HEALTH_CHECK_NODE_PORT), "dst", "-j", "ACCEPT"))
    # KUBE-IPVS-FILTER: a service address is local (kube-ipvs0), so without this every host port
    # would answer on it (kubernetes issue 72236). Service ports return; other new connections
    # to those addresses are rejected.
    for base in (LOAD_BALANCER, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL):
        filt.append(_rule("-A", KUBE_IPVS_FILTER, "-m", "set", "--match-set", name(base), "dst,dst", "-j", "RETURN"))
    filt.append(_rule("-A", KUBE_IPVS_FILTER, "-m", "set", "--match-set", name(HEALTH_CHECK_NODE_PORT), "dst",
                      "-j", "RETURN"))
    filt.append(_rule("-A", KUBE_IPVS_FILTER, "-m", "conntrack", "--ctstate", "NEW", "-m", "set", "--match-set",
                      name(IPVS_IPS), "dst", "-j", "REJECT"))

    nat.append(_rule("-A", KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN"))
    nat.append(_rule("-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark))   # clear it: no re-masquerade
    masquerade = ["-A", KUBE_POSTROUTING, "-m", "comment", "--comment", '"kubernetes service traffic requiring SNAT"',
                  "-j", "MASQUERADE"]
    nat.append(_rule(*masquerade, *(["--random-fully"] if cfg.random_fully else [])))
    nat.append(_rule("-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark))
    return "\n".join([*nat, "COMMIT", *filt, "COMMIT"]) + "\n"


def render_ipvs_jump_rules(cfg: IpvsConfig) -> list[list[str]]:
    """The argv kube-proxy runs (EnsureRule Prepend, after ``-C`` finds it missing) per jump rule."""
    binary = "ip6tables" if cfg.family == 6 else "iptables"
    return [[binary, "-w", "5", "-W", "100000", "-I", j.chain, "-t", j.table, *j.args] for j in JUMP_RULES]


def ipvs_sysctls(cfg: IpvsConfig, kernel_release: str | None = None) -> list[tuple[str, int]]:
    """The sysctls kube-proxy's NewProxier ensures, in its order.

    conn_reuse_mode=0 only on kernels 4.1 to 5.8 (kubernetes issue 93297: later kernels fixed the
    1-second delay that made kube-proxy turn it off).
    """
    release = kernel_release if kernel_release is not None else platform.release()
    values = [("net/ipv4/vs/conntrack", 1)]
    version = tuple(int(x) for x in re.findall(r"\d+", release)[:2]) or (0, 0)
    if (4, 1) <= version < (5, 9):
        values.append(("net/ipv4/vs/conn_reuse_mode", 0))
    values += [("net/ipv4/vs/expire_nodest_conn", 1), ("net/ipv4/vs/expire_quiescent_template", 1),
               ("net/ipv4/ip_forward", 1)]
    if cfg.strict_arp:
        values += [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)]
    return values


# --- the kernel behind a narrow interface ------------------------------------------------------------


class IpvsKernel(Protocol):
    """Everything IPVS mode does to the kernel. Failures raise OSError (errno, message)."""

    has_ipvs: bool

    def list_services(self) -> list[VirtualServer]: ...
    def add_service(self, vs: VirtualServer) -> None: ...
    def update_service(self, vs: VirtualServer) -> None: ...
    def del_service(self, vs: VirtualServer) -> None: ...
    def list_dests(self, vs: VirtualServer) -> list[RealServer]: ...
    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...

    def ensure_dummy(self, device: str) -> bool: ...
    def delete_dummy(self, device: str) -> bool: ...
    def list_addresses(self, device: str) -> set[str]: ...
    def add_address(self, device: str, address: str) -> None: ...
    def del_address(self, device: str, address: str) -> None: ...
    def node_addresses(self, exclude_device: str, family: int) -> list[str]: ...

    def list_ipsets(self) -> set[str]: ...
    def create_ipset(self, spec: IpsetSpec) -> None: ...
    def destroy_ipset(self, name: str) -> None: ...
    def list_entries(self, name: str) -> set[str]: ...
    def add_entry(self, spec: IpsetSpec, entry: str) -> None: ...
    def del_entry(self, spec: IpsetSpec, entry: str) -> None: ...

    def restore_iptables(self, text: str, family: int) -> None: ...
    def ensure_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool: ...
    def delete_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool: ...
    def list_chains(self, family: int, table: str) -> set[str]: ...
    def delete_chains(self, family: int, table: str, chains: Sequence[str]) -> None: ...

    def set_sysctl(self, name: str, value: int) -> None: ...
    def close(self) -> None: ...


IPVS_MISSING = ("IPVS is not available in this kernel (no ip_vs module / IPVS netlink family): "
                "use --mode ebpf|iptables|nftables, or a kernel with CONFIG_IP_VS")


def _os_error(exc: BaseException, what: str) -> OSError:
    """pyroute2's NetlinkError is not an OSError; turn it into one that names the object."""
    code = getattr(exc, "code", None) or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code) if isinstance(code, int) else exc}")


class LinuxKernel:
    """IpvsKernel over netlink (pyroute2's IPVS, IPRoute, IPSet) and iptables-restore.

    Works in the network namespace of the thread that opens it.
    """

    def __init__(self, ipvs, ipr, ipset):
        self.ipvs = ipvs          # pyroute2.IPVS, or None where the kernel has no IPVS
        self.ipr = ipr            # pyroute2.IPRoute
        self.ipset = ipset        # pyroute2.IPSet, or None where the kernel has no ipset

    @property
    def has_ipvs(self) -> bool:
        return self.ipvs is not None

    @classmethod
    def open(cls, require: bool = True) -> LinuxKernel:
        """Opens the netlink sockets. With ``require`` (``IpvsMode.start``) a kernel without IPVS,
        ipset or iptables-restore is a DatapathError saying what is missing; without (cleanup)
        whatever is missing is simply not cleaned."""
        from pyroute2 import IPVS, IPRoute, IPSet

        ipvs = ipset = None
        try:
            ipvs = IPVS()      # resolving the "IPVS" genl family also makes the kernel load ip_vs
        except Exception as exc:  # NetlinkError (ENOENT: no such family) or OSError
            if require:
                detail = ('no generic netlink family "IPVS"' if getattr(exc, "code", None) == errno.ENOENT
                          else str(exc))
                if not os.path.exists("/proc/net/ip_vs"):
                    detail += "; /proc/net/ip_vs is absent"
                raise DatapathError(f"{IPVS_MISSING} ({detail})") from exc
        try:
            ipset = IPSet()
        except Exception as exc:
            if require:
                if ipvs is not None:
                    ipvs.close()
                raise DatapathError(f"ipset is not available in this kernel ({exc}): IPVS mode keeps its "
                                    f"masquerade and filter sets there; use a kernel with CONFIG_IP_SET") from exc
        if require and shutil.which("iptables-restore") is None:
            for sock in (ipvs, ipset):
                if sock is not None:
                    sock.close()
            raise DatapathError("iptables-restore is not installed: IPVS mode needs it for its masquerade "
                                "rules (install iptables)")
        return cls(ipvs, IPRoute(), ipset)

    def close(self) -> None:
        for sock in (self.ipvs, self.ipr, self.ipset):
            if sock is not None:
                sock.close()

    # --- IPVS --------------------------------------------------------------------------------------

    @staticmethod
    def _service(vs: VirtualServer):
        from pyroute2 import IPVSService

        fields = dict(addr=vs.address, port=vs.port, protocol=PROTOCOL_NUMBERS[vs.protocol],
                      sched_name=vs.scheduler, timeout=vs.timeout,
                      flags={"flags": vs.flags, "mask": 0xFFFFFFFF})
        if vs.family == 6:
            # The kernel reads an IPv6 service's netmask as a prefix length in a host-order u32
            # (ipvsadm and moby/ipvs send 128); pyroute2 types the attribute as an IPv4 address.
            fields["netmask"] = socket.inet_ntoa(struct.pack("=I", 128))
        return IPVSService(**fields)

    @staticmethod
    def _dest(rs: RealServer):
        from pyroute2 import IPVSDest

        return IPVSDest(addr=rs.address, port=rs.port, weight=rs.weight, fwd_method=FWD_MASQ)

    def _ipvs_call(self, what: str, fn, *args, **kwargs):
        if self.ipvs is None:
            raise OSError(errno.EPROTONOSUPPORT, f"{what}: {IPVS_MISSING}")
        try:
            return fn(*args, **kwargs)
        except OSError:
            raise
        except Exception as exc:  # NetlinkError
            raise _os_error(exc, what) from exc

    def list_services(self) -> list[VirtualServer]:
        found = []
        for msg in self._ipvs_call("listing IPVS services", lambda: list(self.ipvs.service("dump"))):
            attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            if attrs.get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue   # firewall-mark services have no address and are never kube-proxy's
            protocol = PROTOCOL_NAMES.get(attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
            if protocol is None:
                continue
            flags = (attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {}).get("flags", 0)
            found.append(VirtualServer(
                address=str(ipaddress.ip_address(attrs.get_attr("IPVS_SVC_ATTR_ADDR"))),
                port=attrs.get_attr("IPVS_SVC_ATTR_PORT"), protocol=protocol,
                scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "",
                flags=flags & ~FLAG_HASHED, timeout=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0))
        return sorted(found)

    def add_service(self, vs: VirtualServer) -> None:
        self._ipvs_call(f"adding virtual server {vs}", self.ipvs.service, "add", service=self._service(vs))

    def update_service(self, vs: VirtualServer) -> None:
        self._ipvs_call(f"updating virtual server {vs}", self.ipvs.service, "set", service=self._service(vs))

    def del_service(self, vs: VirtualServer) -> None:
        self._ipvs_call(f"deleting virtual server {vs}", self.ipvs.service, "del", service=self._service(vs))

    def list_dests(self, vs: VirtualServer) -> list[RealServer]:
        found = []
        msgs = self._ipvs_call(f"listing real servers of {vs}",
                               lambda: list(self.ipvs.dest("dump", service=self._service(vs))))
        for msg in msgs:
            d = msg.get_attr("IPVS_CMD_ATTR_DEST")
            found.append(RealServer(
                str(ipaddress.ip_address(d.get_attr("IPVS_DEST_ATTR_ADDR"))), d.get_attr("IPVS_DEST_ATTR_PORT"),
                d.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0, d.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
                d.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0))
        return sorted(found)

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs_call(f"adding real server {rs} to {vs}", self.ipvs.dest, "add",
                        service=self._service(vs), dest=self._dest(rs))

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs_call(f"setting weight {rs.weight} on real server {rs} of {vs}", self.ipvs.dest, "set",
                        service=self._service(vs), dest=self._dest(rs))

    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs_call(f"deleting real server {rs} from {vs}", self.ipvs.dest, "del",
                        service=self._service(vs), dest=self._dest(rs))

    # --- the dummy device and addresses -----------------------------------------------------------

    def _netlink(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError:
            raise
        except Exception as exc:
            raise _os_error(exc, what) from exc

    def _index(self, device: str) -> int | None:
        found = self.ipr.link_lookup(ifname=device)
        return found[0] if found else None

    def ensure_dummy(self, device: str) -> bool:
        """Creates the dummy device if missing (left down, as kube-proxy does: addresses on a down
        device are still local). True when it was created."""
        if self._index(device) is not None:
            return False
        self._netlink(f"creating dummy device {device}", self.ipr.link, "add", ifname=device, kind="dummy")
        return True

    def delete_dummy(self, device: str) -> bool:
        index = self._index(device)
        if index is None:
            return False
        link = self.ipr.get_links(index)[0]
        kind = link.get(("linkinfo", "kind"))
        if kind != "dummy":
            raise OSError(errno.EINVAL, f"{device} is a {kind or 'non-dummy'} device, not lbctl's dummy; left alone")
        self._netlink(f"deleting {device}", self.ipr.link, "del", index=index)
        return True

    def list_addresses(self, device: str) -> set[str]:
        index = self._index(device)
        if index is None:
            raise OSError(errno.ENODEV, f"listing addresses of {device}: no such device")
        return {str(ipaddress.ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")))
                for m in self.ipr.get_addr(index=index)}

    def _addr(self, verb: str, device: str, address: str) -> None:
        index = self._index(device)
        if index is None:
            raise OSError(errno.ENODEV, f"{verb} {address} on {device}: no such device")
        prefix = 128 if ":" in address else 32
        self._netlink(f"{verb} {address}/{prefix} on {device}", self.ipr.addr, verb, index=index,
                      address=address, prefixlen=prefix)

    def add_address(self, device: str, address: str) -> None:
        self._addr("add", device, address)

    def del_address(self, device: str, address: str) -> None:
        self._addr("del", device, address)

    def node_addresses(self, exclude_device: str, family: int) -> list[str]:
        """GetAllLocalAddressesExcept: every interface's addresses but the dummy's. (An address can
        sit on two interfaces, so this is not all addresses minus the dummy's.)"""
        skip = self._index(exclude_device)
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        found = {str(ipaddress.ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")))
                 for m in self.ipr.get_addr(family=af) if m["index"] != skip}
        return _local_addresses(found, family)

    # --- ipsets ---------------------------------------------------------------------------------------

    def _ipset_call(self, what: str, fn, *args, **kwargs):
        if self.ipset is None:
            raise OSError(errno.EPROTONOSUPPORT, f"{what}: ipset is not available in this kernel")
        return self._netlink(what, fn, *args, **kwargs)

    def list_ipsets(self) -> set[str]:
        if self.ipset is None:
            return set()
        return {m.get_attr("IPSET_ATTR_SETNAME")
                for m in self._ipset_call("listing ipsets", lambda: list(self.ipset.list()))}

    def create_ipset(self, spec: IpsetSpec) -> None:
        af = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
        if spec.set_type == BITMAP_PORT:
            begin, end = (int(x) for x in spec.port_range.split("-"))
            self._ipset_call(f"creating ipset {spec.name}", self.ipset.create, spec.name, stype=spec.set_type,
                             exclusive=False, bitmap_ports_range=(begin, end))
        else:
            self._ipset_call(f"creating ipset {spec.name}", self.ipset.create, spec.name, stype=spec.set_type,
                             family=af, exclusive=False, hashsize=spec.hash_size, maxelem=spec.max_elem)

    def destroy_ipset(self, name: str) -> None:
        self._ipset_call(f"destroying ipset {name}", self.ipset.destroy, name)

    def list_entries(self, name: str) -> set[str]:
        """Members in kube-proxy's Entry.String() form ("10.0.0.1,tcp:80"), whatever the type.
        A big set comes back in several messages; a missing set as none."""
        entries: set[str] = set()
        for msg in self._ipset_call(f"listing ipset {name}", lambda: list(self.ipset.list(name))):
            set_type = msg.get_attr("IPSET_ATTR_TYPENAME")
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if adt is None:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                entries.add(_entry_string(set_type, data))
        return entries

    def add_entry(self, spec: IpsetSpec, entry: str) -> None:
        parts, etype = _entry_parts(spec.set_type, entry)
        self._ipset_call(f"adding {entry} to ipset {spec.name}", self.ipset.add, spec.name, parts,
                         family=_ipset_family(spec), etype=etype, exclusive=False)

    def del_entry(self, spec: IpsetSpec, entry: str) -> None:
        parts, etype = _entry_parts(spec.set_type, entry)
        self._ipset_call(f"deleting {entry} from ipset {spec.name}", self.ipset.delete, spec.name, parts,
                         family=_ipset_family(spec), etype=etype)

    # --- iptables --------------------------------------------------------------------------------------

    @staticmethod
    def _run(argv: list[str], what: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise OSError(errno.EIO, f"{what}: {' '.join(argv[:2])} failed: {done.stderr.strip()}")
        return done

    def restore_iptables(self, text: str, family: int) -> None:
        binary = "ip6tables-restore" if family == 6 else "iptables-restore"
        self._run([binary, "-w", "5", "--noflush", "--counters"], "restoring kube-proxy's IPVS-mode rules",
                  input=text)

    def _iptables(self, family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        binary = "ip6tables" if family == 6 else "iptables"
        return self._run([binary, "-w", "5", *args], f"{binary} {' '.join(args[:4])}", check=check)

    def ensure_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        if self._iptables(family, "-t", table, "-C", chain, *args, check=False).returncode == 0:
            return False
        self._iptables(family, "-t", table, "-I", chain, *args)
        return True

    def delete_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        deleted = False
        while self._iptables(family, "-t", table, "-C", chain, *args, check=False).returncode == 0:
            self._iptables(family, "-t", table, "-D", chain, *args)
            deleted = True
        return deleted

    def list_chains(self, family: int, table: str) -> set[str]:
        binary = "ip6tables-save" if family == 6 else "iptables-save"
        done = self._run([binary, "-t", table], f"listing {table} chains", check=False)
        return {line[1:].split()[0] for line in done.stdout.splitlines() if line.startswith(":")}

    def delete_chains(self, family: int, table: str, chains: Sequence[str]) -> None:
        """Flushes then deletes, in one restore: declaring a chain flushes it (and creates it if
        missing, so this is idempotent); flushing all first removes jumps between them."""
        if not chains:
            return
        lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains), "COMMIT"]
        self.restore_iptables("\n".join(lines) + "\n", family)

    def set_sysctl(self, name: str, value: int) -> None:
        path = f"/proc/sys/{name}"
        try:
            with open(path) as f:
                if f.read().strip() == str(value):
                    return
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise OSError(exc.errno, f"setting sysctl {name.replace('/', '.')}={value}: {exc.strerror}") from exc


def _ipset_family(spec: IpsetSpec) -> int:
    return socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET


def _entry_parts(set_type: str, entry: str):
    """kube-proxy's entry string -> pyroute2's entry tuple and etype."""
    from pyroute2.ipset import PortEntry

    def port_entry(text: str) -> PortEntry:
        proto, _, port = text.partition(":")
        return PortEntry(int(port), protocol=PROTOCOL_NUMBERS[proto.upper()])

    if set_type == BITMAP_PORT:
        return int(entry), "port"
    if set_type == HASH_IP:
        return entry, "ip"
    fields = entry.split(",")
    if set_type == HASH_IP_PORT:
        return (fields[0], port_entry(fields[1])), "ip,port"
    if set_type == HASH_IP_PORT_IP:
        return (fields[0], port_entry(fields[1]), fields[2]), "ip,port,ip"
    if set_type == HASH_IP_PORT_NET:
        return (fields[0], port_entry(fields[1]), fields[2]), "ip,port,net"
    raise ValueError(f"unsupported ipset type {set_type}")


def _entry_string(set_type: str, data) -> str:
    """One listed member (an IPSET_ATTR_DATA nla) in kube-proxy's Entry.String() form."""
    def ip(attr: str) -> str:
        nested = data.get_attr(attr)
        value = nested.get_attr("IPSET_ATTR_IPADDR_IPV4") or nested.get_attr("IPSET_ATTR_IPADDR_IPV6")
        return str(ipaddress.ip_address(value))

    port = data.get_attr("IPSET_ATTR_PORT_FROM") or data.get_attr("IPSET_ATTR_PORT")
    if set_type == BITMAP_PORT:
        return str(port)
    if set_type == HASH_IP:
        return ip("IPSET_ATTR_IP_FROM")
    proto = PROTOCOL_NAMES.get(data.get_attr("IPSET_ATTR_PROTO"), str(data.get_attr("IPSET_ATTR_PROTO"))).lower()
    head = hash_ip_port(ip("IPSET_ATTR_IP_FROM"), proto, port)
    if set_type == HASH_IP_PORT:
        return head
    if set_type == HASH_IP_PORT_IP:
        return f"{head},{ip('IPSET_ATTR_IP2')}"
    if set_type == HASH_IP_PORT_NET:
        return f"{head},{ipaddress.ip_network((ip('IPSET_ATTR_IP2'), data.get_attr('IPSET_ATTR_CIDR2')))}"
    raise ValueError(f"unsupported ipset type {set_type}")


# --- the in-memory kernel ---------------------------------------------------------------------------

_BUILTIN_CHAINS = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
                   "filter": ("INPUT", "FORWARD", "OUTPUT")}


class FakeKernel:
    """An in-memory IpvsKernel that behaves like the kernel where it matters to the mode: EEXIST
    and ENOENT on duplicate or missing objects, iptables-restore refusing rules that match
    missing ipsets, ipsets that rules reference cannot be destroyed.

    ``fail_on`` injects failures: a set of (operation, key) pairs, key as ``_key`` spells it
    (e.g. ("add_dest", "10.0.0.1:80/TCP 10.180.0.1:80")). ``log`` lists every write in order.
    ``set_connections`` stands in for traffic, for graceful-termination tests.
    """

    def __init__(self, node_addresses: Iterable[str] = ("192.168.0.2",), has_ipvs: bool = True):
        self.has_ipvs = has_ipvs
        self.services: dict[tuple, VirtualServer] = {}
        self.dests: dict[tuple, dict[tuple, RealServer]] = {}
        self.links: dict[str, set[str]] = {"lo": {"127.0.0.1", "::1"}, "eth0": set(node_addresses)}
        self.dummies: set[str] = set()
        self.ipsets: dict[str, IpsetSpec] = {}
        self.entries: dict[str, set[str]] = {}
        self.tables: dict[tuple[int, str], dict[str, list[tuple[str, ...]]]] = {}
        self.sysctls: dict[str, int] = {}
        self.fail_on: set[tuple[str, str]] = set()
        self.log: list[tuple[str, str]] = []
        self.restores: list[str] = []

    def _write(self, op: str, key: str) -> None:
        if (op, key) in self.fail_on:
            raise OSError(errno.EIO, f"injected failure: {op} {key}")
        self.log.append((op, key))

    def _ipvs(self) -> None:
        if not self.has_ipvs:
            raise OSError(errno.EPROTONOSUPPORT, IPVS_MISSING)

    def writes(self, op: str | None = None) -> list[tuple[str, str]]:
        return [entry for entry in self.log if op is None or entry[0] == op]

    def close(self) -> None:
        pass

    # IPVS
    def list_services(self) -> list[VirtualServer]:
        self._ipvs()
        return sorted(self.services.values())

    def add_service(self, vs: VirtualServer) -> None:
        self._ipvs()
        self._write("add_service", str(vs))
        if vs.key in self.services:
            raise OSError(errno.EEXIST, f"adding virtual server {vs}: exists")
        self.services[vs.key] = vs
        self.dests[vs.key] = {}

    def update_service(self, vs: VirtualServer) -> None:
        self._ipvs()
        self._write("update_service", str(vs))
        if vs.key not in self.services:
            raise OSError(errno.ESRCH, f"updating virtual server {vs}: no such service")
        self.services[vs.key] = vs

    def del_service(self, vs: VirtualServer) -> None:
        self._ipvs()
        self._write("del_service", str(vs))
        if self.services.pop(vs.key, None) is None:
            raise OSError(errno.ESRCH, f"deleting virtual server {vs}: no such service")
        self.dests.pop(vs.key, None)

    def list_dests(self, vs: VirtualServer) -> list[RealServer]:
        self._ipvs()
        if vs.key not in self.services:
            raise OSError(errno.ESRCH, f"listing real servers of {vs}: no such service")
        return sorted(self.dests[vs.key].values())

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs()
        self._write("add_dest", f"{vs} {rs}")
        dests = self._dests(vs)
        if rs.key in dests:
            raise OSError(errno.EEXIST, f"adding real server {rs} to {vs}: exists")
        dests[rs.key] = RealServer(rs.address, rs.port, rs.weight)

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs()
        self._write("update_dest", f"{vs} {rs} weight {rs.weight}")
        dests = self._dests(vs)
        if rs.key not in dests:
            raise OSError(errno.ENOENT, f"updating real server {rs} of {vs}: no such destination")
        dests[rs.key] = replace(dests[rs.key], weight=rs.weight)

    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs()
        self._write("del_dest", f"{vs} {rs}")
        if self._dests(vs).pop(rs.key, None) is None:
            raise OSError(errno.ENOENT, f"deleting real server {rs} of {vs}: no such destination")

    def _dests(self, vs: VirtualServer) -> dict[tuple, RealServer]:
        if vs.key not in self.dests:
            raise OSError(errno.ESRCH, f"{vs}: no such service")
        return self.dests[vs.key]

    def set_connections(self, vs: VirtualServer, address: str, port: int, active: int, inactive: int = 0) -> None:
        dests = self._dests(vs)
        dests[(address, port)] = replace(dests[(address, port)], active_conns=active, inactive_conns=inactive)

    # the dummy device and addresses
    def ensure_dummy(self, device: str) -> bool:
        if device in self.links:
            return False
        self._write("ensure_dummy", device)
        self.links[device] = set()
        self.dummies.add(device)
        return True

    def delete_dummy(self, device: str) -> bool:
        if device not in self.links:
            return False
        if device not in self.dummies:
            raise OSError(errno.EINVAL, f"{device} is not a dummy device; left alone")
        self._write("delete_dummy", device)
        del self.links[device]
        self.dummies.discard(device)
        return True

    def list_addresses(self, device: str) -> set[str]:
        if device not in self.links:
            raise OSError(errno.ENODEV, f"listing addresses of {device}: no such device")
        return set(self.links[device])

    def add_address(self, device: str, address: str) -> None:
        self._write("add_address", address)
        if address in self.list_addresses(device):
            raise OSError(errno.EEXIST, f"adding {address} to {device}: exists")
        self.links[device].add(address)

    def del_address(self, device: str, address: str) -> None:
        self._write("del_address", address)
        if address not in self.list_addresses(device):
            raise OSError(errno.EADDRNOTAVAIL, f"deleting {address} from {device}: not there")
        self.links[device].discard(address)

    def node_addresses(self, exclude_device: str, family: int) -> list[str]:
        found = {a for name, addresses in self.links.items() if name != exclude_device for a in addresses}
        return _local_addresses(found, family)

    # ipsets
    def list_ipsets(self) -> set[str]:
        return set(self.ipsets)

    def create_ipset(self, spec: IpsetSpec) -> None:
        self._write("create_ipset", spec.name)
        existing = self.ipsets.get(spec.name)
        if existing is not None and existing.set_type != spec.set_type:
            raise OSError(errno.EEXIST, f"creating ipset {spec.name}: exists with type {existing.set_type}")
        self.ipsets[spec.name] = spec
        self.entries.setdefault(spec.name, set())

    def destroy_ipset(self, name: str) -> None:
        self._write("destroy_ipset", name)
        if name not in self.ipsets:
            raise OSError(errno.ENOENT, f"destroying ipset {name}: does not exist")
        if any(name in _matched_sets(rule) for chains in self.tables.values()
               for rules in chains.values() for rule in rules):
            raise OSError(errno.EBUSY, f"destroying ipset {name}: in use by iptables")
        del self.ipsets[name]
        del self.entries[name]

    def list_entries(self, name: str) -> set[str]:
        return set(self.entries.get(name, ()))

    def add_entry(self, spec: IpsetSpec, entry: str) -> None:
        self._write("add_entry", f"{spec.name} {entry}")
        if spec.name not in self.ipsets:
            raise OSError(errno.ENOENT, f"adding {entry}: ipset {spec.name} does not exist")
        self.entries[spec.name].add(entry)

    def del_entry(self, spec: IpsetSpec, entry: str) -> None:
        self._write("del_entry", f"{spec.name} {entry}")
        if entry not in self.entries.get(spec.name, ()):
            raise OSError(errno.ENOENT, f"deleting {entry} from ipset {spec.name}: not a member")
        self.entries[spec.name].discard(entry)

    # iptables
    def _table(self, family: int, table: str) -> dict[str, list[tuple[str, ...]]]:
        return self.tables.setdefault((family, table), {c: [] for c in _BUILTIN_CHAINS[table]})

    def restore_iptables(self, text: str, family: int) -> None:
        """iptables-restore --noflush: a declared chain is created or flushed, -A appends, -X
        deletes; a table is committed whole or not at all."""
        self._write("restore_iptables", str(family))
        pending: dict[str, dict[str, list[tuple[str, ...]]]] = {}
        table = None
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            if line.startswith("*"):
                table = line[1:]
                pending[table] = {c: list(r) for c, r in self._table(family, table).items()}
            elif line == "COMMIT":
                table = None
            elif line.startswith(":"):
                pending[table][line[1:].split()[0]] = []
            else:
                words = tuple(shlex.split(line))
                chain = words[1]
                if words[0] == "-X":
                    pending[table].pop(chain, None)
                    continue
                if words[0] != "-A" or chain not in pending[table]:
                    raise OSError(errno.EINVAL, f"iptables-restore: line {line!r}: no chain {chain}")
                for name in _matched_sets(words):
                    if name not in self.ipsets:
                        raise OSError(errno.ENOENT, f"iptables-restore: Set {name} doesn't exist")
                pending[table][chain].append(words[2:])
        for name, chains in pending.items():
            self.tables[(family, name)] = chains
        self.restores.append(text)

    def rules(self, family: int, table: str, chain: str) -> list[str]:
        """A chain's rules as "-A CHAIN ..." lines (shlex-joined), for tests."""
        return [" ".join(["-A", chain, *(shlex.quote(w) for w in r)])
                for r in self._table(family, table).get(chain, [])]

    def ensure_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        rules = self._table(family, table)[chain]
        if tuple(args) in rules:
            return False
        self._write("ensure_rule", f"{table} {chain} {' '.join(args)}")
        rules.insert(0, tuple(args))
        return True

    def delete_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        rules = self._table(family, table).get(chain, [])
        if tuple(args) not in rules:
            return False
        self._write("delete_rule", f"{table} {chain} {' '.join(args)}")
        rules[:] = [r for r in rules if r != tuple(args)]
        return True

    def list_chains(self, family: int, table: str) -> set[str]:
        return set(self._table(family, table))

    def delete_chains(self, family: int, table: str, chains: Sequence[str]) -> None:
        self._write("delete_chains", f"{table} {' '.join(chains)}")
        current = self._table(family, table)
        for chain, rules in current.items():
            for rule in rules:
                target = rule[rule.index("-j") + 1] if "-j" in rule else None
                if chain not in chains and target in chains:
                    raise OSError(errno.EBUSY, f"deleting chain {target}: referenced from {chain}")
        for chain in chains:
            current.pop(chain, None)

    def set_sysctl(self, name: str, value: int) -> None:
        if self.sysctls.get(name) == value:
            return
        self._write("set_sysctl", f"{name}={value}")
        self.sysctls[name] = value


def _matched_sets(words: Sequence[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--match-set"]


# --- the mode ------------------------------------------------------------------------------------------


class IpvsMode:
    """kube-proxy's IPVS mode behind lbctl's Mode interface (see lbctl.datapath.base).

    Every sync reads the kernel and makes it match the desired state, in an order in which no
    packet meets a half-made service:

      1. the dummy device and all ipsets exist; new ipset members are added (so a virtual
         server's masquerade and filter entries exist before it goes live);
      2. the constant iptables rules are restored and the jumps to them ensured;
      3. per virtual server: created or updated, real servers added, weights restored, stale real
         servers drained (TCP with connections: weight 0) or deleted; only then is its address
         bound to kube-ipvs0 (IPVS sees a VIP's packets only once the VIP is local);
      4. stale addresses are unbound first (no new packets reach IPVS), then stale virtual servers
         deleted, then stale ipset members.

    A failed write is reported in SyncResult.errors and leaves the rest going; the next sync
    reads the kernel again and converges (``needs_retry``). SyncResult counts virtual servers in
    added/updated/removed and real servers in backends_added/backends_removed (a real server
    starting to drain counts as removed); a sync that changes nothing but ipset members (say,
    loadBalancerSourceRanges) reports each changed set as an update, so it is not silent.
    """

    name = "ipvs"

    def __init__(self, cfg: IpvsConfig = IpvsConfig(), kernel: IpvsKernel | None = None,
                 clock=time.monotonic, ebpf_pin_dir: str | None = None):
        self.cfg = cfg
        self.kernel = kernel
        # Switching modes: with a pin dir (what `lbctl run` passes), start() removes the other
        # modes' objects once it knows IPVS mode can run. Tests on a fake kernel pass none.
        self.ebpf_pin_dir = ebpf_pin_dir
        self.clock = clock
        self.ports: tuple[ServicePortInfo, ...] = ()
        self.desired: IpvsDesired | None = None
        self.problems: tuple = ()
        self.dirty = False
        self.draining: set[tuple[str, str]] = set()     # (virtual server, real server) at weight 0
        self._last_sync = 0.0

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Checks the kernel can do IPVS mode at all (DatapathError saying what is missing) and
        sets kube-proxy's sysctls. State left by a previous run is not restored into memory: every
        sync diffs against what the kernel holds, so a restart moves no real server."""
        if self.kernel is None:
            self.kernel = LinuxKernel.open(require=True)
        try:
            created = self.kernel.ensure_dummy(self.cfg.dummy_device)
        except OSError as exc:
            raise DatapathError(
                f"cannot create the dummy device {self.cfg.dummy_device} that IPVS mode binds service "
                f"addresses to ({exc.strerror or exc}): use a kernel with CONFIG_DUMMY, or --mode "
                f"ebpf|iptables|nftables") from exc
        for name, value in ipvs_sysctls(self.cfg):
            try:
                self.kernel.set_sysctl(name, value)
            except OSError as exc:
                log.warning("%s", exc.strerror or exc)
        if self.ebpf_pin_dir is not None:
            from lbctl.datapath.base import cleanup_other_modes
            cleanup_other_modes(self.name, self.ebpf_pin_dir)
        log.info("IPVS mode started (%s %s)", self.cfg.dummy_device, "created" if created else "found")

    def stop(self, detach: bool) -> None:
        if self.kernel is None:
            return
        if detach:
            removed = self.cleanup(kernel=self.kernel, cfg=self.cfg)
            log.info("removed %d IPVS-mode object(s)", len(removed))
        else:
            log.info("exiting; virtual servers, %s, ipsets and iptables rules stay (`lbctl cleanup` "
                     "removes them)", self.cfg.dummy_device)
        self.kernel.close()

    @property
    def needs_retry(self) -> bool:
        """A failed sync, or real servers draining (checked every graceful_check_interval)."""
        if self.dirty:
            return True
        return bool(self.draining) and self.clock() - self._last_sync >= self.cfg.graceful_check_interval

    # --- the sync ------------------------------------------------------------------------------------

    def sync(self, ports: Sequence[ServicePortInfo] | None = None) -> SyncResult:
        """Programs ``ports``; with None, syncs the last ones again (retry, draining check)."""
        if ports is not None:
            self.ports = tuple(ports)
        result = SyncResult()
        self._last_sync = self.clock()
        kernel, cfg, family = self.kernel, self.cfg, self.cfg.family
        try:
            node_addresses = kernel.node_addresses(cfg.dummy_device, family)
        except OSError as exc:
            node_addresses = list(cfg.node_ips)
            self._error(result, f"reading node addresses (using {node_addresses}): {exc.strerror or exc}")
        desired = desired_ipvs(self.ports, cfg, node_addresses)
        self.desired, self.problems = desired, desired.problems
        specs = {spec.name: spec for spec in ipset_specs(family)}

        try:
            kernel.ensure_dummy(cfg.dummy_device)
            actual_sets = {name: kernel.list_entries(name) for name in self._ensure_ipsets(specs)}
        except OSError as exc:
            # Without the device or the sets nothing below can be right: retry from scratch.
            self._error(result, str(exc.strerror or exc))
            self.dirty = True
            return result
        sets_changed = self._add_entries(desired, specs, actual_sets, result)
        self._restore_iptables(desired, result)
        bound = self._bound_addresses(result)
        live = self._sync_virtual_servers(desired, bound, result)
        self._remove_stale(desired, bound, live, result)
        sets_changed |= self._remove_entries(desired, specs, actual_sets, result)
        if sets_changed and not result.changed:
            result.updated = len(sets_changed)
        self.dirty = bool(result.errors)
        return result

    def _error(self, result: SyncResult, message: str) -> None:
        result.errors.append(message)
        log.error("%s", message)

    def _ensure_ipsets(self, specs: Mapping[str, IpsetSpec]) -> list[str]:
        existing = self.kernel.list_ipsets()
        for name, spec in specs.items():
            if name not in existing:
                self.kernel.create_ipset(spec)
        return list(specs)

    def _add_entries(self, desired: IpvsDesired, specs, actual_sets, result: SyncResult) -> set[str]:
        """Adds missing members; returns the names of the sets it changed."""
        changed = set()
        for name, members in desired.ipsets.items():
            for entry in sorted(members - actual_sets[name]):
                try:
                    self.kernel.add_entry(specs[name], entry)
                    actual_sets[name].add(entry)
                    changed.add(name)
                except OSError as exc:
                    self._error(result, f"ipset {name}: {exc.strerror or exc}")
        return changed

    def _remove_entries(self, desired: IpvsDesired, specs, actual_sets, result: SyncResult) -> set[str]:
        changed = set()
        for name, members in desired.ipsets.items():
            for entry in sorted(actual_sets[name] - members):
                try:
                    self.kernel.del_entry(specs[name], entry)
                    changed.add(name)
                except OSError as exc:
                    self._error(result, f"ipset {name}: {exc.strerror or exc}")
        return changed

    def _restore_iptables(self, desired: IpvsDesired, result: SyncResult) -> None:
        family = desired.family
        try:
            self.kernel.restore_iptables(render_ipvs_iptables(desired, self.cfg), family)
            for jump in JUMP_RULES:
                self.kernel.ensure_rule(family, jump.table, jump.chain, jump.args)
        except OSError as exc:
            self._error(result, f"iptables: {exc.strerror or exc}")

    def _bound_addresses(self, result: SyncResult) -> set[str]:
        """The dummy's addresses of our family (the other family's proxier owns the rest), IPv6
        link-local ones aside. Loopback ones count: an external IP may be 127.0.0.1."""
        try:
            found = (common.parse_ip_sloppy(a) for a in self.kernel.list_addresses(self.cfg.dummy_device))
            return {str(ip) for ip in found if ip is not None and ip.version == self.cfg.family
                    and not (ip.version == 6 and ip.is_link_local)}
        except OSError as exc:
            self._error(result, str(exc.strerror or exc))
            return set()

    def _sync_virtual_servers(self, desired: IpvsDesired, bound: set[str], result: SyncResult) -> set:
        """Step 3. Returns the keys of the kernel's virtual servers of this family, after the sync."""
        try:
            actual = {vs.key: vs for vs in self.kernel.list_services() if vs.family == desired.family}
        except OSError as exc:
            self._error(result, f"IPVS: {exc.strerror or exc}")
            return set()
        draining: set[tuple[str, str]] = set()
        for key, want in desired.virtual_servers.items():
            try:
                self._sync_virtual_server(want, actual.get(key), draining, result)
            except OSError as exc:
                self._error(result, f"{want.name}: {exc.strerror or exc}")
                continue
            actual[key] = want.virtual_server
            address = want.virtual_server.address
            if want.bind and address not in bound:
                try:
                    self.kernel.add_address(self.cfg.dummy_device, address)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:     # EnsureAddressBind: already there is fine
                        self._error(result, f"{want.name}: {exc.strerror or exc}")
                        continue
                bound.add(address)
        self.draining = draining
        return set(actual)

    def _sync_virtual_server(self, want: DesiredVirtualServer, have: VirtualServer | None,
                             draining: set, result: SyncResult) -> None:
        vs, kernel = want.virtual_server, self.kernel
        changed = False
        if have is None:
            kernel.add_service(vs)
            result.added += 1
            current: dict[tuple, RealServer] = {}
        else:
            if have != vs:                      # scheduler, persistence or timeout changed
                kernel.update_service(vs)
                changed = True
            current = {rs.key: rs for rs in kernel.list_dests(vs)}
        wanted = {rs.key: rs for rs in want.real_servers}
        for key in sorted(wanted.keys() - current.keys()):
            kernel.add_dest(vs, wanted[key])
            result.backends_added += 1
        for key in sorted(wanted.keys() & current.keys()):
            if current[key].weight != wanted[key].weight:
                # Draining before, or left at weight 0 by a previous run: in rotation again.
                # Deviation: kube-proxy deletes and re-adds a draining one, cutting its connections.
                kernel.update_dest(vs, wanted[key])
                changed = True
        for key in sorted(current.keys() - wanted.keys()):
            if self._retire(vs, current[key], result):
                draining.add((str(vs), str(current[key])))
        if changed:
            result.updated += 1

    def _retire(self, vs: VirtualServer, rs: RealServer, result: SyncResult) -> bool:
        """GracefulDeleteRS: a TCP real server with connections is set to weight 0 and kept until
        they are gone; anything else is deleted now. True while it drains."""
        if graceful_termination_needed(vs.protocol) and rs.active_conns + rs.inactive_conns > 0:
            if rs.weight != 0:
                self.kernel.update_dest(vs, replace(rs, weight=0))
                result.backends_removed += 1
                log.info("%s: draining real server %s (%d active, %d inactive connections)",
                         vs, rs, rs.active_conns, rs.inactive_conns)
            return True
        self.kernel.del_dest(vs, rs)
        if rs.weight != 0:
            result.backends_removed += 1
        return False

    def _remove_stale(self, desired: IpvsDesired, bound: set[str], live: set, result: SyncResult) -> None:
        """Step 4: stale addresses, then stale virtual servers of our family (cleanLegacyService),
        leaving --ipvs-exclude-cidrs alone."""
        for address in sorted(bound - desired.addresses):
            try:
                self.kernel.del_address(self.cfg.dummy_device, address)
            except OSError as exc:
                self._error(result, f"{self.cfg.dummy_device}: {exc.strerror or exc}")
        excluded = [c for c in (common.parse_cidr_sloppy(x) for x in self.cfg.exclude_cidrs) if c is not None]
        for key in sorted(live - desired.virtual_servers.keys()):
            vs = VirtualServer(*key)
            ip = ipaddress.ip_address(vs.address)
            if any(ip.version == c.version and ip in c for c in excluded):
                continue
            try:
                self.kernel.del_service(vs)
                result.removed += 1
            except OSError as exc:
                self._error(result, f"{vs}: {exc.strerror or exc}")

    # --- reading the kernel back ---------------------------------------------------------------------

    def dump(self) -> dict:
        """What the kernel holds for IPVS mode, as plain data (``ipvsadm -Ln`` + ``ipset list``)."""
        if self.kernel is None:
            self.kernel = LinuxKernel.open(require=True)
        return collect(self.kernel, self.cfg)

    # --- the end ---------------------------------------------------------------------------------------

    @classmethod
    def cleanup(cls, kernel: IpvsKernel | None = None, cfg: IpvsConfig = IpvsConfig()) -> list[str]:
        """kube-proxy's cleanupLeftovers: all IPVS virtual servers (kube-proxy flushes IPVS
        whole), the dummy device, the jump rules, the chains, then the ipsets (which cannot go
        while rules reference them). Works on kernels without IPVS (nothing to flush there)."""
        own = kernel is None
        if own:
            kernel = LinuxKernel.open(require=False)
        removed: list[str] = []
        try:
            _cleanup(kernel, cfg, removed)
        finally:
            if own:
                kernel.close()
        return removed


def _cleanup(kernel: IpvsKernel, cfg: IpvsConfig, removed: list[str]) -> None:
    def attempt(what: str, fn, *args) -> tuple[bool, object]:
        """(succeeded, value): cleanup goes on past failures, logging each."""
        try:
            return True, fn(*args)
        except OSError as exc:
            log.warning("cleanup: %s: %s", what, exc.strerror or exc)
            return False, None

    if kernel.has_ipvs:
        for vs in attempt("listing IPVS services", kernel.list_services)[1] or []:
            if attempt(str(vs), kernel.del_service, vs)[0]:
                removed.append(f"IPVS virtual server {vs}")
    if attempt(cfg.dummy_device, kernel.delete_dummy, cfg.dummy_device)[1]:
        removed.append(f"dummy device {cfg.dummy_device}")
    for family in (4, 6):
        binary = "ip6tables" if family == 6 else "iptables"
        for jump in JUMP_RULES:
            if attempt("jump rule", kernel.delete_rule, family, jump.table, jump.chain, jump.args)[1]:
                removed.append(f"{binary} -t {jump.table} {jump.chain} rule -j {jump.target}")
        for table in ("nat", "filter"):
            present = attempt(f"{table} chains", kernel.list_chains, family, table)[1] or set()
            ours = [c for t, c in IPTABLES_CHAINS if t == table and c in present]
            if ours and attempt(f"{table} chains", kernel.delete_chains, family, table, ours)[0]:
                removed += [f"{binary} -t {table} chain {c}" for c in ours]
    present = attempt("listing ipsets", kernel.list_ipsets)[1] or set()
    for family in (4, 6):
        for spec in ipset_specs(family):
            if spec.name in present and attempt(spec.name, kernel.destroy_ipset, spec.name)[0]:
                removed.append(f"ipset {spec.name}")


def collect(kernel: IpvsKernel, cfg: IpvsConfig) -> dict:
    """The kernel's IPVS-mode state as JSON-able data."""
    virtual_servers = []
    for vs in (kernel.list_services() if kernel.has_ipvs else []):
        virtual_servers.append({
            "address": vs.address, "port": vs.port, "protocol": vs.protocol, "scheduler": vs.scheduler,
            "flags": vs.flags, "timeout": vs.timeout,
            "real_servers": [{"address": rs.address, "port": rs.port, "weight": rs.weight,
                              "active_conns": rs.active_conns, "inactive_conns": rs.inactive_conns}
                             for rs in kernel.list_dests(vs)]})
    try:
        addresses = sorted(kernel.list_addresses(cfg.dummy_device))
    except OSError:
        addresses = []
    present = kernel.list_ipsets()
    ipsets = {spec.name: sorted(kernel.list_entries(spec.name))
              for spec in ipset_specs(cfg.family) if spec.name in present}
    return {"mode": "ipvs", "device": cfg.dummy_device, "addresses": addresses,
            "virtual_servers": virtual_servers, "ipsets": ipsets}


def format_ipvsadm(state: dict) -> str:
    """``ipvsadm -Ln``-style text of ``collect``'s virtual servers."""
    lines = ["Prot LocalAddress:Port Scheduler Flags",
             "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"]
    for vs in state["virtual_servers"]:
        head = f"{vs['protocol']:<4} {common.join_host_port(vs['address'], vs['port'])} {vs['scheduler']}"
        if vs["flags"] & FLAG_PERSISTENT:
            head += f" persistent {vs['timeout']}"
        lines.append(head.rstrip())
        for rs in vs["real_servers"]:
            lines.append(f"  -> {common.join_host_port(rs['address'], rs['port']):<28} Masq    "
                         f"{rs['weight']:<6} {rs['active_conns']:<10} {rs['inactive_conns']}")
    return "\n".join(lines) + "\n"


def format_desired(desired: IpvsDesired) -> str:
    """The desired state as text (virtual servers as ``ipvsadm -Ln``, then addresses and set
    members), for golden files and ``lbctl render``."""
    state = {"virtual_servers": [
        {"address": d.virtual_server.address, "port": d.virtual_server.port,
         "protocol": d.virtual_server.protocol, "scheduler": d.virtual_server.scheduler,
         "flags": d.virtual_server.flags, "timeout": d.virtual_server.timeout,
         "real_servers": [{"address": rs.address, "port": rs.port, "weight": rs.weight, "active_conns": 0,
                           "inactive_conns": 0} for rs in d.real_servers]}
        for d in desired.virtual_servers.values()]}
    lines = [format_ipvsadm(state).rstrip("\n"), "", f"{DUMMY_DEVICE}: {' '.join(sorted(desired.addresses))}".rstrip()]
    for name, members in desired.ipsets.items():
        if members:
            lines.append(f"{name}: {' '.join(sorted(members))}")
    for problem in desired.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines) + "\n"
