"""Golden and packet-flow tests for the kube-proxy v1.32 iptables renderer.

Each golden file under tests/golden/iptables/ holds kube-proxy's expected restore input in the
canonical order of kube-proxy's own tests (sortIPTablesRules). Where pkg/proxy/iptables/
proxier_test.go has a full expectation, the golden file is that expectation and the inputs
below are that test's inputs translated to lbctl's model; the other golden files were written
by hand from proxier.go for inputs taken from the tests that only check packet flows. Each
case names its source.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess

import pytest
from kubeproxy_cases import (
    POD_CIDR,
    TEST_EXTERNAL_CLIENT,
    TEST_EXTERNAL_CLIENT_BLOCKED,
    TEST_EXTERNAL_IP,
    TEST_NODE_IP,
    TEST_NODE_IP_ALT,
    TEST_NODE_IPS,
    TEST_NODE_NAME,
    check_iptables_rule_jumps,
    cli_ports,
    ep,
    golden,
    info,
    iptables_chain,
    port,
    service,
    sort_iptables_rules,
    write_cli_manifests,
)

from lbctl.datapath.kubeproxy import (
    IptablesConfig,
    common,
    iptables,
    render_iptables,
    render_iptables_partial,
    render_jump_chains,
    render_jump_rules,
)
from lbctl.testing.iptables_trace import trace_iptables

# kube-proxy's NewFakeProxier: IPv4, pod CIDR detector, localhost NodePorts, nfacct counters
# available, no --random-fully, the mark injected as "0x4000".
FAKE_PROXIER = IptablesConfig(
    node_name=TEST_NODE_NAME,
    node_ips=TEST_NODE_IPS,
    cluster_cidr=POD_CIDR,
    nfacct=True,
    masquerade_mark="0x4000",
)


def cfg(**changes) -> IptablesConfig:
    return dataclasses.replace(FAKE_PROXIER, **changes)


# --- inputs ----------------------------------------------------------------------------------


def overall_ports():
    """TestOverallIPTablesRules: one of each kind of service."""
    svc1 = service("ns1", "svc1", "172.30.0.41", port("p80", 80))
    svc2 = service("ns2", "svc2", "172.30.0.42", port("p80", 80, node_port=3001), type="LoadBalancer",
                   external_traffic_policy="Local", load_balancer_ips=("1.2.3.4",),
                   external_ips=("192.168.99.22",), health_check_node_port=30000)
    svc3 = service("ns3", "svc3", "172.30.0.43", port("p80", 80, node_port=3003), type="NodePort")
    svc4 = service("ns4", "svc4", "172.30.0.44", port("p80", 80), type="NodePort",
                   external_ips=("192.168.99.33",))
    svc5 = service("ns5", "svc5", "172.30.0.45", port("p80", 80, node_port=3002), type="LoadBalancer",
                   load_balancer_ips=("5.6.7.8",), health_check_node_port=30000,
                   load_balancer_source_ranges=(" 203.0.113.0/25",),   # whitespace must be ignored
                   session_affinity="ClientIP", session_affinity_timeout=10800)
    svc6 = service("ns6", "svc6", "172.30.0.46", port("p80", 80))
    return [
        info(svc1, "p80", ep("10.180.0.1", 80)),
        info(svc2, "p80", ep("10.180.0.2", 80)),   # not local: eTP=Local has no endpoint here
        info(svc3, "p80", ep("10.180.0.3", 80)),
        info(svc4, "p80", ep("10.180.0.4", 80), ep("10.180.0.5", 80, node=TEST_NODE_NAME)),
        info(svc5, "p80", ep("10.180.0.3", 80)),
        info(svc6, "p80"),
    ]


def repeated_ports(step: int):
    """TestSyncProxyRulesRepeated: the services after each step of the test."""
    svc1 = service("ns1", "svc1", "172.30.0.41", port("p80", 80))
    svc2 = service("ns2", "svc2", "172.30.0.42", port("p8080", 8080))
    svc3 = service("ns3", "svc3", "172.30.0.43", port("p80", 80))
    svc4 = service("ns4", "svc4", "172.30.0.44", port("p80", 80))
    ports = [info(svc1, "p80", ep("10.0.1.1", 80))]
    if step <= 2:
        ports.append(info(svc2, "p8080", ep("10.0.2.1", 8080)))
    if step >= 2:
        svc3_endpoints = {2: ["10.0.3.1"], 3: ["10.0.3.1"], 4: ["10.0.3.1"], 5: ["10.0.3.1"],
                          6: ["10.0.3.2"]}.get(step, ["10.0.3.2", "10.0.3.3"])
        ports.append(info(svc3, "p80", *(ep(a, 80) for a in svc3_endpoints)))
    if step == 4:
        ports.append(info(svc4, "p80"))
    if 5 <= step <= 8:
        ports.append(info(svc4, "p80", ep("10.0.4.1", 80)))
    return ports


def bad_ips_ports():
    """TestBadIPs: leading zeros everywhere (accepted by old API servers) are normalized."""
    svc = service("ns1", "svc1", "172.30.0.041", port("p80", 80, node_port=3001), type="LoadBalancer",
                  load_balancer_ips=("1.2.3.004",), external_ips=("192.168.099.022",),
                  load_balancer_source_ranges=("203.0.113.000/025",))
    return [info(svc, "p80", ep("10.180.00.001", 80))]


def clusterip_3_endpoints():
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80))
    return [info(svc, "p80", ep("10.180.0.3", 80), ep("10.180.0.1", 80), ep("10.180.0.2", 80))]


def etp_local_ports():
    """TestExternalTrafficPolicyLocal."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  external_traffic_policy="Local", external_ips=(TEST_EXTERNAL_IP,),
                  load_balancer_ips=("1.2.3.4",), health_check_node_port=30000)
    return [info(svc, "p80", ep("10.180.0.1", 80), ep("10.180.2.1", 80, node=TEST_NODE_NAME))]


def etp_cluster_ports():
    """TestExternalTrafficPolicyCluster."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  external_ips=(TEST_EXTERNAL_IP,), load_balancer_ips=("1.2.3.4",))
    return [info(svc, "p80", ep("10.180.0.1", 80), ep("10.180.2.1", 80, node=TEST_NODE_NAME))]


def itp_local_ports(*nodes: str):
    """TestInternalTrafficPolicy: an unnamed port, endpoints 10.0.1.1-3 on the given nodes."""
    svc = service("ns1", "svc1", "172.30.1.1", port("", 80), internal_traffic_policy="Local", has_selector=True)
    return [info(svc, "", *(ep(f"10.0.1.{i + 1}", 80, node=node) for i, node in enumerate(nodes)))]


def terminating_ports(*endpoints):
    """TestTerminatingEndpointsTrafficPolicyLocal's service with the given endpoints."""
    svc = service("ns1", "svc1", "172.30.1.1", port("", 80), type="LoadBalancer",
                  external_traffic_policy="Local", health_check_node_port=30000,
                  load_balancer_ips=("1.2.3.4",))
    return [info(svc, "", *endpoints)]


ONLY_TERMINATING = (
    ep("10.0.1.2", 80, node=TEST_NODE_NAME, ready=False, serving=True, terminating=True),
    ep("10.0.1.3", 80, node=TEST_NODE_NAME, ready=False, serving=True, terminating=True),
    ep("10.0.1.4", 80, node=TEST_NODE_NAME, ready=False, serving=False, terminating=True),
    ep("10.0.1.5", 80, node="node-1"),
)


def masquerade_ports():
    """TestInternalExternalMasquerade's three services: eTP=Cluster, eTP=Local, iTP=Local."""
    svc1 = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                   health_check_node_port=30001, load_balancer_ips=("1.2.3.4",))
    svc2 = service("ns2", "svc2", "172.30.0.42", port("p80", 80, node_port=3002), type="LoadBalancer",
                   health_check_node_port=30002, external_traffic_policy="Local",
                   load_balancer_ips=("5.6.7.8",))
    svc3 = service("ns3", "svc3", "172.30.0.43", port("p80", 80, node_port=3003), type="LoadBalancer",
                   health_check_node_port=30003, internal_traffic_policy="Local",
                   load_balancer_ips=("9.10.11.12",))
    return [
        info(svc1, "p80", ep("10.180.0.1", 80, node=TEST_NODE_NAME), ep("10.180.1.1", 80, node="remote")),
        info(svc2, "p80", ep("10.180.0.2", 80, node=TEST_NODE_NAME), ep("10.180.1.2", 80, node="remote")),
        info(svc3, "p80", ep("10.180.0.3", 80, node=TEST_NODE_NAME), ep("10.180.1.3", 80, node="remote")),
    ]


def nodeport_ports(family: int = 4):
    """TestNodePorts: a NodePort service, one endpoint without a node and one local."""
    if family == 4:
        svc_ip, ep1, ep2 = "172.30.0.41", "10.180.0.1", "10.180.2.1"
    else:
        svc_ip, ep1, ep2 = "fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1"
    svc = service("ns1", "svc1", svc_ip, port("p80", 80, node_port=3001), type="NodePort")
    return [info(svc, "p80", ep(ep1, 80), ep(ep2, 80, node=TEST_NODE_NAME))]


def loadbalancer_ports():
    """TestLoadBalancer: two LB IPs, source ranges that include the node IP."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  load_balancer_ips=("1.2.3.4", "5.6.7.8"),
                  load_balancer_source_ranges=("192.168.0.0/24", " 203.0.113.0/25"))
    return [info(svc, "p80", ep("10.180.0.1", 80))]


IPV6_CONFIG = cfg(node_ips=("2001:db8::1", "2001:db8:1::2"), cluster_cidr="fd00:10::/64")

# (golden file, ports, config, source in kube-proxy's proxier_test.go)
GOLDEN_CASES = [
    ("overall.restore", overall_ports, FAKE_PROXIER, "TestOverallIPTablesRules (verbatim)"),
    ("bad-ips.restore", bad_ips_ports, FAKE_PROXIER, "TestBadIPs (verbatim)"),
    ("repeated-1-initial.restore", lambda: repeated_ports(1), FAKE_PROXIER, "TestSyncProxyRulesRepeated (verbatim)"),
    ("clusterip-3-endpoints.restore", clusterip_3_endpoints, FAKE_PROXIER, "hand-written"),
    ("etp-local.restore", etp_local_ports, FAKE_PROXIER, "TestExternalTrafficPolicyLocal inputs"),
    ("itp-local.restore", lambda: itp_local_ports(TEST_NODE_NAME, "node1", "node2"), FAKE_PROXIER,
     "TestInternalTrafficPolicy inputs"),
    ("itp-local-no-local-endpoints.restore", lambda: itp_local_ports("node0", "node1", "node2"), FAKE_PROXIER,
     "TestInternalTrafficPolicy inputs"),
    ("terminating-endpoints.restore", lambda: terminating_ports(*ONLY_TERMINATING), FAKE_PROXIER,
     "TestTerminatingEndpointsTrafficPolicyLocal inputs"),
    ("masquerade-all.restore", lambda: masquerade_ports()[:1], cfg(masquerade_all=True),
     "TestInternalExternalMasquerade inputs, masqueradeAll"),
    ("no-cluster-cidr.restore", lambda: masquerade_ports()[1:2], cfg(cluster_cidr=None),
     "TestInternalExternalMasquerade inputs, no LocalTrafficDetector"),
    ("nodeport-addresses.restore", nodeport_ports,
     cfg(localhost_nodeports=False, nodeport_addresses=("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64")),
     "TestNodePorts inputs, multiple nodeport-addresses"),
    ("no-localhost-nodeports.restore", nodeport_ports, cfg(localhost_nodeports=False),
     "TestNodePorts inputs, localhost-nodeports disabled"),
    ("ipv6-nodeport.restore", lambda: nodeport_ports(6), IPV6_CONFIG, "TestNodePorts inputs, ipv6"),
    ("loadbalancer-source-ranges.restore", loadbalancer_ports, FAKE_PROXIER, "TestLoadBalancer inputs"),
    ("empty-random-fully-no-nfacct.restore", list, cfg(random_fully=True, nfacct=False),
     "TestMasqueradeRule + TestDropInvalidRule"),
    ("empty-tcp-be-liberal.restore", list, cfg(tcp_be_liberal=True), "TestDropInvalidRule, tcpLiberal"),
]


@pytest.mark.parametrize("name,ports,config,source", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_full_sync_matches_golden(name, ports, config, source):
    rendered = render_iptables(ports(), config)
    assert sort_iptables_rules(rendered) == golden("iptables", name)


@pytest.mark.parametrize("name", [c[0] for c in GOLDEN_CASES])
def test_golden_files_are_consistent(name):
    """kube-proxy's checkIPTablesRuleJumps on each full-sync golden file: no dangling jumps."""
    check_iptables_rule_jumps(golden("iptables", name))


def test_render_is_deterministic_and_order_independent():
    ports = overall_ports()
    assert render_iptables(ports, FAKE_PROXIER) == render_iptables(list(reversed(ports)), FAKE_PROXIER)


def test_restore_input_keeps_kube_proxy_write_order():
    """Unsorted, the input is what kube-proxy writes: filter then nat, chain lines first,
    KUBE-POSTROUTING before services, the NodePorts jump and KUBE-FORWARD last."""
    lines = render_iptables(repeated_ports(1), FAKE_PROXIER).splitlines()
    assert lines[:7] == ["*filter", ":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]",
                         ":KUBE-FORWARD - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]",
                         ":KUBE-FIREWALL - [0:0]"]
    nat = lines[lines.index("*nat"):]
    assert nat[1:5] == [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                        ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    first_rule = next(i for i, line in enumerate(nat) if line.startswith("-A"))
    assert nat[first_rule].startswith("-A KUBE-POSTROUTING -m mark ! --mark")
    assert "must be the last rule" in nat[-2] and nat[-1] == "COMMIT"


# --- partial syncs (TestSyncProxyRulesRepeated) -----------------------------------------------


PARTIAL_STEPS = [
    (1, 2, "repeated-2-add-svc3.restore"),
    (2, 3, "repeated-3-delete-svc2.restore"),
    (3, 4, "repeated-4-svc4-no-endpoints.restore"),
    (4, 5, "repeated-5-svc4-endpoint.restore"),
    (5, 6, "repeated-6-change-endpoint.restore"),
    (6, 7, "repeated-7-add-endpoint.restore"),
    (7, 8, "repeated-8-no-change.restore"),
]


@pytest.mark.parametrize("before,after,name", PARTIAL_STEPS, ids=[s[2] for s in PARTIAL_STEPS])
def test_partial_sync_matches_golden(before, after, name):
    rendered = render_iptables_partial(repeated_ports(before), repeated_ports(after), FAKE_PROXIER)
    assert sort_iptables_rules(rendered) == golden("iptables", name)


def test_full_resync_deletes_stale_chains():
    """The last step of TestSyncProxyRulesRepeated: after svc4 is deleted a full resync rewrites
    every chain and deletes svc4's, which iptables-save still lists."""
    existing = iptables.active_nat_chains(
        common.proxied_ports(repeated_ports(8), 4, TEST_NODE_NAME), FAKE_PROXIER,
        common.node_view(TEST_NODE_NAME, TEST_NODE_IPS, 4))
    rendered = render_iptables(repeated_ports(9), FAKE_PROXIER, existing_chains=existing | {"KUBE-NOT-OURS"})
    assert sort_iptables_rules(rendered) == golden("iptables", "repeated-9-full-resync.restore")


def test_partial_sync_of_changed_port_rewrites_the_whole_service():
    """The change trackers work per service: changing one port rewrites every port's chains."""
    svc = service("ns1", "svc1", "172.30.0.41", port("a", 80), port("b", 81))
    before = [info(svc, "a", ep("10.0.1.1", 80)), info(svc, "b", ep("10.0.1.1", 81))]
    after = [info(svc, "a", ep("10.0.1.1", 80)), info(svc, "b", ep("10.0.1.2", 81))]
    rendered = render_iptables_partial(before, after, FAKE_PROXIER)
    assert ":KUBE-SVC-" + iptables.port_proto_hash("ns1/svc1:a", "tcp") + " - [0:0]" in rendered
    assert ":KUBE-SVC-" + iptables.port_proto_hash("ns1/svc1:b", "tcp") + " - [0:0]" in rendered


# --- single chains and settings --------------------------------------------------------------


@pytest.mark.parametrize("random_fully,suffix", [(False, ""), (True, " --random-fully")])
def test_masquerade_rule(random_fully, suffix):
    """TestMasqueradeRule."""
    rendered = render_iptables([], cfg(random_fully=random_fully))
    assert iptables_chain(rendered, "nat", "KUBE-POSTROUTING") == [
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + suffix,
    ]


@pytest.mark.parametrize("nfacct,liberal,drop", [
    (False, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"),
    (True, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct "
                  "--nfacct-name ct_state_invalid_dropped_pkts -j DROP"),
    (False, True, None),
])
def test_drop_invalid_rule(nfacct, liberal, drop):
    """TestDropInvalidRule."""
    rules = iptables_chain(render_iptables([], cfg(nfacct=nfacct, tcp_be_liberal=liberal)), "filter", "KUBE-FORWARD")
    accept = [
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    assert rules == ([drop] if drop else []) + accept


def test_masquerade_mark_follows_masquerade_bit_like_go():
    """Without an injected mark, kube-proxy's fmt.Sprintf("%#08x", 1<<bit) is used."""
    rendered = render_iptables([], cfg(masquerade_mark=None))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000" in rendered
    assert common.masquerade_mark(14) == "0x00004000"
    assert common.masquerade_mark(15) == "0x00008000"


def test_large_cluster_mode_drops_endpoint_comments():
    """TestSyncProxyRulesLargeClusterMode: above 1000 endpoints, endpoint rules lose comments."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80))
    many = [ep(f"10.0.{i % 256}.{i // 256}", 80) for i in range(1001)]
    rendered = render_iptables([info(svc, "p80", *many)], cfg(masquerade_all=True))
    dnat = [l for l in rendered.splitlines() if "--to-destination 10.0.0.0:80" in l]
    assert dnat == ["-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"]


def test_probabilities():
    """TestComputeProbability."""
    assert [iptables.probability(n) for n in (1, 2, 10, 100000, 100001)] == [
        "1.0000000000", "0.5000000000", "0.1000000000", "0.0000100000", "0.0000099999"]


def test_chain_name_hashes():
    """Hashes from kube-proxy's expected outputs: sha256 of name + lowercase protocol (+ endpoint)."""
    view = common.service_port_view(info(service("ns1", "svc1", "172.30.0.41", port("p80", 80)), "p80"), 4)
    assert iptables.service_chain(view, "KUBE-SVC-") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    endpoint = common.EndpointView("10.180.0.1", 80, False, True, True, False)
    assert iptables.endpoint_chain(view, endpoint) == "KUBE-SEP-SXIVWICOYRO3J4NJ"


def test_headless_externalname_and_other_family_services_are_skipped():
    headless = dataclasses.replace(service("ns1", "h", "172.30.0.9", port("p", 80)), cluster_ips=())
    external = service("ns1", "x", "172.30.0.10", port("p", 80), type="ExternalName")
    v6only = service("ns1", "v6", "fd00::10", port("p", 80))
    rendered = render_iptables([info(headless, "p"), info(external, "p"), info(v6only, "p")], FAKE_PROXIER)
    assert rendered == render_iptables([], FAKE_PROXIER)


def _policy(svc, *endpoints, masquerade_all=False, cluster_cidr=None):
    proxied = common.proxied_ports([info(svc, "p80", *endpoints)], 4, TEST_NODE_NAME)[0]
    return common.service_policy(proxied, masquerade_all, common.local_detector(cluster_cidr, 4))


def test_service_policy_shared_by_the_iptables_and_nftables_renderers():
    """common.service_policy: which endpoints serve which traffic, reject or drop, masquerade."""
    Verdict, Masquerade = common.Verdict, common.Masquerade
    remote, local = ep("10.180.0.1", 80, "other-node"), ep("10.180.2.1", 80, TEST_NODE_NAME)
    cluster_ip = service("ns1", "svc1", "172.30.0.41", port("p80", 80))

    none = _policy(cluster_ip)
    assert (none.has_endpoints, none.internal_verdict, none.external_verdict) == (False, Verdict.REJECT, Verdict.REJECT)
    served = _policy(cluster_ip, remote)
    assert (served.internal_verdict, served.uses_cluster_endpoints, served.uses_local_endpoints) == (None, True, False)
    assert not served.uses_external_chain

    itp_local = dataclasses.replace(cluster_ip, internal_traffic_policy="Local")
    assert _policy(itp_local, remote).internal_verdict is Verdict.DROP       # endpoints, none local
    here = _policy(itp_local, remote, local)
    assert (here.internal_local, here.uses_local_endpoints, here.uses_cluster_endpoints) == (True, True, False)

    etp_local = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                        load_balancer_ips=("1.2.3.4",), external_traffic_policy="Local")
    elsewhere = _policy(etp_local, remote)
    assert (elsewhere.internal_verdict, elsewhere.external_verdict) == (None, Verdict.DROP)
    assert elsewhere.uses_external_chain and elsewhere.external_masquerade is Masquerade.FROM_NODE
    etp_cluster = dataclasses.replace(etp_local, external_traffic_policy="Cluster")
    assert _policy(etp_cluster, remote).external_masquerade is Masquerade.ALL

    assert _policy(cluster_ip, remote).internal_masquerade is Masquerade.NONE
    assert _policy(cluster_ip, remote, cluster_cidr=POD_CIDR).internal_masquerade is Masquerade.OFF_CLUSTER
    assert _policy(cluster_ip, remote, masquerade_all=True, cluster_cidr=POD_CIDR).internal_masquerade \
        is Masquerade.ALL


def test_jump_rules():
    rules = render_jump_rules(FAKE_PROXIER)
    assert rules[0] == ["iptables", "-w", "5", "-W", "100000", "-I", "INPUT", "-t", "filter",
                        "-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                        "kubernetes externally-visible service portals", "-j", "KUBE-EXTERNAL-SERVICES"]
    assert ["iptables", "-w", "5", "-W", "100000", "-I", "PREROUTING", "-t", "nat", "-m", "comment",
            "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"] in rules
    assert rules[-1] == ["iptables", "-w", "5", "-W", "100000", "-I", "OUTPUT", "-t", "filter",
                         "-j", "KUBE-FIREWALL"]
    assert len(rules) == 14
    assert render_jump_rules(IPV6_CONFIG)[0][0] == "ip6tables"
    chains = render_jump_chains(FAKE_PROXIER)
    assert ["iptables", "-w", "5", "-W", "100000", "-N", "KUBE-SERVICES", "-t", "nat"] in chains
    assert len(chains) == len({tuple(c) for c in chains}) == 8   # 6 filter + 2 nat chains


# --- packet flows (runPacketFlowTests) --------------------------------------------------------

POD = "10.0.0.2"


def flows(ports, config, cases):
    """Trace each (name, source, destination, port, protocol, expected output, masquerade)."""
    rendered = render_iptables(ports, config)
    for name, src, dst, dport, proto, output, masq in cases:
        trace = trace_iptables(rendered, src, dst, dport, proto, node_ips=config.node_ips)
        assert (trace.output, trace.masquerade) == (output, masq), \
            f"{name}: {proto} {src} -> {dst}:{dport}\nmatched:\n" + "\n".join(trace.matched)


def test_flows_trace_packet():
    """TestTracePacket's cases, against TestOverallIPTablesRules' services."""
    flows(overall_ports(), FAKE_PROXIER, [
        ("no match", POD, "10.0.0.3", 80, "tcp", "", False),
        ("single endpoint", POD, "172.30.0.41", 80, "tcp", "10.180.0.1:80", False),
        ("multiple endpoints", POD, "172.30.0.44", 80, "tcp", "10.180.0.4:80, 10.180.0.5:80", False),
        ("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "tcp", "10.180.0.2:80", True),
        ("DROP", TEST_EXTERNAL_CLIENT, "192.168.99.22", 80, "tcp", "DROP", False),
        ("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "tcp", "ACCEPT", False),
        ("REJECT", POD, "172.30.0.46", 80, "tcp", "REJECT", False),
    ])


def test_flows_no_endpoints_reject():
    """TestNoEndpointsReject."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  external_ips=("192.168.99.11",), load_balancer_ips=("1.2.3.4",))
    flows([info(svc, "p80")], FAKE_PROXIER, [
        ("pod to cluster IP", POD, "172.30.0.41", 80, "tcp", "REJECT", False),
        ("external to external IP", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, "tcp", "REJECT", False),
        ("pod to NodePort", POD, TEST_NODE_IP, 3001, "tcp", "REJECT", False),
        ("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "tcp", "REJECT", False),
        ("pod to LB IP", POD, "1.2.3.4", 80, "tcp", "REJECT", False),
        ("external to LB IP", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "tcp", "REJECT", False),
    ])


def test_flows_cluster_ip_general():
    """TestClusterIPGeneral: ports, target ports, TCP/UDP/SCTP on one port number, hairpin."""
    svc1 = service("ns1", "svc1", "172.30.0.41", port("http", 80))
    svc2 = service("ns2", "svc2", "172.30.0.42", port("http", 80), port("https", 443, target_port=8443),
                   port("dns-udp", 53, "UDP"), port("dns-tcp", 53, target_port=5353), port("dns-sctp", 53, "SCTP"))
    both = lambda p: (ep("10.180.0.1", p, node=TEST_NODE_NAME), ep("10.180.2.1", p, node="node2"))
    ports = [
        info(svc1, "http", ep("10.180.0.1", 80, node=TEST_NODE_NAME)),
        info(svc2, "http", *both(80)), info(svc2, "https", *both(8443)), info(svc2, "dns-udp", *both(53)),
        info(svc2, "dns-tcp", *both(5353)), info(svc2, "dns-sctp", *both(53)),
    ]
    src = "10.180.0.2"
    flows(ports, FAKE_PROXIER, [
        ("simple clusterIP", src, "172.30.0.41", 80, "tcp", "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "tcp", "10.180.0.1:80", True),
        ("multiple endpoints", src, "172.30.0.42", 80, "tcp", "10.180.0.1:80, 10.180.2.1:80", False),
        ("TargetPort", src, "172.30.0.42", 443, "tcp", "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("TCP on 53", src, "172.30.0.42", 53, "tcp", "10.180.0.1:5353, 10.180.2.1:5353", False),
        ("UDP on 53", src, "172.30.0.42", 53, "udp", "10.180.0.1:53, 10.180.2.1:53", False),
        ("SCTP on 53", src, "172.30.0.42", 53, "sctp", "10.180.0.1:53, 10.180.2.1:53", False),
        ("TCP-only port does not match UDP", src, "172.30.0.42", 80, "udp", "", False),
        ("svc1 does not accept svc2's ports", src, "172.30.0.41", 443, "tcp", "", False),
    ])


def test_flows_load_balancer_source_ranges():
    """TestLoadBalancer."""
    out = "10.180.0.1:80"
    flows(loadbalancer_ports(), FAKE_PROXIER, [
        ("pod to cluster IP", POD, "172.30.0.41", 80, "tcp", out, False),
        ("external to nodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "tcp", out, True),
        ("nodePort bypasses source ranges", TEST_EXTERNAL_CLIENT_BLOCKED, TEST_NODE_IP, 3001, "tcp", out, True),
        ("accepted external to LB1", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "tcp", out, True),
        ("accepted external to LB2", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, "tcp", out, True),
        ("blocked external to LB1", TEST_EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "tcp", "DROP", False),
        ("blocked external to LB2", TEST_EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "tcp", "DROP", False),
        ("pod to LB1 (blocked)", POD, "1.2.3.4", 80, "tcp", "DROP", False),
        ("pod to LB2 (blocked)", POD, "5.6.7.8", 80, "tcp", "DROP", False),
        ("node to LB1 (allowed)", TEST_NODE_IP, "1.2.3.4", 80, "tcp", out, True),
        ("node to LB2 (allowed)", TEST_NODE_IP, "5.6.7.8", 80, "tcp", out, True),
        ("same node to LB1, SNATted to LB1", "1.2.3.4", "1.2.3.4", 80, "tcp", out, True),
        ("same node to LB2, SNATted to LB2", "5.6.7.8", "5.6.7.8", 80, "tcp", out, True),
    ])


def test_flows_external_traffic_policy_local():
    """TestExternalTrafficPolicyLocal."""
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    flows(etp_local_ports(), FAKE_PROXIER, [
        ("pod to cluster IP", POD, "172.30.0.41", 80, "tcp", both, False),
        ("pod to external IP", POD, TEST_EXTERNAL_IP, 80, "tcp", both, False),
        ("external to external IP", TEST_EXTERNAL_CLIENT, TEST_EXTERNAL_IP, 80, "tcp", local, False),
        ("pod to LB IP", POD, "1.2.3.4", 80, "tcp", both, False),
        ("external to LB IP", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "tcp", local, False),
        ("pod to NodePort", POD, TEST_NODE_IP, 3001, "tcp", both, False),
        ("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "tcp", local, False),
    ])


def test_flows_external_traffic_policy_cluster():
    """TestExternalTrafficPolicyCluster."""
    both = "10.180.0.1:80, 10.180.2.1:80"
    flows(etp_cluster_ports(), FAKE_PROXIER, [
        ("pod to cluster IP", POD, "172.30.0.41", 80, "tcp", both, False),
        ("pod to external IP", POD, TEST_EXTERNAL_IP, 80, "tcp", both, True),
        ("external to external IP", TEST_EXTERNAL_CLIENT, TEST_EXTERNAL_IP, 80, "tcp", both, True),
        ("pod to LB IP", POD, "1.2.3.4", 80, "tcp", both, True),
        ("external to LB IP", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "tcp", both, True),
        ("pod to NodePort", POD, TEST_NODE_IP, 3001, "tcp", both, True),
        ("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "tcp", both, True),
    ])


@pytest.mark.parametrize("nodes,output", [
    ((TEST_NODE_NAME, "node1", "node2"), "10.0.1.1:80"),
    ((TEST_NODE_NAME, TEST_NODE_NAME, "node2"), "10.0.1.1:80, 10.0.1.2:80"),
    (("node0", "node1", "node2"), "DROP"),
])
def test_flows_internal_traffic_policy_local(nodes, output):
    """TestInternalTrafficPolicy; with no endpoints at all the cluster IP rejects."""
    flows(itp_local_ports(*nodes), FAKE_PROXIER, [("pod to ClusterIP", POD, "172.30.1.1", 80, "tcp", output, False)])
    flows(itp_local_ports(), FAKE_PROXIER, [("endpoints deleted", POD, "172.30.1.1", 80, "tcp", "REJECT", False)])


@pytest.mark.parametrize("policy,endpoints,to_cluster_ip,to_lb,lb_masq", [
    ("Local", (ep("10.0.1.1", 80, node=TEST_NODE_NAME), ep("10.0.1.2", 80, node=TEST_NODE_NAME),
               ep("10.0.1.3", 80, node=TEST_NODE_NAME, ready=False, terminating=True),
               ep("10.0.1.4", 80, node=TEST_NODE_NAME, ready=False, serving=False, terminating=True),
               ep("10.0.1.5", 80, node="node-1")),
     "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", "10.0.1.1:80, 10.0.1.2:80", False),
    ("Local", ONLY_TERMINATING, "10.0.1.5:80", "10.0.1.2:80, 10.0.1.3:80", False),
    ("Local", (ep("10.0.1.5", 80, node="node-1", ready=False, terminating=True),), "10.0.1.5:80", "DROP", False),
    ("Local", (ep("10.0.1.5", 80, node=TEST_NODE_NAME, ready=False, serving=False, terminating=True),),
     "REJECT", "REJECT", False),
    ("Cluster", (ep("10.0.1.2", 80, node=TEST_NODE_NAME, ready=False, terminating=True),
                 ep("10.0.1.3", 80, node=TEST_NODE_NAME, ready=False, terminating=True),
                 ep("10.0.1.4", 80, node="another-node", ready=False, serving=False, terminating=True),
                 ep("10.0.1.5", 80, node="another-node", ready=False, terminating=True)),
     "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", True),
])
def test_flows_terminating_endpoints(policy, endpoints, to_cluster_ip, to_lb, lb_masq):
    """TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster (KEP-1669)."""
    ports = terminating_ports(*endpoints)
    ports = [dataclasses.replace(p, service=dataclasses.replace(p.service, external_traffic_policy=policy))
             for p in ports]
    flows(ports, FAKE_PROXIER, [
        ("pod to clusterIP", POD, "172.30.1.1", 80, "tcp", to_cluster_ip, False),
        ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "tcp", to_lb, lb_masq and to_lb != "REJECT"),
    ])


# TestInternalExternalMasquerade: the base expectations and each variant's overrides.
MASQ_FLOWS = [
    ("pod to ClusterIP", POD, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", False),
    ("pod to NodePort", POD, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to LB", POD, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to ClusterIP", TEST_NODE_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to NodePort", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to LB", TEST_NODE_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to ClusterIP", TEST_EXTERNAL_CLIENT, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to NodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to ClusterIP with eTP:Local", POD, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to NodePort with eTP:Local", POD, TEST_NODE_IP, 3002, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to LB with eTP:Local", POD, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("node to ClusterIP with eTP:Local", TEST_NODE_IP, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to NodePort with eTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("localhost to NodePort with eTP:Local", "127.0.0.1", "127.0.0.1", 3002, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to LB with eTP:Local", TEST_NODE_IP, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to ClusterIP with eTP:Local", TEST_EXTERNAL_CLIENT, "172.30.0.42", 80,
     "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to NodePort with eTP:Local", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3002, "10.180.0.2:80", False),
    ("external to LB with eTP:Local", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.2:80", False),
    ("pod to ClusterIP with iTP:Local", POD, "172.30.0.43", 80, "10.180.0.3:80", False),
    ("pod to NodePort with iTP:Local", POD, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("pod to LB with iTP:Local", POD, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to ClusterIP with iTP:Local", TEST_NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("node to NodePort with iTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("localhost to NodePort with iTP:Local", "127.0.0.1", "127.0.0.1", 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to LB with iTP:Local", TEST_NODE_IP, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to ClusterIP with iTP:Local", TEST_EXTERNAL_CLIENT, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("external to NodePort with iTP:Local", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3003,
     "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to LB with iTP:Local", TEST_EXTERNAL_CLIENT, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
]
NO_DETECTOR = {
    "node to ClusterIP": {"masq": False}, "node to ClusterIP with eTP:Local": {"masq": False},
    "node to ClusterIP with iTP:Local": {"masq": False}, "external to ClusterIP": {"masq": False},
    "external to ClusterIP with eTP:Local": {"masq": False}, "external to ClusterIP with iTP:Local": {"masq": False},
    "pod to NodePort with eTP:Local": {"output": "10.180.0.2:80"},
    "pod to LB with eTP:Local": {"output": "10.180.0.2:80"},
}
MASQUERADE_ALL = {
    "pod to ClusterIP": {"masq": True}, "pod to ClusterIP with eTP:Local": {"masq": True},
    "pod to ClusterIP with iTP:Local": {"masq": True},
}


@pytest.mark.parametrize("masquerade_all,cluster_cidr,overrides", [
    (False, POD_CIDR, {}),
    (False, None, NO_DETECTOR),
    (True, POD_CIDR, MASQUERADE_ALL),
    (True, None, {**MASQUERADE_ALL, **{k: v for k, v in NO_DETECTOR.items() if "output" in v}}),
], ids=["base", "no LocalTrafficDetector", "masqueradeAll", "masqueradeAll, no LocalTrafficDetector"])
def test_flows_internal_external_masquerade(masquerade_all, cluster_cidr, overrides):
    cases = []
    for name, src, dst, dport, output, masq in MASQ_FLOWS:
        override = overrides.get(name, {})
        cases.append((name, src, dst, dport, "tcp", override.get("output", output), override.get("masq", masq)))
    flows(masquerade_ports(), cfg(masquerade_all=masquerade_all, cluster_cidr=cluster_cidr), cases)


@pytest.mark.parametrize("family,localhost_nodeports,addresses,alt_node_ip_allowed", [
    (4, True, (), True),
    (4, False, (), True),
    (4, False, ("192.168.0.0/24", "127.0.0.1/32"), False),
    (4, False, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), True),
    (6, True, (), True),
    (6, False, (), True),
    (6, False, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), False),
])
def test_flows_node_ports(family, localhost_nodeports, addresses, alt_node_ip_allowed):
    """TestNodePorts: --nodeport-addresses and --iptables-localhost-nodeports combinations."""
    if family == 4:
        config = cfg(localhost_nodeports=localhost_nodeports, nodeport_addresses=addresses)
        svc_ip, pod, client, node_ip, alt_ip, localhost = ("172.30.0.41", POD, TEST_EXTERNAL_CLIENT,
                                                            TEST_NODE_IP, TEST_NODE_IP_ALT, "127.0.0.1")
        output = "10.180.0.1:80, 10.180.2.1:80"
    else:
        config = dataclasses.replace(IPV6_CONFIG, localhost_nodeports=localhost_nodeports,
                                     nodeport_addresses=addresses)
        svc_ip, pod, client, node_ip, alt_ip, localhost = ("fd00:172:30::41", "fd00:10::2", "2600:5200::1",
                                                            "2001:db8::1", "2001:db8:1::2", "::1")
        output = "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80"
    localhost_allowed = family == 4 and localhost_nodeports
    flows(nodeport_ports(family), config, [
        ("pod to cluster IP", pod, svc_ip, 80, "tcp", output, False),
        ("external to nodePort", client, node_ip, 3001, "tcp", output, True),
        ("node to nodePort", node_ip, node_ip, 3001, "tcp", output, True),
        ("localhost to nodePort", localhost, localhost, 3001, "tcp",
         output if localhost_allowed else "", localhost_allowed),
        ("external to nodePort on secondary IP", client, alt_ip, 3001, "tcp",
         output if alt_node_ip_allowed else "", alt_node_ip_allowed),
    ])
    firewall = iptables_chain(render_iptables(nodeport_ports(family), config), "filter", "KUBE-FIREWALL")
    assert bool(firewall) == localhost_allowed


def test_flows_health_check_node_port():
    """TestHealthCheckNodePort: accepted even with no endpoints and nodeport-addresses 127/8."""
    svc = service("ns1", "svc1", "172.30.0.42", port("p80", 80, node_port=3001), type="LoadBalancer",
                  external_traffic_policy="Local", health_check_node_port=30000)
    flows([info(svc, "p80")], cfg(nodeport_addresses=("127.0.0.0/8",)), [
        ("firewall accepts HealthCheckNodePort", "1.2.3.4", TEST_NODE_IP, 30000, "tcp", "ACCEPT", False),
    ])
    flows([], cfg(nodeport_addresses=("127.0.0.0/8",)), [
        ("HealthCheckNodePort no longer has any rule", "1.2.3.4", TEST_NODE_IP, 30000, "tcp", "", False),
    ])


def test_flows_session_affinity_first_packet():
    """Affinity checks never match a new client; the spread picks among all endpoints."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80), session_affinity="ClientIP",
                  session_affinity_timeout=60)
    ports = [info(svc, "p80", ep("10.180.0.1", 80), ep("10.180.0.2", 80))]
    flows(ports, FAKE_PROXIER, [("new client", POD, "172.30.0.41", 80, "tcp", "10.180.0.1:80, 10.180.0.2:80", False)])
    assert "--rcheck --seconds 60 --reap" in render_iptables(ports, FAKE_PROXIER)


# --- the kernel's own parser -------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("name,ports,config,source", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_iptables_restore_accepts_input(name, ports, config, source):
    """``iptables-restore --test`` parses every rule and asks the kernel for each match and
    target, applying nothing. nfacct is off: ``-m nfacct`` needs kube-proxy's counter objects."""
    config = dataclasses.replace(config, nfacct=False)
    tool = "ip6tables-restore" if common.node_view(config.node_name, config.node_ips, config.ip_family).family == 6 \
        else "iptables-restore"
    result = subprocess.run([tool, "--test", "--noflush"], input=render_iptables(ports(), config),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- `lbctl render iptables` -------------------------------------------------------------------

CLI_PORTS = cli_ports()


@pytest.fixture
def manifests(tmp_path):
    return write_cli_manifests(tmp_path)


def render_cli(*argv: str) -> int:
    from lbctl.cli import main as cli

    return cli.main(["render", *argv])


def test_cli_renders_the_manifests(manifests, capsys):
    """The command joins the manifests like the agent does and maps every flag to the config."""
    rc = render_cli("iptables", "--manifests", str(manifests), "--node-name", TEST_NODE_NAME,
                    "--node-ip", TEST_NODE_IP, "--node-ip", TEST_NODE_IP_ALT, "--cluster-cidr", POD_CIDR,
                    "--masquerade-all", "--nodeport-addresses", "192.168.0.0/24, 192.168.1.0/24",
                    "--no-localhost-nodeports", "--random-fully", "--nfacct", "--no-tcp-be-liberal")
    out, err = capsys.readouterr()
    expected = IptablesConfig(
        node_name=TEST_NODE_NAME, node_ips=(TEST_NODE_IP, TEST_NODE_IP_ALT), cluster_cidr=POD_CIDR,
        masquerade_all=True, nodeport_addresses=("192.168.0.0/24", "192.168.1.0/24"),
        localhost_nodeports=False, random_fully=True, nfacct=True, tcp_be_liberal=False)
    assert (rc, err) == (0, "")
    assert out == render_iptables(CLI_PORTS, expected)
    assert "--random-fully" in out and "KUBE-FIREWALL" not in out
    assert "-d 192.168.0.2 -j KUBE-NODEPORTS" in out and "-d 192.168.1.2 -j KUBE-NODEPORTS" in out


def test_cli_probes_the_host_when_not_told(manifests, capsys, monkeypatch):
    from lbctl.datapath.kubeproxy import probes

    monkeypatch.setattr(probes, "probe_random_fully", lambda: True)
    monkeypatch.setattr(probes, "probe_nfacct", lambda: False)
    monkeypatch.setattr(probes, "probe_tcp_be_liberal", lambda: True)
    assert render_cli("iptables", "--manifests", str(manifests), "--node-name", TEST_NODE_NAME,
                      "--node-ip", TEST_NODE_IP) == 0
    out = capsys.readouterr().out
    assert out == render_iptables(CLI_PORTS, IptablesConfig(
        node_name=TEST_NODE_NAME, node_ips=(TEST_NODE_IP,), random_fully=True, nfacct=False,
        tcp_be_liberal=True))


def test_cli_reports_manifest_problems_and_renders_the_rest(manifests, capsys):
    (manifests / "broken.yaml").write_text("kind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n")
    assert render_cli("iptables", "--manifests", str(manifests), "--node-name", "n",
                      "--node-ip", TEST_NODE_IP, "--no-nfacct") == 0
    out, err = capsys.readouterr()
    assert "lbctl render iptables: " in err and "broken.yaml" in err
    assert '"ns1/svc1:p80 cluster IP"' in out


@pytest.mark.parametrize("argv,message", [
    (("--node-ip", "192.168.0.300"), "is not an IP address"),
    (("--node-ip", TEST_NODE_IP, "--cluster-cidr", "10.0.0.0/99"), "is not a CIDR"),
    (("--node-ip", TEST_NODE_IP, "--nodeport-addresses", "primary,nonsense"), "is not a CIDR"),
    (("--node-ip", TEST_NODE_IP, "--masquerade-bit", "32"), "out of range"),
])
def test_cli_refuses_bad_flags(manifests, capsys, argv, message):
    assert render_cli("iptables", "--manifests", str(manifests), "--node-name", "n", *argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err


def test_cli_refuses_a_missing_manifests_directory(tmp_path, capsys):
    assert render_cli("iptables", "--manifests", str(tmp_path / "nope"), "--node-name", "n",
                      "--node-ip", TEST_NODE_IP) == 1
    out, err = capsys.readouterr()
    assert out == "" and "not a directory" in err


def test_cli_prints_jump_rules(manifests, capsys):
    config = IptablesConfig(node_name="n", node_ips=(TEST_NODE_IP,))
    assert render_cli("iptables", "--manifests", str(manifests), "--node-name", "n",
                      "--node-ip", TEST_NODE_IP, "--jump-rules") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [shlex.join(a) for a in render_jump_chains(config) + render_jump_rules(config)]


def test_host_probes(monkeypatch, tmp_path):
    """The probes read the host; here they are pointed at files and fake tool output."""
    from lbctl.datapath.kubeproxy import probes

    sysctl = tmp_path / "nf_conntrack_tcp_be_liberal"
    monkeypatch.setattr(probes, "TCP_BE_LIBERAL_SYSCTL", sysctl)
    assert probes.probe_tcp_be_liberal() is False          # no conntrack module: kube-proxy's 0
    sysctl.write_text("1\n")
    assert probes.probe_tcp_be_liberal() is True
    assert probes.version("iptables v1.8.9 (nf_tables)") == (1, 8, 9)
    assert probes.version("6.1.0-18-amd64") == (6, 1, 0)
    assert probes.version("iptables v1.6.1") < probes.RANDOM_FULLY_MIN_IPTABLES
    assert isinstance(probes.probe_random_fully(), bool) and isinstance(probes.probe_nfacct(), bool)
