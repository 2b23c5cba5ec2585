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

        # an endpoint change through the API server moves the traffic off web-1, and back, and
        # kube-proxy's network_programming_duration_seconds observes it. At least one
        # observation per flip pair: the lab's condition times have a second's resolution (two
        # flips within one second carry one trigger time, reported once), and kube-proxy drops
        # the trigger times of a sync whose restore failed (it retries with a full sync, which
        # moves the traffic but observes nothing): so up to three pairs, each reported.
        before = programming_count(kp.metrics())
        attempts = []
        for _ in range(3):
            cp.set_pod_ready("default", "web-1", False)
            until_spread(client.ns, (WEB_IP, 80), {"web-0", "web-2"})
            cp.set_pod_ready("default", "web-1", True)
            until_spread(client.ns, (WEB_IP, 80), set(WEB))
            try:
                wait_for(lambda: programming_count(kp.metrics()) > before, timeout=5.0)
                break
            except AssertionError:
                text = kp.metrics()
                attempts.append({"count": programming_count(text), "restore failures": samples(
                    text, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total")})
        else:
            raise AssertionError(f"{mode}: no network_programming_duration_seconds observation after three "
                                 f"flip pairs: {attempts}; log {kp.log}: {kube.log_tail(kp.log)}")
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


# --- lbctl's renderings (kube-proxy v1.32) against what v1.37.2 programs -----------------------

# What differs, found on this lab (Services web and web-np, 3 endpoints, one on node 0) and
# normalised by rulesdiff (kernel form on both sides, counters, comments apart, elements as sets).
# iptables: the canary chains, which kube-proxy makes outside its restore (to notice a flush by
# someone else) and `lbctl render` does not print; and the nfacct counter on the INVALID drop:
# v1.37.2 created its nfacct objects over netlink in the node, lbctl's probe (the module
# loaded, built in or installed) answers no on this machine: a probe difference, not a rules one.
# (The scratch namespace has no nfacct objects, so `--nfacct` cannot be rendered into it.)
IPTABLES_DIFF = [
    "chain filter/KUBE-PROXY-CANARY: only the real kube-proxy",
    "chain mangle/KUBE-PROXY-CANARY: only the real kube-proxy",
    "chain nat/KUBE-PROXY-CANARY: only the real kube-proxy",
    "filter/KUBE-FORWARD: only the real kube-proxy: -m conntrack --ctstate INVALID -m nfacct "
    "--nfacct-name ct_state_invalid_dropped_pkts -j DROP",
    "filter/KUBE-FORWARD: only lbctl: -m conntrack --ctstate INVALID -j DROP",
]
# nftables: v1.37 DNATs in the service chain (numgen map straight to address . port: no
# endpoint- chains), marks for masquerade inline (no mark-for-masquerade chain) with ClusterIP
# traffic from outside the cluster CIDR marked once in `services` (matching @cluster-ips)
# instead of per service, masquerades hairpin traffic through a hairpin-connections set, runs its
# filter chains at priority filter (0) instead of -110 with new *-pre-dnat chains, and checks
# locally originated traffic against cluster-ips-check instead of firewall-check.
SVC, NP = "service-SUSTUHLJ-default/web/tcp/http", "service-4OLDCMEK-default/web-np/tcp/http"
EXT = "external-4OLDCMEK-default/web-np/tcp/http"
DNAT = ("meta l4proto tcp dnat ip to numgen random mod 3 map { 0 : 10.244.230.3 . 8080, "
        "1 : 10.244.231.2 . 8080, 2 : 10.244.231.3 . 8080 }")
T = "ip kube-proxy"
NFTABLES_DIFF = sorted([
    f"chain {T}/filter-output-pre-dnat: only the real kube-proxy",
    f"chain {T}/filter-prerouting-pre-dnat: only the real kube-proxy",
    f"{T}/{EXT}: only the real kube-proxy: meta mark set meta mark | 0x00004000",
    *(f"{T}/filter-{hook}: only the real kube-proxy: [type filter hook {hook} priority filter; policy accept;]"
      for hook in ("forward", "input", "output")),
    f"{T}/filter-output: only the real kube-proxy: ct state new jump cluster-ips-check",
    f"{T}/masquerading: only the real kube-proxy: meta mark & 0x00004000 != 0x00000000 meta mark set "
    "meta mark ^ 0x00004000 masquerade fully-random",
    f"{T}/masquerading: only the real kube-proxy: ct status dnat ip saddr . ip daddr . meta l4proto . "
    "th dport @hairpin-connections masquerade fully-random",
    f"{T}/{NP}: only the real kube-proxy: {DNAT}",
    f"{T}/{SVC}: only the real kube-proxy: {DNAT}",
    f"{T}/services: only the real kube-proxy: ip daddr @cluster-ips ip saddr != {CLUSTER_CIDR} "
    "meta mark set meta mark | 0x00004000",
    f"set/map {T}/hairpin-connections: only the real kube-proxy",
    *(f"chain {T}/endpoint-{h}-default/{svc}/tcp/http__{ip}/8080: only lbctl"
      for h, svc, ip in (("BV4MOUJW", "web", "10.244.230.3"), ("VCB6EBGB", "web", "10.244.231.2"),
                         ("GP6OHHHG", "web", "10.244.231.3"), ("R3HA5VMV", "web-np", "10.244.230.3"),
                         ("TIUMIE2W", "web-np", "10.244.231.2"), ("EXCPCCXB", "web-np", "10.244.231.3"))),
    f"chain {T}/filter-output-post-dnat: only lbctl",
    f"chain {T}/filter-prerouting: only lbctl",
    f"chain {T}/mark-for-masquerade: only lbctl",
    f"{T}/{EXT}: only lbctl: jump mark-for-masquerade",
    *(f"{T}/filter-{hook}: only lbctl: [type filter hook {hook} priority -110; policy accept;]"
      for hook in ("forward", "input", "output")),
    f"{T}/filter-output: only lbctl: ct state new jump firewall-check",
    f"{T}/masquerading: only lbctl: meta mark & 0x00004000 == 0x00000000 return",
    f"{T}/masquerading: only lbctl: meta mark set meta mark ^ 0x00004000",
    f"{T}/masquerading: only lbctl: masquerade fully-random",
    f"{T}/{NP}: only lbctl: ip daddr {{np_ip}} tcp dport 8081 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
    f"{T}/{NP}: only lbctl: numgen random mod 3 vmap {{ 0 : goto endpoint-R3HA5VMV-default/web-np/tcp/"
    "http__10.244.230.3/8080, 1 : goto endpoint-TIUMIE2W-default/web-np/tcp/http__10.244.231.2/8080, "
    "2 : goto endpoint-EXCPCCXB-default/web-np/tcp/http__10.244.231.3/8080 }",
    f"{T}/{SVC}: only lbctl: ip daddr {WEB_IP} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
    f"{T}/{SVC}: only lbctl: numgen random mod 3 vmap {{ 0 : goto endpoint-BV4MOUJW-default/web/tcp/"
    "http__10.244.230.3/8080, 1 : goto endpoint-VCB6EBGB-default/web/tcp/http__10.244.231.2/8080, "
    "2 : goto endpoint-GP6OHHHG-default/web/tcp/http__10.244.231.3/8080 }",
])


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_lbctl_renders_what_the_real_kube_proxy_programs_but_for_the_documented_differences(
        k8s_lab, mode, tmp_path):
    import shlex

    from lbctl.lab import rulesdiff

    state, cp, kubeconfig = k8s_lab
    node0 = state.node(0)
    assert node0.ns is not None
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "cluster.yaml").write_text(
        cp.kubectl("get", "services,endpointslices", "-A", "-o", "yaml").stdout)
    with KubeProxy(Path(cp.state.bin_dir), mode, node0.ns, node0.name, node0.ip, CLUSTER_CIDR,
                   kubeconfig, tmp_path / "kube-proxy") as kp:
        kp.wait_synced()
        real = rulesdiff.read_rules(node0.ns, mode)
    # lbctl render in the node's namespace, so that what it probes (sysctls) is the node's
    render = [*node0.enter(), *netns.python_argv("lbctl.cli.main", "render", mode), "--manifests", str(objects),
              "--node-name", node0.name, "--node-ip", node0.ip, "--cluster-cidr", CLUSTER_CIDR,
              "--nodeport-addresses", "primary"]
    if mode == "iptables":
        jumps = [shlex.split(line) for line in
                 netns.run([*render, "--jump-rules"], env=netns.python_env()).stdout.splitlines()]
    else:
        render += ["--service-cidr", SERVICE_CIDR]   # v1.37 reads the ServiceCIDR objects
        jumps = []
    rendered = netns.run(render, env=netns.python_env()).stdout
    ours = rulesdiff.kernel_form(rendered, mode, f"{PREFIX}-scratch", jumps)
    report = rulesdiff.compare_rules(real, ours, mode)
    np_ip = json.loads(cp.kubectl("get", "service", "web-np", "-o", "json").stdout)["spec"]["clusterIP"]
    want = IPTABLES_DIFF if mode == "iptables" else sorted(line.replace("{np_ip}", np_ip) for line in NFTABLES_DIFF)
    assert sorted(rulesdiff.summary(report)) == sorted(want)
    assert not report["comments"] and not report["order"] and not report["sets"]["elements"]
