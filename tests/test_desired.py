"""Desired state: services + endpoint slices -> service ports -> eBPF frontends and backends."""
from __future__ import annotations

from pathlib import Path

import pytest

from lbctl.model.desired import NodeAddresses, desired_state, service_ports
from lbctl.model.objects import (
    Backend,
    ClusterSnapshot,
    DesiredState,
    Endpoint,
    EndpointInfo,
    EndpointPort,
    EndpointSlice,
    Frontend,
    Problem,
    Protocol,
    Service,
    ServiceEntry,
    ServicePort,
    ServicePortInfo,
)
from lbctl.sources.manifests import load_manifests

FIXTURES = Path(__file__).parent / "data" / "manifests"
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


# --- builders --------------------------------------------------------------------------------


def svc(name: str = "web", *ports: ServicePort, ips: tuple[str, ...] = ("10.96.0.1",),
        namespace: str = "default", type: str = "ClusterIP") -> Service:
    return Service(namespace, name, type=type, cluster_ips=ips,
                   ports=ports or (ServicePort("http", 80, TCP, 8080),))


def eps(name: str, service: str, endpoints: tuple[Endpoint, ...], ports: tuple[EndpointPort, ...] = (),
        address_type: str = "IPv4", namespace: str = "default") -> EndpointSlice:
    return EndpointSlice(namespace, name, service, address_type,
                         ports or (EndpointPort("http", 8080, TCP),), endpoints)


def ep(address: str, **conditions) -> Endpoint:
    return Endpoint((address,), **conditions)


def snapshot(services: list[Service], slices: list[EndpointSlice] = ()) -> ClusterSnapshot:
    by_service: dict[str, list[EndpointSlice]] = {}
    for s in slices:
        by_service.setdefault(s.service_key, []).append(s)
    return ClusterSnapshot(services={s.key: s for s in services},
                           slices={k: tuple(v) for k, v in by_service.items()})


def dump(state: DesiredState) -> list[str]:
    """The desired maps as text, one frontend a line: easy to read in a failing assert."""
    return [f"{fe} {entry.name} -> {' '.join(map(str, entry.backends)) or 'REJECT'}"
            for fe, entry in state.services.items()]


def info(service: Service, port: ServicePort | None = None, *endpoints: EndpointInfo) -> ServicePortInfo:
    return ServicePortInfo(service, port or service.ports[0], tuple(endpoints))


# --- the fixtures end to end -----------------------------------------------------------------


def frontends(state: DesiredState) -> list[str]:
    """Every frontend with its kind, both slot sets, drop or reject, and source ranges."""
    def slots(backends, drop):
        return " ".join(map(str, backends)) or ("DROP" if drop else "REJECT")
    lines = []
    for fe, entry in state.services.items():
        line = f"{fe} {entry.kind.value} {entry.name} -> {slots(entry.backends, entry.drop_without_backends)}"
        if entry.internal_backends is not None:
            line += f" | internal -> {slots(entry.internal_backends, False)}"
        if entry.source_ranges:
            line += f" | from {' '.join(entry.source_ranges)}"
        lines.append(line)
    return lines


NODE = NodeAddresses(nodeport_ips=("127.0.0.1", "172.18.0.2"), node_ip="172.18.0.2")


def test_fixture_manifests_golden():
    """kube-dns (named UDP+TCP ports), the seed's nginx NodePort, mysql-kevin (legacy Endpoints),
    shop/web (LoadBalancer, eTP Local, externalIPs, source ranges) seen from its endpoints' node."""
    state, problems = desired_state(service_ports(load_manifests(FIXTURES)), "worker-3", node=NODE)
    assert problems == ()
    assert frontends(state) == [
        "10.102.19.139:80/TCP ClusterIP default/nginx -> 10.244.169.147:80/TCP 10.244.36.124:80/TCP 10.244.36.125:80/TCP",
        "10.254.125.157:3306/TCP ClusterIP default/mysql-kevin -> 172.16.60.55:3306/TCP",
        "10.96.0.10:53/TCP ClusterIP kube-system/kube-dns:dns-tcp -> 10.244.0.5:53/TCP 10.244.1.7:53/TCP",
        "10.96.0.10:53/UDP ClusterIP kube-system/kube-dns:dns -> 10.244.0.5:53/UDP 10.244.1.7:53/UDP",
        "10.96.0.10:9153/TCP ClusterIP kube-system/kube-dns:metrics -> 10.244.0.5:9153/TCP 10.244.1.7:9153/TCP",
        "10.96.100.20:80/TCP ClusterIP shop/web:http -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP",
        "10.96.100.20:443/TCP ClusterIP shop/web:https -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP",
        "127.0.0.1:30601/TCP NodePort default/nginx -> 10.244.169.147:80/TCP 10.244.36.124:80/TCP 10.244.36.125:80/TCP",
        "127.0.0.1:31080/TCP NodePort shop/web:http -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP"
        " | internal -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP",
        "127.0.0.1:31443/TCP NodePort shop/web:https -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP"
        " | internal -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP",
        "172.18.0.2:30601/TCP NodePort default/nginx -> 10.244.169.147:80/TCP 10.244.36.124:80/TCP 10.244.36.125:80/TCP",
        "172.18.0.2:31080/TCP NodePort shop/web:http -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP"
        " | internal -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP",
        "172.18.0.2:31443/TCP NodePort shop/web:https -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP"
        " | internal -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP",
        "192.0.2.10:80/TCP ExternalIP shop/web:http -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP"
        " | internal -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP",
        "192.0.2.10:443/TCP ExternalIP shop/web:https -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP"
        " | internal -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP",
        "203.0.113.7:80/TCP LoadBalancer shop/web:http -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP"
        " | internal -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP | from 198.51.100.0/24",
        "203.0.113.7:443/TCP LoadBalancer shop/web:https -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP"
        " | internal -> 10.244.3.4:8443/TCP 10.244.3.5:8443/TCP | from 198.51.100.0/24",
    ]
    # from another node: eTP Local frontends have no local endpoint and drop outside traffic
    state, _ = desired_state(service_ports(load_manifests(FIXTURES)), "worker-1", node=NODE)
    assert [line for line in frontends(state) if line.startswith("203.0.113.7:80/")] == [
        "203.0.113.7:80/TCP LoadBalancer shop/web:http -> DROP"
        " | internal -> 10.244.3.4:8080/TCP 10.244.3.5:8080/TCP | from 198.51.100.0/24"]


def test_kube_dns_service_ports_match_by_name_and_keep_terminating_endpoints():
    snap = load_manifests(FIXTURES)
    dns = [i for i in service_ports(snap) if i.service.name == "kube-dns"]
    assert [(i.name, i.port.port, i.port.protocol) for i in dns] == [
        ("kube-system/kube-dns:dns-tcp", 53, TCP),
        ("kube-system/kube-dns:dns", 53, UDP),
        ("kube-system/kube-dns:metrics", 9153, TCP),
    ]
    assert dns[2].endpoints == (
        EndpointInfo("10.244.0.5", 9153, node_name="control-plane", zone="zone-a"),
        EndpointInfo("10.244.1.7", 9153, node_name="worker-1", zone="zone-b"),
        EndpointInfo("10.244.2.9", 9153, ready=False, serving=True, terminating=True, node_name="worker-2"),
    )


def test_kube_dns_terminating_pod_drains_on_tcp_only():
    state, _ = desired_state(service_ports(load_manifests(FIXTURES)))
    dns_tcp = state.services[Frontend("10.96.0.10", 53, TCP)]
    dns_udp = state.services[Frontend("10.96.0.10", 53, UDP)]
    assert dns_tcp.draining == (Backend("10.244.2.9", 53, TCP),)
    assert dns_udp.draining == ()


def test_seed_mysql_kevin():
    state, problems = desired_state(service_ports(load_manifests(FIXTURES / "mysql")))
    frontend = Frontend("10.254.125.157", 3306, TCP)
    assert state.services == {frontend: ServiceEntry(frontend, "default/mysql-kevin",
                                                     (Backend("172.16.60.55", 3306, TCP),))}
    assert problems == ()


# --- service_ports ---------------------------------------------------------------------------


def test_service_ports_order_is_service_key_then_port():
    b = svc("b", ServicePort("z", 9000, TCP, 9000), ServicePort("a", 53, UDP, 53), ServicePort("t", 53, TCP, 53),
            ips=("10.96.0.2",))
    a = svc("a", ips=("10.96.0.3",), namespace="prod")
    c = svc("c", ips=("10.96.0.4",), namespace="default")
    infos = service_ports(snapshot([a, b, c]))
    assert [i.name for i in infos] == ["default/b:t", "default/b:a", "default/b:z", "default/c:http", "prod/a:http"]


def test_service_without_ports_gives_nothing():
    assert service_ports(snapshot([Service("default", "empty", cluster_ips=("10.96.0.9",))])) == ()


def test_endpoints_match_slice_port_by_name_and_protocol_not_number():
    service = svc("dns", ServicePort("dns", 53, UDP, 53), ServicePort("dns-tcp", 53, TCP, 53))
    slice_ = eps("dns-1", "dns", (ep("10.0.0.1"),), ports=(
        EndpointPort("dns-tcp", 1053, TCP),    # a different number behind the same name
        EndpointPort("dns", 5353, UDP),
        EndpointPort("dns", 5354, TCP),        # right name, wrong protocol: not ours
        EndpointPort("other", 53, UDP),        # right number and protocol, wrong name: not ours
    ))
    infos = service_ports(snapshot([service], [slice_]))
    assert {i.name: [(e.address, e.port) for e in i.endpoints] for i in infos} == {
        "default/dns:dns": [("10.0.0.1", 5353)],
        "default/dns:dns-tcp": [("10.0.0.1", 1053)],
    }


def test_unnamed_service_port_matches_unnamed_slice_port():
    service = svc("db", ServicePort("", 3306, TCP, 3306))
    slice_ = eps("db-1", "db", (ep("10.0.0.1"),), ports=(EndpointPort("", 3306, TCP), EndpointPort("x", 1, TCP)))
    (only,) = service_ports(snapshot([service], [slice_]))
    assert only.name == "default/db"
    assert [(e.address, e.port) for e in only.endpoints] == [("10.0.0.1", 3306)]


def test_endpoints_from_all_slices_deduplicated_sorted_ready_copy_preferred():
    service = svc()
    first = eps("web-1", "web", (ep("10.0.0.9"), ep("10.0.0.10", ready=False, serving=False), ep("10.0.0.2")))
    second = eps("web-2", "web", (ep("10.0.0.10"), ep("10.0.0.2", ready=False, serving=False)))
    (only,) = service_ports(snapshot([service], [first, second]))
    assert only.endpoints == (
        EndpointInfo("10.0.0.10", 8080),      # the ready copy from web-2 won
        EndpointInfo("10.0.0.2", 8080),       # the ready copy from web-1 kept
        EndpointInfo("10.0.0.9", 8080),
    )


def test_only_slices_of_the_service_family_are_used():
    service = svc()
    slices = [
        eps("web-v4", "web", (ep("10.0.0.1"),)),
        eps("web-v6", "web", (ep("fd00::1"),), address_type="IPv6"),
        eps("web-fqdn", "web", (ep("web.example.com"),), address_type="FQDN"),
        eps("other", "other", (ep("10.0.0.99"),)),
        eps("web-1", "web", (ep("10.0.0.98"),), namespace="prod"),
    ]
    (only,) = service_ports(snapshot([service], slices))
    assert [e.address for e in only.endpoints] == ["10.0.0.1"]


def test_ipv6_only_service_gets_its_ipv6_endpoints():
    service = svc(ips=("fd00::10",))
    slices = [eps("v4", "web", (ep("10.0.0.1"),)), eps("v6", "web", (ep("fd00::1"),), address_type="IPv6")]
    (only,) = service_ports(snapshot([service], slices))
    assert [e.address for e in only.endpoints] == ["fd00::1"]


def test_dual_stack_service_gets_its_ipv4_endpoints():
    service = svc(ips=("fd00::10", "10.96.0.1"))
    slices = [eps("v4", "web", (ep("10.0.0.1"),)), eps("v6", "web", (ep("fd00::1"),), address_type="IPv6")]
    (only,) = service_ports(snapshot([service], slices))
    assert [e.address for e in only.endpoints] == ["10.0.0.1"]


def test_headless_and_external_name_services_are_still_described():
    headless = svc("headless", ips=())
    alias = Service("default", "alias", type="ExternalName", ports=(ServicePort("", 80, TCP, 80),))
    infos = service_ports(snapshot([headless, alias], [eps("h-1", "headless", (ep("10.0.0.1"),))]))
    assert [(i.name, len(i.endpoints)) for i in infos] == [("default/alias", 0), ("default/headless:http", 1)]


# --- desired_state: backend choice -----------------------------------------------------------


READY = dict(ready=True, serving=True, terminating=False)
NOT_READY = dict(ready=False, serving=False, terminating=False)
TERMINATING_SERVING = dict(ready=False, serving=True, terminating=True)
TERMINATING_NOT_SERVING = dict(ready=False, serving=False, terminating=True)
SERVING_NOT_READY = dict(ready=False, serving=True, terminating=False)


@pytest.mark.parametrize("conditions, expected", [
    ([READY, READY], ["10.0.0.1", "10.0.0.2"]),
    ([READY, NOT_READY], ["10.0.0.1"]),
    ([READY, TERMINATING_SERVING], ["10.0.0.1"]),                      # ready ones win
    ([TERMINATING_SERVING, TERMINATING_SERVING], ["10.0.0.1", "10.0.0.2"]),   # KEP-1669 fallback
    ([TERMINATING_SERVING, TERMINATING_NOT_SERVING], ["10.0.0.1"]),
    ([TERMINATING_SERVING, NOT_READY], ["10.0.0.1"]),
    ([SERVING_NOT_READY, NOT_READY], []),            # the fallback is for terminating endpoints only
    ([TERMINATING_NOT_SERVING, NOT_READY], []),
    ([], []),                                        # no endpoints: an entry that rejects
], ids=["all-ready", "one-not-ready", "ready-beats-terminating", "all-terminating-serving",
        "terminating-not-serving", "terminating-and-not-ready", "serving-but-not-terminating",
        "nothing-usable", "no-endpoints"])
def test_backend_choice(conditions, expected):
    service = svc()
    endpoints = [EndpointInfo(f"10.0.0.{i}", 8080, **c) for i, c in enumerate(conditions, start=1)]
    state, problems = desired_state([info(service, None, *endpoints)])
    assert problems == ()
    (entry,) = state.services.values()
    assert entry.backends == tuple(Backend(a, 8080, TCP) for a in expected)


def test_backends_sorted_and_deduplicated():
    service = svc()
    endpoints = [EndpointInfo("10.0.0.3", 8080), EndpointInfo("10.0.0.1", 8080),
                 EndpointInfo("10.0.0.3", 8080), EndpointInfo("10.0.0.1", 9090)]
    state, _ = desired_state([info(service, None, *endpoints)])
    (entry,) = state.services.values()
    assert entry.backends == (Backend("10.0.0.1", 8080, TCP), Backend("10.0.0.1", 9090, TCP),
                              Backend("10.0.0.3", 8080, TCP))


def test_backend_takes_the_service_port_protocol():
    service = svc("dns", ServicePort("dns", 53, UDP, 53))
    state, _ = desired_state([info(service, None, EndpointInfo("10.0.0.1", 53))])
    assert [str(b) for b in state.backends] == ["10.0.0.1:53/UDP"]


# --- desired_state: frontends ----------------------------------------------------------------


@pytest.mark.parametrize("port, expected_name", [
    (ServicePort("http", 80, TCP, 80), "default/web:http"),
    (ServicePort("", 80, TCP, 80), "default/web"),
])
def test_entry_name_is_the_service_port_name(port, expected_name):
    service = svc("web", port)
    state, _ = desired_state(service_ports(snapshot([service])))
    (entry,) = state.services.values()
    assert entry.name == expected_name == service_ports(snapshot([service]))[0].name
    assert entry.frontend == Frontend("10.96.0.1", 80, TCP)


@pytest.mark.parametrize("type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_cluster_ip_frontend_for_every_proxied_type(type):
    state, problems = desired_state(service_ports(snapshot([svc(type=type)])))
    assert list(state.services) == [Frontend("10.96.0.1", 80, TCP)]
    assert problems == ()


def test_headless_and_external_name_are_skipped_silently():
    headless = svc("headless", ips=())
    alias = Service("default", "alias", type="ExternalName", ports=(ServicePort("", 80, TCP, 80),))
    state, problems = desired_state(service_ports(snapshot([headless, alias])))
    assert state == DesiredState()
    assert problems == ()


def test_same_port_number_on_udp_and_tcp_are_two_frontends():
    service = svc("dns", ServicePort("dns", 53, UDP, 53), ServicePort("dns-tcp", 53, TCP, 53))
    state, _ = desired_state(service_ports(snapshot([service])))
    assert list(state.services) == [Frontend("10.96.0.1", 53, TCP), Frontend("10.96.0.1", 53, UDP)]


def test_sctp_is_one_problem_per_port_and_the_rest_is_programmed():
    service = svc("sig", ServicePort("sig", 9000, SCTP, 9000), ServicePort("web", 80, TCP, 80),
                  ips=("10.96.0.1",))
    other = svc("other", ServicePort("", 7000, SCTP, 7000), ips=("10.96.0.2",))
    state, problems = desired_state(service_ports(snapshot([service, other])))
    assert list(state.services) == [Frontend("10.96.0.1", 80, TCP)]
    assert problems == (
        Problem("Service default/other", "port 7000/SCTP: SCTP is not supported by the eBPF datapath yet; skipped"),
        Problem("Service default/sig",
                'port "sig" (9000/SCTP): SCTP is not supported by the eBPF datapath yet; skipped'),
    )


def test_ipv6_only_service_is_one_problem_per_port():
    service = svc("v6", ServicePort("a", 80, TCP, 80), ServicePort("b", 81, TCP, 81), ips=("fd00::1",))
    state, problems = desired_state(service_ports(snapshot([service])))
    assert state == DesiredState()
    assert problems == (
        Problem("Service default/v6",
                'port "a" (80/TCP) on fd00::1: IPv6 is not supported by the eBPF datapath yet; skipped'),
        Problem("Service default/v6",
                'port "b" (81/TCP) on fd00::1: IPv6 is not supported by the eBPF datapath yet; skipped'),
    )


def test_dual_stack_service_programs_its_ipv4_address():
    service = svc("dual", ips=("fd00::1", "10.96.0.7"))
    slices = [eps("v4", "dual", (ep("10.0.0.1"),)), eps("v6", "dual", (ep("fd00::99"),), address_type="IPv6")]
    state, problems = desired_state(service_ports(snapshot([service], slices)))
    assert dump(state) == ["10.96.0.7:80/TCP default/dual:http -> 10.0.0.1:8080/TCP"]
    assert [p.message for p in problems] == [
        'port "http" (80/TCP) on fd00::1: IPv6 is not supported by the eBPF datapath yet; skipped']


def test_frontend_conflict_first_service_key_wins_whatever_the_input_order():
    a = svc("a", ServicePort("", 80, TCP, 80), ips=("10.96.0.1",))
    b = svc("b", ServicePort("", 80, TCP, 80), ServicePort("dns", 53, UDP, 53), ips=("10.96.0.1",))
    ports = [info(b, b.ports[0], EndpointInfo("10.0.0.2", 80)), info(b, b.ports[1]),
             info(a, a.ports[0], EndpointInfo("10.0.0.1", 80))]
    state, problems = desired_state(ports)
    assert dump(state) == [
        "10.96.0.1:53/UDP default/b:dns -> REJECT",            # b's other port is not affected
        "10.96.0.1:80/TCP default/a -> 10.0.0.1:80/TCP",
    ]
    assert problems == (Problem(
        "Service default/b",
        "port 80/TCP: frontend 10.96.0.1:80/TCP already belongs to default/a; skipped, default/a keeps it"),)
    assert desired_state(reversed(ports)) == (state, problems)


def test_frontend_conflict_the_programmed_service_keeps_it():
    """A Service that sorts first never takes a VIP another Service holds (duplicate VIPs come
    from manifests: the API server's allocator refuses them)."""
    a = svc("a", ServicePort("", 80, TCP, 80), ips=("10.96.0.1",))
    b = svc("b", ServicePort("", 80, TCP, 80), ips=("10.96.0.1",))
    ports = [info(a, a.ports[0], EndpointInfo("10.0.0.1", 80)), info(b, b.ports[0], EndpointInfo("10.0.0.2", 80))]
    held = {Frontend("10.96.0.1", 80, TCP): "default/b"}
    state, problems = desired_state(ports, holders=held)
    assert dump(state) == ["10.96.0.1:80/TCP default/b -> 10.0.0.2:80/TCP"]
    assert problems == (Problem(
        "Service default/a",
        "port 80/TCP: frontend 10.96.0.1:80/TCP already belongs to default/b (it is programmed); "
        "skipped, default/b keeps it"),)
    assert desired_state(reversed(ports), holders=held) == (state, problems)
    # a holder that no longer claims it hands it over to the first by key
    assert dump(desired_state(ports[:1], holders=held)[0]) == ["10.96.0.1:80/TCP default/a -> 10.0.0.1:80/TCP"]


def test_result_is_independent_of_input_order():
    infos = service_ports(load_manifests(FIXTURES))
    assert desired_state(infos) == desired_state(reversed(infos))
    assert list(desired_state(infos)[0].services) == sorted(desired_state(infos)[0].services)


def test_desired_state_accepts_a_generator_and_nothing():
    assert desired_state(iter(())) == (DesiredState(), ())


# --- desired_state: draining -----------------------------------------------------------------


def test_draining_lists_tcp_endpoints_not_chosen_for_new_flows():
    service = svc()
    endpoints = [EndpointInfo("10.0.0.1", 8080, **READY), EndpointInfo("10.0.0.2", 8080, **TERMINATING_SERVING),
                 EndpointInfo("10.0.0.3", 8080, **NOT_READY)]
    state, _ = desired_state([info(service, None, *endpoints)])
    (entry,) = state.services.values()
    assert entry.backends == (Backend("10.0.0.1", 8080, TCP),)
    assert entry.draining == (Backend("10.0.0.2", 8080, TCP), Backend("10.0.0.3", 8080, TCP))


def test_nothing_drains_when_every_endpoint_is_a_backend():
    endpoints = [EndpointInfo("10.0.0.1", 8080, **TERMINATING_SERVING),
                 EndpointInfo("10.0.0.2", 8080, **TERMINATING_NOT_SERVING)]
    state, _ = desired_state([info(svc(), None, *endpoints)])
    (entry,) = state.services.values()
    assert entry.backends == (Backend("10.0.0.1", 8080, TCP),)
    assert entry.draining == (Backend("10.0.0.2", 8080, TCP),)


def test_udp_never_drains():
    service = svc("dns", ServicePort("dns", 53, UDP, 53))
    endpoints = [EndpointInfo("10.0.0.1", 53, **READY), EndpointInfo("10.0.0.2", 53, **TERMINATING_SERVING)]
    state, _ = desired_state([info(service, None, *endpoints)])
    (entry,) = state.services.values()
    assert entry.backends == (Backend("10.0.0.1", 53, UDP),)
    assert entry.draining == ()


@pytest.mark.parametrize("affinity,timeout,expected", [
    ("None", 10800, 0),
    ("ClientIP", 10800, 10800),
    ("ClientIP", 60, 60),
])
def test_session_affinity_carries_its_timeout(affinity, timeout, expected):
    import dataclasses
    service = dataclasses.replace(svc(), session_affinity=affinity, session_affinity_timeout=timeout)
    state, problems = desired_state([info(service, None, EndpointInfo("10.244.0.5", 8080))])
    assert not problems
    assert [e.affinity_timeout for e in state.services.values()] == [expected]


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints_or_drops():
    import dataclasses
    service = dataclasses.replace(svc(), internal_traffic_policy="Local")
    here = EndpointInfo("10.244.0.5", 8080, node_name="node-a")
    there = EndpointInfo("10.244.1.5", 8080, node_name="node-b")
    state, _ = desired_state([info(service, None, here, there)], node_name="node-a")
    [entry] = state.services.values()
    assert [b.address for b in entry.backends] == ["10.244.0.5"] and entry.drop_without_backends
    state, _ = desired_state([info(service, None, there)], node_name="node-a")
    [entry] = state.services.values()
    assert entry.backends == () and entry.drop_without_backends, "no local endpoint: drop, not reject"
    state, _ = desired_state([info(svc(), None, here, there)], node_name="node-a")
    [entry] = state.services.values()
    assert len(entry.backends) == 2 and not entry.drop_without_backends
