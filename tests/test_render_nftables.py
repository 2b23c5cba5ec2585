"""Golden tests for the kube-proxy v1.32 nftables renderer.

kube-proxy's nftables tests (pkg/proxy/nftables/proxier_test.go) compare the table a sync
leaves behind (knftables.Fake.Dump()) with an expected list of "add ..." lines, ignoring order
(sortNFTablesTransaction). We do the same: the rendered transaction is replayed on an empty
table (apply_nft_transaction) and compared with golden files that hold kube-proxy's
expectations: verbatim where its tests have them (baseRules + TestOverallNFTablesRules,
TestSyncProxyRulesStartup, states of TestSyncProxyRulesRepeated), hand-written from
proxier.go otherwise. The v1.32 generation of those tests is used (filter-output-post-dnat,
"ip daddr X tcp dport N ip saddr != CIDR" masquerade rules).
"""
from __future__ import annotations

import dataclasses
import subprocess

import pytest
from kubeproxy_cases import (
    POD_CIDR,
    TEST_EXTERNAL_IP,
    TEST_NODE_IPS,
    TEST_NODE_NAME,
    apply_nft_transaction,
    cli_ports,
    ep,
    golden,
    info,
    nft_chain_rules,
    port,
    service,
    sort_nftables_transaction,
    write_cli_manifests,
)

from lbctl.datapath.kubeproxy import NftablesConfig, common, nftables, render_nftables

# kube-proxy's NewFakeProxier for nftables: service CIDR 172.30.0.0/16 known, NodePorts on the
# primary node IP (192.168.0.2/32), pod CIDR detector, the mark injected as "0x4000".
FAKE_PROXIER = NftablesConfig(
    node_name=TEST_NODE_NAME,
    node_ips=TEST_NODE_IPS,
    cluster_cidr=POD_CIDR,
    service_cidrs=("172.30.0.0/16",),
    masquerade_mark="0x4000",
)


def cfg(**changes) -> NftablesConfig:
    return dataclasses.replace(FAKE_PROXIER, **changes)


def table_after(transaction: str) -> str:
    return sort_nftables_transaction(apply_nft_transaction(transaction))


# --- inputs (kube-proxy's nftables test fixtures) ---------------------------------------------


def overall_ports():
    """TestOverallNFTablesRules (same services as the iptables TestOverallIPTablesRules)."""
    svc1 = service("ns1", "svc1", "172.30.0.41", port("p80", 80))
    svc2 = service("ns2", "svc2", "172.30.0.42", port("p80", 80, node_port=3001), type="LoadBalancer",
                   external_traffic_policy="Local", load_balancer_ips=("1.2.3.4",),
                   external_ips=("192.168.99.22",), health_check_node_port=30000)
    svc3 = service("ns3", "svc3", "172.30.0.43", port("p80", 80, node_port=3003), type="NodePort")
    svc4 = service("ns4", "svc4", "172.30.0.44", port("p80", 80), type="NodePort", external_ips=("192.168.99.33",))
    svc5 = service("ns5", "svc5", "172.30.0.45", port("p80", 80, node_port=3002), type="LoadBalancer",
                   load_balancer_ips=("5.6.7.8",), health_check_node_port=30000,
                   load_balancer_source_ranges=(" 203.0.113.0/25",), session_affinity="ClientIP")
    svc6 = service("ns6", "svc6", "172.30.0.46", port("p80", 80))
    return [
        info(svc1, "p80", ep("10.180.0.1", 80)),
        info(svc2, "p80", ep("10.180.0.2", 80)),
        info(svc3, "p80", ep("10.180.0.3", 80)),
        info(svc4, "p80", ep("10.180.0.4", 80), ep("10.180.0.5", 80, node=TEST_NODE_NAME)),
        info(svc5, "p80", ep("10.180.0.3", 80)),
        info(svc6, "p80"),
    ]


def cluster_ip(namespace, name, ip, port_name, number, *addresses):
    svc = service(namespace, name, ip, port(port_name, number))
    return info(svc, port_name, *(ep(a, number) for a in addresses))


def startup_ports():
    """TestSyncProxyRulesStartup: svc1 with two endpoints, svc2, svc3 without endpoints."""
    return [cluster_ip("ns1", "svc1", "172.30.0.41", "p80", 80, "10.0.1.1", "10.0.1.2"),
            cluster_ip("ns2", "svc2", "172.30.0.42", "p8080", 8080, "10.0.2.1"),
            cluster_ip("ns3", "svc3", "172.30.0.43", "p80", 80)]


def repeated_svc4_no_endpoints():
    return [cluster_ip("ns1", "svc1", "172.30.0.41", "p80", 80, "10.0.1.1"),
            cluster_ip("ns3", "svc3", "172.30.0.43", "p80", 80, "10.0.3.1"),
            cluster_ip("ns4", "svc4", "172.30.0.44", "p80", 80)]


def repeated_add_endpoint():
    return [cluster_ip("ns1", "svc1", "172.30.0.41", "p80", 80, "10.0.1.1"),
            cluster_ip("ns3", "svc3", "172.30.0.43", "p80", 80, "10.0.3.2", "10.0.3.3"),
            cluster_ip("ns4", "svc4", "172.30.0.44", "p80", 80, "10.0.4.1")]


def etp_local_ports():
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  external_traffic_policy="Local", external_ips=(TEST_EXTERNAL_IP,),
                  load_balancer_ips=("1.2.3.4",), health_check_node_port=30000)
    return [info(svc, "p80", ep("10.180.0.1", 80), ep("10.180.2.1", 80, node=TEST_NODE_NAME))]


def itp_local_no_local_endpoints():
    svc = service("ns1", "svc1", "172.30.1.1", port("", 80), internal_traffic_policy="Local")
    return [info(svc, "", ep("10.0.1.1", 80, node="node0"), ep("10.0.1.2", 80, node="node1"),
                 ep("10.0.1.3", 80, node="node2"))]


def terminating_ports():
    svc = service("ns1", "svc1", "172.30.1.1", port("", 80), type="LoadBalancer",
                  external_traffic_policy="Local", health_check_node_port=30000, load_balancer_ips=("1.2.3.4",))
    return [info(svc, "",
                 ep("10.0.1.2", 80, node=TEST_NODE_NAME, ready=False, terminating=True),
                 ep("10.0.1.3", 80, node=TEST_NODE_NAME, ready=False, terminating=True),
                 ep("10.0.1.4", 80, node=TEST_NODE_NAME, ready=False, serving=False, terminating=True),
                 ep("10.0.1.5", 80, node="node-1"))]


def masquerade_svc1():
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  health_check_node_port=30001, load_balancer_ips=("1.2.3.4",))
    return [info(svc, "p80", ep("10.180.0.1", 80, node=TEST_NODE_NAME), ep("10.180.1.1", 80, node="remote"))]


def masquerade_svc2():
    svc = service("ns2", "svc2", "172.30.0.42", port("p80", 80, node_port=3002), type="LoadBalancer",
                  health_check_node_port=30002, external_traffic_policy="Local", load_balancer_ips=("5.6.7.8",))
    return [info(svc, "p80", ep("10.180.0.2", 80, node=TEST_NODE_NAME), ep("10.180.1.2", 80, node="remote"))]


def loadbalancer_ports():
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="LoadBalancer",
                  load_balancer_ips=("1.2.3.4", "5.6.7.8"),
                  load_balancer_source_ranges=("192.168.0.0/24", " 203.0.113.0/25"))
    return [info(svc, "p80", ep("10.180.0.1", 80))]


def nodeport_ports(family: int = 4):
    if family == 4:
        svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=3001), type="NodePort")
        return [info(svc, "p80", ep("10.180.0.1", 80))]
    svc = service("ns1", "svc1", "fd00:172:30::41", port("p80", 80, node_port=3001), type="NodePort")
    return [info(svc, "p80", ep("fd00:10:180::1", 80), ep("fd00:10:180::2:1", 80, node=TEST_NODE_NAME))]


IPV6_CONFIG = cfg(node_ips=("2001:db8::1", "2001:db8:1::2"), cluster_cidr="fd00:10::/64",
                  service_cidrs=("fd00:10:96::/112",))

GOLDEN_CASES = [
    ("overall.nft", overall_ports, FAKE_PROXIER),
    ("startup.nft", startup_ports, FAKE_PROXIER),
    ("repeated-svc4-no-endpoints.nft", repeated_svc4_no_endpoints, FAKE_PROXIER),
    ("repeated-add-endpoint.nft", repeated_add_endpoint, FAKE_PROXIER),
    ("etp-local.nft", etp_local_ports, FAKE_PROXIER),
    ("itp-local-no-local-endpoints.nft", itp_local_no_local_endpoints, FAKE_PROXIER),
    ("terminating-endpoints.nft", terminating_ports, FAKE_PROXIER),
    ("masquerade-all.nft", masquerade_svc1, cfg(masquerade_all=True)),
    ("no-cluster-cidr.nft", masquerade_svc2, cfg(cluster_cidr=None)),
    ("loadbalancer-source-ranges.nft", loadbalancer_ports, FAKE_PROXIER),
    ("nodeport-match-all.nft", nodeport_ports, cfg(nodeport_addresses=("0.0.0.0/0",))),
    ("v132-defaults-empty.nft", list, cfg(service_cidrs=())),
    ("ipv6-nodeport.nft", lambda: nodeport_ports(6), IPV6_CONFIG),
]


@pytest.mark.parametrize("name,ports,config", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_full_sync_matches_golden(name, ports, config):
    assert table_after(render_nftables(ports(), config)) == sort_nftables_transaction(golden("nftables", name))


def test_render_is_deterministic_and_order_independent():
    ports = overall_ports()
    assert render_nftables(ports, FAKE_PROXIER) == render_nftables(list(reversed(ports)), FAKE_PROXIER)


def test_first_sync_transaction_shape():
    """What setupNFTables queues before any service: the table, an add+delete of each base chain
    (kube-proxy's first sync, so it may change their priority), the base chains with their
    hooks, and, as the element lists cannot be read on a clean node, flushes of the six
    sets/maps whose elements kube-proxy tracks."""
    lines = render_nftables([], FAKE_PROXIER).splitlines()
    assert lines[0] == 'add table ip kube-proxy { comment "rules for kube-proxy" ; }'
    assert lines[1:3] == ["add chain ip kube-proxy filter-prerouting", "delete chain ip kube-proxy filter-prerouting"]
    assert "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }" in lines
    assert lines[-6:] == [
        "flush set ip kube-proxy cluster-ips",
        "flush map ip kube-proxy service-ips",
        "flush map ip kube-proxy firewall-ips",
        "flush map ip kube-proxy no-endpoint-services",
        "flush map ip kube-proxy no-endpoint-nodeports",
        "flush map ip kube-proxy service-nodeports",
    ]


def test_every_goto_and_jump_target_exists_before_use():
    """nft -f applies the transaction in order: a chain must be added before a rule or a map
    element refers to it."""
    created: set[str] = set()
    for line in render_nftables(overall_ports(), FAKE_PROXIER).splitlines():
        words = line.split()
        if words[:2] == ["add", "chain"]:
            created.add(words[4])
        for verb in ("goto", "jump"):
            for i, word in enumerate(words[:-1]):
                if word == verb:
                    assert words[i + 1] in created, line


def test_numgen_spreads_over_all_endpoints():
    ports = [cluster_ip("ns1", "svc1", "172.30.0.41", "p80", 80, "10.0.1.3", "10.0.1.1", "10.0.1.2")]
    chain = "service-" + nftables.hash_and_truncate("ns1/svc1/tcp/p80")
    rules = nft_chain_rules(render_nftables(ports, FAKE_PROXIER), chain)
    assert rules[1].startswith("numgen random mod 3 vmap { 0 : goto endpoint-")
    assert [w for w in rules[1].split() if w.startswith("endpoint-")] == [
        "endpoint-" + nftables.hash_and_truncate(f"ns1/svc1/tcp/p80__10.0.1.{i}/80") for i in (1, 2, 3)]


def test_session_affinity_timeout():
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80), session_affinity="ClientIP",
                  session_affinity_timeout=60)
    rendered = render_nftables([info(svc, "p80", ep("10.0.1.1", 80))], FAKE_PROXIER)
    assert "{ type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }" in rendered


def test_masquerade_mark_follows_masquerade_bit_like_go():
    rendered = render_nftables([], cfg(masquerade_mark=None))
    assert "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000" in rendered


def test_chain_names_are_truncated_to_nftables_limit():
    """hashAndTruncate keeps names within nftables' limit; only the longest IPv6 endpoint names
    of 63-character namespace, service and port names are long enough to be cut."""
    long = "n" * 63
    view = common.service_port_view(info(service(long, long, "172.30.0.41", port(long, 80)), long), 4)
    base = nftables.service_chain_base(view)
    assert base == nftables.hash_and_truncate(f"{long}/{long}/tcp/{long}") and len(base) == 9 + 3 * 63 + 6
    endpoint = common.EndpointView("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, False, True, True, False)
    endpoint_base = nftables.endpoint_chain_base(view, endpoint)
    assert len(endpoint_base) == nftables.CHAIN_NAME_BASE_MAX and endpoint_base.endswith("...")


@pytest.mark.root
@pytest.mark.parametrize("name,ports,config", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_nft_accepts_transaction(name, ports, config):
    """``nft --check`` parses and validates the transaction against the kernel without applying it."""
    result = subprocess.run(["nft", "--check", "-f", "-"], input=render_nftables(ports(), config),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- `lbctl render nftables` --------------------------------------------------------------------


def test_cli_renders_the_manifests(tmp_path, capsys):
    """The command maps its flags to NftablesConfig; the iptables tests cover the shared parts."""
    from lbctl.cli import main as cli

    rc = cli.main(["render", "nftables", "--manifests", str(write_cli_manifests(tmp_path)),
                   "--node-name", TEST_NODE_NAME, "--node-ip", "192.168.0.2", "--cluster-cidr", POD_CIDR,
                   "--nodeport-addresses", "192.168.0.0/16", "--service-cidr", "172.30.0.0/16",
                   "--masquerade-bit", "12"])
    out, err = capsys.readouterr()
    expected = NftablesConfig(node_name=TEST_NODE_NAME, node_ips=("192.168.0.2",), cluster_cidr=POD_CIDR,
                              nodeport_addresses=("192.168.0.0/16",), service_cidrs=("172.30.0.0/16",),
                              masquerade_bit=12)
    assert (rc, err) == (0, "")
    assert out == render_nftables(cli_ports(), expected)
    assert "0x00001000" in out and "172.30.0.0/16" in out
