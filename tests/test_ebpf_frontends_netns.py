"""NodePort, LoadBalancer and their marks through the real datapath, as root, in a netns lab.

The root namespace is the node: the lab's pods hang off it on veths (pod links), and an outside
client namespace sits behind an uplink (a veth whose node end carries the node IP), as the host
behind kind's extraPortMappings. The agent attaches the pod programs to the pod links and XDP
plus the uplink's tc programs to the uplink. Asserted: which backends answer and the source they
see (masqueraded to the node for eTP Cluster, the client's own for eTP Local), drops where
kube-proxy drops (eTP Local without a local endpoint, a source outside
loadBalancerSourceRanges) with their counters, the two netfilter rules' counters, `dump`'s
report of it all, and that nothing is left behind. The node runs strict (nsutil.strict_node).
"""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from conftest import TEST_PIN_DIR, config_for_tests
from nsutil import forget_conntrack, strict_node, wait_for

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf import dump, rules
from lbctl.datapath.ebpf.mode import EbpfMode, ProxySettings
from lbctl.lab import cluster as lab
from lbctl.lab.client import request_spread
from lbctl.model.desired import service_ports
from lbctl.sources.manifests import ManifestSource, load_manifests

pytestmark = [pytest.mark.root, pytest.mark.netns]

PREFIX = f"lbf{os.getpid() % 1000}"
PIN_DIR = TEST_PIN_DIR + "-frontends"
POD_CIDR, GATEWAY = "10.244.221.0/24", "10.244.221.1"
UPLINK, OUTSIDE = f"{PREFIX}up", f"{PREFIX}out"
NODE_IP, CLIENT_IP = "192.168.221.1", "192.168.221.2"
LB_IP = "198.18.221.10"
NODE_PORT, DNS_NODE_PORT = 30081, 30053
SERVICES = (
    lab.ServiceSpec("default", "web", "10.96.221.10", (lab.PortSpec("http", 80, "TCP", 8080),),
                    ("web-0", "web-1", "web-2")),
    lab.ServiceSpec("default", "dns", "10.96.221.53", (lab.PortSpec("dns", 53, "UDP", 5353),),
                    ("dns-0", "dns-1")),
)
WEB = {"web-0", "web-1", "web-2"}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def outside_up() -> None:
    """The outside client: a namespace behind the uplink, routed to everything via the node."""
    sh("ip", "netns", "add", OUTSIDE)
    sh("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", OUTSIDE)
    sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", UPLINK)
    sh("ip", "link", "set", UPLINK, "up")
    inside = ["ip", "netns", "exec", OUTSIDE]
    sh(*inside, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    sh(*inside, "ip", "link", "set", "eth0", "up")
    sh(*inside, "ip", "link", "set", "lo", "up")
    sh(*inside, "ip", "route", "add", "default", "via", NODE_IP)


def outside_down() -> None:
    sh("ip", "link", "del", UPLINK, check=False)
    sh("ip", "netns", "del", OUTSIDE, check=False)


class RecordingAgent(Agent):
    """The agent, remembering what it last synced and whether that sync succeeded."""

    last_ports = None
    last_ok = False

    def sync_snapshot(self, snapshot):
        result = super().sync_snapshot(snapshot)
        self.last_ports, self.last_ok = service_ports(snapshot), not result.errors
        return result


class Running:
    """The agent in a thread, with pod links, the uplink and the cluster's settings; it
    resyncs every second (the mark rules' repair is part of the resync)."""

    def __init__(self, manifests: Path):
        self.manifests = manifests
        cfg = config_for_tests(pin_dir=PIN_DIR, devices=(f"veth{PREFIX}*",), uplink_devices=(UPLINK,),
                               node_name=lab.NODE_NAME)
        self.mode = EbpfMode(cfg, switch_modes=False,
                             settings=ProxySettings(node_ips=(NODE_IP,), cluster_cidr="10.244.0.0/16"))
        self.stop_event = threading.Event()
        self.agent = RecordingAgent(ManifestSource(manifests, interval=0.05), mode=self.mode,
                                    options=AgentOptions(interval=0.05, detach_on_exit=True, sync_period=1.0))
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,),
                                       kwargs={"max_seconds": 600}, daemon=True)

    def start(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.agent.synced.is_set() or not self.thread.is_alive(), 60, what="the first sync")
        assert self.thread.is_alive(), "the agent stopped (see the log)"
        return self

    def wait_synced(self) -> None:
        expected = service_ports(load_manifests(self.manifests))
        wait_for(lambda: self.agent.last_ok and self.agent.last_ports == expected
                 and not self.mode.needs_retry, 10, what="the agent to sync the manifests")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    spec = lab.LabSpec(prefix=PREFIX, pod_cidr=POD_CIDR, gateway=GATEWAY, service_cidr="10.96.221.0/24",
                       services=SERVICES)
    state = lab.lab_up(spec, tmp_path_factory.mktemp("frontend-manifests"))
    running = None
    try:
        outside_up()
        with strict_node(PREFIX, state.host_links(), POD_CIDR):
            running = Running(Path(state.manifests_dir)).start()
            yield state, running
            running.stop()
            running = None
            assert_nothing_left()
    finally:
        if running is not None:
            running.stop()
        EbpfMode.cleanup(config_for_tests(pin_dir=PIN_DIR))
        outside_down()
        lab.lab_down(PREFIX)
        forget_conntrack("192.168.221.0/24")


def assert_nothing_left() -> None:
    """The agent detached on exit: no pin, no tc filter or XDP program, no nft table, no names."""
    assert not os.path.exists(PIN_DIR)
    assert not os.path.exists(dump.state_file(PIN_DIR))
    link = sh("ip", "-d", "link", "show", UPLINK).stdout
    assert "xdp" not in link, link
    assert "lbctl" not in sh("tc", "filter", "show", "dev", UPLINK, "ingress").stdout
    assert sh("nft", "list", "table", "ip", rules.table_name(PIN_DIR), check=False).returncode != 0


@pytest.fixture
def manifests(node):
    state, running = node
    path = Path(state.manifests_dir)
    saved = {p.name: p.read_text() for p in path.iterdir()}
    yield path
    for name, text in saved.items():
        write(path / name, text)
    running.wait_synced()


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def edit(path: Path, change) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    write(path, yaml.safe_dump(doc, sort_keys=False))


def web_node_port(spec, **more) -> None:
    spec.update(type="NodePort", **more)
    spec["ports"][0]["nodePort"] = NODE_PORT


def set_nodes(manifests: Path, name: str, local: set[str]) -> None:
    def change(doc):
        for e in doc["endpoints"]:
            e["nodeName"] = lab.NODE_NAME if e["targetRef"]["name"] in local else "other-node"
    edit(manifests / f"default-{name}.endpointslice.yaml", change)


def counters(running: Running) -> dict:
    return running.mode.dump()["counters"]


def nft_counter(which: str) -> int:
    found = rules.read_counters(rules.table_name(PIN_DIR))
    assert found is not None, "the mark rules are not installed"
    return found[which]["packets"]


# --- the scenarios --------------------------------------------------------------------------------


def test_uplink_gets_xdp_and_pod_links_tc_as_dump_shows(node):
    state, running = node
    (name, how), = running.mode.uplinks.values()
    assert (name, how) == (UPLINK, "xdp-native"), "veth takes native XDP"
    attached = running.mode.dump()["attachments"]["links"]
    roles = {link["link"]: (link["role"], link["mode"]) for link in attached}
    assert roles[UPLINK] == ("uplink", "xdp-native"), attached[0]["tc"]
    assert all(roles[link] == ("pod", "tc") for link in state.host_links())
    assert rules.rule_count(rules.table_name(PIN_DIR)) == 2


def test_node_port_from_outside_reaches_every_endpoint_masqueraded(node, manifests):
    """eTP Cluster: any endpoint, the client masqueraded to the node (the reply comes back
    through it), TCP and UDP, marked by the datapath and masqueraded by the one nft rule."""
    _, running = node
    edit(manifests / "default-web.service.yaml", lambda doc: web_node_port(doc["spec"]))
    def dns(doc):
        doc["spec"]["type"] = "NodePort"
        doc["spec"]["ports"][0]["nodePort"] = DNS_NODE_PORT
    edit(manifests / "default-dns.service.yaml", dns)
    running.wait_synced()
    masqueraded = nft_counter("masquerade")
    report = request_spread(OUTSIDE, "tcp", f"{NODE_IP}:{NODE_PORT}", 45, timeout=1)
    assert sum(report["errors"].values()) == 0, report
    assert set(report["answers"]) == WEB
    assert set(report["peers"]) == {GATEWAY}, "masqueraded to the node's address"
    report = request_spread(OUTSIDE, "udp", f"{NODE_IP}:{DNS_NODE_PORT}", 30, timeout=1)
    assert sum(report["errors"].values()) == 0, report
    assert set(report["answers"]) == {"dns-0", "dns-1"} and set(report["peers"]) == {GATEWAY}
    assert nft_counter("masquerade") >= masqueraded + 75, "each new flow passed the masquerade rule"
    assert counters(running)["masquerade"] > 0


def test_node_port_from_a_pod(node, manifests):
    state, running = node
    edit(manifests / "default-web.service.yaml", lambda doc: web_node_port(doc["spec"]))
    running.wait_synced()
    report = request_spread(state.pods["client-0"].ns, "tcp", f"{NODE_IP}:{NODE_PORT}", 45, timeout=1)
    assert sum(report["errors"].values()) == 0, report
    assert set(report["answers"]) == WEB and set(report["peers"]) == {GATEWAY}


def test_external_traffic_policy_local_keeps_the_client_and_drops_without_a_local_endpoint(node, manifests):
    state, running = node
    edit(manifests / "default-web.service.yaml",
         lambda doc: web_node_port(doc["spec"], externalTrafficPolicy="Local"))
    set_nodes(manifests, "web", {"web-0"})
    running.wait_synced()
    report = request_spread(OUTSIDE, "tcp", f"{NODE_IP}:{NODE_PORT}", 20, timeout=1)
    assert report["answers"] == {"web-0": 20}, report
    assert set(report["peers"]) == {CLIENT_IP}, "the client's own address"
    # from a pod: in-cluster traffic, every endpoint, its own address
    report = request_spread(state.pods["client-0"].ns, "tcp", f"{NODE_IP}:{NODE_PORT}", 30, timeout=1)
    assert set(report["answers"]) == WEB and set(report["peers"]) == {state.pods["client-0"].ip}
    set_nodes(manifests, "web", set())
    running.wait_synced()
    dropped, nft_dropped = counters(running)["drop_etp_local"], nft_counter("drop")
    report = request_spread(OUTSIDE, "tcp", f"{NODE_IP}:{NODE_PORT}", 3, timeout=0.5)
    assert report["answers"] == {} and report["errors"]["timeout"] == 3, report
    assert counters(running)["drop_etp_local"] >= dropped + 3
    assert nft_counter("drop") >= nft_dropped + 3, "dropped by the one nft rule"


def test_load_balancer_source_ranges_admit_and_drop(node, manifests):
    _, running = node

    def lb(doc, ranges):
        doc["spec"].update(type="LoadBalancer", loadBalancerSourceRanges=ranges)
        doc["spec"]["ports"][0]["nodePort"] = NODE_PORT
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    edit(manifests / "default-web.service.yaml", lambda doc: lb(doc, [f"{CLIENT_IP}/32"]))
    running.wait_synced()
    report = request_spread(OUTSIDE, "tcp", f"{LB_IP}:80", 30, timeout=1)
    assert sum(report["errors"].values()) == 0 and set(report["answers"]) == WEB, report
    (row,) = [s for s in running.mode.dump()["services"] if s["type"] == "LoadBalancer"]
    assert row["frontend"] == f"{LB_IP}:80/TCP" and row["source_ranges"] == [f"{CLIENT_IP}/32"]
    edit(manifests / "default-web.service.yaml", lambda doc: lb(doc, ["203.0.113.0/24"]))
    running.wait_synced()
    dropped = counters(running)["drop_source_range"]
    report = request_spread(OUTSIDE, "tcp", f"{LB_IP}:80", 3, timeout=0.5)
    assert report["answers"] == {} and report["errors"]["timeout"] == 3, report
    assert counters(running)["drop_source_range"] >= dropped + 3
    # NodePorts are never subject to loadBalancerSourceRanges
    report = request_spread(OUTSIDE, "tcp", f"{NODE_IP}:{NODE_PORT}", 15, timeout=1)
    assert sum(report["errors"].values()) == 0, report


def test_resync_puts_back_the_mark_rules_someone_removed(node):
    _, running = node
    table = rules.table_name(PIN_DIR)
    sh("nft", "delete", "table", "ip", table)
    wait_for(lambda: rules.rule_count(table) == 2, 10, what="the resync to install the rules again")
    table_text = dump.format_table(running.mode.dump())
    assert f"netfilter (nft table ip {table}): masquerade rule" in table_text
    assert f"link {UPLINK} (uplink): xdp-native" in table_text
