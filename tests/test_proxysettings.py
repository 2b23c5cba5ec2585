"""ProxySettings: kube-proxy's flags that change what the eBPF datapath does.

Its defaults are kube-proxy's (--masquerade-bit 14: 0x4000, KUBE-MARK-DROP's 0x8000, no
--masquerade-all, no --cluster-cidr, NodePorts on every local address as iptables mode), and
`lbctl run`'s flag defaults give exactly them; each flag reaches its field; a KubeProxyConfiguration
file fills what the command line did not give (the command line wins); a bad value is refused
with an error naming the flag or field; and what the settings become: the NodePort addresses
and the lb4_config value.
"""
from __future__ import annotations

import textwrap

import pytest

from lbctl.cli import config, kpconfig
from lbctl.cli import main as cli
from lbctl.datapath.ebpf import shared
from lbctl.datapath.ebpf.mode import EbpfMode, ProxySettings
from lbctl.datapath.kubeproxy.iptables import IptablesConfig


def run_args(*flags: str):
    return cli.build_parser().parse_args(["run", "--mode", "ebpf", *flags])


def settings_from(*flags: str) -> ProxySettings:
    return config.proxy_settings(run_args(*flags))


# --- defaults --------------------------------------------------------------------------------------


def test_defaults_are_kube_proxys():
    s = ProxySettings()
    assert s.masquerade_bit == 14 and s.masquerade_mark == 0x4000, "kube-proxy --masquerade-bit 14"
    assert s.drop_mark == 0x8000, "KUBE-MARK-DROP's mark"
    assert s.masquerade_all is False and s.cluster_cidr is None and s.ipv4_cluster_cidr is None
    assert s.nodeport_addresses == () and s.node_ips == ()
    assert s.masquerade_bit == IptablesConfig(node_name="n", node_ips=("192.0.2.2",)).masquerade_bit, \
        "the same default as the iptables mode's"


def test_run_flag_defaults_give_the_default_settings():
    assert settings_from("--node-ip", "192.0.2.2") == ProxySettings(node_ips=("192.0.2.2",))


def test_default_nodeport_addresses_are_every_local_address_as_iptables_mode():
    s = ProxySettings(node_ips=("192.0.2.2",))
    node = s.node_addresses("n", ["10.0.0.5", "127.0.0.1"])
    assert node.nodeport_ips == ("10.0.0.5", "127.0.0.1", "192.0.2.2"), "host addresses and the node IP"
    assert node.node_ip == "192.0.2.2"
    assert ProxySettings().node_addresses("n", ["10.0.0.5"]).node_ip is None, "no --node-ip, no node IP"


# --- flags -----------------------------------------------------------------------------------------


def test_each_flag_reaches_its_field():
    s = settings_from("--node-ip", "192.0.2.2", "--node-ip", "198.51.100.7",
                      "--nodeport-addresses", "192.0.2.0/24, 10.0.0.0/8", "--cluster-cidr", "10.244.0.0/16",
                      "--masquerade-all", "--masquerade-bit", "9")
    assert s == ProxySettings(node_ips=("192.0.2.2", "198.51.100.7"),
                              nodeport_addresses=("192.0.2.0/24", "10.0.0.0/8"),
                              cluster_cidr="10.244.0.0/16", masquerade_all=True, masquerade_bit=9)
    assert s.masquerade_mark == 0x200


def test_service_node_port_range_reaches_the_masquerade_ports():
    """The mark rule's masquerade picks ports outside the NodePort range: the flag's range, not
    the default one."""
    from lbctl.datapath.ebpf import rules

    s = settings_from("--node-ip", "192.0.2.2", "--service-node-port-range", "40000-40999")
    assert s.node_port_range == (40000, 40999)
    assert rules.masquerade_ports(s.node_port_range) != rules.masquerade_ports(ProxySettings().node_port_range)


def test_build_mode_gives_the_ebpf_mode_these_settings():
    mode = cli.build_mode(run_args("--node-ip", "192.0.2.2", "--masquerade-bit", "3", "--uplink-devices", "none"))
    assert isinstance(mode, EbpfMode)
    assert mode.settings == ProxySettings(node_ips=("192.0.2.2",), masquerade_bit=3)


def test_nodeport_addresses_primary_and_cidrs_pick_the_addresses():
    host = ["192.0.2.2", "10.0.0.5"]
    primary = ProxySettings(node_ips=("192.0.2.2",), nodeport_addresses=("primary",))
    assert primary.node_addresses("n", host).nodeport_ips == ("192.0.2.2",)
    cidr = ProxySettings(node_ips=("192.0.2.2",), nodeport_addresses=("10.0.0.0/8",))
    assert cidr.node_addresses("n", host).nodeport_ips == ("10.0.0.5",)


def test_dual_stack_cluster_cidr_keeps_the_ipv4_one():
    assert ProxySettings(cluster_cidr="fd00:10:244::/48,10.244.0.0/16").ipv4_cluster_cidr == "10.244.0.0/16"
    assert ProxySettings(cluster_cidr="fd00:10:244::/48").ipv4_cluster_cidr is None


def test_config_value_carries_every_setting():
    s = ProxySettings(cluster_cidr="10.244.0.0/16", masquerade_all=True, masquerade_bit=9)
    assert s.config_value() == shared.config_value("10.244.0.0/16", True, 0x200, 0x8000, False)
    assert s.config_value(drop_rule=True) == shared.config_value("10.244.0.0/16", True, 0x200, 0x8000, True)
    assert ProxySettings().config_value() == shared.config_value(None, False, 0x4000, 0x8000, False)
    assert ProxySettings().config_value() != s.config_value()


# --- the configuration file, and which wins -------------------------------------------------------


def config_file(tmp_path, body: str) -> str:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    + textwrap.dedent(body))
    return str(path)


def settings_with_file(path: str, *flags: str) -> ProxySettings:
    parser = cli.build_parser()
    argv = ["--mode", "ebpf", "--config", path, *flags]
    args = parser.parse_args(["run", *argv])
    kpconfig.apply(args, kpconfig.subparser(parser, "run"), argv)
    return config.proxy_settings(args)


FILE = """\
    bindAddress: 192.0.2.2
    clusterCIDR: 10.244.0.0/16
    nodePortAddresses: [192.0.2.0/24]
    iptables: {masqueradeBit: 10, masqueradeAll: true}
    nftables: {masqueradeBit: 3}
    """


def test_the_file_fills_the_settings(tmp_path):
    assert settings_with_file(config_file(tmp_path, FILE)) == ProxySettings(
        node_ips=("192.0.2.2",), nodeport_addresses=("192.0.2.0/24",), cluster_cidr="10.244.0.0/16",
        masquerade_all=True, masquerade_bit=10)


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    s = settings_with_file(config_file(tmp_path, FILE), "--masquerade-bit", "12", "--node-ip", "198.51.100.7",
                           "--cluster-cidr", "10.200.0.0/16", "--nodeport-addresses", "primary")
    assert s == ProxySettings(node_ips=("198.51.100.7",), nodeport_addresses=("primary",),
                              cluster_cidr="10.200.0.0/16", masquerade_all=True, masquerade_bit=12)


def test_unspecified_bind_address_leaves_the_node_ip_to_the_flag_default(tmp_path):
    s = settings_with_file(config_file(tmp_path, "bindAddress: 0.0.0.0\n"), "--node-ip", "192.0.2.9")
    assert s.node_ips == ("192.0.2.9",)


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--node-ip", "192.0.2.300"], "--node-ip '192.0.2.300' is not an IP address"),
    (["--cluster-cidr", "10.244.0.0/33"], "'10.244.0.0/33' is not a CIDR"),
    (["--nodeport-addresses", "192.0.2.0/24,nodes"], "'nodes' is not a CIDR"),
])
def test_bad_flag_values_are_refused_naming_them(flags, message):
    with pytest.raises(ValueError, match=message):
        settings_from("--node-ip", "192.0.2.2", *flags)
    with pytest.raises(ValueError, match=message):
        cli.build_mode(run_args(*flags, "--uplink-devices", "none"))


def test_every_bad_value_is_named_at_once():
    with pytest.raises(ValueError) as caught:
        settings_from("--node-ip", "not-an-ip", "--cluster-cidr", "10.0.0.0/99")
    assert "--node-ip 'not-an-ip'" in str(caught.value) and "'10.0.0.0/99'" in str(caught.value)


@pytest.mark.parametrize("bit", ["32", "-1", "x"])
def test_masquerade_bit_out_of_range_is_refused_by_the_flag(bit, capsys):
    assert cli.main(["run", "--mode", "ebpf", "--masquerade-bit", bit, "--manifests", "/nonexistent"]) == 2
    assert "--masquerade-bit" in capsys.readouterr().err


def test_bad_file_value_is_refused_naming_the_field(tmp_path):
    with pytest.raises(kpconfig.ConfigError, match="clusterCIDR"):
        settings_with_file(config_file(tmp_path, "clusterCIDR: [10.244.0.0/16]\n"))
