"""eBPF frontends by kind (ClusterIP, NodePort, ExternalIP, LoadBalancer), without root.

The desired state must decide what kube-proxy decides, rule for rule: the same addresses, the
same endpoints for each kind and traffic source, drop versus reject, the source ranges. Rather
than restate kube-proxy's rules by hand, random services are run through both
``desired_state`` and the kube-proxy renderers' own policy code
(``lbctl.datapath.kubeproxy.common``, which the golden files tie to kube-proxy's tests), and the
two must agree on every service port.
"""
from __future__ import annotations

import random

import pytest

from lbctl.datapath.kubeproxy import common, iptables
from lbctl.model.desired import NodeAddresses, desired_state
from lbctl.model.objects import (
    Backend,
    EndpointInfo,
    Frontend,
    FrontendKind,
    Protocol,
    Service,
    ServicePort,
    ServicePortInfo,
)

NODE_NAME = "node-a"
NODE = NodeAddresses(nodeport_ips=("127.0.0.1", "172.18.0.2", "192.168.5.1"), node_ip="172.18.0.2")
TCP, UDP = Protocol.TCP, Protocol.UDP


def random_port_info(rng: random.Random, index: int) -> ServicePortInfo:
    kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
    protocol = rng.choice([TCP, UDP])
    external_ips = tuple(f"198.18.{index}.{i}" for i in range(rng.choice([0, 0, 1, 2])))
    lb_ips = tuple(f"203.0.{index}.{i}" for i in range(rng.choice([0, 1, 2]))) if kind == "LoadBalancer" else ()
    ranges: tuple[str, ...] = ()
    if kind == "LoadBalancer" and rng.random() < 0.6:
        ranges = tuple(rng.sample(["198.51.100.0/24", "172.18.0.0/16", "10.0.0.0/8", "0.0.0.0/0"],
                                  rng.choice([1, 2])))
    accessible = kind != "ClusterIP" or bool(external_ips)
    service = Service(
        "default", f"svc{index}", type=kind, cluster_ips=(f"10.96.{index // 250}.{index % 250 + 1}",),
        ports=(ServicePort("p", 80 + index, protocol, 8080,
                           node_port=30000 + index if kind != "ClusterIP" else None),),
        external_ips=external_ips, load_balancer_ips=lb_ips, load_balancer_source_ranges=ranges,
        external_traffic_policy=rng.choice(["Cluster", "Local"]) if accessible else "Cluster",
        internal_traffic_policy=rng.choice(["Cluster", "Local"]),
        session_affinity=rng.choice(["None", "ClientIP"]))
    endpoints = []
    for i in range(rng.choice([0, 1, 2, 3, 4])):
        ready = rng.random() < 0.6
        terminating = not ready and rng.random() < 0.7
        endpoints.append(EndpointInfo(f"10.244.{index % 250}.{i + 2}", 8080, ready=ready,
                                      serving=ready or (terminating and rng.random() < 0.7),
                                      terminating=terminating,
                                      node_name=rng.choice([NODE_NAME, "node-b", None])))
    return ServicePortInfo(service, service.ports[0], tuple(endpoints))


def kube_proxy_view(info: ServicePortInfo):
    """What kube-proxy's own policy code says for one service port."""
    (port,) = common.proxied_ports([info], 4, NODE_NAME)
    policy = common.service_policy(port, masquerade_all=False, detector=common.local_detector(None, 4))
    return port, policy


def as_backends(endpoints, protocol) -> tuple[Backend, ...]:
    return tuple(sorted(Backend(e.ip, e.port, protocol) for e in endpoints))


def expected_entries(info: ServicePortInfo) -> dict[Frontend, tuple]:
    """frontend -> (kind, backends, drop, internal_backends, source_ranges), from kube-proxy."""
    port, policy = kube_proxy_view(info)
    view, cats = port.view, port.categories
    proto = info.port.protocol
    expected = {}
    internal = as_backends(cats.local if policy.internal_local else cats.cluster, proto) if policy.has_internal else ()
    expected[Frontend(view.cluster_ip, view.port, proto)] = (
        FrontendKind.CLUSTER_IP, internal, policy.internal_verdict is common.Verdict.DROP, None, ())
    if policy.has_external:
        external = as_backends(cats.local if policy.external_local else cats.cluster, proto)
    else:
        external = ()
    drop = policy.external_verdict is common.Verdict.DROP
    # eTP Local: the short-circuit rules (pods, the node) jump to the cluster chain
    short_circuit = as_backends(cats.cluster, proto) if policy.external_local else None
    plan = iptables._plan(port, iptables._sync_context(iptables.IptablesConfig(NODE_NAME, (NODE.node_ip,)),
                                                       [port], common.node_view(NODE_NAME, (NODE.node_ip,), 4)))
    ranges: tuple[str, ...] = ()
    if plan.uses_firewall_chain:
        ranges = tuple(str(c) for c in view.load_balancer_source_ranges)
        if common.source_ranges_admit_node(view, common.parse_ip_sloppy(NODE.node_ip)):
            ranges += tuple(f"{ip}/32" for ip in view.load_balancer_vips)
    if view.node_port:
        for ip in NODE.nodeport_ips:
            expected[Frontend(ip, view.node_port, proto)] = (FrontendKind.NODE_PORT, external, drop, short_circuit, ())
    for ip in view.external_ips:
        expected[Frontend(ip, view.port, proto)] = (FrontendKind.EXTERNAL_IP, external, drop, short_circuit, ())
    for ip in view.load_balancer_vips:
        expected[Frontend(ip, view.port, proto)] = (FrontendKind.LOAD_BALANCER, external, drop, short_circuit, ranges)
    return expected


@pytest.mark.parametrize("seed", range(4))
def test_every_kind_agrees_with_kube_proxys_policy(seed):
    rng = random.Random(seed)
    infos = [random_port_info(rng, i) for i in range(150)]
    state, problems = desired_state(infos, NODE_NAME, node=NODE)
    assert problems == ()
    seen = 0
    for info in infos:
        for frontend, want in expected_entries(info).items():
            entry = state.services[frontend]
            have = (entry.kind, entry.backends, entry.drop_without_backends and not entry.backends,
                    entry.internal_backends, entry.source_ranges)
            assert have == want, (info.name, frontend)
            assert entry.name == info.name
            seen += 1
    assert seen == len(state.services), "no frontend kube-proxy would not program"


def test_every_case_is_covered_by_the_random_services():
    """The agreement above means something only if the random services reach every decision."""
    rng = random.Random(0)
    infos = [random_port_info(rng, i) for i in range(150)]
    state, _ = desired_state(infos, NODE_NAME, node=NODE)
    entries = list(state.services.values())
    kinds = {e.kind for e in entries}
    assert kinds == set(FrontendKind)
    assert any(e.internal_backends and not e.backends and e.drop_without_backends for e in entries)
    assert any(e.internal_backends and e.backends for e in entries)
    assert any(e.kind is FrontendKind.CLUSTER_IP and not e.backends and e.drop_without_backends for e in entries)
    assert any(not e.backends and not e.drop_without_backends for e in entries)
    assert any(e.source_ranges and e.source_ranges[-1].endswith("/32") for e in entries)
    assert any(e.kind is FrontendKind.LOAD_BALANCER and not e.source_ranges for e in entries)


def svc(name: str = "web", **fields) -> Service:
    values = dict(type="NodePort", cluster_ips=("10.96.0.10",),
                  ports=(ServicePort("http", 80, TCP, 8080, node_port=30080),))
    values.update(fields)
    return Service("default", name, **values)


def test_node_port_on_every_address_that_accepts_node_ports():
    info = ServicePortInfo(svc(), svc().ports[0], (EndpointInfo("10.244.0.4", 8080),))
    state, _ = desired_state([info], NODE_NAME, node=NodeAddresses(("10.0.0.1", "172.18.0.2")))
    assert [(str(fe), e.kind.value) for fe, e in state.services.items()] == [
        ("10.0.0.1:30080/TCP", "NodePort"), ("10.96.0.10:80/TCP", "ClusterIP"),
        ("172.18.0.2:30080/TCP", "NodePort")]
    state, _ = desired_state([info], NODE_NAME)
    assert list(state.services) == [Frontend("10.96.0.10", 80, TCP)], "no node address: no NodePort"


def test_a_node_port_another_service_holds_is_an_error_naming_both():
    first = svc(name="a")
    second = svc(name="b", cluster_ips=("10.96.0.11",))
    infos = [ServicePortInfo(s, s.ports[0], (EndpointInfo("10.244.0.4", 8080),)) for s in (second, first)]
    state, problems = desired_state(infos, NODE_NAME, node=NodeAddresses(("172.18.0.2",)))
    assert state.services[Frontend("172.18.0.2", 30080, TCP)].name == "default/a:http"
    assert [str(p) for p in problems] == [
        'Service default/b: port "http" (80/TCP): NodePort frontend 172.18.0.2:30080/TCP already belongs '
        'to default/a:http; skipped, default/a:http keeps it']
    # the holder keeps it, whatever the order of names
    state, _ = desired_state(infos, NODE_NAME, node=NodeAddresses(("172.18.0.2",)),
                             holders={Frontend("172.18.0.2", 30080, TCP): "default/b:http"})
    assert state.services[Frontend("172.18.0.2", 30080, TCP)].name == "default/b:http"
    assert state.services[Frontend("10.96.0.10", 80, TCP)].name == "default/a:http"


def test_an_external_ip_equal_to_another_services_cluster_ip_stays_with_the_cluster_ip():
    web = svc(name="web", type="ClusterIP", ports=(ServicePort("http", 80, TCP, 8080),))
    rogue = svc(name="rogue", type="ClusterIP", cluster_ips=("10.96.0.99",), external_ips=("10.96.0.10",),
                ports=(ServicePort("http", 80, TCP, 8080),))
    infos = [ServicePortInfo(s, s.ports[0], ()) for s in (rogue, web)]
    state, problems = desired_state(infos, NODE_NAME, holders={Frontend("10.96.0.10", 80, TCP): "default/web:http"})
    assert state.services[Frontend("10.96.0.10", 80, TCP)].kind is FrontendKind.CLUSTER_IP
    assert "externalIP frontend 10.96.0.10:80/TCP already belongs to default/web:http (it is programmed)" \
        in str(problems[0])


def test_ipv6_external_and_load_balancer_ips_are_reported_the_ipv4_ones_programmed():
    service = svc(type="LoadBalancer", external_ips=("2001:db8::1", "198.18.0.1"),
                  load_balancer_ips=("2001:db8::2",))
    state, problems = desired_state([ServicePortInfo(service, service.ports[0], ())], NODE_NAME)
    assert Frontend("198.18.0.1", 80, TCP) in state.services
    assert [str(p) for p in problems] == [
        'Service default/web: port "http" (80/TCP) on 2001:db8::1, 2001:db8::2: IPv6 is not supported '
        'by the eBPF datapath yet; skipped']


def test_one_service_at_a_time_gives_the_same_state():
    """A per-service cache (the API source's) may compute services one by one and merge them."""
    rng = random.Random(7)
    infos = [random_port_info(rng, i) for i in range(60)]
    whole, _ = desired_state(infos, NODE_NAME, node=NODE)
    merged: dict = {}
    for info in infos:
        merged.update(desired_state([info], NODE_NAME, node=NODE)[0].services)
    assert dict(sorted(merged.items())) == dict(whole.services)
