"""From a cluster snapshot to what the datapath should hold. Pure functions, no kernel.

Two steps, as in kube-proxy: ``service_ports`` joins every service port with its endpoints
(what every datapath mode consumes), and ``desired_state`` turns those into the frontends and
backends of the eBPF datapath. Both are deterministic: the same snapshot always gives the same
result, whatever order the objects came in, so a sync can compare desired against actual.

Both are kept up to date change by change, so that a sync costs what changed: ``PortsCache``
reuses the service ports of services whose objects are the very objects of last time, and
``DesiredCache`` the entries of service ports it has seen, and says which frontends differ
from its last result; the eBPF reconciler then visits only those. ``desired_state`` is the
cache used once: the full pass the caches must always agree with.
"""
from __future__ import annotations

import dataclasses
import functools
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
    takes a live address from another; between newcomers the first by service key (then port,
    then kind) wins, so the outcome does not depend on input order. Problems come in service
    key and port order.

    This is ``DesiredCache`` without a past: the full pass. The frontends are sorted.
    """
    state, problems, _ = DesiredCache().update(ports, node_name, node, maglev_table_size, holders)
    return DesiredState(services=dict(sorted(state.services.items()))), problems


@dataclass(frozen=True)
class _PortResult:
    """What one service port asks for, computed once per ``ServicePortInfo`` object."""

    info: ServicePortInfo                  # kept: the cache knows it by id()
    order: tuple                           # _info_order: who wins a shared frontend, problem order
    entries: tuple[ServiceEntry, ...]      # every frontend it claims, ClusterIP first
    problems: tuple[Problem, ...]          # SCTP, IPv6


class DesiredCache:
    """``desired_state`` kept up to date change by change: a sync costs what changed.

    Each service port's entries depend on that port, the node's name and addresses and the
    default Maglev table size alone, save for who wins a frontend two ports claim. So the cache
    keeps, per ``ServicePortInfo`` object (a source keeps unchanged objects as the same Python
    objects, and ``PortsCache`` then the same infos), the entries it asked for, and per frontend
    who claims it. ``update`` computes the ports that are new since the last call, forgets the
    ones that are gone, and decides again only the frontends they claim (or claimed): the
    holder keeps a shared frontend, else the first claimant in service key order. Anything
    else (the node's name or addresses, the Maglev default) changed: everything is computed
    again, as by ``desired_state``, which is this cache used once.

    ``update`` returns the desired state, the problems, and the frontends whose entry differs
    from the last result (added, removed or changed), or None when everything was computed
    afresh: the reconciler visits only those. The result equals ``desired_state`` of the same
    ports with the last result as holders, which tests/test_incremental.py checks on random
    change sequences. An exception leaves the cache empty: the next update is a full pass.
    """

    def __init__(self) -> None:
        self._params: tuple | None = None
        self._ports: dict[int, _PortResult] = {}
        # frontend -> the claims on it: (id of the info, index of the entry in its entries)
        self._claims: dict[Frontend, dict[tuple[int, int], None]] = {}
        self._winners: dict[Frontend, ServiceEntry] = {}
        self._conflicts: dict[Frontend, list[tuple[tuple, Problem]]] = {}
        self._own: dict[int, list[tuple[tuple, Problem]]] = {}
        self._contested: set[Frontend] = set()     # claimed twice: decided again each update
        self._problems: tuple[Problem, ...] = ()
        self.full_passes = 0                       # how many updates computed everything
        self.computed = 0                          # service ports the last update computed

    @property
    def empty(self) -> bool:
        return self._params is None

    def clear(self) -> None:
        """Forgets everything: the next update is a full pass."""
        passes = self.full_passes
        self.__init__()   # type: ignore[misc]
        self.full_passes = passes

    def update(self, ports: Iterable[ServicePortInfo], node_name: str | None = None,
               node: NodeAddresses | None = None,
               maglev_table_size: int = MAGLEV_DEFAULT_TABLE_SIZE,
               holders: Mapping[Frontend, str] | None = None,
               ) -> tuple[DesiredState, tuple[Problem, ...], frozenset[Frontend] | None]:
        """The desired state of ``ports`` (see ``desired_state``). ``holders``: who holds each
        frontend now; None: the last result's (after a restart the caller knows from the maps)."""
        node = node or NodeAddresses()
        params = (node_name, node, maglev_table_size)
        try:
            return self._update(tuple(ports), params, holders)
        except BaseException:
            self.clear()
            raise

    def _update(self, ports: tuple[ServicePortInfo, ...], params: tuple,
                holders: Mapping[Frontend, str] | None):
        full = params != self._params
        if full:
            if holders is None:   # the node changed: what was desired holds its frontends
                holders = {fe: e.name for fe, e in self._winners.items()}
            self.clear()
            self._params = params
            self.full_passes += 1
        elif holders is None:
            holders = _Names(self._winners)
        node_name, node, maglev_size = params
        by_id = dict(zip(map(id, ports), ports))
        gone = self._ports.keys() - by_id.keys()
        new = [by_id[i] for i in by_id.keys() - self._ports.keys()]
        self.computed = len(new)
        touched: set[Frontend] = set()
        problems_changed = False
        for pid in gone:
            old = self._ports.pop(pid)
            for index, e in enumerate(old.entries):
                claims = self._claims[e.frontend]
                del claims[(pid, index)]
                if not claims:
                    del self._claims[e.frontend]
                touched.add(e.frontend)
            if self._own.pop(pid, None) is not None:
                problems_changed = True
        for info in new:
            pid = id(info)
            result = _port_result(info, node_name, node, maglev_size)
            self._ports[pid] = result
            for index, e in enumerate(result.entries):
                self._claims.setdefault(e.frontend, {})[(pid, index)] = None
                touched.add(e.frontend)
            if result.problems:
                self._own[pid] = [((*result.order, -1), p) for p in result.problems]
                problems_changed = True
        changed: set[Frontend] = set()
        # Frontends two ports claim are decided again every time (they are few: each one is a
        # problem), so that who holds them is always today's word, as in a full pass.
        for fe in touched | self._contested:
            before = self._winners.get(fe)
            held = holders.get(fe)
            after = self._decide(fe, held)
            if after is None:
                self._winners.pop(fe, None)
            else:
                self._winners[fe] = after
            if self._conflicts.pop(fe, None) is not None:
                problems_changed = True
            if self._lost(fe, after, held):
                problems_changed = True
                self._contested.add(fe)
            else:
                self._contested.discard(fe)
            if before is not after and before != after:
                changed.add(fe)
        if problems_changed or full:
            listed = [x for own in self._own.values() for x in own]
            listed += [x for lost in self._conflicts.values() for x in lost]
            self._problems = tuple(p for _, p in sorted(listed, key=lambda x: x[0]))
        state = DesiredState(services=dict(self._winners))
        return state, self._problems, None if full else frozenset(changed)

    def _decide(self, fe: Frontend, held: str | None) -> ServiceEntry | None:
        """The entry that gets `fe`: its holder's claim, else the first claim by service key,
        port and position; None if nobody claims it."""
        claims = self._claims.get(fe)
        if not claims:
            return None
        if len(claims) == 1:
            pid, index = next(iter(claims))
            return self._ports[pid].entries[index]
        best = min(claims, key=lambda c: (self._ports[c[0]].entries[c[1]].name != held,
                                          self._ports[c[0]].order, c[1]))
        return self._ports[best[0]].entries[best[1]]

    def _lost(self, fe: Frontend, owner: ServiceEntry | None, held: str | None) -> bool:
        """The problems of the claims on `fe` that did not get it; True if there are any."""
        claims = self._claims.get(fe)
        if owner is None or not claims or len(claims) == 1:
            return False
        why = " (it is programmed)" if held == owner.name else ""
        lost = []
        for pid, index in claims:
            result = self._ports[pid]
            e = result.entries[index]
            if e is owner:
                continue
            lost.append(((*result.order, index), Problem(
                f"Service {result.info.service.key}",
                f"port {_describe(result.info.port)}: {_kind_name(e.kind)} {fe} already belongs to "
                f"{owner.name}{why}; skipped, {owner.name} keeps it")))
        self._conflicts[fe] = lost
        return True


class _Names(Mapping[Frontend, str]):
    """frontend -> service port name, a view of desired entries (no copy: read a few times)."""

    def __init__(self, entries: Mapping[Frontend, ServiceEntry]) -> None:
        self._entries = entries

    def __getitem__(self, fe: Frontend) -> str:
        return self._entries[fe].name

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _port_result(info: ServicePortInfo, node_name: str | None, node: NodeAddresses,
                 maglev_table_size: int) -> _PortResult:
    """One service port's entries and problems, before any other port is looked at."""
    service, port = info.service, info.port
    order = _info_order(info)
    if service.type == "ExternalName" or not service.cluster_ips:
        return _PortResult(info, order, (), ())
    obj = f"Service {service.key}"
    if port.protocol is Protocol.SCTP:
        return _PortResult(info, order, (), (Problem(obj, f"port {_describe(port)}: SCTP is not supported "
                                                          f"by the eBPF datapath yet; skipped"),))
    problems = []
    ipv6 = [ip for ip in (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
            if _ipv4(ip) is None]
    if ipv6:
        problems.append(Problem(obj, f"port {_describe(port)} on {', '.join(ipv6)}: IPv6 is not "
                                     f"supported by the eBPF datapath yet; skipped"))
    if not any(_ipv4(ip) for ip in service.cluster_ips):
        return _PortResult(info, order, (), tuple(problems))
    return _PortResult(info, order, tuple(_entries(info, node_name, node, maglev_table_size)), tuple(problems))


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


@functools.lru_cache(maxsize=1 << 17)
def _ipv4(address: str) -> str | None:
    """The canonical text of an IPv4 address (read as kube-proxy's ParseIPSloppy), or None.
    Memoized: a full pass at 10,000 services reads ~70,000 addresses, most of them again."""
    ip = parse_ip_sloppy(address)
    return str(ip) if ip is not None and ip.version == 4 else None


def _addresses(values: Iterable[str]) -> list[str]:
    """The IPv4 ones, canonical, each once, in their order."""
    return list(dict.fromkeys(ip for ip in map(_ipv4, values) if ip is not None))
