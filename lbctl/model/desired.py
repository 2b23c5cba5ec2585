"""From a cluster snapshot to what the datapath should hold. Pure functions, no kernel.

Two steps, as in kube-proxy: ``service_ports`` joins every service port with its endpoints
(what every datapath mode consumes), and ``desired_state`` turns those into the frontends and
backends of the eBPF datapath. Both are deterministic: the same snapshot always gives the same
result, whatever order the objects came in, so a sync can compare desired against actual.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lbctl.model.addresses import parse_cidr_sloppy, parse_ip_sloppy
from lbctl.model.objects import (
    MAGLEV_DEFAULT_TABLE_SIZE,
    Backend,
    ClusterSnapshot,
    DesiredState,
    EndpointInfo,
    EndpointSlice,
    Frontend,
    FrontendKind,
    Problem,
    Protocol,
    Service,
    ServiceEntry,
    ServicePort,
    ServicePortInfo,
)


class PortsCache:
    """The service ports of each service as last computed, with the objects they came from.

    A source keeps unchanged objects as the same Python objects from one snapshot to the next
    (the Kubernetes source per resourceVersion, the manifest source per unchanged file), so a
    service whose Service and slices are the very objects of last time gets the very
    ``ServicePortInfo`` objects of last time, without recomputing them. Downstream caches
    (the eBPF reconciler's mirror) compare against them in turn: one changed EndpointSlice at 10,000
    services costs one service's work.
    """

    def __init__(self) -> None:
        self._by_service: dict[str, tuple[Service, tuple[EndpointSlice, ...], tuple[ServicePortInfo, ...]]] = {}

    def get(self, key: str, service: Service, slices: tuple[EndpointSlice, ...]) -> tuple[ServicePortInfo, ...]:
        cached = self._by_service.get(key)
        if cached is not None and cached[0] is service and _same(cached[1], slices):
            return cached[2]
        infos = _service_port_infos(service, slices)
        self._by_service[key] = (service, slices, infos)
        return infos

    def forget_except(self, keys) -> None:
        for key in self._by_service.keys() - keys:
            del self._by_service[key]


def _same(a: tuple, b: tuple) -> bool:
    """The same objects, in the same order (identity: equal-but-new objects are recomputed)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def service_ports(snapshot: ClusterSnapshot, cache: PortsCache | None = None) -> tuple[ServicePortInfo, ...]:
    """One ``ServicePortInfo`` per port of every service, ordered by service key, then port.

    Endpoints come from the service's slices of its IP family, from the slice port with the same
    name and protocol as the service port (kube-proxy matches by name, since the number behind a
    named targetPort can differ per pod). An endpoint listed twice (two slices, or an Endpoints
    object mirrored next to its slices) counts once, its most usable copy kept.

    With ``cache``, services whose objects did not change since the last call reuse its result.
    """
    infos: list[ServicePortInfo] = []
    for key in sorted(snapshot.services):
        service = snapshot.services[key]
        slices = tuple(snapshot.slices.get(key, ()))
        infos.extend(cache.get(key, service, slices) if cache is not None
                     else _service_port_infos(service, slices))
    if cache is not None:
        cache.forget_except(snapshot.services.keys())
    return tuple(infos)


def _service_port_infos(service: Service, all_slices: Sequence[EndpointSlice]) -> tuple[ServicePortInfo, ...]:
    """The service ports of one service, from its slices."""
    family = _endpoint_family(service)
    slices = [s for s in all_slices if s.address_type == family]
    return tuple(ServicePortInfo(service, port, _endpoints_for(port, slices))
                 for port in sorted(service.ports, key=_port_order))


@dataclass(frozen=True)
class NodeAddresses:
    """What the eBPF frontends need to know of this node besides its name.

    ``nodeport_ips``: the node addresses that accept NodePorts (kube-proxy's
    --nodeport-addresses applied to the node's addresses; the mode computes them), one NodePort
    frontend each. ``node_ip``: the primary node IP; loadBalancerSourceRanges that include it
    admit the load-balancer IPs as sources too (the node reaching its own LB IP loops back with
    that source), as kube-proxy's firewall chains do.
    """

    nodeport_ips: tuple[str, ...] = ()
    node_ip: str | None = None


def desired_state(ports: Iterable[ServicePortInfo], node_name: str | None = None,
                  holders: Mapping[Frontend, str] | None = None,
                  node: NodeAddresses | None = None,
                  maglev_table_size: int = MAGLEV_DEFAULT_TABLE_SIZE) -> tuple[DesiredState, tuple[Problem, ...]]:
    """The eBPF datapath's frontends: one ``ServiceEntry`` per IPv4 address, port and protocol
    a service port answers on, of four kinds (``FrontendKind``): its cluster IP, a NodePort on
    every address of ``node.nodeport_ips``, its externalIPs and its load-balancer ingress IPs.

    Which endpoints each frontend uses follows kube-proxy's CategorizeEndpoints and
    syncProxyRules (lbctl.datapath.kubeproxy.common.service_policy; tests/test_desired.py
    checks the two agree on random services): ready endpoints, else serving-and-terminating
    ones. ``internalTrafficPolicy: Local`` keeps the cluster IP to endpoints on ``node_name``
    (this node); ``externalTrafficPolicy: Local`` keeps the external kinds to them for traffic
    from outside, while traffic from inside the cluster uses every endpoint
    (``internal_backends``). A Local policy without a local endpoint drops; a service port
    without any usable endpoint rejects, whatever its policies. loadBalancerSourceRanges apply
    to the load-balancer IPs only, and only while there are endpoints (without any, everyone
    is rejected), as kube-proxy's firewall chains.

    ``backends`` take new flows; ``draining`` lists the other TCP endpoints still in the slices,
    whose established flows the datapath lets finish.

    Headless and ExternalName services have nothing to proxy and are passed over silently.
    SCTP and IPv6 are not handled by the datapath yet: one Problem per service port. When two
    service ports claim the same frontend (of any kind), the one that holds it now
    (``holders``: frontend -> "ns/name:port" as programmed) keeps it, so a new Service never
    takes a live address from another; between newcomers the first by service key wins, so the
    outcome does not depend on input order.

    Each service port's entries depend on that port (and the node) alone, save for who wins a
    shared frontend: a caller may compute services one at a time and merge them.
    """
    entries: dict[Frontend, ServiceEntry] = {}
    problems: list[Problem] = []
    held = holders or {}
    node = node or NodeAddresses()
    for info in sorted(ports, key=lambda i: _claim_order(i, held, node)):
        service, port = info.service, info.port
        if service.type == "ExternalName" or not service.cluster_ips:
            continue
        obj = f"Service {service.key}"
        if port.protocol is Protocol.SCTP:
            problems.append(Problem(obj, f"port {_describe(port)}: SCTP is not supported by the "
                                         f"eBPF datapath yet; skipped"))
            continue
        ipv6 = [ip for ip in (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
                if _ipv4(ip) is None]
        if ipv6:
            problems.append(Problem(obj, f"port {_describe(port)} on {', '.join(ipv6)}: IPv6 is not "
                                         f"supported by the eBPF datapath yet; skipped"))
        if not any(_ipv4(ip) for ip in service.cluster_ips):
            continue
        for new in _entries(info, node_name, node, maglev_table_size):
            owner = entries.get(new.frontend)
            if owner is not None:
                why = " (it is programmed)" if held.get(new.frontend) == owner.name else ""
                problems.append(Problem(obj, f"port {_describe(port)}: {_kind_name(new.kind)} "
                                             f"{new.frontend} already belongs to {owner.name}{why}; "
                                             f"skipped, {owner.name} keeps it"))
                continue
            entries[new.frontend] = new
    return DesiredState(services=dict(sorted(entries.items()))), tuple(problems)


def _entries(info: ServicePortInfo, node_name: str | None, node: NodeAddresses,
             maglev_table_size: int = MAGLEV_DEFAULT_TABLE_SIZE) -> list[ServiceEntry]:
    """Every frontend of one (IPv4, TCP/UDP) service port, ClusterIP first."""
    service, port = info.service, info.port
    policy = _policy(info, node_name)
    affinity = service.session_affinity_timeout if service.session_affinity == "ClientIP" else 0
    draining = _draining(info, policy.cluster + policy.local)
    maglev = (service.maglev_table_size or maglev_table_size) if service.load_balancing == "maglev" else 0
    cluster_ips = _addresses(service.cluster_ips)[:1]     # kube-proxy: the family's first cluster IP
    # the ClusterIP frontend (internal traffic), then the one every external kind copies
    internal = ServiceEntry(frontend=Frontend(cluster_ips[0], port.port, port.protocol), name=info.name,
                            maglev_table_size=maglev,
                            backends=policy.local if policy.internal_local else policy.cluster,
                            draining=draining, affinity_timeout=affinity,
                            drop_without_backends=policy.internal_local and policy.has_endpoints)
    if policy.external_local:
        external = dataclasses.replace(internal, backends=policy.local, internal_backends=policy.cluster,
                                       drop_without_backends=policy.has_endpoints)
    else:
        external = dataclasses.replace(internal, backends=policy.cluster, drop_without_backends=False)

    result = [internal]
    if port.node_port:
        for ip in _addresses(node.nodeport_ips):
            result.append(dataclasses.replace(external, kind=FrontendKind.NODE_PORT,
                                              frontend=Frontend(ip, port.node_port, port.protocol)))
    for ip in _addresses(service.external_ips):
        result.append(dataclasses.replace(external, kind=FrontendKind.EXTERNAL_IP,
                                          frontend=Frontend(ip, port.port, port.protocol)))
    lb_ips = _addresses(service.load_balancer_ips)
    ranges = _source_ranges(service, lb_ips, node) if policy.has_endpoints else ()
    for ip in lb_ips:
        result.append(dataclasses.replace(external, kind=FrontendKind.LOAD_BALANCER, source_ranges=ranges,
                                          frontend=Frontend(ip, port.port, port.protocol)))
    return result


def _source_ranges(service: Service, lb_ips: Sequence[str], node: NodeAddresses) -> tuple[str, ...]:
    """loadBalancerSourceRanges as CIDRs (sloppy, IPv4, duplicates once), plus each LB IP as a
    /32 when a range includes the primary node IP (KUBE-FW: a node connecting to its own LB IP
    loops back with it as the source)."""
    ranges = [c for c in (parse_cidr_sloppy(r.strip()) for r in service.load_balancer_source_ranges)
              if c is not None and c.version == 4]
    if not ranges:
        return ()
    node_ip = _ipv4(node.node_ip) if node.node_ip else None
    cidrs = [str(c) for c in ranges]
    if node_ip is not None and any(ipaddress.ip_address(node_ip) in c for c in ranges):
        cidrs += [f"{ip}/32" for ip in lb_ips]
    return tuple(dict.fromkeys(cidrs))


@dataclass(frozen=True)
class _Policy:
    """kube-proxy's decision for one service port (CategorizeEndpoints + service_policy)."""

    cluster: tuple[Backend, ...]     # every usable endpoint: ready, else serving-and-terminating
    local: tuple[Backend, ...]       # the same, of this node's endpoints only
    has_endpoints: bool              # any usable endpoint at all: else every kind rejects
    internal_local: bool             # iTP Local: the cluster IP uses `local`
    external_local: bool             # eTP Local (externally accessible services only)


def _policy(info: ServicePortInfo, node_name: str | None) -> _Policy:
    service = info.service
    endpoints = tuple(e for e in info.endpoints if _ipv4(e.address) is not None)
    local = tuple(e for e in endpoints if node_name and e.node_name == node_name)
    cluster = _usable(info, endpoints)
    externally_accessible = service.type in ("NodePort", "LoadBalancer") or (
        service.type == "ClusterIP" and bool(service.external_ips))
    return _Policy(cluster=cluster, local=_usable(info, local), has_endpoints=bool(cluster),
                   internal_local=service.internal_traffic_policy == "Local",
                   external_local=externally_accessible and service.external_traffic_policy == "Local")


def _claim_order(info: ServicePortInfo, holders: Mapping[Frontend, str], node: NodeAddresses) -> tuple:
    """Service ports that hold one of their frontends now come first, then the usual order."""
    if holders:
        name = info.name
        for frontend in _claims(info, node):
            if holders.get(frontend) == name:
                return (0, *_info_order(info))
    return (1, *_info_order(info))


def _claims(info: ServicePortInfo, node: NodeAddresses) -> Iterable[Frontend]:
    """The frontends a service port asks for (before conflicts), every kind."""
    service, port = info.service, info.port
    for ip in (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips):
        yield Frontend(_ipv4(ip) or ip, port.port, port.protocol)
    if port.node_port:
        for ip in node.nodeport_ips:
            yield Frontend(ip, port.node_port, port.protocol)


def _kind_name(kind: FrontendKind) -> str:
    return {FrontendKind.CLUSTER_IP: "frontend", FrontendKind.NODE_PORT: "NodePort frontend",
            FrontendKind.EXTERNAL_IP: "externalIP frontend",
            FrontendKind.LOAD_BALANCER: "load-balancer frontend"}[kind]


# --- endpoints -------------------------------------------------------------------------------


def _endpoint_family(service: Service) -> str:
    """The slice addressType whose endpoints serve this service.

    lbctl proxies IPv4: a dual-stack service gets its IPv4 endpoints. An IPv6-only service
    gets its IPv6 endpoints so that it is described truthfully; desired_state reports it.
    """
    if service.cluster_ips and not any(_ipv4(ip) for ip in service.cluster_ips):
        return "IPv6"
    return "IPv4"


def _endpoints_for(port: ServicePort, slices: Sequence[EndpointSlice]) -> tuple[EndpointInfo, ...]:
    """Endpoints of one service port, deduplicated by (address, port), sorted."""
    best: dict[tuple[str, int], EndpointInfo] = {}
    for eps in slices:
        for slice_port in eps.ports:
            if slice_port.name != port.name or slice_port.protocol != port.protocol:
                continue
            for endpoint in eps.endpoints:
                if not endpoint.addresses:
                    continue
                info = EndpointInfo(
                    address=endpoint.addresses[0],   # kube-proxy uses the first address only
                    port=slice_port.port,
                    ready=endpoint.ready,
                    serving=endpoint.serving,
                    terminating=endpoint.terminating,
                    node_name=endpoint.node_name,
                    zone=endpoint.zone,
                )
                key = (info.address, info.port)
                if key not in best or _usefulness(info) > _usefulness(best[key]):
                    best[key] = info
    return tuple(best[key] for key in sorted(best))


def _usefulness(endpoint: EndpointInfo) -> tuple[bool, bool, bool]:
    """Which copy of a duplicated endpoint to keep: ready first, then serving, then not terminating."""
    return endpoint.ready, endpoint.serving, not endpoint.terminating


def _usable(info: ServicePortInfo, endpoints: Sequence[EndpointInfo]) -> tuple[Backend, ...]:
    """Ready endpoints; if none, the serving-and-terminating ones (KEP-1669); else none."""
    chosen = [e for e in endpoints if e.ready]
    if not chosen:
        chosen = [e for e in endpoints if e.serving and e.terminating]
    return tuple(sorted({Backend(e.address, e.port, info.port.protocol) for e in chosen}))


def _draining(info: ServicePortInfo, chosen: Iterable[Backend]) -> tuple[Backend, ...]:
    """Endpoints still listed but in no slot set: their established TCP flows may finish.

    kube-proxy leaves conntrack entries of TCP flows alone when an endpoint stops being used,
    but flushes UDP ones (stale UDP entries are its best-known bug), so UDP never drains.
    """
    if info.port.protocol is not Protocol.TCP:
        return ()
    taken = set(chosen)
    return tuple(sorted({
        backend for e in info.endpoints
        if _ipv4(e.address) and (backend := Backend(e.address, e.port, Protocol.TCP)) not in taken
    }))


# --- ordering and names ----------------------------------------------------------------------


def _port_order(port: ServicePort) -> tuple[int, str, str]:
    return port.port, port.protocol.value, port.name


def _info_order(info: ServicePortInfo) -> tuple[str, tuple[int, str, str]]:
    return info.service.key, _port_order(info.port)


def _describe(port: ServicePort) -> str:
    number = f"{port.port}/{port.protocol.value}"
    return f"\"{port.name}\" ({number})" if port.name else number


def _ipv4(address: str) -> str | None:
    """The canonical text of an IPv4 address (read as kube-proxy's ParseIPSloppy), or None."""
    ip = parse_ip_sloppy(address)
    return str(ip) if ip is not None and ip.version == 4 else None


def _addresses(values: Iterable[str]) -> list[str]:
    """The IPv4 ones, canonical, each once, in their order."""
    return list(dict.fromkeys(ip for ip in map(_ipv4, values) if ip is not None))
