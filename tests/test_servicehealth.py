"""healthCheckNodePort servers as kube-proxy's ServiceHealthServer (service_health.go): which
services get one, how local endpoints are counted, kube-proxy's body byte for byte, and real
HTTP requests as services and endpoints come and go; a port that cannot be bound."""
from __future__ import annotations

import http.client
import json
import logging
import socket

import pytest
from kubeproxy_cases import ep, info, port, service

from lbctl.agent import servicehealth
from lbctl.agent.servicehealth import ServiceHealthServer

NODE = "node-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lb_local(name="web", hc=32000, endpoints=(), etp="Local", type_="LoadBalancer", ports=("http",)):
    svc = service("default", name, "10.96.0.10", *(port(p, 80 + i, node_port=30080 + i)
                                                  for i, p in enumerate(ports)),
                  type=type_, external_traffic_policy=etp, health_check_node_port=hc,
                  load_balancer_ips=("192.0.2.100",))
    return [info(svc, p, *endpoints) for p in ports]


def test_which_services_get_a_health_check():
    checks, _ = servicehealth.health_checks(
        lb_local("a", 32001) + lb_local("b", 32002, etp="Cluster") + lb_local("c", 32003, type_="NodePort")
        + lb_local("d", None), NODE)
    assert list(checks) == ["default/a"], "LoadBalancer, eTP Local, with a port (NeedsHealthCheck)"
    assert checks["default/a"].port == 32001


def test_local_endpoints_are_distinct_ready_ips_on_this_node():
    endpoints = (ep("10.244.0.5", 8080, NODE), ep("10.244.0.6", 8080, NODE),
                 ep("10.244.0.7", 8080, NODE, ready=False, serving=True, terminating=True),
                 ep("10.244.1.5", 8080, "node-b"), ep("10.244.0.8", 8080, NODE, ready=False))
    ports = lb_local(endpoints=endpoints, ports=("http", "https"))   # the same pods serve both ports
    _, local = servicehealth.health_checks(ports, NODE)
    assert local == {"default/web": 2}


def test_body_is_kube_proxys():
    # kube-proxy's template after dedent.Dedent and strings.Trim(..., "\n")
    expected = ('{\n\t"service": {\n\t\t"namespace": "ns",\n\t\t"name": "svc"\n\t},\n'
                '\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
    assert servicehealth.body("ns", "svc", 2, True).decode() == expected
    assert json.loads(servicehealth.body("ns", "svc", 0, False)) == {
        "service": {"namespace": "ns", "name": "svc"}, "localEndpoints": 0, "serviceProxyHealthy": False}


def test_listen_addresses_follow_nodeport_addresses():
    local = lambda: ["127.0.0.1", "192.0.2.2", "198.51.100.7"]
    assert servicehealth.listen_addresses((), ("192.0.2.2",), local) == ["0.0.0.0"]
    assert servicehealth.listen_addresses(("0.0.0.0/0",), (), local) == ["0.0.0.0"]
    assert servicehealth.listen_addresses(("192.0.2.0/24", "198.51.100.0/24"), (), local) == [
        "192.0.2.2", "198.51.100.7"]
    assert servicehealth.listen_addresses(("primary",), ("192.0.2.2",), local) == ["192.0.2.2"]


def get(port: int, path: str = "/") -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def server():
    state = {"healthy": True}
    s = ServiceHealthServer(NODE, ["127.0.0.1"], lambda: state["healthy"])
    try:
        yield s, state
    finally:
        s.stop()


def test_servers_follow_services_and_endpoints(server):
    s, proxy = server
    hc = free_port()
    s.sync(lb_local(hc=hc, endpoints=(ep("10.244.0.5", 8080, NODE),)))
    code, kind, body = get(hc, "/any/path")
    assert (code, kind) == (200, "application/json")
    assert body == {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 1,
                    "serviceProxyHealthy": True}
    s.sync(lb_local(hc=hc, endpoints=(ep("10.244.1.5", 8080, "node-b"),)))
    code, _, body = get(hc)
    assert code == 503 and body["localEndpoints"] == 0, "endpoints elsewhere only: 503"
    s.sync(lb_local(hc=hc, endpoints=(ep("10.244.0.5", 8080, NODE),)))
    proxy["healthy"] = False
    code, _, body = get(hc)
    assert code == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 1
    proxy["healthy"] = True

    moved = free_port()
    s.sync(lb_local(hc=moved, endpoints=(ep("10.244.0.5", 8080, NODE),)))
    assert get(moved)[0] == 200
    with pytest.raises(ConnectionRefusedError):
        get(hc)
    s.sync([])
    with pytest.raises(ConnectionRefusedError):
        get(moved)
    assert not s.services


def test_a_port_taken_is_reported_once_naming_the_service(server, caplog):
    s, _ = server
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    hc = blocker.getsockname()[1]
    other = free_port()
    caplog.set_level(logging.INFO, logger="lbctl.agent.servicehealth")
    ports = lb_local(hc=hc, endpoints=(ep("10.244.0.5", 8080, NODE),)) + \
        lb_local("api", other, endpoints=(ep("10.244.0.9", 8080, NODE),))
    try:
        s.sync(ports)
        s.sync(ports)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "Service default/web" in errors[0] and f"healthCheckNodePort {hc}" in errors[0]
        assert get(other)[0] == 200, "the other services are served"
    finally:
        blocker.close()
    s.sync(ports)
    assert get(hc)[0] == 200
    assert any("resolved" in r.getMessage() and "default/web" in r.getMessage() for r in caplog.records)
