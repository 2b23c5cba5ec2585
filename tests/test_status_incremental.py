"""The agent's status observer at the cost of what changed: on seeded random change sequences its
counts, change counts and no-local counts equal a fresh full computation, and one endpoint change
next to 10,000 services builds the service-port view of a handful of ports only."""
from __future__ import annotations

import random
import time

import pytest

from lbctl.agent import status
from lbctl.datapath.kubeproxy import common
from lbctl.model.objects import EndpointInfo, Protocol, Service, ServicePort, ServicePortInfo

NODE = "node-a"


def random_ports(rnd: random.Random, name: str) -> tuple[ServicePortInfo, ...]:
    kind = rnd.choice(("ClusterIP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"))
    ips = rnd.choice(((f"10.96.0.{rnd.randint(1, 6)}",), (), ("fd00::1", "10.96.0.9"), ("fd00::2",)))
    ports = tuple(ServicePort(n, p, proto, p, 30000 + rnd.randint(0, 3) if kind != "ClusterIP" else None)
                  for n, p, proto in rnd.sample((("http", 80, Protocol.TCP), ("dns", 53, Protocol.UDP),
                                                 ("alt", 8080, Protocol.TCP)), rnd.randint(1, 2)))
    service = Service(
        "default", name, type=kind, cluster_ips=ips, ports=ports,
        external_ips=tuple(rnd.sample(("192.0.2.1", "192.0.2.2"), rnd.randint(0, 1))),
        load_balancer_ips=("198.51.100.1",) if kind == "LoadBalancer" and rnd.random() < 0.5 else (),
        external_traffic_policy=rnd.choice(("Cluster", "Local")),
        internal_traffic_policy=rnd.choice(("Cluster", "Local")))
    infos = []
    for port in ports:
        endpoints = tuple(EndpointInfo(
            rnd.choice((f"10.0.0.{rnd.randint(1, 5)}", "fd00::9", "bogus")), rnd.choice((8080, 9090)),
            ready=rnd.random() < 0.7, serving=rnd.random() < 0.8, terminating=rnd.random() < 0.3,
            node_name=rnd.choice((NODE, "node-b", None))) for _ in range(rnd.randint(0, 3)))
        infos.append(ServicePortInfo(service, port, endpoints))
    return tuple(infos)


def full(previous, ports):
    return (status.counts(ports), status.changes(previous, ports), status.no_local_endpoints(ports, NODE))


@pytest.mark.parametrize("seed", range(25))
def test_incremental_equals_full(seed):
    rnd = random.Random(seed)
    services = {f"svc-{i}": random_ports(rnd, f"svc-{i}") for i in range(rnd.randint(0, 12))}
    observer, previous = status.StatusObserver(NODE), None
    for _ in range(40):
        for _ in range(rnd.randint(0, 3)):
            what = rnd.random()
            name = f"svc-{rnd.randint(0, 15)}"
            if what < 0.4:
                services[name] = random_ports(rnd, name)            # added or changed
            elif what < 0.6:
                services.pop(name, None)                            # removed
            elif what < 0.8 and name in services:                   # equal, but new objects
                services[name] = tuple(ServicePortInfo(i.service, i.port, i.endpoints) for i in services[name])
            elif name in services:                                  # its ports in another order
                services[name] = tuple(reversed(services[name]))
        order = sorted(services)
        if rnd.random() < 0.2:
            rnd.shuffle(order)
        ports = [info for name in order for info in services[name]]
        if ports and rnd.random() < 0.1:
            ports.append(ports[0])                                  # the same object twice
        assert observer.update(ports) == full(previous, ports)
        previous = ports


def test_one_endpoint_change_next_to_10000_services(monkeypatch):
    def port(i: int, endpoint: str) -> ServicePortInfo:
        service = Service("default", f"svc-{i}", cluster_ips=(f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",),
                          ports=(ServicePort("http", 80, Protocol.TCP, 8080),))
        return ServicePortInfo(service, service.ports[0], (EndpointInfo(endpoint, 8080, node_name=NODE),))

    ports = [port(i, f"10.1.{i // 256 % 256}.{i % 256}") for i in range(10_000)]
    changed = list(ports)
    changed[1234] = port(1234, "10.2.0.1")

    observer = status.StatusObserver(NODE)
    observer.update(ports)
    calls = []
    real = common.service_port_view
    monkeypatch.setattr(common, "service_port_view", lambda info, family: calls.append(info) or real(info, family))
    counts, changes, no_local = observer.update(changed)
    assert calls == [changed[1234]], f"{len(calls)} service-port views for one endpoint change"
    assert (counts, changes, no_local) == full(ports, changed)
    assert changes == (0, 1)

    monkeypatch.setattr(common, "service_port_view", real)
    started = time.perf_counter()
    full(ports, changed)
    full_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    observer.update(ports)
    incremental_ms = (time.perf_counter() - started) * 1000
    print(f"\nstatus after one endpoint change next to 10,000 services: full pass {full_ms:.1f} ms, "
          f"incremental {incremental_ms:.1f} ms")
