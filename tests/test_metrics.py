"""Prometheus /metrics: kube-proxy's names, labels and buckets (pkg/proxy/metrics) fed by the
agent's syncs, the health counters, the metrics server's other paths; and (root) a real scrape
of an agent running in the lab, whose per-service counters and map occupancy come from the
pinned maps at scrape time."""
from __future__ import annotations

import http.client
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbctl.agent import metrics as agent_metrics
from lbctl.agent.health import ProxyHealth
from lbctl.agent.metrics import Metrics


def scrape_text(text: str) -> dict[str, dict]:
    """name -> {labels tuple: value}, for every sample."""
    found: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def http_get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read().decode()
    finally:
        conn.close()


IPV4 = (("ip_family", "IPv4"),)


def test_kube_proxy_names_before_and_after_syncs():
    h = ProxyHealth(60)
    m = Metrics("nftables", health=h)
    before = scrape_text(m.exposition().decode())
    assert before["kubeproxy_sync_proxy_rules_duration_seconds_count"][IPV4] == 0, "series exist before a sync"
    assert before["kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"][IPV4] > 0
    m.queued()
    m.synced("change", 0.003, ok=True)
    m.synced("resync", 0.020, ok=True)
    m.synced("retry", 0.5, ok=False, problems=2)
    m.changes(services=3, endpoints=5)
    m.no_local(internal=1, external=2)
    m.programmed([time.time() - 1.5])
    h.answer("/healthz")
    h.answer("/livez")
    after = scrape_text(m.exposition().decode())
    assert after["kubeproxy_sync_proxy_rules_duration_seconds_count"][IPV4] == 3
    buckets = {dict(k)["le"]: v for k, v in after["kubeproxy_sync_proxy_rules_duration_seconds_bucket"].items()}
    assert buckets["0.001"] == 0 and buckets["0.004"] == 1 and buckets["0.032"] == 2 and buckets["16.384"] == 3
    assert len(buckets) == 16, "ExponentialBuckets(0.001, 2, 15) plus +Inf"
    assert after["kubeproxy_sync_full_proxy_rules_duration_seconds_count"][IPV4] == 1
    assert after["kubeproxy_sync_partial_proxy_rules_duration_seconds_count"][IPV4] == 2
    assert abs(after["kubeproxy_sync_proxy_rules_last_timestamp_seconds"][IPV4] - time.time()) < 60
    assert after["kubeproxy_sync_proxy_rules_service_changes_total"][()] == 3
    assert after["kubeproxy_sync_proxy_rules_endpoint_changes_total"][()] == 5
    no_local = after["kubeproxy_sync_proxy_rules_no_local_endpoints_total"]
    assert no_local[(("ip_family", "IPv4"), ("traffic_policy", "internal"))] == 1
    assert no_local[(("ip_family", "IPv4"), ("traffic_policy", "external"))] == 2
    programming = {dict(k)["le"]: v for k, v in after["kubeproxy_network_programming_duration_seconds_bucket"].items()}
    assert programming["1.0"] == 0 and programming["2.0"] == 1 and "300.0" in programming
    assert after["kubeproxy_proxy_healthz_total"][(("code", "200"),)] == 1
    assert after["kubeproxy_proxy_livez_total"][(("code", "200"),)] == 1
    assert after["lbctl_syncs_total"][(("kind", "retry"), ("mode", "nftables"), ("result", "failed"))] == 1
    assert after["lbctl_problems"][()] == 2
    assert "process_cpu_seconds_total" in after
    assert not [n for n in after if n.endswith("_created")], "no *_created series, as kube-proxy"


def test_network_programming_buckets_are_kube_proxys():
    b = agent_metrics.NETWORK_PROGRAMMING_BUCKETS
    assert b[:4] == (0.0, 0.25, 0.5, 1.0) and b[62:64] == (60.0, 65.0) and b[-1] == 300.0
    assert len(b) == 1 + 2 + 59 + 12 + 7, "merge() of kube-proxy's four linear ranges after a 0"


def test_a_failed_sync_does_not_move_the_last_sync_timestamp():
    m = Metrics("ebpf")
    m.synced("change", 0.01, ok=False)
    assert scrape_text(m.exposition().decode())["kubeproxy_sync_proxy_rules_last_timestamp_seconds"][IPV4] == 0


def test_metrics_server_paths():
    m = Metrics("iptables")
    listener = agent_metrics.serve_metrics(m, "127.0.0.1:0")
    try:
        port = listener.server.port
        code, kind, text = http_get(port, "/metrics")
        assert code == 200 and kind.startswith("text/plain; version=")
        assert "kubeproxy_sync_proxy_rules_duration_seconds_bucket" in scrape_text(text)
        assert http_get(port, "/proxyMode")[::2] == (200, "iptables")
        assert http_get(port, "/healthz")[::2] == (200, "ok")
        assert http_get(port, "/nothing")[0] == 404
    finally:
        listener.stop()


def test_no_maps_no_map_series(tmp_path):
    m = Metrics("iptables", pin_dir=str(tmp_path))
    assert not [n for n in scrape_text(m.exposition().decode()) if n.startswith(("lbctl_map", "lbctl_service"))]


@pytest.mark.parametrize("counter, drop", [("nat_failed", True), ("drop_etp_local", True),
                                           ("svc_new_flow", False), ("revnat", False)])
def test_drop_counters(counter, drop):
    assert agent_metrics.is_drop(counter) is drop
