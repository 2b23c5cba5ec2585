"""What kube-proxy v1.32's IPVS proxier keeps in the kernel, as plain data (no kernel here).

``desired_ipvs(ports, cfg)`` follows syncProxyRules (``pkg/proxy/ipvs/proxier.go``) line by line:
the virtual servers with their real servers, the addresses bound to kube-ipvs0 and the members
of kube-proxy's 17 ipsets. The types here (``VirtualServer``, ``RealServer``, ``IpsetSpec``) are
also what the kernel interface (``kernel.py``) reads and writes.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.common import ProxiedPort
from lbctl.model.objects import Problem, ServicePortInfo

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"

# IPVS service flags (include/uapi/linux/ip_vs.h, kube-proxy's utilipvs.Flag*).
FLAG_PERSISTENT = 0x1      # sessionAffinity: ClientIP
FLAG_HASHED = 0x2          # set by the kernel on every service; stripped when read back
FLAG_SOURCE_HASH = 0x10    # IP_VS_SVC_F_SCHED1, which the "mh" scheduler needs

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
    builder = _DesiredBuilder(cfg, family, local_addresses(
        cfg.node_ips if node_addresses is None else node_addresses, family))
    for proxied in common.proxied_ports(ports, family, cfg.node_name):
        builder.add(proxied)
    return builder.result()


def local_addresses(addresses: Iterable[str], family: int) -> list[str]:
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
        for cidr in view.load_balancer_source_ranges:
            self.sets[LOAD_BALANCER_SOURCE_CIDR].add(f"{entry},{cidr}")
        # The node reaches an LB IP it is a backend of directly (the IP is bound locally), with
        # the LB IP as source: allowed when the node's own IP is in the source ranges.
        if common.source_ranges_admit_node(view, self.node_ip):
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


# --- as text --------------------------------------------------------------------------------------


def virtual_server_state(vs: VirtualServer, real_servers: Iterable[RealServer]) -> dict[str, Any]:
    """A virtual server and its real servers as JSON-able data (``lbctl dump``, ``format_ipvsadm``)."""
    return {"address": vs.address, "port": vs.port, "protocol": vs.protocol, "scheduler": vs.scheduler,
            "flags": vs.flags, "timeout": vs.timeout,
            "real_servers": [{"address": rs.address, "port": rs.port, "weight": rs.weight,
                              "active_conns": rs.active_conns, "inactive_conns": rs.inactive_conns}
                             for rs in real_servers]}


def format_ipvsadm(state: Mapping[str, Any]) -> str:
    """``ipvsadm -Ln``-style text of the virtual servers in ``state`` (what ``collect`` returns)."""
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
    state = {"virtual_servers": [virtual_server_state(d.virtual_server, d.real_servers)
                                 for d in desired.virtual_servers.values()]}
    lines = [format_ipvsadm(state).rstrip("\n"), "", f"{DUMMY_DEVICE}: {' '.join(sorted(desired.addresses))}".rstrip()]
    for name, members in desired.ipsets.items():
        if members:
            lines.append(f"{name}: {' '.join(sorted(members))}")
    for problem in desired.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines) + "\n"
