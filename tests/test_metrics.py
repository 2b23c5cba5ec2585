"""Prometheus /metrics: kube-proxy's names, labels and buckets (pkg/proxy/metrics) fed by the
agent's syncs, the health counters, the metrics server's other paths; and (root) a real scrape
of an agent running in the lab, whose per-service counters and map occupancy come from the
pinned maps at scrape time."""
from __future__ import annotations

import http.client
import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbctl.agent import metrics as agent_metrics
from lbctl.agent.health import ProxyHealth
from lbctl.agent.metrics import Metrics
from lbctl.datapath.ebpf.mode import EbpfMode


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


# --- a real scrape of an agent in the lab (root) ---------------------------------------------------


@pytest.fixture(scope="module")
def lab_agent(tmp_path_factory):
    """The lab (pods in namespaces), the eBPF agent on its links with the metrics server."""
    import threading

    from conftest import TEST_PIN_DIR, config_for_tests

    from lbctl.agent.loop import Agent, AgentOptions
    from lbctl.agent.status import Operations
    from lbctl.lab import cluster as lab
    from lbctl.sources.manifests import ManifestSource

    prefix = f"lbx{os.getpid() % 1000}"
    pin_dir = TEST_PIN_DIR + "-metrics"
    cfg = config_for_tests(pin_dir=pin_dir, devices=(f"veth{prefix}*",))
    state = lab.lab_up(lab.LabSpec(prefix=prefix, pod_cidr="10.244.210.0/24", gateway="10.244.210.1"),
                       tmp_path_factory.mktemp("manifests"))
    metrics = Metrics("ebpf", pin_dir, ProxyHealth(60))
    ops = Operations(mode="ebpf", source="lab", pin_dir=pin_dir, metrics=metrics, write_status=False)
    agent = Agent(ManifestSource(state.manifests_dir, interval=0.1), cfg,
                  AgentOptions(interval=0.1, link_rescan=0.5), observer=ops)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"max_seconds": 600}, daemon=True)
    listener = None
    try:
        thread.start()
        assert agent.synced.wait(60), "agent did not sync"
        listener = agent_metrics.serve_metrics(metrics, "127.0.0.1:0")
        yield state, agent, listener.server.port, cfg
    finally:
        if listener is not None:
            listener.stop()
        stop.set()
        thread.join(30)
        EbpfMode.cleanup(cfg)   # filters, pins, names, mark table
        lab.lab_down(state.prefix)


@pytest.mark.root
@pytest.mark.netns
def test_scrape_reads_the_maps_of_the_running_agent(lab_agent):
    from lbctl.datapath.ebpf import dump
    from lbctl.lab.client import request_spread

    state, agent, port, cfg = lab_agent
    client = state.pods[state.clients[0]].ns
    before = scrape_text(http_get(port, "/metrics")[2])
    web = (("frontend", "10.96.0.10:80/TCP"), ("service", "default/web:http"))
    report = request_spread(client, "tcp", "10.96.0.10:80", 40)
    assert sum(report["errors"].values()) == 0, report
    code, _, text = http_get(port, "/metrics")
    after = scrape_text(text)
    maps = dump.collect(cfg.pin_dir)
    row = next(s for s in maps["services"] if s["name"] == "default/web:http")

    flows = after["lbctl_service_flows_total"][web] - before.get("lbctl_service_flows_total", {}).get(web, 0)
    assert flows == 40, "one new flow per connection, read from the maps at scrape time"
    assert after["lbctl_service_flows_total"][web] == row["flows"], "nothing else went to web meanwhile"
    assert 0 < after["lbctl_service_packets_total"][web] <= row["packets"]
    assert 0 < after["lbctl_service_bytes_total"][web] <= row["bytes"]
    assert after["lbctl_service_backends"][web] == 3
    assert after["lbctl_datapath_packets_total"][(("counter", "svc_new_flow"),)] >= 40
    assert (("reason", "nat_failed"),) in after["lbctl_datapath_drops_total"]

    entries = after["lbctl_map_entries"]
    slots = sum(1 + s["count"] for s in maps["services"])
    assert entries[(("map", "lb4_services"),)] == slots, "a frontend and its backend slots each"
    assert entries[(("map", "lb4_backends"),)] == maps["backends"]
    assert after["lbctl_map_max_entries"][(("map", "lb4_services"),)] == cfg.services_map_size
    assert after["lbctl_map_max_entries"][(("map", "lb4_ct"),)] == cfg.ct_size
    assert entries[(("map", "lb4_ct"),)] > 0 and after["lbctl_maps_readable"][(("pin_dir", cfg.pin_dir),)] == 1
    assert after["kubeproxy_sync_proxy_rules_duration_seconds_count"][IPV4] >= 1
    assert after["kubeproxy_sync_proxy_rules_last_timestamp_seconds"][IPV4] > 0
