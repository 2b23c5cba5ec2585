"""`lbctl run --config`: kube-proxy's KubeProxyConfiguration file. The fields lbctl applies map
to its flags; a flag on the command line wins; what lbctl does not apply and unknown fields are
reported one by one; a file that cannot be used stops `lbctl run` before anything starts."""
from __future__ import annotations

import logging
import os
import textwrap

import pytest

from lbctl.cli import kpconfig
from lbctl.cli import main as cli

# What `kubeadm config print init-defaults --component-configs KubeProxyConfiguration` prints
# (kubeadm v1.32), with a cluster's values filled in.
KUBEADM = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def write(tmp_path, text: str, name: str = "kube-proxy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def config_file(tmp_path, body: str) -> str:
    return write(tmp_path, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                 + textwrap.dedent(body))


def test_kubeadms_defaults_apply_their_values_and_report_only_what_is_set(tmp_path):
    config = kpconfig.read(write(tmp_path, KUBEADM))
    assert config.values == {"cluster_cidr": "10.244.0.0/16",
                             "kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf"}
    assert config.reports == [], "zero values, nulls and 0s are kube-proxy's 'unset': nothing to report"


def test_fields_map_to_flags(tmp_path):
    path = config_file(tmp_path, """\
        hostnameOverride: Node-A
        bindAddress: 192.0.2.2
        healthzBindAddress: 0.0.0.0:10266
        metricsBindAddress: 127.0.0.1:10259
        bindAddressHardFail: true
        mode: nftables
        clusterCIDR: 10.244.0.0/16
        nodePortAddresses: [192.0.2.0/24, primary]
        iptables: {masqueradeBit: 3, syncPeriod: 1m0s}
        nftables: {masqueradeBit: 15, masqueradeAll: true, syncPeriod: 45s, minSyncPeriod: 500ms}
        logging: {verbosity: 2}
        """)
    values = kpconfig.read(path).values
    assert values == {
        "node_name": "node-a", "node_ip": ["192.0.2.2"], "healthz_bind_address": "0.0.0.0:10266",
        "metrics_bind_address": "127.0.0.1:10259", "bind_address_hard_fail": True, "mode": "nftables",
        "cluster_cidr": "10.244.0.0/16", "nodeport_addresses": "192.0.2.0/24,primary",
        "masquerade_bit": 15, "masquerade_all": True, "sync_period": 45.0, "min_sync_period": 0.5, "v": 2,
    }, "nftables mode reads the nftables section, as kube-proxy's conversion"


def test_iptables_section_for_ebpf_and_iptables(tmp_path):
    values = kpconfig.read(config_file(tmp_path, """\
        iptables: {masqueradeBit: 3, masqueradeAll: true, syncPeriod: 2h30m, localhostNodePorts: false}
        nftables: {masqueradeBit: 15}
        """)).values
    assert values == {"masquerade_bit": 3, "masquerade_all": True, "sync_period": 9000.0,
                      "localhost_nodeports": False}


def test_conntrack_sizes_become_the_ct_map(tmp_path):
    values = kpconfig.read(config_file(tmp_path, "conntrack: {maxPerCore: 1000, min: 2000}\n")).values
    assert values["ct_size"] == 2 * max(1000 * os.cpu_count(), 2000), "two entries per flow"
    assert "ct_size" not in kpconfig.read(config_file(tmp_path, "conntrack: {maxPerCore: 0, min: 5}\n")).values
    nft = kpconfig.read(config_file(tmp_path, "mode: nftables\nconntrack: {maxPerCore: 1000}\n"))
    assert "ct_size" not in nft.values and "nf_conntrack_max" in nft.reports[0]


def test_not_applied_and_unknown_fields_are_reported(tmp_path):
    config = kpconfig.read(config_file(tmp_path, """\
        oomScoreAdj: -999
        conntrack: {tcpEstablishedTimeout: 24h0m0s}
        featureGates: {SomeGate: true}
        ipvs: {scheduler: wrr}
        detectLocalMode: NodeCIDR
        clusterCIRD: 10.0.0.0/8
        iptables: {masqueradeBits: 2}
        """))
    text = "\n".join(config.reports)
    for field in ("oomScoreAdj", "conntrack.tcpEstablishedTimeout", "featureGates", "ipvs.scheduler",
                  "detectLocalMode"):
        assert f"{field} is not applied" in text, field
    assert "unknown field 'clusterCIRD'" in text and "unknown field 'iptables.masqueradeBits'" in text
    assert all(r.startswith(str(tmp_path)) for r in config.reports), "each names the file"
    assert config.values == {}


@pytest.mark.parametrize("body, message", [
    ("iptables: {syncPeriod: 30 seconds}\n", "iptables.syncPeriod: '30 seconds' is not a duration"),
    ("iptables: {masqueradeBit: 40}\n", "iptables.masqueradeBit: out of range"),
    ("masqueradeAll: yes\nmode: kernelspace\n", "mode: 'kernelspace' is not a mode of lbctl"),
    ("iptables: {masqueradeAll: 1}\n", "iptables.masqueradeAll: true or false expected"),
    ("healthzBindAddress: 10256\n", "healthzBindAddress: an address with a port expected"),
    ("metricsBindAddress: localhost\n", "metricsBindAddress: 'localhost' is not an address with a port"),
    ("bindAddress: node-a\n", "bindAddress: 'node-a' is not an IP address"),
])
def test_bad_values_are_errors_naming_the_field(tmp_path, body, message):
    with pytest.raises(kpconfig.ConfigError, match=message.replace("(", r"\(")):
        kpconfig.read(config_file(tmp_path, body))


def test_not_a_kube_proxy_configuration(tmp_path):
    with pytest.raises(kpconfig.ConfigError, match="expected apiVersion kubeproxy.config.k8s.io/v1alpha1"):
        kpconfig.read(write(tmp_path, "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"))
    with pytest.raises(kpconfig.ConfigError, match="cannot read"):
        kpconfig.read(str(tmp_path / "missing.yaml"))
    with pytest.raises(kpconfig.ConfigError, match="not YAML"):
        kpconfig.read(write(tmp_path, "a: [b\n"))


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("1m0s", 60), ("2h45m", 9900), ("300ms", 0.3),
                                           ("1.5h", 5400), ("0", 0), ("1h2m3.5s", 3723.5)])
def test_go_durations(text, seconds):
    assert kpconfig.parse_duration(text) == pytest.approx(seconds)


def parse_run(argv: list[str]):
    parser = cli.build_parser()
    args = parser.parse_args(["run", *argv])
    return args, kpconfig.subparser(parser, "run"), argv


def test_flags_given_win_over_the_file(tmp_path, caplog):
    path = config_file(tmp_path, """\
        clusterCIDR: 10.244.0.0/16
        hostnameOverride: node-a
        bindAddress: 192.0.2.2
        iptables: {syncPeriod: 10s, masqueradeAll: true}
        healthzBindAddress: 0.0.0.0:10266
        """)
    args, parser, argv = parse_run(["--config", path, "--sync-period", "5", "--node-ip", "198.51.100.1",
                                    "--healthz-bind-address", ""])
    caplog.set_level(logging.INFO, logger="lbctl.cli.kpconfig")
    kpconfig.apply(args, parser, argv)
    assert args.sync_period == 5.0 and args.node_ip == ["198.51.100.1"], "given on the command line"
    assert args.healthz_bind_address == "", "an empty flag given still wins (it turns the server off)"
    assert args.cluster_cidr == "10.244.0.0/16" and args.node_name == "node-a" and args.masquerade_all
    overridden = [r.getMessage() for r in caplog.records if "overridden" in r.getMessage()]
    assert len(overridden) == 3 and any("iptables.syncPeriod" in m for m in overridden)


def test_a_field_without_a_flag_here_is_reported(tmp_path, caplog):
    path = config_file(tmp_path, "clientConnection: {kubeconfig: /etc/kubeconfig}\n")
    args, parser, argv = parse_run(["--config", path])
    known = {a.dest for a in parser._actions}
    caplog.set_level(logging.WARNING, logger="lbctl.cli.kpconfig")
    kpconfig.apply(args, parser, argv)
    if "kubeconfig" in known:        # once the Kubernetes source has its --kubeconfig
        assert args.kubeconfig == "/etc/kubeconfig"
    else:
        assert any("clientConnection.kubeconfig is not applied: this lbctl has no flag" in r.getMessage()
                   for r in caplog.records)


def test_explicit_flags_are_detected():
    args, parser, argv = parse_run(["--masquerade-all", "--node-ip", "192.0.2.1", "--node-ip", "192.0.2.2",
                                    "--sync-period=7", "-v", "3"])
    assert kpconfig.explicit_dests(parser, argv) == {"masquerade_all", "node_ip", "sync_period", "v"}
    assert kpconfig.explicit_dests(parser, []) == set()


def test_lbctl_run_refuses_a_bad_file_before_starting(tmp_path, caplog):
    path = config_file(tmp_path, "mode: userspace\n")
    assert cli.main(["run", "--config", path, "--manifests", str(tmp_path)]) == 2
    assert any("'userspace' is not a mode of lbctl" in r.getMessage() for r in caplog.records)


def test_verbosity_from_the_file_unless_given(tmp_path):
    path = config_file(tmp_path, "logging: {verbosity: 4}\n")
    args, parser, argv = parse_run(["--config", path])
    kpconfig.apply(args, parser, argv)
    assert args.v == 4
    top = cli.build_parser().parse_args(["-v", "1", "run", "--config", path])
    kpconfig.apply(top, parser, ["--config", path], ["-v", "1"])
    assert top.v == 1, "lbctl -v 1 run: the flag wins"
