"""A burst of 10,000 Services through the real API server (tests/kubeapi.py), and the agent (eBPF
mode, in a thread, as in test_agent_k8s.py) keeping up: after the burst the pinned maps equal the
desired state computed from a fresh list, no stale backend; traffic through a burst service
answers; after a burst of deletes the maps are back to the small state they had before.

The burst services are selector-less, each with one hand-made EndpointSlice, written by a thread
pool of the official client in a process of its own (so the agent's thread and the writers do not
share an interpreter). Selector Services would have the real EndpointSlice controller write the
slices, but it writes through its client's rate limit (kube-controller-manager's --kube-api-qps,
20/s): 10,000 slices would take over 8 minutes. Hand-made slices keep the test around 3 minutes
on 2 cores and still go through the API server and the agent's watch, as a controller's would.

Service 0 of the burst has the three lab web pods as endpoints (its traffic is checked); every
other one a lab pod and an address of its own in 10.136.0.0/16 that no pod has, so the burst
adds ~10,000 backends, and the deletes must take every one of them away again.

Timings (create, converge) are printed, never asserted: `lbctl bench --k8s-latency` measures."""
from __future__ import annotations

import ipaddress
import os
import threading
import time

import pytest
from conftest import TEST_PIN_DIR, config_for_tests
from nsutil import strict_node, wait_for

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.bench.k8s_latency import apply_objects, in_subprocess
from lbctl.datapath.ebpf import dump
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.lab import cluster as lab
from lbctl.lab.client import request_spread
from lbctl.model.desired import desired_state, service_ports
from lbctl.sources.kubernetes import KubernetesSource, api_client

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.kube]

BURST = 10_000
PREFIX = f"lbs{os.getpid() % 1000}"
PIN_DIR = TEST_PIN_DIR + "-burst"
POD_CIDR, GATEWAY = "10.244.212.0/24", "10.244.212.1"
WEB_IP = "10.96.212.10"
BURST_VIPS = ipaddress.ip_network("10.96.64.0/18")        # 16,384 addresses, none used elsewhere
FAKE_BACKENDS = ipaddress.ip_network("10.136.0.0/16")     # no pod has these
CONVERGE = 300.0     # seconds for the agent to take in the burst: a safety net, never the assertion
WEB_PODS = ("web-0", "web-1", "web-2")

SERVICES = (lab.ServiceSpec("default", "web", WEB_IP, (lab.PortSpec("http", 80, "TCP", 8080),), WEB_PODS),)


def burst_objects(namespace: str, pod_ips: dict[str, str]) -> list[tuple[dict, dict]]:
    pairs = []
    for i in range(BURST):
        name = f"burst-{i:05d}"
        endpoints = ([pod_ips[p] for p in WEB_PODS] if i == 0
                     else [pod_ips[WEB_PODS[i % 3]], str(FAKE_BACKENDS.network_address + 1 + i)])
        labels = {"lbctl.io/test": "burst"}
        pairs.append((
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": name, "namespace": namespace, "labels": labels},
             "spec": {"clusterIP": str(BURST_VIPS.network_address + 1 + i),
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-1", "namespace": namespace, "labels": {
                 **labels, "kubernetes.io/service-name": name,
                 "endpointslice.kubernetes.io/managed-by": "lbctl-test"}},
             "addressType": "IPv4",
             "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in endpoints]}))
    return pairs


@pytest.fixture(scope="module")
def burst_lab(kube_control_plane, kube_node, tmp_path_factory):
    """The lab's web pods as Pods, default/web as a selector Service (the real controller makes
    its slice), in a namespace of this module."""
    cp = kube_control_plane
    spec = lab.LabSpec(prefix=PREFIX, pod_cidr=POD_CIDR, gateway=GATEWAY, services=SERVICES)
    state = lab.lab_up(spec, tmp_path_factory.mktemp("burst-lab-manifests"))
    namespace = f"lbburst-{os.getpid()}"
    try:
        cp.kubectl("create", "namespace", namespace)
        wait_for(lambda: cp.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] == 200,
                 60.0, what="the namespace's default serviceaccount")
        for pod in WEB_PODS:
            cp.create_pod(namespace, pod, node=kube_node, ip=state.pods[pod].ip, labels={"app": "web"},
                          ports=(("http", 8080, "TCP"),))
        cp.kubectl("apply", "-f", "-", input=(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {namespace}}}\n"
            f"spec: {{clusterIP: {WEB_IP}, selector: {{app: web}}, ports: [{{name: http, port: 80, "
            f"targetPort: 8080, protocol: TCP}}]}}\n"))
        cp.wait_for_endpoints({(namespace, "web"): WEB_PODS}, time.monotonic() + 60.0)
        with strict_node(PREFIX, state.host_links(), POD_CIDR):
            yield cp, state, namespace, kube_node
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        lab.lab_down(state.prefix)


@pytest.fixture(scope="module")
def agent(burst_lab):
    cp, _, _, node = burst_lab
    cfg = config_for_tests(pin_dir=PIN_DIR, devices=(f"veth{PREFIX}*",), node_name=node,
                           max_services=16384, max_backends=16384, services_map_size=65536)
    source = KubernetesSource(api_client(str(cp.kubeconfig)), node, initial_backoff=0.05, max_backoff=0.5)
    # min_sync_period as `lbctl run`'s default: a burst coalesces into a sync a second (each one
    # rebuilds the whole desired state today: with a sync per event the agent takes a core and
    # the burst crawls, ~60 objects/s instead of ~400)
    running = Agent(source, cfg, AgentOptions(interval=0.5, link_rescan=0.5, min_sync_period=1.0))
    stop = threading.Event()
    thread = threading.Thread(target=running.run, args=(stop,), kwargs={"max_seconds": 900}, daemon=True)
    thread.start()
    try:
        assert running.synced.wait(60.0), "the agent did not sync"
        yield running
    finally:
        stop.set()
        thread.join(60)
        source.stop()
        EbpfMode.cleanup(cfg)


def programmed() -> tuple[dict[str, list[str]], int]:
    """Frontend -> its backends, from the pinned maps; and how many backends the maps hold."""
    state = dump.collect(PIN_DIR)
    return ({s["frontend"]: sorted(b["address"] for b in s["backends"]) for s in state["services"]},
            state["backends"])


def wanted(cp, node: str) -> dict[str, list[str]]:
    """The desired state from a fresh list of the API server (a source of its own)."""
    source = KubernetesSource(cp.api(), node, ready_timeout=120.0)
    try:
        snapshot = source.poll()
    finally:
        source.stop()
    desired, _ = desired_state(service_ports(snapshot), node)
    return {str(fe): sorted(str(b) for b in entry.backends) for fe, entry in desired.services.items()}


def converge(cp, node: str, started: float, what: str) -> dict[str, list[str]]:
    """Until the maps equal a fresh list's desired state; prints how long after `started` (the
    burst's first write) and after the list (taken once the burst's last write was answered)."""
    listed = time.monotonic()
    want = wanted(cp, node)
    wait_for(lambda: programmed()[0] == want, CONVERGE, interval=0.5, what=f"the maps to hold {what}")
    now = time.monotonic()
    print(f"\n{what}: maps equal the desired state {now - started:.1f} s after the burst started, "
          f"{now - listed:.1f} s after its last write")
    state = wanted(cp, node)           # and a list taken after that says the same
    assert programmed()[0] == state
    return state


def retried(bulk) -> str:
    return f"{bulk.retries} retried, first: {bulk.first_retry}" if bulk.retries else "none retried"


def test_a_burst_of_10000_services_and_back(burst_lab, agent):
    cp, state, namespace, node = burst_lab
    pod_ips = {p: state.pods[p].ip for p in WEB_PODS}
    web = sorted(f"{pod_ips[p]}:8080/TCP" for p in WEB_PODS)
    before = converge(cp, node, time.monotonic(), "the small state")
    assert before[f"{WEB_IP}:80/TCP"] == web
    backends_before = programmed()[1]
    pairs = burst_objects(namespace, pod_ips)
    kubeconfig = str(cp.kubeconfig)

    started = time.monotonic()
    bulk = in_subprocess(apply_objects, kubeconfig, pairs, workers=16)
    print(f"\ncreated {BURST:,} Services and {BURST:,} EndpointSlices in {bulk.seconds:.1f} s "
          f"({bulk.requests / bulk.seconds:,.0f} objects/s, {retried(bulk)})")
    try:
        after = converge(cp, node, started, f"{BURST:,} more services")
        burst = {fe: b for fe, b in after.items() if fe not in before}
        assert len(burst) == BURST and {fe: b for fe, b in after.items() if fe in before} == before
        first = f"{BURST_VIPS.network_address + 1}:80/TCP"
        assert burst[first] == web
        fake = f"{FAKE_BACKENDS.network_address + 1 + 7}:8080/TCP"
        assert burst[f"{BURST_VIPS.network_address + 1 + 7}:80/TCP"] == sorted([f"{pod_ips['web-1']}:8080/TCP", fake])
        assert programmed()[1] == backends_before + BURST - 1     # one address of its own each, but service 0
        report = request_spread(state.pods[state.clients[0]].ns, "tcp", f"{BURST_VIPS.network_address + 1}:80", 60)
        assert sum(report["answers"].values()) == 60 and set(report["answers"]) == set(WEB_PODS), report
    finally:
        started = time.monotonic()
        bulk = in_subprocess(apply_objects, kubeconfig, pairs, delete=True, workers=16)
        print(f"\ndeleted them in {bulk.seconds:.1f} s ({bulk.requests / bulk.seconds:,.0f} objects/s, "
              f"{retried(bulk)})")
    assert converge(cp, node, started, "the small state again") == before
    assert programmed()[1] == backends_before, "a backend of a deleted service stayed in the maps"
    report = request_spread(state.pods[state.clients[0]].ns, "tcp", f"{WEB_IP}:80", 60)
    assert set(report["answers"]) == set(WEB_PODS), report
