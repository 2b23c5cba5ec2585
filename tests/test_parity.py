"""The parity suite: the same traffic scenarios against every datapath mode this kernel runs.

One lab (pods in network namespaces, the root namespace as the node) serves the whole module;
for each mode (ebpf, iptables, nftables) an agent runs on the lab's manifests, and every
scenario programs manifests, sends real traffic and asserts what a user of the cluster sees:
which backends answer and how evenly, the source address a backend sees, reject (TCP RST / ICMP
port unreachable) versus drop versus success, session affinity, and what happens to flows when
endpoints change. kube-proxy's iptables and nftables modes are the reference semantics.

A scenario the eBPF datapath does not support yet is an expected failure for ebpf with the
reason (``@modes(ebpf="...")``, xfail strict): when the gap is closed the test fails loudly
until the mark is removed, so those marks are always the true list of gaps
(``pytest -rx tests/test_parity.py`` prints it).

The lab uses its own pod CIDR (10.244.210.0/24) and service CIDR (10.96.210.0/24), so that it
can share the node with other labs. The node runs strict, as kind and hardened hosts do
(``nsutil.strict_node``): rp_filter=1 on the pod links, conntrack-INVALID packets from the pods
dropped in FORWARD, nf_conntrack_tcp_be_liberal off; the iptables mode writes kube-proxy's own
INVALID-drop rule too. Every mode must show netfilter consistent flows to pass. Service traffic
no rule claims goes to a sink link, as it would leave a real node (see
``service_traffic_sink``). The module checks at the end that iptables-save and the nft ruleset
are as they were before it started.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from conftest import TEST_PIN_DIR, config_for_tests
from netfilter_state import iptables_state, nft_state
from nsutil import forget_conntrack, socket_in, strict_node, wait_for
from scipy.stats import chisquare

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf import dump
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.datapath.kubeproxy import iptables_mode, nftables_mode, proxier
from lbctl.lab import cluster as lab
from lbctl.lab.client import request_spread
from lbctl.model.desired import service_ports
from lbctl.sources.manifests import ManifestSource, load_manifests

pytestmark = [pytest.mark.root, pytest.mark.netns]

MODES = ("ebpf", "iptables", "nftables")
PREFIX = f"lbp{os.getpid() % 1000}"
PIN_DIR = TEST_PIN_DIR + "-parity"
POD_CIDR, GATEWAY = "10.244.210.0/24", "10.244.210.1"
CLUSTER_CIDR = "10.244.0.0/16"          # --cluster-cidr: pod traffic is not masqueraded
WEB_VIP, DNS_VIP = "10.96.210.10", "10.96.210.53"
EXTERNAL_IP = "198.18.0.10"             # benchmarking range, routed to the sink (kept local)
SINK_ROUTE = "10.96.210.0/25"           # the cluster IPs, more specific than the lab's route
NODE_PORT = 30080

SERVICES = (
    lab.ServiceSpec("default", "web", WEB_VIP, (lab.PortSpec("http", 80, "TCP", 8080),),
                    ("web-0", "web-1", "web-2")),
    lab.ServiceSpec("default", "dns", DNS_VIP,
                    (lab.PortSpec("dns", 53, "UDP", 5353), lab.PortSpec("dns-tcp", 53, "TCP", 5353)),
                    ("dns-0", "dns-1")),
)
WEB = {"web-0", "web-1", "web-2"}
DNS = {"dns-0", "dns-1"}


def modes(**gaps: str):
    """Run the test once per mode; ``ebpf="reason"`` makes it an expected failure there."""
    return pytest.mark.parametrize("cluster", [
        pytest.param(mode, id=mode,
                     marks=[pytest.mark.xfail(strict=True, reason=gaps[mode])] if mode in gaps else [])
        for mode in MODES], indirect=True)


# --- the lab, and one agent per mode -----------------------------------------------------------


def netfilter_state() -> tuple[dict, dict]:
    return iptables_state(), nft_state()


@contextlib.contextmanager
def service_traffic_sink():
    """Traffic to a service address that no rule claims leaves the node silently, as it would
    in a cluster (out of the default route, to nobody), instead of meeting the lab's
    "unreachable" route for the service CIDR. That route would answer ICMP host unreachable at
    the routing decision, before kube-proxy's filter rules (REJECT for no endpoints, DROP for
    no local endpoints) see the packet. An ifb link swallows it (ifb drops whatever is routed
    to it rather than redirected by tc; it needs no ARP), through a route more specific than the
    lab's, covering the cluster IPs and the external IP."""
    sink = f"{PREFIX}sink"
    routes = [SINK_ROUTE, f"{EXTERNAL_IP}/32"]
    subprocess.run(["ip", "link", "add", sink, "type", "ifb"], check=True)
    try:
        subprocess.run(["ip", "link", "set", sink, "up"], check=True)
        for route in routes:
            subprocess.run(["ip", "route", "add", route, "dev", sink], check=True)
        yield
    finally:
        subprocess.run(["ip", "link", "del", sink], check=False)   # its routes go with it


@pytest.fixture(scope="module")
def lab_state(tmp_path_factory):
    before = netfilter_state()
    spec = lab.LabSpec(prefix=PREFIX, pod_cidr=POD_CIDR, gateway=GATEWAY,
                       service_cidr="10.96.210.0/24", services=SERVICES)
    state = lab.lab_up(spec, tmp_path_factory.mktemp("parity-manifests"))
    try:
        with service_traffic_sink(), strict_node(PREFIX, state.host_links(), POD_CIDR):
            yield state
    finally:
        lab.lab_down(PREFIX)
        # Nothing left behind: namespaces, links, tc filters, pins, rules, chains, tables.
        assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                              text=True).stdout.split() if n.startswith(PREFIX)]
        assert f"veth{PREFIX}" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                     text=True).stdout
        assert not os.path.exists(PIN_DIR)
        assert netfilter_state() == before


class RecordingAgent(Agent):
    """The agent, remembering what it last synced and whether that sync succeeded."""

    last_ports = None
    last_ok = False

    def sync_snapshot(self, snapshot):
        result = super().sync_snapshot(snapshot)
        self.last_ports, self.last_ok = service_ports(snapshot), not result.errors
        return result

    def retry(self):
        result = super().retry()
        self.last_ok = not result.errors
        return result


class Running:
    """`lbctl run --mode M` in a thread on the lab's manifests."""

    def __init__(self, mode_name: str, state: lab.LabState):
        self.name = mode_name
        self.state = state
        self.manifests = Path(state.manifests_dir)
        self.mode = make_mode(mode_name)
        self.stop_event = threading.Event()
        self.agent = RecordingAgent(ManifestSource(self.manifests, interval=0.05), mode=self.mode,
                                    options=AgentOptions(interval=0.05, detach_on_exit=True))
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,),
                                       kwargs={"max_seconds": 600}, daemon=True)

    def start(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.agent.synced.is_set() or not self.thread.is_alive(), 60,
                 what=f"the {self.name} agent's first sync")
        assert self.thread.is_alive(), f"the {self.name} agent stopped (see the log)"
        self.wait_synced()
        return self

    def wait_synced(self, timeout: float = 10) -> None:
        """Until the agent has programmed exactly what the manifests now say."""
        expected = service_ports(load_manifests(self.manifests))
        wait_for(lambda: self.agent.last_ok and self.agent.last_ports == expected
                 and not getattr(self.mode, "dirty", False), timeout,
                 what=f"the {self.name} agent to sync the manifests")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        # whatever the mode left (it detaches on exit; this is the belt to those braces)
        EbpfMode.cleanup(ebpf.DatapathConfig(pin_dir=PIN_DIR))
        dump.remove_names(PIN_DIR)
        iptables_mode.IptablesMode.cleanup()
        nftables_mode.NftablesMode.cleanup()
        forget_conntrack(POD_CIDR)   # the next mode starts from no flows, as on a fresh node


def node_ip() -> str:
    """The node address the modes are told about: the lab gateway, an address of this node on
    every pod link, so the suite needs no default route."""
    return GATEWAY


def make_mode(name: str):
    options = proxier.ProxierOptions(full_sync_every=4, ebpf_pin_dir=PIN_DIR)
    settings = dict(node_name=lab.NODE_NAME, node_ips=(node_ip(),),
                    cluster_cidr=CLUSTER_CIDR)
    if name == "ebpf":
        return EbpfMode(config_for_tests(pin_dir=PIN_DIR, devices=(f"veth{PREFIX}*",),
                                         node_name=lab.NODE_NAME))
    if name == "iptables":
        return iptables_mode.IptablesMode(iptables_mode.config_from(**settings, tcp_be_liberal=False),
                                          options)
    return nftables_mode.NftablesMode(nftables_mode.config_from(**settings), options)


def unsupported(name: str) -> str | None:
    """Why this host cannot run mode ``name``, or None."""
    needs = {"ebpf": [], "iptables": ["iptables-restore", "iptables-save"], "nftables": ["nft"]}[name]
    missing = [tool for tool in needs + ["conntrack"] * (name != "ebpf") if not shutil.which(tool)]
    return f"{', '.join(missing)} not installed" if missing else None


@pytest.fixture(scope="module")
def cluster(request, lab_state):
    why = unsupported(request.param)
    assert not why, f"{request.param} mode: {why} (`make setup` installs it)"
    running = Running(request.param, lab_state)
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def manifests(cluster):
    """The manifest directory; whatever a test changes is put back (and synced) afterwards."""
    path = cluster.manifests
    saved = {p.name: p.read_text() for p in path.iterdir()}
    yield path
    for p in path.iterdir():
        if p.name not in saved:
            p.unlink()
    for name, text in saved.items():
        write(path / name, text)
    cluster.wait_synced()


# --- manifests and traffic ---------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    """Atomically (a hidden temporary file, which the source skips, renamed over the file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def edit(path: Path, change) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    write(path, yaml.safe_dump(doc, sort_keys=False))


def edit_service(manifests: Path, name: str, change) -> None:
    edit(manifests / f"default-{name}.service.yaml", lambda doc: change(doc["spec"]))


def edit_endpoints(manifests: Path, name: str, change) -> None:
    """``change(pod_name, endpoint)`` edits an endpoint in place; returning False drops it."""
    def apply(doc):
        doc["endpoints"] = [e for e in doc["endpoints"] if change(e["targetRef"]["name"], e) is not False]
    edit(manifests / f"default-{name}.endpointslice.yaml", apply)


def client_ns(state, client: str = "client-0") -> str:
    return state.pods[client].ns


def pod_ip(state, pod: str) -> str:
    return state.pods[pod].ip


def no_errors(report: dict) -> bool:
    return sum(report["errors"].values()) == 0


class UdpFlow:
    """One UDP flow: a connected socket in a pod, asking again and again from the same port."""

    def __init__(self, ns: str, target: tuple[str, int]):
        self.sock = socket_in(ns)
        self.sock.settimeout(0.5)
        self.sock.connect(target)

    def ask(self) -> str | None:
        """The answering pod, or None (timeout, ICMP error)."""
        try:
            self.sock.send(b"?")
            return self.sock.recv(200).decode().split()[0]
        except OSError:
            return None

    def close(self) -> None:
        self.sock.close()


# --- scenarios ---------------------------------------------------------------------------------


@modes()
@pytest.mark.parametrize("proto,target,pods,count", [
    ("tcp", f"{WEB_VIP}:80", WEB, 900),
    ("udp", f"{DNS_VIP}:53", DNS, 600),
], ids=["tcp-web", "udp-dns"])
def test_every_backend_answers_evenly(cluster, proto, target, pods, count):
    """Each new connection picks a ready endpoint uniformly: all answer, chi-square passes.

    Sequential: a sample with p <= 0.001 is followed by a second, independent one, which must
    pass. A fair datapath then fails one run in a million instead of one in a thousand per
    scenario (six here); a biased one still fails both. (Seen once in CI: the iptables and
    nftables samples of one run both at p = 0.0009, never again in the following runs.)"""
    samples = []
    for _ in range(2):
        report = request_spread(client_ns(cluster.state), proto, target, count, concurrency=32)
        assert no_errors(report), report
        assert set(report["answers"]) == pods
        counts = [report["answers"][p] for p in sorted(pods)]
        assert sum(counts) == count
        samples.append(counts)
        if chisquare(counts).pvalue > 0.001:
            return
    raise AssertionError(f"not uniform in two independent samples: {samples}")


@modes()
@pytest.mark.parametrize("proto,target", [("tcp", f"{WEB_VIP}:80"), ("udp", f"{DNS_VIP}:53"),
                                          ("tcp", f"{DNS_VIP}:53")])
def test_backends_see_the_client_pod_address(cluster, proto, target):
    """Pod -> ClusterIP is DNAT only: with the cluster CIDR known, nothing is masqueraded."""
    state = cluster.state
    report = request_spread(client_ns(state, "client-1"), proto, target, 40)
    assert no_errors(report), report
    assert set(report["peers"]) == {pod_ip(state, "client-1")}


@modes()
def test_service_without_endpoints_rejects(cluster, manifests):
    """No endpoints: a reject, never a silent drop. connect() fails with ECONNREFUSED, from a
    TCP RST (eBPF) or an ICMP port unreachable (netfilter's REJECT, in both kube-proxy modes);
    UDP gets ICMP port unreachable. The kernel rate-limits the ICMP errors REJECT sends (a
    burst of six, then about one a second per client), so after the first ones a user of the
    kube-proxy modes sees timeouts: at least one reject, nothing else but timeouts."""
    edit_endpoints(manifests, "dns", lambda pod, e: False)
    cluster.wait_synced()
    # one client per protocol: the ICMP rate limit counts per destination
    for proto, client in (("tcp", "client-0"), ("udp", "client-1")):
        report = request_spread(client_ns(cluster.state, client), proto, f"{DNS_VIP}:53", 4,
                                concurrency=1, timeout=0.5)
        assert report["answers"] == {}, report
        assert report["errors"]["refused"] + report["errors"]["unreachable"] >= 1, report
        assert report["errors"]["other"] == 0, report
    # the other service is untouched
    assert request_spread(client_ns(cluster.state), "tcp", f"{WEB_VIP}:80", 30)["answers"].keys() == WEB


@modes()
def test_deleted_service_gets_no_answers(cluster, manifests):
    (manifests / "default-dns.service.yaml").unlink()
    cluster.wait_synced()
    ns = client_ns(cluster.state)
    for proto in ("udp", "tcp"):
        report = request_spread(ns, proto, f"{DNS_VIP}:53", 6, timeout=0.3)
        assert report["answers"] == {}, report
    assert sum(request_spread(ns, "tcp", f"{WEB_VIP}:80", 30)["answers"].values()) == 30


@modes()
def test_removed_endpoint_gets_no_new_connections(cluster, manifests):
    edit_endpoints(manifests, "web", lambda pod, e: pod != "web-2")
    cluster.wait_synced()
    report = request_spread(client_ns(cluster.state), "tcp", f"{WEB_VIP}:80", 300)
    assert no_errors(report), report
    assert set(report["answers"]) == {"web-0", "web-1"}


@modes()
def test_established_udp_flow_leaves_a_removed_endpoint(cluster, manifests):
    """The stale-UDP-conntrack bug: a flow whose endpoint is removed must move at its next
    packet, not keep reaching the old pod (kube-proxy deletes the conntrack entries)."""
    flow = UdpFlow(client_ns(cluster.state), (DNS_VIP, 53))
    try:
        first = wait_for(flow.ask, 5, what="a first answer on the UDP flow")
        assert all(flow.ask() == first for _ in range(5)), "a flow keeps its backend"
        edit_endpoints(manifests, "dns", lambda pod, e: pod != first)
        cluster.wait_synced()
        answers = [flow.ask() for _ in range(6)]
        (other,) = DNS - {first}
        assert answers == [other] * 6, f"after removing {first}: {answers}"
    finally:
        flow.close()


@modes()
def test_udp_flow_is_answered_once_endpoints_appear(cluster, manifests):
    """A UDP flow rejected while the service had no endpoints is answered, on the same socket,
    as soon as endpoints appear (no entry made meanwhile blackholes it)."""
    slice_file = manifests / "default-dns.endpointslice.yaml"
    with_endpoints = slice_file.read_text()
    edit_endpoints(manifests, "dns", lambda pod, e: False)
    cluster.wait_synced()
    flow = UdpFlow(client_ns(cluster.state), (DNS_VIP, 53))
    try:
        assert [flow.ask() for _ in range(3)] == [None] * 3
        write(slice_file, with_endpoints)
        cluster.wait_synced()
        assert flow.ask() in DNS
    finally:
        flow.close()


@modes()
def test_session_affinity_client_ip(cluster, manifests):
    """sessionAffinity ClientIP: every new connection from one client lands on one backend."""
    edit_service(manifests, "web", lambda spec: spec.update(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}}))
    cluster.wait_synced()
    for client in ("client-0", "client-1"):
        report = request_spread(client_ns(cluster.state, client), "tcp", f"{WEB_VIP}:80", 50,
                                concurrency=1)
        assert no_errors(report), report
        assert len(report["answers"]) == 1, f"{client}: {report['answers']}"


@modes()
def test_hairpin_is_masqueraded(cluster, manifests):
    """A pod reaching itself through its service gets an answer, from a masqueraded source (with
    its own address as source the pod would drop the packet as martian). kube-proxy masquerades
    to the node's address on the pod's link; the eBPF datapath to a link-local address."""
    edit_endpoints(manifests, "web", lambda pod, e: pod == "web-0")
    cluster.wait_synced()
    report = request_spread(cluster.state.pods["web-0"].ns, "tcp", f"{WEB_VIP}:80", 20, timeout=0.5)
    assert report["answers"] == {"web-0": 20}, report
    assert len(report["peers"]) == 1 and pod_ip(cluster.state, "web-0") not in report["peers"], report
    if cluster.name != "ebpf":
        assert set(report["peers"]) == {GATEWAY}, report["peers"]


@modes()
def test_terminating_endpoints_serve_only_when_none_is_ready(cluster, manifests):
    """KEP-1669: serving-but-terminating endpoints take traffic only if no endpoint is ready."""
    def terminating(e):
        e["conditions"] = {"ready": False, "serving": True, "terminating": True}

    edit_endpoints(manifests, "web", lambda pod, e: terminating(e) if pod != "web-0" else None)
    cluster.wait_synced()
    ns = client_ns(cluster.state)
    report = request_spread(ns, "tcp", f"{WEB_VIP}:80", 60)
    assert report["answers"] == {"web-0": 60}, report

    edit_endpoints(manifests, "web", lambda pod, e: e["conditions"].update(
        ready=False, serving=False, terminating=True) if pod == "web-0" else None)
    cluster.wait_synced()
    report = request_spread(ns, "tcp", f"{WEB_VIP}:80", 150)
    assert no_errors(report), report
    assert set(report["answers"]) == {"web-1", "web-2"}


@modes()
def test_internal_traffic_policy_local(cluster, manifests):
    """internalTrafficPolicy Local: only this node's endpoints; none here: dropped (a timeout),
    not rejected."""
    edit_service(manifests, "web", lambda spec: spec.update(internalTrafficPolicy="Local"))
    edit_endpoints(manifests, "web", lambda pod, e: e.update(
        nodeName=lab.NODE_NAME if pod == "web-0" else "other-node"))
    cluster.wait_synced()
    ns = client_ns(cluster.state)
    report = request_spread(ns, "tcp", f"{WEB_VIP}:80", 60)
    assert report["answers"] == {"web-0": 60}, report

    edit_endpoints(manifests, "web", lambda pod, e: e.update(nodeName="other-node"))
    cluster.wait_synced()
    report = request_spread(ns, "tcp", f"{WEB_VIP}:80", 4, timeout=0.5)
    assert report["answers"] == {} and report["errors"]["timeout"] == 4, report


@modes()
def test_external_ip(cluster, manifests):
    """externalIPs: the service answers there too, masqueraded (externalTrafficPolicy Cluster)."""
    edit_service(manifests, "web", lambda spec: spec.update(externalIPs=[EXTERNAL_IP]))
    cluster.wait_synced()
    report = request_spread(client_ns(cluster.state), "tcp", f"{EXTERNAL_IP}:80", 45, timeout=0.5)
    assert no_errors(report), report
    assert set(report["answers"]) == WEB
    assert set(report["peers"]) == {GATEWAY}


@modes()
def test_node_port_from_a_pod(cluster, manifests):
    """NodePort: node IP:nodePort reaches every endpoint, masqueraded (eTP Cluster)."""
    address = node_ip()

    def node_port(spec):
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = NODE_PORT
    edit_service(manifests, "web", node_port)
    cluster.wait_synced()
    report = request_spread(client_ns(cluster.state), "tcp", f"{address}:{NODE_PORT}", 45, timeout=0.5)
    assert no_errors(report), report
    assert set(report["answers"]) == WEB
    assert set(report["peers"]) == {GATEWAY}


@modes()
def test_node_port_local_policy_short_circuits_pod_traffic(cluster, manifests):
    """externalTrafficPolicy Local limits external clients to this node's endpoints, but a pod
    (a source in the cluster CIDR) reaching a NodePort is treated as in-cluster traffic: every
    endpoint, wherever it runs, and its own address kept."""
    address = node_ip()

    def local_node_port(spec):
        spec.update(type="NodePort", externalTrafficPolicy="Local")
        spec["ports"][0]["nodePort"] = NODE_PORT
    edit_service(manifests, "web", local_node_port)
    edit_endpoints(manifests, "web", lambda pod, e: e.update(
        nodeName=lab.NODE_NAME if pod == "web-0" else "other-node"))
    cluster.wait_synced()
    report = request_spread(client_ns(cluster.state), "tcp", f"{address}:{NODE_PORT}", 45, timeout=0.5)
    assert no_errors(report), report
    assert set(report["answers"]) == WEB
    assert set(report["peers"]) == {pod_ip(cluster.state, "client-0")}
