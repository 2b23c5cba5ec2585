"""IPVS mode: kube-proxy v1.32's IPVS proxier as an lbctl datapath mode.

Three kinds of tests:

- ports of pkg/proxy/ipvs/proxier_test.go: the same inputs (translated to lbctl's model) must give
  the virtual servers, real servers, ipset members and iptables rule sequences kube-proxy's tests
  expect. Each case names the kube-proxy test it comes from. kube-proxy's fake proxier has no
  cluster CIDR (a no-op local detector), node name "test-node" and node IPs only where the test
  gives them;
- IpvsMode.sync against the in-memory FakeKernel: create, update, remove, restart, failures,
  graceful termination, cleanup; and golden files (tests/golden/ipvs) for the rendered
  iptables-restore text and the desired state;
- the real kernel of this machine (root): IPVS and dummy-device detection, and the parts that
  work here (ipsets, iptables-restore of the rendered rules, cleanup), in a throwaway network
  namespace. Set LBCTL_UPDATE_GOLDEN=1 to rewrite the golden files after a deliberate change.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shlex
import subprocess
import threading
from pathlib import Path

import pytest
from kubeproxy_cases import ep, info, port, service

from lbctl.datapath.base import DatapathError
from lbctl.datapath.kubeproxy import ipvs
from lbctl.datapath.kubeproxy.ipvs import (
    IpvsConfig,
    IpvsMode,
    LinuxKernel,
    RealServer,
    VirtualServer,
    desired_ipvs,
    format_desired,
    format_ipvsadm,
    ipset_specs,
    ipvs_sysctls,
    render_ipvs_iptables,
    render_ipvs_jump_rules,
    set_name,
)
from lbctl.testing.ipvs_kernel import FakeKernel, matched_sets

GOLDEN_DIR = Path(__file__).parent / "golden" / "ipvs"
NODE = "test-node"
KP = IpvsConfig(node_name=NODE)          # kube-proxy's NewFakeProxier
KP6 = IpvsConfig(node_name=NODE, ip_family=6)


# --- helpers ------------------------------------------------------------------------------------


def state(desired) -> dict[str, list[str]]:
    """{"10.20.30.41:80/TCP": ["10.180.0.1:80", ...]}: what kube-proxy's FakeIPVS compares."""
    return {str(d.virtual_server): [str(rs) for rs in d.real_servers] for d in desired.virtual_servers.values()}


def kernel_state(kernel: FakeKernel) -> dict[str, list[str]]:
    return {str(vs): [f"{rs}" + ("" if rs.weight == 1 else f" w{rs.weight}") for rs in kernel.list_dests(vs)]
            for vs in kernel.list_services()}


def chain(text: str, name: str) -> list[tuple[str, str]]:
    """kube-proxy's getRules + checkIptables: (jump, match-set) of a chain's rules, nat before filter."""
    rules = []
    for table in ("nat", "filter"):
        body = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
        for line in body.splitlines():
            if line.startswith(f"-A {name} "):
                words = shlex.split(line)
                match = words[words.index("--match-set") + 1] if "--match-set" in words else ""
                rules.append((words[words.index("-j") + 1], match))
    return rules


def rendered(ports, cfg=KP, node_addresses=None) -> str:
    return render_ipvs_iptables(desired_ipvs(ports, cfg, node_addresses), cfg)


def synced(ports, cfg=KP, node_addresses=("192.168.0.2",)) -> tuple[IpvsMode, FakeKernel]:
    kernel = FakeKernel(node_addresses)
    mode = IpvsMode(cfg, kernel=kernel)
    mode.start()
    result = mode.sync(ports)
    assert not result.errors, result.errors
    return mode, kernel


def vs(address, port_number, protocol="TCP", **fields) -> VirtualServer:
    return VirtualServer(address, port_number, protocol, **fields)


# --- kube-proxy fixtures translated -------------------------------------------------------------


def nodeport_svc(protocol="TCP", etp="Cluster", cluster_ip="10.20.30.41"):
    return service("ns1", "svc1", cluster_ip, port("p80", 80, protocol, node_port=3001), type="NodePort",
                   external_traffic_policy=etp)


def terminating_svc(etp: str):
    """Test_EndpointSlice*Terminating*: NodePort type without a node port, one external IP."""
    return service("ns1", "svc1", "172.20.1.1", port("", 80), type="NodePort", external_ips=("1.2.3.4",),
                   external_traffic_policy=etp)


READY_AND_TERMINATING = (
    ep("10.0.1.1", 80, NODE), ep("10.0.1.2", 80, NODE),
    ep("10.0.1.3", 80, NODE, ready=False, serving=True, terminating=True),
    ep("10.0.1.4", 80, NODE, ready=False, serving=False, terminating=True),
    ep("10.0.1.5", 80, "another-node"))
ONLY_TERMINATING = (
    ep("10.0.1.1", 80, NODE, ready=False, serving=True, terminating=True),
    ep("10.0.1.2", 80, NODE, ready=False, serving=True, terminating=True),
    ep("10.0.1.3", 80, NODE, ready=False, serving=False, terminating=True),
    ep("10.0.1.4", 80, "another-node", ready=False, serving=True, terminating=True),
    ep("10.0.1.5", 80, "another-node", ready=False, serving=False, terminating=False))

# (kube-proxy test / case, ports, config, node addresses, expected {virtual server: real servers})
IPVS_CASES = [
    ("TestNodePortIPv4/1 service with node port, has 2 endpoints",
     [info(nodeport_svc(), "p80", ep("10.180.0.1", 80), ep("1002:ab8::2:10", 80))], KP,
     ["100.101.102.103", "2001:db8::1:1"],
     {"10.20.30.41:80/TCP": ["10.180.0.1:80"], "100.101.102.103:3001/TCP": ["10.180.0.1:80"]}),
    ("TestNodePortIPv4/1 UDP service with node port, has endpoints",
     [info(nodeport_svc("UDP"), "p80", ep("10.180.0.1", 80))], KP, ["100.101.102.103"],
     {"10.20.30.41:80/UDP": ["10.180.0.1:80"], "100.101.102.103:3001/UDP": ["10.180.0.1:80"]}),
    ("TestNodePortIPv4/service has node port but no endpoints",
     [info(nodeport_svc(), "p80")], KP, ["100.101.102.103"],
     {"10.20.30.41:80/TCP": [], "100.101.102.103:3001/TCP": []}),
    ("TestNodePortIPv4/node port service with protocol sctp on a node with multiple nodeIPs",
     [info(nodeport_svc("SCTP"), "p80", ep("10.180.0.1", 80))], KP,
     ["100.101.102.103", "100.101.102.104", "100.101.102.105", "2001:db8::1:1", "2001:db8::1:2"],
     {"10.20.30.41:80/SCTP": ["10.180.0.1:80"], "100.101.102.103:3001/SCTP": ["10.180.0.1:80"],
      "100.101.102.104:3001/SCTP": ["10.180.0.1:80"], "100.101.102.105:3001/SCTP": ["10.180.0.1:80"]}),
    ("TestNodePortIPv4/node port service with protocol sctp and externalTrafficPolicy local",
     [info(nodeport_svc("SCTP", "Local"), "p80", ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))],
     KP, ["100.101.102.103"],
     {"10.20.30.41:80/SCTP": ["10.180.0.1:80", "10.180.1.1:80"], "100.101.102.103:3001/SCTP": ["10.180.0.1:80"]}),
    ("TestNodePortIPv6/1 service with node port, has 2 endpoints",
     [info(nodeport_svc(cluster_ip="2020::1"), "p80", ep("10.180.0.1", 80), ep("1002:ab8::2:10", 80))], KP6,
     ["100.101.102.103", "2001:db8::1:1"],
     {"[2001:db8::1:1]:3001/TCP": ["[1002:ab8::2:10]:80"], "[2020::1]:80/TCP": ["[1002:ab8::2:10]:80"]}),
    ("TestNodePortIPv6/1 UDP service with node port, has endpoints (no action on IPv6 Proxier)",
     [info(nodeport_svc("UDP"), "p80", ep("10.180.0.1", 80))], KP6, ["100.101.102.103"], {}),
    ("TestNodePortIPv6/service has node port but no endpoints",
     [info(nodeport_svc(cluster_ip="2020::1"), "p80")], KP6, ["100.101.102.103", "2001:db8::1:1"],
     {"[2001:db8::1:1]:3001/TCP": [], "[2020::1]:80/TCP": []}),
    ("TestNodePortIPv6/node port service with protocol sctp on a node with multiple nodeIPs",
     [info(nodeport_svc("SCTP", cluster_ip="2020::1"), "p80", ep("2001::1", 80))], KP6,
     ["2001:db8::1:1", "2001:db8::1:2"],
     {"[2001:db8::1:1]:3001/SCTP": ["[2001::1]:80"], "[2001:db8::1:2]:3001/SCTP": ["[2001::1]:80"],
      "[2020::1]:80/SCTP": ["[2001::1]:80"]}),
    ("TestIPv4Proxier/2 services with Cluster IP, each with endpoints",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80)), "p80", ep("10.180.0.1", 80)),
      info(service("ns2", "svc2", "1002:ab8::2:1", port("p8080", 8080)), "p8080", ep("1009:ab8::5:6", 8080))],
     KP, [], {"10.20.30.41:80/TCP": ["10.180.0.1:80"]}),
    ("TestIPv4Proxier/cluster IP service with no endpoints",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80)), "p80")], KP, [], {"10.20.30.41:80/TCP": []}),
    ("TestIPv6Proxier/2 services with Cluster IP, each with endpoints",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80)), "p80", ep("10.180.0.1", 80)),
      info(service("ns2", "svc2", "1002:ab8::2:1", port("p8080", 8080)), "p8080", ep("1009:ab8::5:6", 8080))],
     KP6, [], {"[1002:ab8::2:1]:8080/TCP": ["[1009:ab8::5:6]:8080"]}),
    ("TestExternalIPsNoEndpoint",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80), external_ips=("50.60.70.81",)), "p80")], KP, [],
     {"10.20.30.41:80/TCP": [], "50.60.70.81:80/TCP": []}),
    ("TestExternalIPs (the fixture's UDP endpoint port does not match the TCP service port)",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80),
                   external_ips=("50.60.70.81", "2012::51", "127.0.0.1")), "p80")], KP, [],
     {"10.20.30.41:80/TCP": [], "127.0.0.1:80/TCP": [], "50.60.70.81:80/TCP": []}),
    ("TestOnlyLocalExternalIPs (no node IPs: the node port is skipped)",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80), type="NodePort", external_traffic_policy="Local",
                   external_ips=("50.60.70.81", "2012::51", "127.0.0.1")), "p80",
           ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))], KP, [],
     {"10.20.30.41:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"], "127.0.0.1:80/TCP": ["10.180.0.1:80"],
      "50.60.70.81:80/TCP": ["10.180.0.1:80"]}),
    ("TestOnlyLocalNodePorts (nodePortAddresses 100.101.102.0/24)",
     [info(nodeport_svc(etp="Local"), "p80", ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))],
     IpvsConfig(node_name=NODE, nodeport_addresses=("100.101.102.0/24",)), ["100.101.102.103", "2001:db8::"],
     {"10.20.30.41:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"], "100.101.102.103:3001/TCP": ["10.180.0.1:80"]}),
    ("TestOnlyLocalLoadBalancing",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                   load_balancer_ips=("1.2.3.4",), external_traffic_policy="Local"), "p80",
           ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))], KP, [],
     {"1.2.3.4:80/TCP": ["10.180.0.1:80"], "10.20.30.41:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"]}),
    ("TestEndpointSliceE2E (not-ready endpoints ignored)",
     [info(service("ns1", "svc1", "172.20.1.1", port("", 80)), "",
           ep("10.0.1.1", 80, NODE), ep("10.0.1.2", 80, "node2"), ep("10.0.1.3", 80, "node3"),
           ep("10.0.1.4", 80, "node3", ready=False))], KP, [],
     {"172.20.1.1:80/TCP": ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]}),
    ("Test_EndpointSliceReadyAndTerminatingCluster",
     [info(terminating_svc("Cluster"), "", *READY_AND_TERMINATING)], KP, [],
     {"1.2.3.4:80/TCP": ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"],
      "172.20.1.1:80/TCP": ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"]}),
    ("Test_EndpointSliceReadyAndTerminatingLocal",
     [info(terminating_svc("Local"), "", *READY_AND_TERMINATING)], KP, [],
     {"1.2.3.4:80/TCP": ["10.0.1.1:80", "10.0.1.2:80"],
      "172.20.1.1:80/TCP": ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"]}),
    ("Test_EndpointSliceOnlyReadyAndTerminatingCluster",
     [info(terminating_svc("Cluster"), "", *ONLY_TERMINATING)], KP, [],
     {"1.2.3.4:80/TCP": ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.4:80"],
      "172.20.1.1:80/TCP": ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.4:80"]}),
    ("Test_EndpointSliceOnlyReadyAndTerminatingLocal",
     [info(terminating_svc("Local"), "", *ONLY_TERMINATING[:4],
           ep("10.0.1.5", 80, "another-node"))], KP, [],
     {"1.2.3.4:80/TCP": ["10.0.1.1:80", "10.0.1.2:80"], "172.20.1.1:80/TCP": ["10.0.1.5:80"]}),
]


@pytest.mark.parametrize("source,ports,cfg,node_addresses,expected", IPVS_CASES, ids=[c[0] for c in IPVS_CASES])
def test_virtual_servers_match_kube_proxy(source, ports, cfg, node_addresses, expected):
    assert state(desired_ipvs(ports, cfg, node_addresses)) == expected


@pytest.mark.parametrize("source,ports,cfg,node_addresses,expected", IPVS_CASES, ids=[c[0] for c in IPVS_CASES])
def test_sync_programs_the_same_through_the_fake_kernel(source, ports, cfg, node_addresses, expected):
    """The mode reads node addresses from the kernel: the same inputs through IpvsMode.sync."""
    _, kernel = synced(ports, cfg, node_addresses)
    assert kernel_state(kernel) == expected


# (kube-proxy test, ports, config, node addresses, expected members by set, expected chains)
IPSET_IPTABLES_CASES = [
    ("TestNodePortIPv4/1 UDP service with node port, has endpoints",
     [info(nodeport_svc("UDP"), "p80", ep("10.180.0.1", 80))], IpvsConfig(node_name=NODE, nodeport_addresses=("0.0.0.0/0",)),
     ["100.101.102.103"],
     {"KUBE-NODE-PORT-UDP": {"3001"}},
     {"KUBE-NODE-PORT": [("KUBE-MARK-MASQ", "KUBE-NODE-PORT-UDP"), ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT")],
      "KUBE-SERVICES": [("RETURN", ""), ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"), ("KUBE-NODE-PORT", ""),
                        ("ACCEPT", "KUBE-CLUSTER-IP")]}),
    ("TestNodePortIPv4/node port service with protocol sctp on a node with multiple nodeIPs",
     [info(nodeport_svc("SCTP"), "p80", ep("10.180.0.1", 80))], KP,
     ["100.101.102.103", "100.101.102.104", "100.101.102.105", "2001:db8::1:1"],
     {"KUBE-NODE-PORT-SCTP-HASH": {"100.101.102.103,sctp:3001", "100.101.102.104,sctp:3001",
                                   "100.101.102.105,sctp:3001"}},
     {}),
    ("TestNodePortIPv4/node port service with protocol sctp and externalTrafficPolicy local",
     [info(nodeport_svc("SCTP", "Local"), "p80", ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))],
     KP, ["100.101.102.103"],
     {"KUBE-NODE-PORT-SCTP-HASH": {"100.101.102.103,sctp:3001"},
      "KUBE-NODE-PORT-LOCAL-SCTP-HASH": {"100.101.102.103,sctp:3001"}},
     {"KUBE-NODE-PORT": [("RETURN", "KUBE-NODE-PORT-LOCAL-SCTP-HASH"), ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-SCTP-HASH"),
                         ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT")]}),
    ("TestNodePortIPv6/node port service with protocol sctp on a node with multiple nodeIPs",
     [info(nodeport_svc("SCTP", cluster_ip="2020::1"), "p80", ep("2001::1", 80))], KP6,
     ["2001:db8::1:1", "2001:db8::1:2"],
     {"KUBE-6-NODE-PORT-SCTP-HASH": {"2001:db8::1:1,sctp:3001", "2001:db8::1:2,sctp:3001"}},
     {}),
    ("TestLoadBalancer",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                   load_balancer_ips=("1.2.3.4",)), "p80")], KP, [],
     {"KUBE-LOAD-BALANCER": {"1.2.3.4,tcp:80"}},
     {"KUBE-SERVICES": [("RETURN", ""), ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
                        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"), ("KUBE-NODE-PORT", ""), ("ACCEPT", "KUBE-CLUSTER-IP"),
                        ("ACCEPT", "KUBE-LOAD-BALANCER")],
      "KUBE-LOAD-BALANCER": [("KUBE-MARK-MASQ", "")]}),
    ("TestOnlyLocalNodePorts",
     [info(nodeport_svc(etp="Local"), "p80", ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))],
     IpvsConfig(node_name=NODE, nodeport_addresses=("100.101.102.0/24",)), ["100.101.102.103", "2001:db8::"],
     {"KUBE-NODE-PORT-TCP": {"3001"}, "KUBE-NODE-PORT-LOCAL-TCP": {"3001"}},
     {"KUBE-SERVICES": [("RETURN", ""), ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"), ("KUBE-NODE-PORT", ""),
                        ("ACCEPT", "KUBE-CLUSTER-IP")],
      "KUBE-NODE-PORT": [("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"), ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
                         ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT")]}),
    ("TestHealthCheckNodePort (svc3 has externalTrafficPolicy Cluster: no health check port)",
     [info(service("ns1", name, "10.20.30.41", port("p80", 80, node_port=3000), type="LoadBalancer",
                   external_traffic_policy=etp, health_check_node_port=hc), "p80")
      for name, etp, hc in (("valid-svc1", "Local", 30000), ("valid-svc2", "Local", 30001),
                            ("invalid-svc3", "Cluster", 30002))],
     IpvsConfig(node_name=NODE, nodeport_addresses=("100.101.102.0/24",)), ["100.101.102.103", "2001:db8::"],
     {"KUBE-HEALTH-CHECK-NODE-PORT": {"30000", "30001"}},
     {"KUBE-NODE-PORT": [("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"), ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
                         ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT")]}),
    ("TestLoadBalancerSourceRanges",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80), type="LoadBalancer", load_balancer_ips=("1.2.3.4",),
                   load_balancer_source_ranges=("10.0.0.0/8",)), "p80", ep("10.180.0.1", 80))], KP, [],
     {"KUBE-LOAD-BALANCER": {"1.2.3.4,tcp:80"}, "KUBE-LOAD-BALANCER-FW": {"1.2.3.4,tcp:80"},
      "KUBE-LOAD-BALANCER-SOURCE-CIDR": {"1.2.3.4,tcp:80,10.0.0.0/8"}},
     {"KUBE-SERVICES": [("RETURN", ""), ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
                        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"), ("KUBE-NODE-PORT", ""), ("ACCEPT", "KUBE-CLUSTER-IP"),
                        ("ACCEPT", "KUBE-LOAD-BALANCER")],
      "KUBE-PROXY-FIREWALL": [("KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-FW")],
      "KUBE-SOURCE-RANGES-FIREWALL": [("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"), ("DROP", "")]}),
    ("TestAcceptIPVSTraffic",
     [info(service("ns1", "svc1", "10.20.30.40", port("p80", 80, node_port=80), external_ips=("5.6.7.8",)), "p80"),
      info(service("ns1", "svc2", "10.20.30.41", port("p80", 80, node_port=80), type="LoadBalancer",
                   load_balancer_ips=("1.2.3.4",)), "p80"),
      info(service("ns1", "svc3", "10.20.30.42", port("p80", 80, node_port=80), type="NodePort"), "p80")], KP, [],
     {},
     {"KUBE-SERVICES": [("RETURN", ""), ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
                        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"), ("KUBE-MARK-MASQ", "KUBE-EXTERNAL-IP"),
                        ("ACCEPT", "KUBE-EXTERNAL-IP"), ("ACCEPT", "KUBE-EXTERNAL-IP"), ("KUBE-NODE-PORT", ""),
                        ("ACCEPT", "KUBE-CLUSTER-IP"), ("ACCEPT", "KUBE-LOAD-BALANCER")]}),
    ("TestOnlyLocalLoadBalancing",
     [info(service("ns1", "svc1", "10.20.30.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                   load_balancer_ips=("1.2.3.4",), external_traffic_policy="Local"), "p80",
           ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node"))], KP, [],
     {"KUBE-LOAD-BALANCER": {"1.2.3.4,tcp:80"}, "KUBE-LOAD-BALANCER-LOCAL": {"1.2.3.4,tcp:80"}},
     {"KUBE-SERVICES": [("RETURN", ""), ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
                        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"), ("KUBE-NODE-PORT", ""), ("ACCEPT", "KUBE-CLUSTER-IP"),
                        ("ACCEPT", "KUBE-LOAD-BALANCER")],
      "KUBE-LOAD-BALANCER": [("RETURN", "KUBE-LOAD-BALANCER-LOCAL"), ("KUBE-MARK-MASQ", "")]}),
    ("TestEndpointSliceE2E (the local endpoint hairpins)",
     [info(service("ns1", "svc1", "172.20.1.1", port("", 80)), "",
           ep("10.0.1.1", 80, NODE), ep("10.0.1.2", 80, "node2"), ep("10.0.1.4", 80, "node3", ready=False))], KP, [],
     {"KUBE-LOOP-BACK": {"10.0.1.1,tcp:80,10.0.1.1"}}, {}),
    ("Test_EndpointSliceReadyAndTerminatingCluster (every local endpoint hairpins, whatever its state)",
     [info(terminating_svc("Cluster"), "", *READY_AND_TERMINATING)], KP, [],
     {"KUBE-LOOP-BACK": {f"10.0.1.{i},tcp:80,10.0.1.{i}" for i in (1, 2, 3, 4)}}, {}),
    ("Test_EndpointSliceOnlyReadyAndTerminatingLocal",
     [info(terminating_svc("Local"), "", *ONLY_TERMINATING)], KP, [],
     {"KUBE-LOOP-BACK": {f"10.0.1.{i},tcp:80,10.0.1.{i}" for i in (1, 2, 3)}}, {}),
]


@pytest.mark.parametrize("source,ports,cfg,node_addresses,sets,chains", IPSET_IPTABLES_CASES,
                         ids=[c[0] for c in IPSET_IPTABLES_CASES])
def test_ipsets_and_iptables_match_kube_proxy(source, ports, cfg, node_addresses, sets, chains):
    desired = desired_ipvs(ports, cfg, node_addresses)
    for name, members in sets.items():
        assert desired.ipsets[name] == members, name
    text = render_ipvs_iptables(desired, cfg)
    for name, rules in chains.items():
        assert chain(text, name) == rules, name


def test_session_affinity_sets_persistence_on_every_virtual_server():
    """TestSessionAffinity: cluster IP, external IP and node port all persistent 10800 s."""
    svc = service("ns1", "svc1", "10.20.30.41", port("p80", 80, node_port=3001), type="NodePort",
                  external_ips=("50.60.70.81",), session_affinity="ClientIP")
    desired = desired_ipvs([info(svc, "p80")], KP, ["100.101.102.103"])
    servers = [d.virtual_server for d in desired.virtual_servers.values()]
    assert len(servers) == 3
    assert all(s.timeout == 10800 and s.flags == ipvs.FLAG_PERSISTENT for s in servers)


def test_scheduler_is_configurable_and_mh_gets_the_source_hash_flag():
    svc = service("ns1", "svc1", "10.20.30.41", port("p80", 80))
    (d,) = desired_ipvs([info(svc, "p80")], IpvsConfig(scheduler="mh")).virtual_servers.values()
    assert (d.virtual_server.scheduler, d.virtual_server.flags) == ("mh", ipvs.FLAG_SOURCE_HASH)
    (d,) = desired_ipvs([info(svc, "p80")], IpvsConfig(scheduler="wlc")).virtual_servers.values()
    assert (d.virtual_server.scheduler, d.virtual_server.flags) == ("wlc", 0)


@pytest.mark.parametrize("policy,nodes,expected", [
    ("Cluster", (NODE, "node1", "node2"), ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]),
    ("Cluster", ("node0", "node1", "node2"), ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]),
    ("Local", (NODE, "node1", "node2"), ["10.0.1.1:80"]),
    ("Local", ("node0", "node1", "node2"), []),
])
def test_internal_traffic_policy(policy, nodes, expected):
    """TestTestInternalTrafficPolicyE2E; the local endpoint (if any) hairpins in every case."""
    svc = service("ns1", "svc1", "172.20.1.1", port("", 80), internal_traffic_policy=policy)
    eps = [ep(f"10.0.1.{i}", 80, node) for i, node in enumerate(nodes, start=1)]
    desired = desired_ipvs([info(svc, "", *eps)], KP)
    assert state(desired) == {"172.20.1.1:80/TCP": expected}
    assert len(desired.ipsets["KUBE-LOOP-BACK"]) == (1 if NODE in nodes else 0)


def test_etp_local_without_local_endpoints_falls_back_to_cluster_endpoints():
    """syncEndpoint (kubernetes PR 97081): unlike the iptables mode, IPVS does not drop a NodePort
    with externalTrafficPolicy=Local and no local endpoint; it uses the cluster endpoints."""
    ports = [info(nodeport_svc(etp="Local"), "p80", ep("10.180.1.1", 80, "other-node"))]
    assert state(desired_ipvs(ports, KP, ["100.101.102.103"])) == {
        "10.20.30.41:80/TCP": ["10.180.1.1:80"], "100.101.102.103:3001/TCP": ["10.180.1.1:80"]}


def test_health_check_node_port_follows_the_service():
    """TestHealthCheckNodePortE2E: 30000, then 30001, then nothing."""
    def ports(hc):
        svc = service("ns1", "svc1", "172.20.1.1", port("", 80), type="LoadBalancer",
                      external_traffic_policy="Local", health_check_node_port=hc)
        return [info(svc, "")]
    mode, kernel = synced(ports(30000))
    assert kernel.entries["KUBE-HEALTH-CHECK-NODE-PORT"] == {"30000"}
    mode.sync(ports(30001))
    assert kernel.entries["KUBE-HEALTH-CHECK-NODE-PORT"] == {"30001"}
    mode.sync([])
    assert kernel.entries["KUBE-HEALTH-CHECK-NODE-PORT"] == set()


def test_kube_chains_are_declared_in_kube_proxys_order():
    """TestCreateAndLinkKubeChain."""
    text = rendered([])
    nat = text.split("*nat\n")[1].split("\n-A")[0]
    filt = text.split("*filter\n")[1].split("\n-A")[0]
    assert nat == ":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-NODE-PORT - [0:0]\n" \
                  ":KUBE-LOAD-BALANCER - [0:0]\n:KUBE-MARK-MASQ - [0:0]"
    assert filt == ":KUBE-FORWARD - [0:0]\n:KUBE-NODE-PORT - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n" \
                   ":KUBE-SOURCE-RANGES-FIREWALL - [0:0]\n:KUBE-IPVS-FILTER - [0:0]\n:KUBE-IPVS-OUT-FILTER - [0:0]"


@pytest.mark.parametrize("cfg,source", [(KP, "127.0.0.0/8"), (KP6, "::1/128")])
def test_localhost_returns_first(cfg, source):
    """TestDismissLocalhostRuleExist."""
    first = [line for line in rendered([], cfg).splitlines() if line.startswith("-A KUBE-SERVICES")][0]
    assert first == f"-A KUBE-SERVICES -s {source} -j RETURN"


@pytest.mark.parametrize("random_fully", [False, True])
def test_masquerade_rule(random_fully):
    """TestMasqueradeRule."""
    text = rendered([], IpvsConfig(random_fully=random_fully))
    (rule,) = [line for line in text.splitlines() if "-j MASQUERADE" in line and "KUBE-POSTROUTING" in line]
    assert rule.endswith("--random-fully") == random_fully


@pytest.mark.parametrize("cfg,expected", [
    (KP, "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"),
    (IpvsConfig(cluster_cidr="10.0.0.0/8"), "--match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"),
    (IpvsConfig(cluster_cidr="10.0.0.0/8", masquerade_all=True), "--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
])
def test_cluster_ip_masquerade_depends_on_the_local_detector(cfg, expected):
    svc = service("ns1", "svc1", "10.20.30.41", port("p80", 80))
    assert expected in rendered([info(svc, "p80")], cfg)


def test_lb_source_ranges_that_include_the_node_allow_it():
    """The node IP in a source range: KUBE-LOAD-BALANCER-SOURCE-IP gets lbIP,proto:port,lbIP and no
    KUBE-IPVS-OUT-FILTER drop (kubernetes issue 119656)."""
    svc = service("ns1", "svc1", "10.20.30.41", port("p80", 80), type="LoadBalancer", load_balancer_ips=("1.2.3.4",),
                  load_balancer_source_ranges=("192.168.0.0/24",))
    cfg = IpvsConfig(node_ips=("192.168.0.2",))
    desired = desired_ipvs([info(svc, "p80")], cfg)
    assert desired.ipsets["KUBE-LOAD-BALANCER-SOURCE-IP"] == {"1.2.3.4,tcp:80,1.2.3.4"}
    assert desired.no_node_access == ()
    assert "KUBE-IPVS-OUT-FILTER -s" not in render_ipvs_iptables(desired, cfg)


def test_ipv6_set_names_are_prefixed_and_cut_to_31_characters():
    names = [spec.name for spec in ipset_specs(6)]
    assert "KUBE-6-CLUSTER-IP" in names and "KUBE-6-LOAD-BALANCER-SOURCE-CID" in names
    assert "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS" in names and all(len(n) <= 31 for n in names)
    assert all(spec.family == "inet6" for spec in ipset_specs(6))
    assert set_name("KUBE-CLUSTER-IP", 4) == "KUBE-CLUSTER-IP"


def test_ipset_specs_create_like_kube_proxy():
    specs = {spec.name: spec for spec in ipset_specs(4)}
    assert len(specs) == 17
    assert specs["KUBE-NODE-PORT-TCP"].create_args() == ["create", "KUBE-NODE-PORT-TCP", "bitmap:port", "range",
                                                         "0-65535", "-exist"]
    assert specs["KUBE-LOOP-BACK"].create_args() == ["create", "KUBE-LOOP-BACK", "hash:ip,port,ip", "family", "inet",
                                                     "hashsize", "1024", "maxelem", "65536", "-exist"]


def test_jump_rules_and_sysctls():
    argv = render_ipvs_jump_rules(KP)
    assert argv[0] == ["iptables", "-w", "5", "-W", "100000", "-I", "OUTPUT", "-t", "nat", "-m", "comment",
                       "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
    assert [a[6] + ">" + a[-1] for a in argv] == [
        "OUTPUT>KUBE-SERVICES", "PREROUTING>KUBE-SERVICES", "POSTROUTING>KUBE-POSTROUTING", "FORWARD>KUBE-FORWARD",
        "INPUT>KUBE-NODE-PORT", "INPUT>KUBE-PROXY-FIREWALL", "FORWARD>KUBE-PROXY-FIREWALL", "INPUT>KUBE-IPVS-FILTER",
        "OUTPUT>KUBE-IPVS-OUT-FILTER"]
    assert render_ipvs_jump_rules(KP6)[0][0] == "ip6tables"
    assert dict(ipvs_sysctls(KP, "6.18.44")) == {
        "net/ipv4/vs/conntrack": 1, "net/ipv4/vs/expire_nodest_conn": 1,
        "net/ipv4/vs/expire_quiescent_template": 1, "net/ipv4/ip_forward": 1}
    assert ("net/ipv4/vs/conn_reuse_mode", 0) in ipvs_sysctls(KP, "5.4.0-generic")
    assert ("net/ipv4/conf/all/arp_announce", 2) in ipvs_sysctls(IpvsConfig(strict_arp=True), "6.1")


def test_problems_name_the_service_and_what_was_skipped():
    a = service("ns1", "a", "10.20.30.41", port("p80", 80))
    b = service("ns1", "b", "10.20.30.50", port("p80", 80), external_ips=("10.20.30.41",))
    n = service("ns1", "n", "10.20.30.42", port("p80", 80, node_port=30080), type="NodePort")
    desired = desired_ipvs([info(b, "p80"), info(n, "p80"), info(a, "p80")], KP, [])
    assert [str(p) for p in desired.problems] == [
        "Service ns1/b: external-ip 10.20.30.41:80/TCP is already used by ns1/a:p80 (cluster-ip); skipped",
        "Service ns1/n: NodePort 30080/TCP not programmed: no node address matches --nodeport-addresses (all)"]


# --- golden files ---------------------------------------------------------------------------------


def overall_ports():
    """A bit of everything, with kube-proxy's test addresses: a ClusterIP with a local endpoint
    (hairpin) and session affinity, UDP and SCTP NodePorts, external IPs (one a node address,
    so not bound), a service without endpoints, a headless one."""
    web = service("ns1", "web", "10.20.30.41", port("http", 80), port("https", 443),
                  session_affinity="ClientIP", session_affinity_timeout=600, external_ips=("50.60.70.81", "192.168.0.2"))
    dns = service("ns1", "dns", "10.20.30.10", port("dns", 53, "UDP", node_port=30053), type="NodePort")
    sctp = service("ns2", "sig", "10.20.30.60", port("sig", 9000, "SCTP", node_port=30900), type="NodePort",
                   external_traffic_policy="Local")
    empty = service("ns2", "empty", "10.20.30.70", port("p", 8080))
    headless = service("ns2", "headless", "None", port("p", 80))
    return [info(web, "http", ep("10.180.0.1", 8080, NODE), ep("10.180.1.1", 8080, "other-node")),
            info(web, "https", ep("10.180.0.1", 8443, NODE), ep("10.180.1.1", 8443, "other-node")),
            info(dns, "dns", ep("10.180.0.2", 53), ep("10.180.1.2", 53, ready=False)),
            info(sctp, "sig", ep("10.180.0.3", 9000, NODE), ep("10.180.1.3", 9000, "other-node")),
            info(empty, "p"), info(headless, "p", ep("10.180.0.9", 80))]


def loadbalancer_ports():
    """LoadBalancers: Cluster and Local policy, source ranges with and without the node."""
    local = service("ns1", "lb-local", "10.20.30.80", port("http", 80, node_port=30080), type="LoadBalancer",
                    load_balancer_ips=("1.2.3.4",), external_traffic_policy="Local", health_check_node_port=32000,
                    load_balancer_source_ranges=("203.0.113.0/25",))
    shared = service("ns1", "lb", "10.20.30.81", port("http", 80, node_port=30081), type="LoadBalancer",
                     load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=("192.168.0.0/24", "203.0.113.0/25"))
    ext_local = service("ns1", "ext", "10.20.30.82", port("http", 80), external_ips=("192.168.99.11",),
                        external_traffic_policy="Local")
    return [info(local, "http", ep("10.180.0.1", 80, NODE), ep("10.180.1.1", 80, "other-node")),
            info(shared, "http", ep("10.180.0.2", 80, NODE)),
            info(ext_local, "http", ep("10.180.1.4", 80, "other-node"))]


def ipv6_ports():
    svc = service("ns1", "web", "fd00:30::41", port("http", 80, node_port=30080), type="NodePort")
    return [info(svc, "http", ep("fd00:10::1", 8080, NODE), ep("fd00:10::2", 8080), ep("10.180.0.1", 8080))]


GOLDEN_CFG = IpvsConfig(node_name=NODE, node_ips=("192.168.0.2", "192.168.1.2"), cluster_cidr="10.0.0.0/8")
GOLDEN_CASES = [
    ("empty", list, GOLDEN_CFG),
    ("overall", overall_ports, GOLDEN_CFG),
    ("loadbalancer", loadbalancer_ports, GOLDEN_CFG),
    ("masquerade-all-random-fully", overall_ports, IpvsConfig(node_name=NODE, node_ips=("192.168.0.2",),
                                                              masquerade_all=True, random_fully=True)),
    ("no-cluster-cidr-mh", overall_ports, IpvsConfig(node_name=NODE, node_ips=("192.168.0.2",), scheduler="mh")),
    ("ipv6", ipv6_ports, IpvsConfig(node_name=NODE, node_ips=("2001:db8::2",), cluster_cidr="fd00:10::/64")),
]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("LBCTL_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs (LBCTL_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("name,ports,cfg", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_rendered_iptables_matches_golden(name, ports, cfg):
    check_golden(f"{name}.restore", render_ipvs_iptables(desired_ipvs(ports(), cfg), cfg))


@pytest.mark.parametrize("name,ports,cfg", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_desired_state_matches_golden(name, ports, cfg):
    check_golden(f"{name}.ipvs", format_desired(desired_ipvs(ports(), cfg)))


@pytest.mark.parametrize("name", [c[0] for c in GOLDEN_CASES])
def test_golden_restore_files_are_consistent(name):
    """Every jump targets a declared chain or a built-in target; every matched set is one of ours;
    the same chains are declared in every file (the text is constant in shape)."""
    text = (GOLDEN_DIR / f"{name}.restore").read_text()
    family = 6 if "KUBE-6-" in text else 4
    sets = {spec.name for spec in ipset_specs(family)}
    targets = {"ACCEPT", "RETURN", "DROP", "REJECT", "MARK", "MASQUERADE"}
    for table in ("nat", "filter"):
        body = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0].splitlines()
        declared = {line[1:].split()[0] for line in body if line.startswith(":")}
        assert declared == {c for t, c in ipvs.IPTABLES_CHAINS if t == table}
        for line in body:
            if line.startswith("-A"):
                words = shlex.split(line)
                assert words[1] in declared
                assert words[words.index("-j") + 1] in declared | targets, line
                assert set(matched_sets(words)) <= sets, line


# --- IpvsMode.sync against the fake kernel ------------------------------------------------------


def web(*endpoints, **fields):
    svc = service("default", "web", "10.96.0.10", port("http", 80), **fields)
    return info(svc, "http", *endpoints)


def test_first_sync_creates_everything_in_a_safe_order():
    mode, kernel = synced([web(ep("10.244.1.2", 8080), ep("10.244.2.2", 8080))])
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.1.2:8080", "10.244.2.2:8080"]}
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10"}
    assert kernel.entries["KUBE-CLUSTER-IP"] == {"10.96.0.10,tcp:80"}
    assert kernel.entries["KUBE-IPVS-IPS"] == {"10.96.0.10"}
    assert set(kernel.ipsets) == {spec.name for spec in ipset_specs(4)}
    assert kernel.sysctls["net/ipv4/vs/conntrack"] == 1
    ops = [op for op, _ in kernel.log]
    # sets and their members, then rules, then the virtual server with its real servers, the
    # address last: IPVS sees the VIP's packets only once it is local, and by then all is ready.
    assert ops.index("add_entry") < ops.index("restore_iptables") < ops.index("ensure_rule") \
        < ops.index("add_service") < ops.index("add_dest") < ops.index("add_address")
    assert kernel.rules(4, "nat", "PREROUTING") == [
        "-A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES"]
    assert kernel.rules(4, "filter", "KUBE-IPVS-FILTER")[-1] == \
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"


def test_sync_is_idempotent():
    ports = [web(ep("10.244.1.2", 8080))]
    mode, kernel = synced(ports)
    before = len(kernel.log)
    result = mode.sync(ports)
    assert not result.changed and not result.errors
    assert [op for op, _ in kernel.log[before:]] == ["restore_iptables"]   # kube-proxy restores every sync


def test_endpoint_changes_add_and_remove_real_servers():
    mode, kernel = synced([web(ep("10.244.1.2", 8080), ep("10.244.2.2", 8080))])
    result = mode.sync([web(ep("10.244.2.2", 8080), ep("10.244.3.2", 8080))])
    assert (result.added, result.backends_added, result.backends_removed) == (0, 1, 1)
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.2.2:8080", "10.244.3.2:8080"]}


def test_no_endpoints_keeps_the_virtual_server_without_real_servers():
    """kube-proxy writes no REJECT rule in IPVS mode: a virtual server without destinations makes
    the kernel (ip_vs_leave) answer ICMP port unreachable, for TCP and UDP alike."""
    mode, kernel = synced([web(ep("10.244.1.2", 8080))])
    mode.sync([web()])
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": []}
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10"}
    assert "REJECT" not in " ".join(kernel.rules(4, "nat", "KUBE-SERVICES"))


def test_removed_services_lose_address_virtual_server_and_set_members():
    other = info(service("default", "api", "10.96.0.20", port("p", 443)), "p", ep("10.244.1.9", 6443))
    mode, kernel = synced([web(ep("10.244.1.2", 8080)), other])
    result = mode.sync([other])
    assert result.removed == 1
    assert kernel_state(kernel) == {"10.96.0.20:443/TCP": ["10.244.1.9:6443"]}
    assert kernel.links["kube-ipvs0"] == {"10.96.0.20"}
    assert kernel.entries["KUBE-CLUSTER-IP"] == {"10.96.0.20,tcp:443"}
    ops = [op for op, _ in kernel.log]
    assert ops.index("del_address") < ops.index("del_service") < ops.index("del_entry")


def test_multi_port_service_binds_its_address_once():
    """TestMultiPortServiceBindAddr."""
    def svc(*ports_):
        s = service("ns1", "svc1", "172.16.55.4", *ports_)
        return [info(s, p.name, protocol=p.protocol.value) for p in ports_]
    p1, p2, p3 = port("port1", 1234), port("port2", 1235), port("port3", 1236, "UDP")
    mode, kernel = synced(svc(p1, p2))
    assert kernel.links["kube-ipvs0"] == {"172.16.55.4"}
    mode.sync(svc(p1))
    assert kernel.links["kube-ipvs0"] == {"172.16.55.4"}
    mode.sync(svc(p1, p2, p3))
    assert kernel.links["kube-ipvs0"] == {"172.16.55.4"} and len(kernel.services) == 3
    mode.sync([])
    assert kernel.links["kube-ipvs0"] == set() and kernel.services == {}


def test_external_ip_on_a_node_interface_is_not_bound():
    mode, kernel = synced([web(ep("10.244.1.2", 8080), external_ips=("192.168.0.2", "203.0.113.7"))])
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10", "203.0.113.7"}
    assert "192.168.0.2:80/TCP" in kernel_state(kernel)


def test_service_changes_update_the_virtual_server_in_place():
    """Test_syncService: scheduler or persistence changes are an IPVS update, not delete + add."""
    mode, kernel = synced([web(ep("10.244.1.2", 8080))])
    result = mode.sync([web(ep("10.244.1.2", 8080), session_affinity="ClientIP")])
    assert (result.added, result.updated, result.removed) == (0, 1, 0)
    assert kernel.list_services() == [vs("10.96.0.10", 80, flags=ipvs.FLAG_PERSISTENT, timeout=10800)]
    assert kernel.writes("update_service") and not kernel.writes("del_service")
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.1.2:8080"]}


def test_restart_changes_nothing():
    """A new IpvsMode on a kernel a previous run programmed finds everything in place."""
    ports = [web(ep("10.244.1.2", 8080), ep("10.244.2.2", 8080), external_ips=("203.0.113.7",))]
    _, kernel = synced(ports)
    before = len(kernel.log)
    again = IpvsMode(KP, kernel=kernel)
    again.start()
    result = again.sync(ports)
    assert not result.changed and not result.errors
    assert [op for op, _ in kernel.log[before:]] == ["restore_iptables"]


def test_restart_restores_weights_left_at_zero():
    """Test_syncEndpoint_updateWeightsOnRestart."""
    ports = [web(ep("10.244.1.2", 8080))]
    _, kernel = synced(ports)
    server = kernel.list_services()[0]
    kernel.update_dest(server, RealServer("10.244.1.2", 8080, weight=0))
    again = IpvsMode(KP, kernel=kernel)
    again.start()
    again.sync(ports)
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.1.2:8080"]}


def test_stale_virtual_servers_are_deleted_except_excluded_cidrs_and_the_other_family():
    """TestCleanLegacyService, TestCleanLegacyServiceWithRealServers, TestCleanLegacyService6."""
    kernel = FakeKernel()
    for address, number in (("1.1.1.1", 53), ("2.2.2.2", 54), ("3.3.3.3", 55), ("4.4.4.4", 56), ("5.5.5.5", 57),
                            ("6.6.6.6", 58), ("1000::6", 58)):
        kernel.add_service(vs(address, number, "UDP"))
    kernel.add_dest(vs("5.5.5.5", 57, "UDP"), RealServer("10.180.0.1", 53))
    cfg = IpvsConfig(node_name=NODE, exclude_cidrs=("3.3.3.0/24", "4.4.4.0/24"))
    mode = IpvsMode(cfg, kernel=kernel)
    mode.start()
    ports = [info(service("ns", f"s{i}", address, port("p", number, "UDP")), "p")
             for i, (address, number) in enumerate((("1.1.1.1", 53), ("2.2.2.2", 54)))]
    result = mode.sync(ports)
    assert result.removed == 2
    assert sorted(str(s) for s in kernel.list_services()) == [
        "1.1.1.1:53/UDP", "2.2.2.2:54/UDP", "3.3.3.3:55/UDP", "4.4.4.4:56/UDP", "[1000::6]:58/UDP"]


def test_graceful_termination_of_tcp_real_servers():
    """graceful_termination.go: a TCP real server with connections goes to weight 0 and is deleted
    once they are gone (checked every graceful_check_interval); back in the slices, weight 1."""
    now = [100.0]
    kernel = FakeKernel()
    mode = IpvsMode(IpvsConfig(graceful_check_interval=60), kernel=kernel, clock=lambda: now[0])
    mode.start()
    mode.sync([web(ep("10.244.1.2", 8080), ep("10.244.2.2", 8080))])
    server = kernel.list_services()[0]
    kernel.set_connections(server, "10.244.1.2", 8080, active=3, inactive=1)

    result = mode.sync([web(ep("10.244.2.2", 8080))])
    assert result.backends_removed == 1 and not kernel.writes("del_dest")
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.1.2:8080 w0", "10.244.2.2:8080"]}
    assert not mode.needs_retry
    now[0] += 61
    assert mode.needs_retry
    assert mode.sync(None).backends_removed == 0          # still connected: stays at weight 0
    kernel.set_connections(server, "10.244.1.2", 8080, active=0, inactive=0)
    now[0] += 61
    mode.sync(None)
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.2.2:8080"]}
    assert not mode.draining and not mode.needs_retry


def test_draining_real_server_that_comes_back_is_weighted_again():
    mode, kernel = synced([web(ep("10.244.1.2", 8080), ep("10.244.2.2", 8080))])
    kernel.set_connections(kernel.list_services()[0], "10.244.1.2", 8080, active=1)
    mode.sync([web(ep("10.244.2.2", 8080))])
    mode.sync([web(ep("10.244.1.2", 8080), ep("10.244.2.2", 8080))])
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.1.2:8080", "10.244.2.2:8080"]}
    assert not kernel.writes("del_dest")            # its connections were never cut


@pytest.mark.parametrize("protocol", ["UDP", "SCTP"])
def test_udp_and_sctp_real_servers_are_deleted_at_once(protocol):
    def ports(*eps):
        return [info(service("ns", "dns", "10.96.0.53", port("dns", 53, protocol)), "dns", *eps)]
    mode, kernel = synced(ports(ep("10.244.1.2", 53), ep("10.244.2.2", 53)))
    kernel.set_connections(kernel.list_services()[0], "10.244.1.2", 53, active=5)
    mode.sync(ports(ep("10.244.2.2", 53)))
    assert kernel_state(kernel) == {f"10.96.0.53:53/{protocol}": ["10.244.2.2:53"]}


def test_failed_write_is_reported_and_the_retry_converges():
    kernel = FakeKernel()
    mode = IpvsMode(KP, kernel=kernel)
    mode.start()
    other = info(service("default", "api", "10.96.0.20", port("p", 443)), "p", ep("10.244.1.9", 6443))
    kernel.fail_on.add(("add_dest", "10.96.0.10:80/TCP 10.244.1.2:8080"))
    result = mode.sync([web(ep("10.244.1.2", 8080)), other])
    assert len(result.errors) == 1 and "default/web:http" in result.errors[0]
    assert mode.needs_retry
    # the other service went ahead; the failed one is created but its address is not bound yet
    assert kernel_state(kernel)["10.96.0.20:443/TCP"] == ["10.244.1.9:6443"]
    assert kernel.links["kube-ipvs0"] == {"10.96.0.20"}
    kernel.fail_on.clear()
    result = mode.sync(None)
    assert not result.errors and not mode.needs_retry
    assert kernel_state(kernel)["10.96.0.10:80/TCP"] == ["10.244.1.2:8080"]
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10", "10.96.0.20"}


def test_failed_iptables_restore_is_reported_and_retried():
    mode, kernel = synced([web(ep("10.244.1.2", 8080))])
    kernel.fail_on.add(("restore_iptables", "4"))
    result = mode.sync(None)
    assert result.errors and result.errors[0].startswith("iptables:") and mode.needs_retry
    kernel.fail_on.clear()
    assert not mode.sync(None).errors


def test_someone_deleting_objects_behind_our_back_is_repaired():
    ports = [web(ep("10.244.1.2", 8080))]
    mode, kernel = synced(ports)
    kernel.del_service(kernel.list_services()[0])
    kernel.del_address("kube-ipvs0", "10.96.0.10")
    kernel.del_entry(kernel.ipsets["KUBE-CLUSTER-IP"], "10.96.0.10,tcp:80")
    mode.sync(ports)
    assert kernel_state(kernel) == {"10.96.0.10:80/TCP": ["10.244.1.2:8080"]}
    assert kernel.links["kube-ipvs0"] == {"10.96.0.10"}
    assert kernel.entries["KUBE-CLUSTER-IP"] == {"10.96.0.10,tcp:80"}


def test_only_ipset_changes_still_report_a_change():
    def lb(ranges):
        svc = service("ns1", "lb", "10.20.30.81", port("http", 80), type="LoadBalancer",
                      load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=ranges)
        return [info(svc, "http", ep("10.180.0.2", 80))]
    mode, kernel = synced(lb(("203.0.113.0/25",)))
    result = mode.sync(lb(("198.51.100.0/24",)))
    assert result.changed and (result.added, result.removed) == (0, 0)
    assert kernel.entries["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == {"5.6.7.8,tcp:80,198.51.100.0/24"}


def test_problems_are_exposed_on_the_mode():
    mode, _ = synced([info(service("ns1", "n", "10.20.30.42", port("p80", 80, node_port=30080), type="NodePort"),
                           "p80")], node_addresses=())
    assert [p.obj for p in mode.problems] == ["Service ns1/n"]


def test_dump_reads_back_what_the_kernel_holds():
    mode, kernel = synced([web(ep("10.244.1.2", 8080), session_affinity="ClientIP")])
    dumped = mode.dump()
    assert dumped["addresses"] == ["10.96.0.10"]
    assert dumped["ipsets"]["KUBE-CLUSTER-IP"] == ["10.96.0.10,tcp:80"]
    assert format_ipvsadm(dumped) == (
        "Prot LocalAddress:Port Scheduler Flags\n"
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
        "TCP  10.96.0.10:80 rr persistent 10800\n"
        "  -> 10.244.1.2:8080              Masq    1      0          0\n")


def test_cleanup_removes_everything_and_leaves_the_builtin_chains():
    """TestCleanupLeftovers (kube-proxy flushes IPVS whole, so foreign virtual servers go too)."""
    mode, kernel = synced([web(ep("10.244.1.2", 8080), external_ips=("203.0.113.7",))])
    kernel.ensure_rule(4, "filter", "INPUT", ("-j", "ACCEPT"))           # someone else's rule
    removed = IpvsMode.cleanup(kernel=kernel, cfg=KP)
    assert "dummy device kube-ipvs0" in removed and "ipset KUBE-CLUSTER-IP" in removed
    assert "IPVS virtual server 10.96.0.10:80/TCP" in removed
    assert kernel.services == {} and "kube-ipvs0" not in kernel.links and kernel.ipsets == {}
    assert kernel.list_chains(4, "nat") == {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}
    assert kernel.rules(4, "filter", "INPUT") == ["-A INPUT -j ACCEPT"]
    assert IpvsMode.cleanup(kernel=kernel, cfg=KP) == []                 # idempotent


def test_stop_detach_cleans_up_and_stop_without_leaves_everything():
    mode, kernel = synced([web(ep("10.244.1.2", 8080))])
    mode.stop(detach=False)
    assert kernel.services and kernel.ipsets
    mode.stop(detach=True)
    assert not kernel.services and not kernel.ipsets and "kube-ipvs0" not in kernel.links


def test_cleanup_without_ipvs_still_removes_sets_and_rules():
    kernel = FakeKernel(has_ipvs=False)
    for spec in ipset_specs(4):
        kernel.create_ipset(spec)
    removed = IpvsMode.cleanup(kernel=kernel, cfg=KP)
    assert len(removed) == 17 and kernel.ipsets == {}


def test_start_reports_a_kernel_without_dummy_devices():
    class NoDummy(FakeKernel):
        def ensure_dummy(self, device):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    with pytest.raises(DatapathError, match="CONFIG_DUMMY"):
        IpvsMode(KP, kernel=NoDummy()).start()


# --- this machine's kernel (root) -----------------------------------------------------------------

root = pytest.mark.root


CLONE_NEWNET = 0x40000000


def has_ipvs() -> bool:
    return os.path.exists("/proc/net/ip_vs")


@contextlib.contextmanager
def throwaway_netns():
    name = f"lbipvs{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in_netns(ns: str, fn):
    """Runs fn in a thread that entered ``ns``: its netlink sockets and the processes it starts
    (iptables-restore) live there, the rest of the test process does not move."""
    box: dict = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                box["error"] = OSError(ctypes.get_errno(), f"setns {ns}")
                return
        finally:
            os.close(fd)
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def ns_run(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True).stdout


@root
def test_start_refuses_a_kernel_without_ipvs_for_real():
    """This machine's kernel has no CONFIG_IP_VS: start() must say so, and leave nothing behind.
    (On a kernel with IPVS, the same probe must find it.)"""
    if has_ipvs():
        LinuxKernel.open(require=True).close()
        return
    sets_before = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout
    mode = IpvsMode(IpvsConfig())
    with pytest.raises(DatapathError) as raised:
        mode.start()
    message = str(raised.value)
    assert message.startswith(ipvs.IPVS_MISSING)
    assert "--mode ebpf|iptables|nftables" in message and "CONFIG_IP_VS" in message
    assert "/proc/net/ip_vs is absent" in message
    assert mode.kernel is None
    assert subprocess.run(["ip", "link", "show", "kube-ipvs0"], capture_output=True).returncode != 0
    assert subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout == sets_before


@root
def test_agent_run_with_ipvs_mode_fails_instead_of_half_working():
    """What `lbctl run --mode ipvs` does: Agent.run reads the source once (no kernel: a source
    it cannot read stops it before the mode starts), starts the mode, and the DatapathError
    reaches cmd_run (which logs it and exits 1) before any sync. (Kernels without IPVS only;
    with IPVS the probe must find it.)"""
    if has_ipvs():
        LinuxKernel.open(require=True).close()
        return
    from lbctl.agent.loop import Agent, AgentOptions

    class Source:
        polled = 0

        def poll(self):
            self.polled += 1
            return None

    source = Source()
    agent = Agent(source, options=AgentOptions(interval=0.01), mode=IpvsMode(IpvsConfig()))
    with pytest.raises(DatapathError, match="IPVS is not available"):
        agent.run(max_seconds=1)
    assert source.polled == 1 and agent.syncs == 0


@root
def test_start_refuses_a_kernel_without_dummy_devices_for_real():
    """With IPVS forced aside, the next missing piece on this kernel (no CONFIG_DUMMY) is named."""
    if subprocess.run(["ip", "link", "add", "lbctlprobe0", "type", "dummy"], capture_output=True).returncode == 0:
        subprocess.run(["ip", "link", "del", "lbctlprobe0"])
        return   # a kernel with dummy devices: nothing to refuse
    with throwaway_netns() as ns:
        def start():
            kernel = LinuxKernel.open(require=False)
            try:
                IpvsMode(IpvsConfig(), kernel=kernel).start()
            finally:
                kernel.close()
        with pytest.raises(DatapathError, match="kube-ipvs0.*CONFIG_DUMMY"):
            run_in_netns(ns, start)


SAMPLE_ENTRIES = {
    4: {"hash:ip": ["10.96.0.10"], "hash:ip,port": ["10.96.0.10,tcp:80", "10.96.0.53,udp:53", "192.168.0.2,sctp:30900"],
        "hash:ip,port,ip": ["10.244.1.2,tcp:8080,10.244.1.2"], "hash:ip,port,net": ["1.2.3.4,tcp:80,203.0.113.0/25"],
        "bitmap:port": ["30080", "32000"]},
    6: {"hash:ip": ["fd00:30::41"], "hash:ip,port": ["fd00:30::41,tcp:80"],
        "hash:ip,port,ip": ["fd00:10::1,udp:53,fd00:10::1"], "hash:ip,port,net": ["2001:db8::5,tcp:80,2001:db8:1::/48"],
        "bitmap:port": ["30080"]},
}


@root
def test_ipsets_round_trip_through_the_real_kernel():
    """LinuxKernel's ipset half over pyroute2 on this kernel: create all 34 sets, add, list back
    in kube-proxy's entry format, delete, destroy."""
    with throwaway_netns() as ns:
        def exercise():
            kernel = LinuxKernel.open(require=False)
            try:
                specs = ipset_specs(4) + ipset_specs(6)
                for spec in specs:
                    kernel.create_ipset(spec)
                    kernel.create_ipset(spec)            # -exist: creating again is fine
                assert kernel.list_ipsets() == {spec.name for spec in specs}
                for family in (4, 6):
                    for spec in ipset_specs(family):
                        entries = SAMPLE_ENTRIES[family][spec.set_type]
                        for entry in entries:
                            kernel.add_entry(spec, entry)
                        assert kernel.list_entries(spec.name) == set(entries), spec.name
                        kernel.del_entry(spec, entries[0])
                        assert kernel.list_entries(spec.name) == set(entries[1:]), spec.name
                cli = ns_run(ns, "ipset", "list", "KUBE-LOAD-BALANCER-SOURCE-CIDR")
                for spec in specs:
                    kernel.destroy_ipset(spec.name)
                assert kernel.list_ipsets() == set()
                return cli
            finally:
                kernel.close()
        cli = run_in_netns(ns, exercise)
        assert "Type: hash:ip,port,net" in cli and "family inet hashsize 1024 maxelem 65536" in cli


def _without_ipvs_match(text: str) -> str:
    """This kernel has no xt_ipvs (it needs CONFIG_IP_VS): drop KUBE-IPVS-OUT-FILTER's -m ipvs rules."""
    return "\n".join(line for line in text.splitlines() if "-m ipvs" not in line) + "\n"


@root
@pytest.mark.parametrize("name,family", [("overall", 4), ("loadbalancer", 4), ("masquerade-all-random-fully", 4),
                                         ("ipv6", 6)])
def test_rendered_rules_load_into_real_iptables_and_cleanup_removes_them(name, family):
    """The golden restore text is accepted by this machine's iptables-restore (nf_tables backend)
    with the ipsets in place, twice (restores are idempotent), next to the jump rules; cleanup
    then leaves no chain, jump or set of ours behind, and other rules alone."""
    text = _without_ipvs_match((GOLDEN_DIR / f"{name}.restore").read_text())
    save = "ip6tables-save" if family == 6 else "iptables-save"
    binary = "ip6tables" if family == 6 else "iptables"
    with throwaway_netns() as ns:
        ns_run(ns, binary, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")   # not ours

        def load():
            kernel = LinuxKernel.open(require=False)
            try:
                for spec in ipset_specs(family):
                    kernel.create_ipset(spec)
                for _ in range(2):
                    kernel.restore_iptables(text, family)
                    for jump in ipvs.JUMP_RULES:
                        kernel.ensure_rule(family, jump.table, jump.chain, jump.args)
            finally:
                kernel.close()
        run_in_netns(ns, load)
        saved = ns_run(ns, save)
        assert saved.count("-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW") == 1
        assert saved.count('-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES') == 1
        ours = [line for line in text.splitlines() if line.startswith("-A")]
        assert len([line for line in saved.splitlines() if line.startswith("-A KUBE-")]) == len(ours)

        def cleanup():
            kernel = LinuxKernel.open(require=False)
            try:
                return IpvsMode.cleanup(kernel=kernel, cfg=IpvsConfig(ip_family=family))
            finally:
                kernel.close()
        removed = run_in_netns(ns, cleanup)
        assert len([r for r in removed if r.startswith("ipset ")]) == 17
        assert len([r for r in removed if " chain " in r]) == 11
        assert len([r for r in removed if " rule " in r]) == 9
        saved = ns_run(ns, save)
        assert "KUBE-" not in saved and "--dport 22 -j ACCEPT" in saved
        assert ns_run(ns, "ipset", "list", "-n").strip() == ""
