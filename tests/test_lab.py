"""lbctl lab: pods in network namespaces, backends that name themselves, manifests, clean teardown.

No load balancer is involved here: clients reach backends by pod IP. The root tests build real labs
with prefixes and pod CIDRs of their own, and check that lab_down leaves no namespace, link,
process, route or file behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nsutil import wait_for

from lbctl.lab import cluster as lab
from lbctl.lab import netns
from lbctl.lab.client import request_spread

needs_root = [
    pytest.mark.root,
    pytest.mark.netns,
]


def spec_for_test(tag: int) -> lab.LabSpec:
    """A default lab under a prefix and pod CIDR of this test process, to not meet other labs."""
    third_octet = 100 + 2 * (os.getpid() % 40) + tag       # 10.244.100-179: the datapath tests
                                                              # use 200 and up
    return lab.LabSpec(prefix=f"lbt{os.getpid() % 100000}{tag}",
                       pod_cidr=f"10.244.{third_octet}.0/24", gateway=f"10.244.{third_octet}.1")


# --- without root: planning and manifests ----------------------------------------------------


def test_default_spec_plans_pods_in_order():
    pods = lab.plan_pods(lab.default_spec())
    assert [(p.name, p.ip, p.ns, p.host_link) for p in pods.values()] == [
        ("client-0", "10.244.0.2", "lbctl-client-0", "vethlbctl0"),
        ("client-1", "10.244.0.3", "lbctl-client-1", "vethlbctl1"),
        ("web-0", "10.244.0.4", "lbctl-web-0", "vethlbctl2"),
        ("web-1", "10.244.0.5", "lbctl-web-1", "vethlbctl3"),
        ("web-2", "10.244.0.6", "lbctl-web-2", "vethlbctl4"),
        ("dns-0", "10.244.0.7", "lbctl-dns-0", "vethlbctl5"),
        ("dns-1", "10.244.0.8", "lbctl-dns-1", "vethlbctl6"),
    ]
    assert lab.served_ports(lab.default_spec(), "dns-0") == {"tcp": [5353], "udp": [5353]}
    assert lab.served_ports(lab.default_spec(), "client-0") == {"tcp": [], "udp": []}


@pytest.mark.parametrize("spec, message", [
    (lab.LabSpec(prefix="muchtoolong"), "too long"),
    (lab.LabSpec(prefix="Lab_1"), "lower-case"),
    (lab.LabSpec(gateway="10.245.0.1"), "not in pod CIDR"),
    (lab.LabSpec(service_cidr="10.97.0.0/16"), "not in service CIDR"),
])
def test_bad_spec_is_refused_with_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.validate()


def test_manifests_describe_services_and_endpoints():
    spec = lab.default_spec()
    state = lab.LabState(spec=spec, pods=lab.plan_pods(spec), manifests_dir="/nonexistent")
    files = lab.render_manifests(state)
    assert sorted(files) == ["default-dns.endpointslice.yaml", "default-dns.service.yaml",
                             "default-web.endpointslice.yaml", "default-web.service.yaml"]
    dns = yaml.safe_load(yaml.safe_dump(files["default-dns.service.yaml"]))
    assert dns["spec"]["clusterIP"] == "10.96.0.53"
    assert dns["spec"]["ports"] == [
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353},
    ]
    web = files["default-web.endpointslice.yaml"]
    assert web["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    assert web["addressType"] == "IPv4"
    assert web["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [e["addresses"] for e in web["endpoints"]] == [["10.244.0.4"], ["10.244.0.5"],
                                                         ["10.244.0.6"]]
    assert web["endpoints"][0]["conditions"] == {"ready": True, "serving": True,
                                                 "terminating": False}
    assert web["endpoints"][0]["nodeName"] == "lab-node"
    assert web["endpoints"][0]["targetRef"] == {"kind": "Pod", "namespace": "default",
                                                "name": "web-0"}


# --- with root: a real lab -------------------------------------------------------------------


def link_names() -> set[str]:
    out = netns.run(["ip", "-o", "link"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def lab_pids(state: lab.LabState) -> list[int]:
    """The labservers and every other process inside the lab's namespaces, right now."""
    pids = set(state.made.servers.values())
    for ns in state.namespaces():
        pids.update(netns.netns_pids(ns))
    return sorted(pids)


def assert_nothing_left(state: lab.LabState, pids: list[int], ip_forward_before: str) -> None:
    left_ns = set(state.namespaces()) & set(netns.list_netns())
    left_links = set(state.host_links()) & link_names()
    assert not left_ns, f"namespaces left: {left_ns}"
    assert not left_links, f"links left: {left_links}"
    assert not [pid for pid in pids if netns.pid_alive(pid)], "processes left"
    assert not state.path.exists(), f"state file left: {state.path}"
    assert not lab.work_dir(state.prefix).exists()
    assert f"unreachable {state.spec.pod_cidr}" not in netns.run(["ip", "route"]).stdout
    if not lab.other_labs(state.prefix):     # else the last lab to go down restores it
        assert netns.IP_FORWARD.read_text().strip() == ip_forward_before


@pytest.fixture(scope="module")
def lab_state(tmp_path_factory):
    spec = spec_for_test(0)
    manifests = tmp_path_factory.mktemp("lab") / "manifests"    # lab_up creates it
    ip_forward_before = netns.IP_FORWARD.read_text().strip()
    state = lab.lab_up(spec, manifests)
    try:
        yield state
    finally:
        pids = lab_pids(state)
        assert lab.lab_down(spec.prefix) is True
        assert not manifests.exists()
        assert_nothing_left(state, pids, ip_forward_before)


class TestLab:
    pytestmark = needs_root

    def test_namespaces_links_and_servers_exist(self, lab_state):
        assert set(lab_state.namespaces()) <= set(netns.list_netns())
        assert set(lab_state.host_links()) <= link_names()
        for link in lab_state.host_links():
            assert link.startswith("veth") and len(link) <= 15
            assert Path(f"/sys/class/net/{link}/operstate").read_text().strip() == "up"
            addrs = netns.ip("-o", "-4", "addr", "show", "dev", link).stdout
            assert f"{lab_state.spec.gateway}/32" in addrs
        assert sorted(lab_state.made.servers) == ["dns-0", "dns-1", "web-0", "web-1", "web-2"]
        assert all(netns.pid_alive(pid) for pid in lab_state.made.servers.values())
        assert lab.LabState.load(lab_state.prefix) == lab_state
        routes = netns.ip("route").stdout
        assert f"unreachable {lab_state.spec.service_cidr}" in routes
        assert netns.IP_FORWARD.read_text().strip() == "1"

    def test_pod_addressing_is_ptp(self, lab_state):
        pod = lab_state.pods["client-0"]
        assert netns.ip("-o", "-4", "addr", "show", "dev", "eth0", ns=pod.ns).stdout.split()[3] \
            == f"{pod.ip}/32"
        routes = netns.ip("route", ns=pod.ns).stdout
        assert f"default via {pod.gateway} dev eth0" in routes
        assert f"{pod.gateway} dev eth0 scope link" in routes
        assert f"{pod.ip} dev {pod.host_link} scope link" in netns.ip("route").stdout

    def test_manifests_written(self, lab_state):
        docs = {p.name: yaml.safe_load(p.read_text())
                for p in Path(lab_state.manifests_dir).glob("*.yaml")}
        assert sorted((d["kind"], d["metadata"]["name"]) for d in docs.values()) == [
            ("EndpointSlice", "dns-lab"), ("EndpointSlice", "web-lab"),
            ("Service", "dns"), ("Service", "web")]
        web = docs["default-web.endpointslice.yaml"]
        assert [e["addresses"][0] for e in web["endpoints"]] == lab_state.backend_ips("default/web")
        assert docs["default-web.service.yaml"]["spec"]["clusterIP"] == "10.96.0.10"

    @pytest.mark.parametrize("client", ["client-0", "client-1"])
    def test_client_reaches_every_backend_by_pod_ip(self, lab_state, client):
        me = lab_state.pods[client]
        for name in lab_state.made.servers:
            for proto, ports in lab.served_ports(lab_state.spec, name).items():
                for port in ports:
                    target = f"{lab_state.pods[name].ip}:{port}"
                    report = request_spread(me.ns, proto, target, 3)
                    assert report["answers"] == {name: 3}, (proto, target, report)
                    assert report["peers"] == {me.ip: 3}, (proto, target, report)
                    assert sum(report["errors"].values()) == 0

    def test_300_tcp_connections_to_one_pod(self, lab_state):
        web0 = lab_state.pods["web-0"]
        report = request_spread(lab_state.pods["client-1"].ns, "tcp", f"{web0.ip}:8080", 300,
                                concurrency=8)
        assert report["answers"] == {"web-0": 300}
        assert report["sent"] == 300 and sum(report["errors"].values()) == 0

    def test_errors_are_counted_not_raised(self, lab_state):
        client, web0 = lab_state.pods["client-0"], lab_state.pods["web-0"]
        tcp = request_spread(client.ns, "tcp", f"{web0.ip}:9", 5)       # RST
        udp = request_spread(client.ns, "udp", f"{web0.ip}:9", 5, timeout=0.3)
        assert (tcp["answers"], tcp["errors"]["refused"]) == ({}, 5)
        # ICMP port unreachable; the kernel rate-limits ICMP errors (net.ipv4.icmp_ratelimit),
        # so a request the limit swallowed times out instead
        assert udp["answers"] == {} and udp["errors"]["unreachable"] >= 1
        assert udp["errors"]["unreachable"] + udp["errors"]["timeout"] == 5

    def test_the_root_namespace_is_the_one_node_on_the_lab_network(self, lab_state):
        """One node: the root namespace, its node address on the bridge, which the outside
        client reaches (a RST from port 9)."""
        node = lab_state.node()
        assert node.ns is None and node.uplink == lab_state.bridge
        assert f"{node.ip}/24" in netns.ip("-o", "-4", "addr", "show", "dev", lab_state.bridge).stdout
        report = request_spread(lab_state.outside_ns, "tcp", f"{node.ip}:9", 2)
        assert report["errors"]["refused"] == 2, report

    def test_unused_pod_ip_does_not_leave_the_node(self, lab_state):
        """The node answers with ICMP host unreachable (rate limited: the rest time out)."""
        unused = lab_state.pods["client-0"].ip.rsplit(".", 1)[0] + ".250"
        report = request_spread(lab_state.pods["client-0"].ns, "tcp", f"{unused}:80", 3,
                                timeout=0.5)
        assert report["answers"] == {}
        assert report["errors"]["unreachable"] >= 1
        assert report["errors"]["unreachable"] + report["errors"]["timeout"] == 3


class TestLifecycle:
    pytestmark = needs_root

    def test_up_twice_replaces_and_down_from_another_process_leaves_nothing(self, tmp_path):
        spec = spec_for_test(1)
        ip_forward_before = netns.IP_FORWARD.read_text().strip()
        try:
            first = lab.lab_up(spec, tmp_path)
            first_pids = list(first.made.servers.values())
            state = lab.lab_up(spec, tmp_path)            # same prefix: torn down, rebuilt
            assert not any(netns.pid_alive(pid) for pid in first_pids)
            pids = lab_pids(state)
            assert len(pids) == 5 and all(netns.pid_alive(pid) for pid in pids)

            subprocess.run([sys.executable, "-c", "import sys; from lbctl.lab.cluster import lab_down; "
                            "sys.exit(0 if lab_down(sys.argv[1]) else 3)", spec.prefix],
                           check=True, timeout=60, env=netns.python_env())
            for pid in pids:
                netns.reap(pid)                 # they were our children: collect the zombies
            assert_nothing_left(state, pids, ip_forward_before)
            assert tmp_path.is_dir() and not list(tmp_path.iterdir())   # not ours: kept, emptied
            assert lab.lab_down(spec.prefix) is False                   # idempotent
        finally:
            lab.lab_down(spec.prefix)

    def test_failed_up_removes_what_it_made(self, monkeypatch, tmp_path):
        spec = spec_for_test(1)
        started: list[int] = []
        real_start = lab.start_server

        def start_then_fail(state, pod):
            if started:
                raise OSError("injected failure")
            started.append(real_start(state, pod))
            return started[-1]

        monkeypatch.setattr(lab, "start_server", start_then_fail)
        ip_forward_before = netns.IP_FORWARD.read_text().strip()
        try:
            with pytest.raises(lab.LabError, match="did not come up: injected failure"):
                lab.lab_up(spec, tmp_path / "manifests")
            state = lab.LabState(spec=spec, pods=lab.plan_pods(spec), manifests_dir="")
            assert_nothing_left(state, started, ip_forward_before)
            assert not (tmp_path / "manifests").exists()
        finally:
            lab.lab_down(spec.prefix)


@pytest.mark.root
def test_spawned_servers_do_not_keep_the_callers_descriptors(tmp_path):
    """A lab server lives for an hour: it must not hold what its starter inherited, e.g. the
    lock of `flock FILE lbctl lab up` (which once blocked every other user of that lock)."""
    ns = f"lbfd{os.getpid() % 100000}"
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)           # as a descriptor inherited from flock(1)
    netns.add_netns(ns)
    try:
        pid = netns.spawn_in(ns, ["sleep", "30"], tmp_path / "log")
        try:
            wait_for(lambda: netns.process_cmdline(pid)[:1] == ["sleep"], what="the spawned command")
            held = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            assert os.readlink(f"/proc/self/fd/{write_end}") not in held
        finally:
            netns.stop_process(pid)
            netns.reap(pid)
    finally:
        os.close(read_end)
        os.close(write_end)
        netns.del_netns(ns)


# --- several nodes: kind's network ------------------------------------------------------------


def test_nodes_are_planned_like_kind():
    """Each node its own pod CIDR and node address; pods spread round-robin per group."""
    spec = lab.LabSpec(prefix="lbq", pod_cidr="10.244.40.0/24", gateway="10.244.40.1", nodes=2)
    state = lab.LabState(spec=spec, pods=lab.plan_pods(spec), manifests_dir="/nonexistent")
    assert [(n.name, n.ns, n.ip, n.uplink, n.pod_cidr, n.gateway) for n in state.node_list()] == [
        ("lab-node", "lbq-node0", "172.18.40.2", "eth0", "10.244.40.0/24", "10.244.40.1"),
        ("lab-node-1", "lbq-node1", "172.18.40.3", "eth0", "10.244.41.0/24", "10.244.41.1")]
    assert {name: (p.node, p.ip) for name, p in state.pods.items()} == {
        "client-0": ("lab-node", "10.244.40.2"), "client-1": ("lab-node-1", "10.244.41.2"),
        "web-0": ("lab-node", "10.244.40.3"), "web-1": ("lab-node-1", "10.244.41.3"),
        "web-2": ("lab-node", "10.244.40.4"),
        "dns-0": ("lab-node", "10.244.40.5"), "dns-1": ("lab-node-1", "10.244.41.4")}
    web = lab.render_manifests(state)["default-web.endpointslice.yaml"]
    assert [e["nodeName"] for e in web["endpoints"]] == ["lab-node", "lab-node-1", "lab-node"]
    assert len({n.pin_dir for n in state.node_list()}) == 2
    assert all(n.cgroup.startswith("/sys/fs/cgroup/unified/lbctl-lab-lbq/") for n in state.node_list())
    moved = lab.LabSpec(prefix="lbq", pod_cidr="10.244.40.0/24", gateway="10.244.40.1", nodes=2,
                        placement=(("web-1", 0),))
    assert lab.plan_pods(moved)["web-1"].node == "lab-node"
    one = lab.LabState(spec=lab.default_spec(), pods=lab.plan_pods(lab.default_spec()), manifests_dir="")
    assert one.node().ns is None and one.node().uplink == "brlbctl"


@pytest.mark.parametrize("spec, message", [
    (lab.LabSpec(nodes=0), "1 to 16 nodes"),
    (lab.LabSpec(nodes=2, placement=(("web-0", 2),)), "no such pod or node"),
    (lab.LabSpec(pod_cidr="10.244.255.0/24", gateway="10.244.255.1", nodes=2), "cluster CIDR"),
])
def test_bad_node_spec_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.validate()


def in_node(node: lab.Node, *argv: str) -> str:
    return netns.run([*node.enter(), *argv]).stdout


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    spec = dataclasses.replace(spec_for_test(0), prefix=f"lbk{os.getpid() % 100000}",
                               pod_cidr="10.244.190.0/24", gateway="10.244.190.1", nodes=2)
    state = lab.lab_up(spec, tmp_path_factory.mktemp("two") / "manifests")
    try:
        yield state
    finally:
        pids = lab_pids(state)
        assert lab.lab_down(spec.prefix) is True
        assert not [pid for pid in pids if netns.pid_alive(pid)]
        left = {n.ns for n in state.node_list()} | {state.outside_ns} | set(state.namespaces())
        assert not left & set(netns.list_netns())
        assert not set(lab.root_links(spec)) & link_names()
        assert f"iif {state.bridge} " not in netns.run(["ip", "rule"]).stdout
        assert not any(os.path.exists(n.cgroup) for n in state.node_list())
        assert not os.path.exists(os.path.dirname(state.node().cgroup))
        assert not state.path.exists()


class TestNodes:
    pytestmark = needs_root

    def test_nodes_are_namespaces_set_up_as_kind_nodes(self, two_nodes):
        for node in two_nodes.node_list():
            sysctls = in_node(node, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter")
            assert sysctls.split() == ["1", "1"]
            routes = in_node(node, "ip", "route")
            assert f"default via {two_nodes.spec.lab_network().network_address + 1} dev eth0" in routes
            for other in two_nodes.node_list():
                if other is not node:
                    assert f"{other.pod_cidr} via {other.ip} dev eth0" in routes
            links = in_node(node, "ip", "-o", "link")
            assert sorted(two_nodes.host_links(node.name)) == sorted(
                name for name in (line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
                if name.startswith("veth"))
            assert "KIND-MASQ-AGENT" in in_node(node, "iptables-save", "-t", "nat")   # conntrack on
            assert os.path.isdir(node.cgroup)
        assert not set(two_nodes.host_links()) & link_names(), "pod links live in their nodes"

    @pytest.mark.parametrize("proto,pod,port", [("tcp", "web-1", 8080), ("udp", "dns-1", 5353),
                                                ("tcp", "web-0", 8080)])
    def test_pods_reach_pods_on_every_node_by_pod_ip(self, two_nodes, proto, pod, port):
        for client in ("client-0", "client-1"):
            me = two_nodes.pods[client]
            report = request_spread(me.ns, proto, f"{two_nodes.pods[pod].ip}:{port}", 5)
            assert report["answers"] == {pod: 5} and report["peers"] == {me.ip: 5}, (client, report)

    def test_outside_client_reaches_the_node_addresses_only(self, two_nodes):
        """Something answers at each node address (a RST: nothing listens on port 9 there);
        a pod IP is not routed from outside."""
        for node in two_nodes.node_list():
            report = request_spread(two_nodes.outside_ns, "tcp", f"{node.ip}:9", 2)
            assert report["errors"]["refused"] == 2, (node.name, report)
        report = request_spread(two_nodes.outside_ns, "tcp", f"{two_nodes.pods['web-0'].ip}:8080", 1,
                                timeout=0.3)
        assert report["answers"] == {}

    def test_host_processes_run_in_the_node_namespace_and_cgroup(self, two_nodes):
        node = two_nodes.node(1)
        out = netns.run(node.host_argv(["sh", "-c", "cat /proc/self/cgroup; ip -o -4 addr show dev eth0"])).stdout
        assert f"0::/{os.path.relpath(node.cgroup, lab.CGROUP_ROOT)}" in out.splitlines()
        assert f"{node.ip}/24" in out

    def test_describe_names_each_nodes_agent(self, two_nodes):
        text = lab.describe(two_nodes)
        for node in two_nodes.node_list():
            assert f"nsenter --net=/run/netns/{node.ns} -- lbctl run" in text
            assert f"--node-name {node.name}" in text and f"--pin-dir {node.pin_dir}" in text
