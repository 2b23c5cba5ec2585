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

from lbctl.model.objects import (
    Backend,
    ClusterSnapshot,
    DesiredState,
    EndpointInfo,
    EndpointSlice,
    Frontend,
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
    (``DesiredCache``) key on those objects in turn: one changed EndpointSlice at 10,000
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


def desired_state(ports: Iterable[ServicePortInfo], node_name: str | None = None,
                  holders: Mapping[Frontend, str] | None = None,
                  cache: DesiredCache | None = None) -> tuple[DesiredState, tuple[Problem, ...]]:
    """The eBPF datapath's frontends: one ``ServiceEntry`` per IPv4 cluster IP, port and protocol.

    ``backends`` take new flows; ``draining`` lists the other TCP endpoints still in the slices,
    whose established flows the datapath lets finish.

    Headless and ExternalName services have nothing to proxy and are passed over silently.
    SCTP and IPv6 are not handled by the datapath yet: one Problem per service port. When two
    services claim the same frontend, the service port that holds it now (``holders``: frontend
    -> "ns/name:port" as programmed) keeps it, so a new Service never takes a live VIP from
    another; between newcomers the first by service key wins, so the outcome does not depend on
    input order.

    ``internalTrafficPolicy: Local`` keeps only endpoints on ``node_name`` (this node); without
    any, the frontend drops instead of rejecting, as kube-proxy does.

    With ``cache``, the entries of a service port that is the very object of the last call are
    reused (``_port_entries`` depends on nothing else); only the claims are settled anew.
    """
    entries: dict[Frontend, ServiceEntry] = {}
    problems: list[Problem] = []
    held = holders or {}
    computed = [(info, cache.get(info, node_name) if cache is not None else _port_entries(info, node_name))
                for info in ports]
    if cache is not None:
        cache.keep_only(info for info, _ in computed)
    computed.sort(key=lambda item: _claim_order(item[0], item[1][1], held))
    for info, (own_problems, candidates) in computed:
        problems.extend(own_problems)
        for frontend, entry in candidates:
            owner = entries.get(frontend)
            if owner is not None:
                why = " (it is programmed)" if held.get(frontend) == owner.name else ""
                problems.append(Problem(f"Service {info.service.key}",
                                        f"port {_describe(info.port)}: frontend {frontend} already "
                                        f"belongs to {owner.name}{why}; skipped, {owner.name} keeps it"))
                continue
            entries[frontend] = entry
    ordered = sorted(entries.items(), key=lambda item: _order(item[0]))
    return DesiredState(services=dict(ordered)), tuple(problems)


_PortEntries = tuple[tuple[Problem, ...], tuple[tuple[Frontend, ServiceEntry], ...]]


class DesiredCache:
    """``_port_entries`` per service port object, for ``desired_state(..., cache=)``: a
    service port that is the same object as last time (``PortsCache`` keeps them) is not
    recomputed."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[ServicePortInfo, str | None, _PortEntries]] = {}

    def get(self, info: ServicePortInfo, node_name: str | None) -> _PortEntries:
        cached = self._by_id.get(id(info))
        if cached is not None and cached[0] is info and cached[1] == node_name:
            return cached[2]
        result = _port_entries(info, node_name)
        self._by_id[id(info)] = (info, node_name, result)
        return result

    def keep_only(self, infos: Iterable[ServicePortInfo]) -> None:
        keep = {id(info) for info in infos}
        for key in self._by_id.keys() - keep:
            del self._by_id[key]


def _port_entries(info: ServicePortInfo, node_name: str | None) -> _PortEntries:
    """One service port on its own: its problems and the frontends it claims, with their
    entries (before the claims of other service ports are settled)."""
    service, port = info.service, info.port
    if service.type == "ExternalName" or not service.cluster_ips:
        return (), ()
    obj = f"Service {service.key}"
    if port.protocol is Protocol.SCTP:
        return (Problem(obj, f"port {_describe(port)}: SCTP is not supported by the "
                             f"eBPF datapath yet; skipped"),), ()
    problems: tuple[Problem, ...] = ()
    ipv6 = [ip for ip in service.cluster_ips if not _is_ipv4(ip)]
    if ipv6:
        problems = (Problem(obj, f"port {_describe(port)} on {', '.join(ipv6)}: IPv6 is not "
                                 f"supported by the eBPF datapath yet; skipped"),)
    local_only = service.internal_traffic_policy == "Local"
    if local_only:
        info = dataclasses.replace(info, endpoints=tuple(
            e for e in info.endpoints if node_name is not None and e.node_name == node_name))
    backends = _backends(info)
    draining = _draining(info, backends)
    affinity = service.session_affinity_timeout if service.session_affinity == "ClientIP" else 0
    candidates = tuple(
        (frontend, ServiceEntry(frontend=frontend, name=info.name, backends=backends, draining=draining,
                                affinity_timeout=affinity, drop_without_backends=local_only))
        for frontend in (Frontend(ip, port.port, port.protocol) for ip in service.cluster_ips if _is_ipv4(ip)))
    return problems, candidates


def _claim_order(info: ServicePortInfo, candidates: tuple[tuple[Frontend, ServiceEntry], ...],
                 holders: Mapping[Frontend, str]) -> tuple:
    """Service ports that hold one of their frontends now come first, then the usual order."""
    if holders:
        name = info.name
        for frontend, _ in candidates:
            if holders.get(frontend) == name:
                return (0, *_info_order(info))
    return (1, *_info_order(info))


def _order(frontend: Frontend) -> tuple[str, int, str]:
    """Frontend's own order (address, port, protocol), without the dataclass comparison's cost."""
    return frontend.address, frontend.port, frontend.protocol.value


# --- endpoints -------------------------------------------------------------------------------


def _endpoint_family(service: Service) -> str:
    """The slice addressType whose endpoints serve this service.

    lbctl proxies IPv4: a dual-stack service gets its IPv4 endpoints. An IPv6-only service
    gets its IPv6 endpoints so that it is described truthfully; desired_state reports it.
    """
    if service.cluster_ips and not any(_is_ipv4(ip) for ip in service.cluster_ips):
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


def _backends(info: ServicePortInfo) -> tuple[Backend, ...]:
    """Ready endpoints; if none, the serving-and-terminating ones (KEP-1669); else none (reject)."""
    chosen = [e for e in info.endpoints if e.ready]
    if not chosen:
        chosen = [e for e in info.endpoints if e.serving and e.terminating]
    return tuple(sorted({
        Backend(e.address, e.port, info.port.protocol) for e in chosen if _is_ipv4(e.address)
    }))


def _draining(info: ServicePortInfo, backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    """Endpoints still listed but not chosen: their established TCP flows may finish.

    kube-proxy leaves conntrack entries of TCP flows alone when an endpoint stops being used,
    but flushes UDP ones (stale UDP entries are its best-known bug), so UDP never drains.
    """
    if info.port.protocol is not Protocol.TCP:
        return ()
    chosen = set(backends)
    return tuple(sorted({
        backend for e in info.endpoints
        if _is_ipv4(e.address) and (backend := Backend(e.address, e.port, Protocol.TCP)) not in chosen
    }))


# --- ordering and names ----------------------------------------------------------------------


def _port_order(port: ServicePort) -> tuple[int, str, str]:
    return port.port, port.protocol.value, port.name


def _info_order(info: ServicePortInfo) -> tuple[str, tuple[int, str, str]]:
    return info.service.key, _port_order(info.port)


def _describe(port: ServicePort) -> str:
    number = f"{port.port}/{port.protocol.value}"
    return f"\"{port.name}\" ({number})" if port.name else number


def _is_ipv4(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 4
    except ValueError:
        return False
