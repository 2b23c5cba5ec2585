"""kube-proxy's view of services and endpoints, shared by the iptables and nftables renderers.

kube-proxy (v1.32, ``pkg/proxy``) does not program Service objects directly: its change
trackers first turn each service port into a ``BaseServicePortInfo`` and each endpoint into a
``BaseEndpointInfo``, for one IP family, and ``CategorizeEndpoints`` then splits the endpoints
into those used by Cluster and by Local traffic policy. Both proxiers build every rule from
those. This module does the same from lbctl's ``ServicePortInfo``, and decides once what both
proxiers decide per service port before writing a rule (``service_policy``: which endpoints,
reject or drop, what is masqueraded), so that the renderers can follow kube-proxy's
``syncProxyRules`` line by line without re-deriving policy in two places.

Everything here is pure and deterministic: where kube-proxy iterates a Go map (services,
matching node IPs) we sort, so the same input always renders the same text.
"""
from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lbctl.model import addresses
from lbctl.model.addresses import IPAddress, IPNetwork
from lbctl.model.objects import ServicePortInfo

LOOPBACK = {4: "127.0.0.1", 6: "::1"}
IPV4_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")

# kube-proxy drops endpoint comments above this many endpoints ("large cluster mode").
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000


# --- addresses ---------------------------------------------------------------------------------


def parse_ip_sloppy(text: str) -> IPAddress | None:
    """An IP as netutils.ParseIPSloppy reads it ("010.0.0.1" is 10.0.0.1), surrounding blanks
    ignored (flag values); None for anything that is not an IP."""
    return addresses.parse_ip_sloppy(text.strip())


def parse_cidr_sloppy(text: str) -> IPNetwork | None:
    """A CIDR as netutils.ParseCIDRSloppy reads it (host bits masked off), blanks ignored."""
    return addresses.parse_cidr_sloppy(text.strip())


def family_of(address: str) -> int | None:
    ip = parse_ip_sloppy(address)
    return ip.version if ip is not None else None


def join_host_port(ip: str, port: int) -> str:
    """net.JoinHostPort: IPv6 addresses get brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def b32_sha256(text: str) -> str:
    """base32(sha256(text)), the root of every kube-proxy chain-name hash."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


# --- the node ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """What kube-proxy knows about the node it runs on, for one IP family."""

    name: str
    family: int
    node_ip: IPAddress | None           # the primary node IP of this family (proxier.nodeIP)
    local_addresses: tuple[IPAddress, ...]   # every address on the node's interfaces, loopback included


def node_view(node_name: str, node_ips: Sequence[str], family: int | None) -> NodeView:
    """Build the node view; ``family`` None means the family of the primary (first) node IP.

    kube-proxy reads interface addresses with net.InterfaceAddrs(); a renderer cannot, so the
    node's addresses are ``node_ips`` plus the loopback address (every Linux host has ``lo``).
    """
    parsed = [ip for ip in (parse_ip_sloppy(s) for s in node_ips) if ip is not None]
    if family is None:
        family = parsed[0].version if parsed else 4
    same_family = [ip for ip in parsed if ip.version == family]
    loopback = ipaddress.ip_address(LOOPBACK[family])
    local = tuple(dict.fromkeys(same_family + [loopback]))
    return NodeView(node_name, family, same_family[0] if same_family else None, local)


@dataclass(frozen=True)
class NodePortAddresses:
    """kube-proxy's --nodeport-addresses for one family (pkg/proxy/util/nodeport_addresses.go)."""

    cidrs: tuple[IPNetwork, ...]
    match_all: bool
    contains_ipv4_loopback: bool

    def node_ips(self, node: NodeView) -> list[IPAddress]:
        """The node addresses inside the CIDRs (GetNodeIPs), sorted for determinism."""
        found = {ip for ip in node.local_addresses for cidr in self.cidrs if ip in cidr}
        return sorted(found)


def nodeport_addresses(values: Iterable[str], node: NodeView, node_ips: Sequence[str]) -> NodePortAddresses:
    """Interpret --nodeport-addresses as kube-proxy v1.32 does.

    "primary" (alone) becomes the first node IP of each family as a /32 or /128 (cmd/kube-proxy
    server.go). CIDRs of the other family are dropped; if none is left the zero CIDR is used,
    which means "every local address" (MatchAll).
    """
    values = [v.strip() for v in values if v.strip()]
    if values == ["primary"]:
        values = []
        for family, bits in ((4, 32), (6, 128)):
            first = next((ip for ip in (parse_ip_sloppy(s) for s in node_ips)
                          if ip is not None and ip.version == family), None)
            if first is not None and not first.is_loopback:
                values.append(f"{first}/{bits}")
    cidrs = [c for c in (parse_cidr_sloppy(v) for v in values) if c is not None and c.version == node.family]
    if not cidrs:
        zero = ipaddress.ip_network("0.0.0.0/0" if node.family == 4 else "::/0")
        return NodePortAddresses((zero,), True, node.family == 4)
    if any(c.prefixlen == 0 for c in cidrs):
        zero = next(c for c in cidrs if c.prefixlen == 0)
        return NodePortAddresses((zero,), True, node.family == 4)
    loopback = any(c.version == 4 and (c.network_address.is_loopback or
                                       IPV4_LOOPBACK_NET.network_address in c) for c in cidrs)
    return NodePortAddresses(tuple(cidrs), False, loopback)


@dataclass(frozen=True)
class LocalDetector:
    """--detect-local-mode=ClusterCIDR (the v1.32 default): "local" means "from a pod".

    Without a cluster CIDR kube-proxy uses a no-op detector: no masquerade of off-cluster
    traffic to cluster IPs and no short-circuit of pod traffic to external IPs.
    """

    cidr: IPNetwork | None

    @property
    def implemented(self) -> bool:
        return self.cidr is not None


def local_detector(cluster_cidr: str | None, family: int) -> LocalDetector:
    """Pick the cluster CIDR of ``family`` from a comma-separated --cluster-cidr value."""
    for text in (cluster_cidr or "").split(","):
        cidr = parse_cidr_sloppy(text)
        if cidr is not None and cidr.version == family:
            return LocalDetector(cidr)
    return LocalDetector(None)


def masquerade_mark(bit: int) -> str:
    """The mark kube-proxy derives from --iptables-masquerade-bit: Go's fmt.Sprintf("%#08x", 1<<bit).

    Go zero-pads the digits to the width and then adds "0x", so bit 14 gives "0x00004000"
    (iptables-save later prints it back as 0x4000).
    """
    return "0x" + format(1 << bit, "08x")


# --- services and endpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointView:
    """kube-proxy's BaseEndpointInfo."""

    ip: str
    port: int
    is_local: bool
    ready: bool
    serving: bool
    terminating: bool

    @property
    def string(self) -> str:
        """Endpoint.String(): "ip:port", the key kube-proxy hashes into endpoint chain names."""
        return join_host_port(self.ip, self.port)


@dataclass(frozen=True)
class ServicePortView:
    """kube-proxy's BaseServicePortInfo for one family, plus the names both proxiers derive."""

    namespace: str
    name: str
    port_name: str
    protocol: str                       # lowercase, as kube-proxy uses it in rules and hashes
    cluster_ip: str
    port: int
    node_port: int
    external_ips: tuple[str, ...]
    load_balancer_vips: tuple[str, ...]
    load_balancer_source_ranges: tuple[IPNetwork, ...]
    sticky_seconds: int | None          # None unless sessionAffinity is ClientIP
    external_policy_local: bool
    internal_policy_local: bool
    health_check_node_port: int

    @property
    def name_string(self) -> str:
        """ServicePortName.String(): "ns/name:port", or "ns/name" for an unnamed port."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.load_balancer_vips or self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """Cluster endpoints are needed for iTP=Cluster, and for any external traffic (short-circuit)."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (self.external_policy_local and self.externally_accessible)


@dataclass(frozen=True)
class ServiceEndpoints:
    """The output of proxy.CategorizeEndpoints for one service port."""

    cluster: tuple[EndpointView, ...]
    local: tuple[EndpointView, ...]
    all_reachable: tuple[EndpointView, ...]
    has_any: bool


@dataclass(frozen=True)
class ProxiedPort:
    """A service port as a proxier sees it: the port, its endpoints, and their categories."""

    view: ServicePortView
    endpoints: tuple[EndpointView, ...]
    categories: ServiceEndpoints


def _externally_accessible_type(info: ServicePortInfo) -> bool:
    """apiservice.ExternallyAccessible: LoadBalancer, NodePort, or ClusterIP with externalIPs."""
    service = info.service
    return service.type in ("LoadBalancer", "NodePort") or (
        service.type == "ClusterIP" and bool(service.external_ips))


def _addresses_of_family(values: Iterable[str], family: int) -> tuple[str, ...]:
    ips = (parse_ip_sloppy(v) for v in values)
    return tuple(str(ip) for ip in ips if ip is not None and ip.version == family)


def service_port_view(info: ServicePortInfo, family: int) -> ServicePortView | None:
    """newBaseServiceInfo for one family, or None where kube-proxy skips the service.

    Skipped: ExternalName services, headless services, and services without a cluster IP of
    this family (proxyutil.ShouldSkipService / GetClusterIPByFamily).
    """
    service, port = info.service, info.port
    if service.type == "ExternalName":
        return None
    cluster_ips = _addresses_of_family(service.cluster_ips, family)
    if not cluster_ips:
        return None
    external_local = _externally_accessible_type(info) and service.external_traffic_policy == "Local"
    ranges = (parse_cidr_sloppy(r) for r in service.load_balancer_source_ranges)
    health_check = 0
    if service.type == "LoadBalancer" and external_local and service.health_check_node_port:
        health_check = service.health_check_node_port
    return ServicePortView(
        namespace=service.namespace,
        name=service.name,
        port_name=port.name,
        protocol=port.protocol.value.lower(),
        cluster_ip=cluster_ips[0],
        port=port.port,
        node_port=port.node_port or 0,
        external_ips=_addresses_of_family(service.external_ips, family),
        load_balancer_vips=_addresses_of_family(service.load_balancer_ips, family),
        load_balancer_source_ranges=tuple(r for r in ranges if r is not None and r.version == family),
        sticky_seconds=service.session_affinity_timeout if service.session_affinity == "ClientIP" else None,
        external_policy_local=external_local,
        internal_policy_local=service.internal_traffic_policy == "Local",
        health_check_node_port=health_check,
    )


def endpoint_views(info: ServicePortInfo, family: int, node_name: str) -> tuple[EndpointView, ...]:
    """The endpoints of one port as kube-proxy's EndpointSliceCache hands them to the proxier.

    Other-family and malformed addresses are dropped, duplicates (same ip:port) collapse with a
    non-terminating copy preferred, and the list is sorted by Endpoint.String() (byEndpoint).
    """
    chosen: dict[str, EndpointView] = {}
    for endpoint in info.endpoints:
        ip = parse_ip_sloppy(endpoint.address)
        if ip is None or ip.version != family or not endpoint.port:
            continue
        view = EndpointView(
            ip=str(ip),
            port=endpoint.port,
            is_local=bool(node_name) and endpoint.node_name == node_name,
            ready=endpoint.ready,
            serving=endpoint.serving,
            terminating=endpoint.terminating,
        )
        if view.string not in chosen or not view.terminating:
            chosen[view.string] = view
    return tuple(chosen[key] for key in sorted(chosen))


def categorize_endpoints(view: ServicePortView, endpoints: Sequence[EndpointView]) -> ServiceEndpoints:
    """proxy.CategorizeEndpoints without topology hints (lbctl's model carries none).

    Ready endpoints are used; only if there are none, serving-and-terminating ones (KEP-1669),
    decided separately for the Cluster and the Local sets.
    """
    cluster: tuple[EndpointView, ...] = ()
    local: tuple[EndpointView, ...] = ()
    has_any = False
    if view.uses_cluster_endpoints:
        cluster = tuple(ep for ep in endpoints if ep.ready) or tuple(
            ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)
    if not view.uses_local_endpoints:
        return ServiceEndpoints(cluster, local, cluster, has_any)

    if any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints):
        has_any = True
    local_ready = tuple(ep for ep in endpoints if ep.is_local and ep.ready)
    local_terminating = tuple(ep for ep in endpoints if ep.is_local and ep.serving and ep.terminating)
    local = local_ready or local_terminating
    if not view.uses_cluster_endpoints:
        return ServiceEndpoints(cluster, local, local, has_any)
    if local_ready or not local:
        return ServiceEndpoints(cluster, local, cluster, has_any)
    # Local uses terminating endpoints that Cluster may not: the reachable set is the union.
    merged = {ep.string: ep for ep in cluster + local}
    return ServiceEndpoints(cluster, local, tuple(merged[k] for k in sorted(merged)), has_any)


def proxied_ports(ports: Iterable[ServicePortInfo], family: int, node_name: str) -> list[ProxiedPort]:
    """Every service port kube-proxy would program for ``family``, in a fixed order.

    kube-proxy walks a Go map (random order); we sort by service and port name and protocol so
    the output is deterministic. The order of services never changes what a packet meets,
    since every per-service rule matches its own destination.
    """
    result = []
    for info in ports:
        view = service_port_view(info, family)
        if view is None:
            continue
        endpoints = endpoint_views(info, family, node_name)
        result.append(ProxiedPort(view, endpoints, categorize_endpoints(view, endpoints)))
    result.sort(key=lambda p: (p.view.namespace, p.view.name, p.view.port_name, p.view.protocol))
    return result


# --- per-service traffic policy ------------------------------------------------------------------


class Verdict(enum.Enum):
    """What happens to traffic for a service port that no endpoint serves."""

    REJECT = "reject"       # no usable endpoint at all: TCP RST / ICMP port unreachable
    DROP = "drop"           # endpoints, but none local where the traffic policy is Local


class Masquerade(enum.Enum):
    """Which traffic to a service address is marked for masquerade (SNAT to the node)."""

    ALL = "all"                     # --masquerade-all, or external traffic with eTP=Cluster
    OFF_CLUSTER = "off-cluster"     # to a cluster IP from outside the cluster CIDR
    FROM_NODE = "from-node"         # eTP=Local: only the node's own connections (they use every endpoint)
    NONE = "none"                   # no cluster CIDR: kube-proxy's no-op local detector


@dataclass(frozen=True)
class ServicePolicy:
    """What syncProxyRules decides for one service port before it writes a rule, the same in the
    iptables and the nftables proxier: which endpoints serve cluster and local traffic, whether
    internal (cluster IP) and external (external, load-balancer IP, NodePort) traffic reaches an
    endpoint or is rejected or dropped, and what is masqueraded. The renderers only name chains
    and spell rules."""

    has_endpoints: bool             # any usable endpoint (CategorizeEndpoints' hasAnyEndpoints)
    has_internal: bool              # internal traffic reaches an endpoint
    has_external: bool              # external traffic reaches an endpoint
    internal_local: bool            # iTP=Local: internal traffic goes to the local endpoints
    external_local: bool            # eTP=Local: external traffic goes to the local endpoints
    uses_cluster_endpoints: bool    # the cluster endpoints are used (their chain is written)
    uses_local_endpoints: bool      # the local endpoints are used (their chain is written)
    uses_external_chain: bool       # external traffic passes a per-service chain first
    internal_masquerade: Masquerade     # applies where has_internal
    external_masquerade: Masquerade     # applies where uses_external_chain

    @property
    def no_endpoint_verdict(self) -> Verdict:
        return Verdict.REJECT if not self.has_endpoints else Verdict.DROP

    @property
    def internal_verdict(self) -> Verdict | None:
        """None when internal traffic reaches an endpoint, else what happens to it."""
        return None if self.has_internal else self.no_endpoint_verdict

    @property
    def external_verdict(self) -> Verdict | None:
        return None if self.has_external else self.no_endpoint_verdict


@dataclass(frozen=True)
class ServiceChains:
    """The per-service chains of one service port, as both proxiers have them (the names are
    each proxier's own), and which of them each traffic policy sends traffic to. Each renderer's
    plan adds what it spells differently."""

    policy: ServicePolicy
    cluster_chain: str          # spreads over the cluster endpoints
    local_chain: str            # spreads over the local endpoints
    external_chain: str         # external traffic passes it first (masquerade, short-circuits)
    firewall_chain: str         # loadBalancerSourceRanges
    uses_firewall_chain: bool

    @property
    def internal_chain(self) -> str:
        return self.local_chain if self.policy.internal_local else self.cluster_chain

    @property
    def external_policy_chain(self) -> str:
        return self.local_chain if self.policy.external_local else self.cluster_chain


def service_policy(port: ProxiedPort, masquerade_all: bool, detector: LocalDetector) -> ServicePolicy:
    """The traffic policy of one service port (syncProxyRules' hasEndpoints/hasInternal/
    hasExternal and usesClusterPolicyChain/usesLocalPolicyChain/usesExternalChain).

    Traffic under a Local policy with no local endpoint is dropped, or rejected when the service
    has no endpoint at all; external traffic with eTP=Cluster is masqueraded so that the reply
    comes back through this node, as is cluster-IP traffic from off the cluster (or all of it
    with --masquerade-all).
    """
    view, cats = port.view, port.categories
    has_endpoints = cats.has_any
    if masquerade_all:
        internal = Masquerade.ALL
    elif detector.implemented:
        internal = Masquerade.OFF_CLUSTER
    else:
        internal = Masquerade.NONE
    return ServicePolicy(
        has_endpoints=has_endpoints,
        has_internal=has_endpoints and not (view.internal_policy_local and not cats.local),
        has_external=has_endpoints and not (view.external_policy_local and not cats.local),
        internal_local=view.internal_policy_local,
        external_local=view.external_policy_local,
        uses_cluster_endpoints=bool(cats.cluster) and view.uses_cluster_endpoints,
        uses_local_endpoints=bool(cats.local) and view.uses_local_endpoints,
        uses_external_chain=has_endpoints and view.externally_accessible,
        internal_masquerade=internal,
        external_masquerade=Masquerade.FROM_NODE if view.external_policy_local else Masquerade.ALL,
    )


def source_ranges_admit_node(view: ServicePortView, node_ip: IPAddress | None) -> bool:
    """Whether loadBalancerSourceRanges include the node's own IP. The node then reaches its own
    load-balancer IPs too, and such a connection loops back with the load-balancer IP as its
    source, so every proxier admits that source as well."""
    return node_ip is not None and any(node_ip in cidr for cidr in view.load_balancer_source_ranges)


def large_cluster_mode(ports: Sequence[ProxiedPort]) -> bool:
    """kube-proxy counts every endpoint of every service port (not only usable ones)."""
    return sum(len(p.endpoints) for p in ports) > LARGE_CLUSTER_ENDPOINTS_THRESHOLD


def changed_services(previous: Sequence[ProxiedPort], current: Sequence[ProxiedPort]) -> set[str]:
    """Services ("ns/name") whose ports or endpoints differ, as kube-proxy's change trackers see it.

    The trackers compare whole ServicePortMaps and EndpointsMaps per service (reflect.DeepEqual),
    so a change to any port or endpoint of a service marks the whole service as updated.
    """
    def by_service(ports: Sequence[ProxiedPort]) -> dict[str, set]:
        grouped: dict[str, set] = {}
        for p in ports:
            grouped.setdefault(p.view.service_key, set()).add((p.view, p.endpoints))
        return grouped

    before, after = by_service(previous), by_service(current)
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
