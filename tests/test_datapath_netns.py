"""The datapath as a datapath: the lab's pods in network namespaces, the agent following the
lab's manifests, real TCP and UDP through the ClusterIPs. Asserts what a user sees.

The node runs strict (nsutil.strict_node): rp_filter=1 on the pod links as kind sets it,
conntrack-INVALID packets dropped in FORWARD as kube-proxy's KUBE-FORWARD rule does, and
nf_conntrack_tcp_be_liberal off: a datapath that shows netfilter an inconsistent flow fails here."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from conftest import TEST_PIN_DIR, config_for_tests
from nsutil import socket_in, strict_node, wait_for
from scipy.stats import chisquare

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.lab import cluster as lab
from lbctl.lab.client import request_spread
from lbctl.model.desired import service_ports
from lbctl.sources.manifests import ManifestSource, load_manifests

pytestmark = [pytest.mark.root, pytest.mark.netns]

PREFIX = f"lbd{os.getpid() % 1000}"
AGENT_PIN_DIR = TEST_PIN_DIR + "-agent"


def lab_spec(prefix: str = PREFIX, octet: int = 200) -> lab.LabSpec:
    return lab.LabSpec(prefix=prefix, pod_cidr=f"10.244.{octet}.0/24", gateway=f"10.244.{octet}.1")


class RecordingAgent(Agent):
    """The agent, remembering the service ports of its last successful sync."""

    last_ports = None

    def sync_snapshot(self, snapshot):
        result = super().sync_snapshot(snapshot)
        if not result.errors:
            self.last_ports = service_ports(snapshot)
        return result


class RunningAgent:
    """`lbctl run` in a thread, restartable, on the lab's manifests."""

    def __init__(self, manifests: str, pin_dir: str, devices: tuple[str, ...]):
        self.cfg = config_for_tests(pin_dir=pin_dir, devices=devices)
        self.manifests = manifests
        self.agent = None

    def start(self) -> RunningAgent:
        self.stop_event = threading.Event()
        self.agent = RecordingAgent(ManifestSource(self.manifests, interval=0.1), self.cfg,
                                    AgentOptions(interval=0.1, detach_on_exit=False, link_rescan=0.5))
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,),
                                       kwargs={"max_seconds": 600}, daemon=True)
        self.thread.start()
        assert self.agent.synced.wait(30), "agent did not sync"
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)

    def last_ports(self):
        return self.agent.last_ports if self.agent else None

    def wait_synced_after(self, change) -> None:
        """Applies `change` (a manifest edit) and waits until the agent has synced it."""
        before = self.agent.syncs
        change()
        wait_for(lambda: self.agent.syncs > before, 10, what="a sync after the manifest change")

    def teardown(self) -> None:
        self.stop()
        EbpfMode.cleanup(self.cfg)   # filters, pins, names, mark table


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    manifests = tmp_path_factory.mktemp("manifests")
    state = lab.lab_up(lab_spec(), manifests)
    agent = None
    try:
        with strict_node(PREFIX, state.host_links(), state.spec.pod_cidr):
            agent = RunningAgent(str(manifests), AGENT_PIN_DIR, (f"veth{PREFIX}*",)).start()
            yield state, agent
    finally:
        if agent:
            agent.teardown()
        lab.lab_down(state.prefix)


@pytest.fixture
def manifests(cluster):
    """The manifest directory; whatever a test changes is restored afterwards."""
    state, agent = cluster
    path = Path(state.manifests_dir)
    saved = {p.name: p.read_text() for p in path.iterdir()}
    yield path
    def restore():
        for p in path.iterdir():
            if p.name not in saved:
                p.unlink()
        for name, text in saved.items():
            write_atomically(path / name, text)
    agent.wait_synced_after(restore)
    # Not just a sync after the change: the sync of exactly the restored manifests. The first
    # sync can be of a half-restored directory, and the next test then met a service without
    # its endpoints (test_restart_keeps_established_flows: ECONNREFUSED on the first request).
    expected = service_ports(load_manifests(path))
    wait_for(lambda: agent.last_ports() == expected, 10, what="the restored manifests synced")


def write_atomically(path: Path, text: str) -> None:
    """A hidden temporary file (which the source skips) renamed over the file: the agent never
    reads a truncated or half-written manifest (an empty EndpointSlice file is valid YAML with
    no endpoints: a service the agent then programs as rejecting)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def client_ns(state) -> str:
    return state.pods[state.clients[0]].ns


def pods_of(state, service: str) -> set[str]:
    return set(state.services[service].backends)


@pytest.mark.parametrize("proto,target,service", [
    ("tcp", "10.96.0.10:80", "default/web"),
    ("udp", "10.96.0.53:53", "default/dns"),
    ("tcp", "10.96.0.53:53", "default/dns"),
])
def test_every_backend_answers_through_the_cluster_ip(cluster, proto, target, service):
    state, _ = cluster
    report = request_spread(client_ns(state), proto, target, 300)
    assert sum(report["errors"].values()) == 0, report
    assert set(report["answers"]) == pods_of(state, service)
    # in-cluster traffic keeps its source address: backends see the client pod
    assert set(report["peers"]) == {state.pods[state.clients[0]].ip}


def test_netfilter_sees_one_flow_through_a_local_backend(cluster):
    """A local backend's replies are translated where netfilter has already seen them (egress
    of the client's link), so conntrack sees client -> backend and backend -> client: one flow,
    assured, on a node that drops INVALID packets. Translating them at ingress of the backend's
    link showed netfilter a VIP -> client SYN-ACK of no known flow: INVALID, dropped, and TCP
    through every local backend timed out."""
    import socket

    state, _ = cluster
    client = state.pods[state.clients[0]].ip
    sock = socket_in(client_ns(state), kind=socket.SOCK_STREAM)
    try:
        sock.settimeout(2)
        sock.connect(("10.96.0.10", 80))
        pod = sock.recv(200).decode().split()[0]
        sport = sock.getsockname()[1]
    finally:
        sock.close()
    flows = subprocess.run(["conntrack", "-L", "-p", "tcp", "--orig-src", client, "--sport", str(sport)],
                           capture_output=True, text=True).stdout
    assert f"dst={state.pods[pod].ip}" in flows and "dport=8080" in flows, flows
    assert "[ASSURED]" in flows and "UNREPLIED" not in flows, flows


def test_spread_over_three_backends_is_uniform(cluster):
    state, _ = cluster
    report = request_spread(client_ns(state), "tcp", "10.96.0.10:80", 3000, concurrency=32)
    assert sum(report["answers"].values()) == 3000, report
    counts = [report["answers"].get(p, 0) for p in sorted(pods_of(state, "default/web"))]
    assert chisquare(counts).pvalue > 0.001, counts


def edit_slice(path: Path, service: str, keep) -> None:
    f = path / f"default-{service}.endpointslice.yaml"
    doc = yaml.safe_load(f.read_text())
    doc["endpoints"] = [e for e in doc["endpoints"] if keep(e)]
    write_atomically(f, yaml.safe_dump(doc))


def test_removed_endpoint_gets_no_new_connections(cluster, manifests):
    state, agent = cluster
    agent.wait_synced_after(lambda: edit_slice(manifests, "web", lambda e: e["targetRef"]["name"] != "web-2"))
    report = request_spread(client_ns(state), "tcp", "10.96.0.10:80", 300)
    assert set(report["answers"]) == {"web-0", "web-1"}
    assert sum(report["answers"].values()) == 300


def test_deleted_service_makes_the_vip_unreachable(cluster, manifests):
    state, agent = cluster
    agent.wait_synced_after(lambda: (manifests / "default-dns.service.yaml").unlink())
    for proto in ("udp", "tcp"):
        report = request_spread(client_ns(state), proto, "10.96.0.53:53", 20, timeout=0.3)
        assert report["answers"] == {}, report
    # the other service is untouched
    assert sum(request_spread(client_ns(state), "tcp", "10.96.0.10:80", 50)["answers"].values()) == 50


def test_service_without_endpoints_rejects(cluster, manifests):
    state, agent = cluster
    agent.wait_synced_after(lambda: edit_slice(manifests, "dns", lambda e: False))
    tcp = request_spread(client_ns(state), "tcp", "10.96.0.53:53", 20, timeout=1)
    assert tcp["errors"]["refused"] == 20, tcp            # TCP RST, as kube-proxy's REJECT
    udp = request_spread(client_ns(state), "udp", "10.96.0.53:53", 20, timeout=1)
    assert udp["errors"]["refused"] + udp["errors"]["unreachable"] == 20, udp  # ICMP port unreachable


def test_bad_manifest_is_reported_and_the_rest_stays_programmed(cluster, manifests, caplog):
    state, agent = cluster
    caplog.set_level(logging.ERROR, logger="lbctl.agent.loop")
    agent.wait_synced_after(lambda: (manifests / "broken.yaml").write_text("kind: Service\nmetadata: [\n"))
    assert any("broken.yaml" in r.getMessage() for r in caplog.records), caplog.text
    assert agent.thread.is_alive()
    # a typo in the file of a programmed service keeps the service as it was
    agent.wait_synced_after(lambda: (manifests / "default-web.endpointslice.yaml").write_text("endpoints: [\n"))
    report = request_spread(client_ns(state), "tcp", "10.96.0.10:80", 60)
    assert sum(report["answers"].values()) == 60
    assert set(report["answers"]) == pods_of(state, "default/web")


def test_restart_keeps_established_flows(cluster):
    state, agent = cluster
    sock = socket_in(client_ns(state))
    try:
        sock.settimeout(2)
        sock.connect(("10.96.0.53", 53))
        def ask():
            sock.send(b"?")
            return sock.recv(200).decode().split()[0]
        first = ask()
        assert all(ask() == first for _ in range(5))
        agent.stop()
        assert ask() == first, "the datapath keeps serving while the agent is down"
        agent.start()
        assert agent.agent.mode.reconciler.services, "state restored from the pinned maps"
        assert all(ask() == first for _ in range(10)), "the flow kept its backend across the restart"
    finally:
        sock.close()


def test_new_links_are_attached_and_vanished_ones_forgotten(cluster):
    _, agent = cluster
    name, peer = f"veth{PREFIX}x", f"veth{PREFIX}y"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        def attached():
            out = subprocess.run(["tc", "filter", "show", "dev", name, "ingress"],
                                 capture_output=True, text=True).stdout
            return agent.cfg.tc_name in out
        wait_for(attached, 10, what=f"filter on {name}")
        assert any(n == peer for n in agent.agent.mode.attached.values())
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
    wait_for(lambda: name not in agent.agent.mode.attached.values(), 10, what=f"{name} forgotten")


def test_dump_maps_from_another_process(cluster):
    state, agent = cluster
    request_spread(client_ns(state), "tcp", "10.96.0.10:80", 30)
    out = subprocess.run([shutil.which("lbctl") or os.path.join(os.path.dirname(os.sys.executable), "lbctl"),
                          "dump", "maps", "--json", "--pin-dir", AGENT_PIN_DIR],
                         capture_output=True, text=True, check=True).stdout
    import json
    data = json.loads(out)
    web = next(s for s in data["services"] if s["name"] == "default/web:http")
    assert web["frontend"] == "10.96.0.10:80/TCP" and web["count"] == 3
    assert web["flows"] >= 30
    assert sorted(b["address"] for b in web["backends"]) == sorted(
        f"{state.pods[p].ip}:8080/TCP" for p in pods_of(state, "default/web"))


def test_teardown_leaves_nothing_behind(tmp_path):
    prefix, pin_dir = f"lbz{os.getpid() % 1000}", TEST_PIN_DIR + "-z"
    state = lab.lab_up(lab_spec(prefix, 201), tmp_path / "m")
    try:
        with strict_node(prefix, state.host_links(), state.spec.pod_cidr):
            agent = RunningAgent(str(tmp_path / "m"), pin_dir, (f"veth{prefix}*",)).start()
            assert request_spread(client_ns(state), "tcp", "10.96.0.10:80", 20)["answers"]
            agent.stop()
        assert os.path.exists(pin_dir)
        EbpfMode.cleanup(agent.cfg)   # filters, pins, names, mark table
    finally:
        lab.lab_down(prefix)
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"veth{prefix}" not in links
    filters = subprocess.run("for d in $(ls /sys/class/net); do tc filter show dev $d ingress; done",
                             shell=True, capture_output=True, text=True).stdout
    assert agent.cfg.tc_name not in filters
    assert not os.path.exists(pin_dir)
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert f"lbctl-test-invalid-drop:{prefix}" not in rules
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert f"lbctl-{os.path.basename(pin_dir)}" not in tables.split()


def test_hairpin_a_pod_reaches_itself_through_its_service(cluster):
    state, _ = cluster
    pod = state.pods["web-0"]
    report = request_spread(pod.ns, "tcp", "10.96.0.10:80", 150)
    assert sum(report["errors"].values()) == 0, report
    assert "web-0" in report["answers"], report
    # answers from the pod itself came from the hairpin address, the others from its own IP
    assert set(report["peers"]) == {"169.254.42.1", pod.ip}, report


def test_trace_names_the_backend_of_a_tracked_flow(cluster):
    """`lbctl trace` on the agent's live maps: the datapath's own code says where a packet goes."""
    from lbctl.datapath.ebpf import trace as tr

    state, agent = cluster
    sock = socket_in(client_ns(state))
    try:
        sock.settimeout(2)
        sock.bind(("0.0.0.0", 0))
        sock.connect(("10.96.0.53", 53))
        sock.send(b"?")
        pod = sock.recv(200).decode().split()[0]
        port = sock.getsockname()[1]
    finally:
        sock.close()
    client = state.pods[state.clients[0]].ip
    with tr.Tracer(AGENT_PIN_DIR) as tracer:
        hit = tracer.trace(tr.Packet(client, port, "10.96.0.53", 53, "udp", ""))
        assert hit.service == "default/dns:dns" and hit.decision == "conntrack_hit", hit.lines()
        assert hit.backend == f"{state.pods[pod].ip}:5353" and hit.output.dst == state.pods[pod].ip
        reply = tracer.trace(tr.Packet(state.pods[pod].ip, 5353, client, port, "udp", ""))
        assert reply.decision == "revnat" and reply.output.src == "10.96.0.53", reply.lines()
        new = tracer.trace(tr.Packet(client, 1, "10.96.0.10", 80, "tcp", "S"))
        assert new.decision == "new_flow" and new.steps[0].count == 3
        assert tracer.trace(tr.Packet(client, 1, "10.244.9.9", 80, "tcp", "S")).decision == "pass"


def test_replies_that_bypass_the_backend_link_are_translated_at_the_client(tmp_path):
    """A backend on another node replies through the uplink, not through a link lbctl watches:
    the reply is translated at egress of the client's link. Here, only the client links are
    attached, so no backend link sees the replies."""
    prefix, pin_dir = f"lby{os.getpid() % 1000}", TEST_PIN_DIR + "-y"
    state = lab.lab_up(lab_spec(prefix, 202), tmp_path / "m")
    agent = None
    try:
        clients = tuple(state.pods[c].host_link for c in state.clients)
        with strict_node(prefix, state.host_links(), state.spec.pod_cidr):
            agent = RunningAgent(str(tmp_path / "m"), pin_dir, clients).start()
            assert set(agent.agent.mode.attached.values()) == set(clients)
            for proto, target, service in (("tcp", "10.96.0.10:80", "default/web"),
                                           ("udp", "10.96.0.53:53", "default/dns")):
                report = request_spread(client_ns(state), proto, target, 60)
                assert sum(report["errors"].values()) == 0, report
                assert set(report["answers"]) == pods_of(state, service)
    finally:
        if agent:
            agent.teardown()
        lab.lab_down(prefix)


def test_an_unexpected_error_in_a_turn_is_logged_and_the_agent_goes_on(cluster, caplog):
    state, agent = cluster
    original = agent.agent.source.poll
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return original()

    agent.agent.source.poll = broken
    try:
        wait_for(lambda: len(calls) > 2, 10, what="the loop going on")
    finally:
        agent.agent.source.poll = original
    assert agent.thread.is_alive()
    assert "boom" in caplog.text
    assert sum(request_spread(client_ns(state), "tcp", "10.96.0.10:80", 30)["answers"].values()) == 30


def tc_filters(link: str, parent: str = "ingress") -> str:
    return subprocess.run(["tc", "filter", "show", "dev", link, parent], capture_output=True, text=True).stdout


def test_filters_removed_behind_our_back_come_back(cluster):
    state, agent = cluster
    link = state.pods["web-1"].host_link
    subprocess.run(["tc", "filter", "del", "dev", link, "ingress"], check=True)
    assert agent.cfg.tc_name not in tc_filters(link)
    wait_for(lambda: agent.cfg.tc_name in tc_filters(link), 10, what=f"filter back on {link}")
    assert sum(request_spread(client_ns(state), "tcp", "10.96.0.10:80", 30)["answers"].values()) == 30


def test_a_restart_with_other_devices_leaves_the_links_that_no_longer_match(cluster):
    state, agent = cluster
    agent.stop()
    keep = state.pods["web-0"].host_link
    devices = agent.cfg.devices
    agent.cfg = dataclasses.replace(agent.cfg, devices=(keep,))
    try:
        agent.start()
        assert set(agent.agent.mode.attached.values()) == {keep}
        others = [p.host_link for name, p in state.pods.items() if p.host_link != keep]
        assert all(agent.cfg.tc_name not in tc_filters(link) for link in others)
        assert agent.cfg.tc_name in tc_filters(keep, "egress")
    finally:
        agent.stop()
        agent.cfg = dataclasses.replace(agent.cfg, devices=devices)
        agent.start()
