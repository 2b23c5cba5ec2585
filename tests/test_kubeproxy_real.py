"""The real kube-proxy (v1.37.2, `make k8s-bins`) on a two-node lab under the real control plane.

One lab for the module: two node namespaces on the lab's bridge, the API server relayed into each
(lbctl.lab.relay), the lab's pods registered as Pods of their nodes. kube-proxy runs on node 0
as the identity a DaemonSet gives it (user system:kube-proxy, the system:node-proxier role), in
iptables mode and then in nftables mode, and for each:

* the ClusterIP, from a pod on node 0, reaches every backend, those on node 1 too;
* a NodePort from the outside client to node 0 reaches the backends, and with
  externalTrafficPolicy Cluster the backend sees the node's address, not the client's;
* a pod's Ready condition flipped through the status subresource moves the traffic off it and
  back, and kube-proxy's network_programming_duration_seconds observed those changes;
* after stop() nothing of kube-proxy is in the node (no KUBE- chain, no kube-proxy nft table).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from nsutil import wait_for

from lbctl.lab import cluster as lab
from lbctl.lab import kube, netns
from lbctl.lab.client import Outcome, tcp_request
from lbctl.lab.kubeproxy import KubeProxy, leftovers, sample, samples

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.kube]

PREFIX = "lbkp"
POD_CIDR, GATEWAY = "10.244.230.0/24", "10.244.230.1"
CLUSTER_CIDR = "10.244.230.0/23"      # node 0's /24 and node 1's
SERVICE_CIDR = "10.96.230.0/24"
WEB_IP = "10.96.230.10"
NODE_PORT = 30080
WEB = ("web-0", "web-1", "web-2")
SETTLE = 30.0          # seconds for kube-proxy to follow a change: a safety net, never the assertion


def lab_spec() -> lab.LabSpec:
    web = lab.ServiceSpec("default", "web", WEB_IP, (lab.PortSpec("http", 80, "TCP", 8080),), WEB)
    return lab.LabSpec(prefix=PREFIX, pod_cidr=POD_CIDR, gateway=GATEWAY, service_cidr=SERVICE_CIDR,
                       cluster_cidr=CLUSTER_CIDR, clients=("client-0",), services=(web,),
                       kubernetes=True, nodes=2,
                       # web-1 and web-2 on node 1: the ClusterIP must cross the lab network
                       placement=(("web-0", 0), ("web-1", 1), ("web-2", 1)))


NODEPORT_SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web-np", "namespace": "default"},
    "spec": {"type": "NodePort", "externalTrafficPolicy": "Cluster",
             "selector": {f"{kube.SERVICE_LABEL}web": "true"},
             "ports": [{"name": "http", "port": 8081, "targetPort": 8080, "protocol": "TCP",
                        "nodePort": NODE_PORT}]},
}


@pytest.fixture(scope="module")
def k8s_lab(tmp_path_factory) -> Iterator[tuple[lab.LabState, kube.ControlPlane, Path]]:
    state = lab.lab_up(lab_spec(), tmp_path_factory.mktemp("manifests"))
    try:
        assert state.made.kube_dir
        cp = kube.ControlPlane.attach(Path(state.made.kube_dir))
        cp.kubectl("apply", "-f", "-", input=json.dumps(NODEPORT_SERVICE))
        cp.wait_for_endpoints({("default", "web-np"): WEB}, lab_deadline())
        kubeconfig = cp.user_kubeconfig("kube-proxy", "system:kube-proxy")
        yield state, cp, kubeconfig
    finally:
        lab.lab_down(PREFIX)


def lab_deadline() -> float:
    import time
    return time.monotonic() + 60


def test_the_multi_node_lab_registers_its_nodes_and_pods_where_they_are(k8s_lab):
    """What kube-proxy reads: each Node with its lab-network InternalIP, each Pod on its node
    (spec.nodeName, status.hostIP), the slices' endpoints with their nodeName; the API server
    answers inside the nodes through the relay."""
    state, cp, _ = k8s_lab
    nodes = json.loads(cp.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert {n["metadata"]["name"]: [a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"]
            for n in nodes} == {node.name: [node.ip] for node in state.node_list()}
    pods = json.loads(cp.kubectl("get", "pods", "-o", "json").stdout)["items"]
    assert {p["metadata"]["name"]: (p["spec"]["nodeName"], p["status"]["hostIP"]) for p in pods} == {
        name: (pod.node, state.nodes[pod.node].ip) for name, pod in state.pods.items()}
    slices = json.loads(cp.kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=web",
                                   "-o", "json").stdout)["items"]
    assert {ep["targetRef"]["name"]: ep["nodeName"] for s in slices for ep in s["endpoints"]} == {
        name: state.pods[name].node for name in WEB}
    for node in state.node_list():
        inside = netns.run([*node.enter(), "kubectl", f"--kubeconfig={cp.kubeconfig}", "get", "node",
                            node.name, "-o", "name"])
        assert inside.stdout.strip() == f"node/{node.name}"


def ask(ns: str, target: tuple[str, int]) -> Outcome:
    return netns.in_netns(ns, tcp_request, target, 1.0)


def spread(ns: str, target: tuple[str, int], count: int) -> tuple[Counter[str], Counter[str]]:
    """(answering pods, client addresses the backends saw) over count connections."""
    pods: Counter[str] = Counter()
    peers: Counter[str] = Counter()
    for _ in range(count):
        outcome = ask(ns, target)
        pods[outcome.pod or f"error:{outcome.error}"] += 1
        if outcome.peer:
            peers[outcome.peer] += 1
    return pods, peers


def until_spread(ns: str, target: tuple[str, int], want: set[str], count: int = 60) -> Counter[str]:
    """Spreads until the answering pods are exactly `want` (kube-proxy syncs within its
    minSyncPeriod of a change)."""
    seen: list[Counter[str]] = []

    def probe() -> Counter[str] | None:
        pods, _ = spread(ns, target, count)
        seen.append(pods)
        return pods if set(pods) == want else None
    return wait_for(probe, timeout=SETTLE, interval=0.2, what=f"{target} answered by {sorted(want)} "
                    f"(last: {seen[-1] if seen else None})")


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_the_real_kube_proxy_serves_clusterip_and_nodeport_and_follows_endpoints(k8s_lab, mode, tmp_path):
    state, cp, kubeconfig = k8s_lab
    node0 = state.node(0)
    assert node0.ns is not None
    client = state.pods["client-0"]
    assert client.node == node0.name
    kp = KubeProxy(Path(cp.state.bin_dir), mode, node0.ns, node0.name, node0.ip, CLUSTER_CIDR,
                   kubeconfig, tmp_path / f"kube-proxy-{mode}", cgroup=Path(node0.cgroup))
    with kp:
        assert kp.pid is not None
        assert str(kp.pid) in Path(node0.cgroup, "cgroup.procs").read_text().split()
        seconds = kp.wait_synced()
        assert 0 < seconds < 120 and kp.first_sync_duration is not None
        status, health = kp.healthz()
        assert status == 200 and "lastUpdated" in health

        # the ClusterIP, from a pod on node 0, reaches the backends on both nodes
        pods = until_spread(client.ns, (WEB_IP, 80), set(WEB))
        assert sum(pods.values()) == 60

        # a NodePort from outside, masqueraded (eTP Cluster): backends see node 0's addresses
        pods, peers = spread(state.outside_ns, (node0.ip, NODE_PORT), 60)
        assert set(pods) == set(WEB), pods
        assert set(peers) <= node0.addresses() and state.outside_ip not in peers, peers

        # an endpoint change through the API server moves the traffic off web-1, and back
        before = programming_count(kp.metrics())
        cp.set_pod_ready("default", "web-1", False)
        until_spread(client.ns, (WEB_IP, 80), {"web-0", "web-2"})
        cp.set_pod_ready("default", "web-1", True)
        until_spread(client.ns, (WEB_IP, 80), set(WEB))
        # (at least one: the lab's condition times have a second's resolution, so two flips
        # within one second carry one trigger time, which the EndpointSlice controller reports once)
        wait_for(lambda: programming_count(kp.metrics()) > before, timeout=SETTLE,
                 what="network_programming_duration_seconds observations of the changes")
        text = kp.metrics()
        assert samples(text, "kubeproxy_network_programming_duration_seconds_bucket")
        assert (sample(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", ip_family="IPv4") or 0) > 0
        assert leftovers(node0.ns), f"{mode}: kube-proxy's rules are in the node while it runs"
    assert kp.pid is None
    assert leftovers(node0.ns) == [], "nothing of kube-proxy is left in the node after stop()"
    assert not kp.running()
    assert ask(client.ns, (WEB_IP, 80)).pod is None, "with no kube-proxy the ClusterIP is dead"


def programming_count(text: str) -> float:
    return sum(v for _, v in samples(text, "kubeproxy_network_programming_duration_seconds_count"))
