"""/healthz and /livez as kube-proxy serves them (pkg/proxy/healthcheck/proxy_health.go): the
rule (healthy unless a queued change is older than 2 x syncPeriod; /healthz also needs the node
eligible), and real HTTP requests to the server: status codes, headers and body shape."""
from __future__ import annotations

import http.client
import json
import logging
import re
import socket

import pytest

from lbctl.agent import health
from lbctl.agent.health import ProxyHealth, go_time

GO_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d*[1-9])? \+0000 UTC m=\+\d+\.\d{9}"
HEALTHZ_BODY = re.compile(rf'\{{"lastUpdated": "({GO_TIME}|0001-01-01 00:00:00 \+0000 UTC)",'
                          rf'"currentTime": "({GO_TIME})", "nodeEligible": (true|false)\}}')
LIVEZ_BODY = re.compile(rf'\{{"lastUpdated": "({GO_TIME})","currentTime": "({GO_TIME})"\}}')


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_go_time_prints_as_go_does():
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(1_700_000_000.0) == "2023-11-14 22:13:20 +0000 UTC"
    assert go_time(1_700_000_000.5) == "2023-11-14 22:13:20.5 +0000 UTC", "trailing zeros trimmed"
    assert re.fullmatch(GO_TIME, go_time(1_700_000_000.25, 3.5))
    assert go_time(1_700_000_000.25, 3.5) == "2023-11-14 22:13:20.25 +0000 UTC m=+3.500000000"


def test_healthy_until_a_queued_change_is_late():
    clock = Clock()
    h = ProxyHealth(timeout=60, clock=clock)
    assert h.is_healthy(), "starting up is healthy (kube-proxy calls Updated when its loop starts)"
    h.queued()
    clock.now += 59.9
    assert h.is_healthy(), "a pending change that is not late yet"
    h.queued()                          # a later change does not move the oldest
    clock.now += 0.1
    assert not h.is_healthy()
    assert h.answer("/healthz")[0] == 503 and h.answer("/livez")[0] == 503
    h.updated()
    assert h.is_healthy() and h.answer("/healthz")[0] == 200
    clock.now += 3600
    assert h.is_healthy(), "no change pending: healthy however long ago the last sync was"


@pytest.mark.parametrize("node, eligible", [
    (None, True),
    ({"metadata": {"name": "n1"}, "spec": {}}, True),
    ({"metadata": {"name": "n1", "deletionTimestamp": "2026-01-01T00:00:00Z"}}, False),
    ({"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                                                       "effect": "NoSchedule"}]}}, False),
    ({"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable"}]}}, True),
])
def test_node_eligibility_as_kube_proxy(node, eligible):
    assert health.node_eligible(node) is eligible


def test_a_node_being_deleted_fails_healthz_but_not_livez():
    h = ProxyHealth(timeout=60)
    h.sync_node({"metadata": {"name": "n1", "deletionTimestamp": "2026-01-01T00:00:00Z"}})
    code, body = h.answer("/healthz")
    assert code == 503 and body.decode().endswith('"nodeEligible": false}')
    assert h.answer("/livez")[0] == 200
    h.sync_node({"metadata": {"name": "n1"}})
    assert h.answer("/healthz")[0] == 200


def test_the_sources_node_is_read_at_each_answer():
    """A source that watches this node's Node (the Kubernetes source's ``node``) is asked at each
    request: the node tainted for deletion turns /healthz 503 without waiting for a sync."""
    node = {"metadata": {"name": "n1"}, "spec": {}}
    h = ProxyHealth(timeout=60, node=lambda: node)
    assert h.answer("/healthz")[0] == 200
    node = {"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler"}]}}
    assert h.answer("/healthz")[0] == 503 and h.answer("/livez")[0] == 200
    node = None       # deleted: not eligible, as kube-proxy's OnNodeDelete
    assert h.answer("/healthz")[0] == 503
    assert ProxyHealth(timeout=60, node=lambda: None).answer("/healthz")[0] == 200, \
        "not seen yet (or a source without Nodes): eligible, as kube-proxy starts"


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def served():
    clock = Clock()
    h = ProxyHealth(timeout=60, clock=clock)
    listener = health.serve_health(h, "127.0.0.1:0")
    try:
        yield h, clock, listener.server.port
    finally:
        listener.stop()


def test_http_answers_like_kube_proxy(served):
    h, clock, port = served
    code, headers, body = get(port, "/healthz")
    assert code == 200
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    match = HEALTHZ_BODY.fullmatch(body.decode())
    assert match, body
    assert match.group(1) == match.group(2), "healthy: lastUpdated is the current time"
    assert match.group(3) == "true"
    assert json.loads(body)["nodeEligible"] is True, "the body is JSON"
    code, headers, body = get(port, "/livez")
    assert code == 200 and LIVEZ_BODY.fullmatch(body.decode()), body

    h.queued()
    clock.now += 61
    code, _, body = get(port, "/healthz", method="POST")       # any method, as Go's handlers
    match = HEALTHZ_BODY.fullmatch(body.decode())
    assert code == 503 and match and match.group(1) != match.group(2), "late: lastUpdated is the last sync"
    assert get(port, "/livez")[0] == 503

    assert get(port, "/metrics")[:1] == (404,)
    assert get(port, "/healthz/x")[2] == b"404 page not found\n"
    assert h.counts[("/healthz", 200)] == 1 and h.counts[("/healthz", 503)] == 1


def test_a_taken_address_is_reported_once_and_retried(caplog):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    caplog.set_level(logging.INFO, logger="lbctl.agent.health")
    h = ProxyHealth(timeout=60)
    listener = health.ListenerWithRetry("healthz server", f"127.0.0.1:{port}", health.health_handler(h),
                                        retry=0.05).start()
    try:
        assert listener.server is None
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0].getMessage()
        blocker.close()
        listener._thread.join(timeout=10)
        assert listener.server is not None and get(port, "/livez")[0] == 200
        assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1
    finally:
        listener.stop()
        blocker.close()


def test_hard_fail_raises_naming_the_address():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        with pytest.raises(OSError, match="healthz server: cannot listen on 127.0.0.1"):
            health.serve_health(ProxyHealth(60), f"127.0.0.1:{blocker.getsockname()[1]}", hard_fail=True)
    finally:
        blocker.close()


@pytest.mark.parametrize("text, expected", [("0.0.0.0:10256", ("0.0.0.0", 10256)),
                                            ("[::]:10256", ("::", 10256)), (":10249", ("0.0.0.0", 10249))])
def test_bind_addresses(text, expected):
    assert health.split_host_port(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0", "host:port", "1.2.3.4:70000"])
def test_bad_bind_addresses(text):
    with pytest.raises(ValueError, match="not an address with a port"):
        health.split_host_port(text)


def test_binding_a_listener_never_asks_the_resolver(monkeypatch):
    """http.server's server_bind looks the address up (getfqdn): in a node without DNS that held
    `lbctl run` for the resolver's timeout (10 s) before it programmed anything."""
    import socket as socket_module

    from lbctl.agent import health as health_module

    def no_resolver(*_args):
        raise AssertionError("the resolver was asked")
    monkeypatch.setattr(socket_module, "getfqdn", no_resolver)
    server = health_module._Server(("127.0.0.1", 0), health_module.JsonHandler)
    try:
        assert server.server_name == "127.0.0.1" and server.server_port > 0
    finally:
        server.server_close()
