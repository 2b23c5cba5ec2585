"""The command line: messages instead of tracebacks for every numeric option, --version, one
place for configuration (run and render, the header's map sizes), and `lbctl run` refusing a
manifests directory it cannot read."""
from __future__ import annotations

import os

import pytest

import lbctl
from lbctl.agent.lock import running_agents
from lbctl.cli import config
from lbctl.cli import main as cli
from lbctl.datapath.base import DEFAULT_PIN_DIR
from lbctl.datapath.ebpf import dump, shared
from lbctl.datapath.ebpf import loader as ebpf

PIN = "/sys/fs/bpf/lbctl-t-cli"


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lbctl {lbctl.__version__}"


# --- item 9: numeric options refuse bad values with a message -----------------------------------

RUN = ["run", "--manifests", "/tmp"]
BAD_NUMBERS = [
    (RUN + ["--interval", "-5"], "--interval", "must be > 0"),
    (RUN + ["--interval", "0"], "--interval", "must be > 0"),            # used to spin a CPU
    (RUN + ["--interval", "nan"], "--interval", "finite"),
    (RUN + ["--interval", "soon"], "--interval", "a number expected"),
    (RUN + ["--sync-period", "0"], "--sync-period", "must be > 0"),
    (RUN + ["--service-node-port-range", "32767-30000"], "--service-node-port-range", "low before high"),
    (RUN + ["--service-node-port-range", "lots"], "--service-node-port-range", "is not LOW-HIGH"),
    (RUN + ["--max-seconds", "-1"], "--max-seconds", "must be > 0"),
    (RUN + ["--max-services", "1"], "--max-services", "out of range"),
    (RUN + ["--max-backends", "-3"], "--max-backends", "out of range"),
    (RUN + ["--services-map-size", "0"], "--services-map-size", "out of range"),
    (RUN + ["--ct-size", "4294967296"], "--ct-size", "out of range"),
    (RUN + ["--ct-size", "1.5"], "--ct-size", "whole number"),
    (RUN + ["--full-sync-every", "0"], "--full-sync-every", "out of range"),
    (RUN + ["--masquerade-bit", "32"], "--masquerade-bit", "out of range"),
    (["bench", "--services", "10,abc"], "--services", "whole number"),
    (["bench", "--services", "0"], "--services", "out of range"),
    (["bench", "--services", ","], "--services", "comma-separated"),
    (["bench", "--backends", "0"], "--backends", "out of range"),
    (["bench", "--repeat", "-1"], "--repeat", "out of range"),
    (["bench", "--new-flows", "0"], "--new-flows", "out of range"),
    (["bench", "--modes", "ebpf", "--connections", "0"], "--connections", "out of range"),
    (["bench", "--modes", "ebpf", "--seconds", "-2"], "--seconds", "must be > 0"),
    (["bench", "--modes", "ebpf", "--rounds", "0"], "--rounds", "out of range"),
    (["bench", "--modes", "ebpf", "--workers", "0"], "--workers", "out of range"),
    (["bench", "--modes", "ebpf", "--sync-timeout", "0"], "--sync-timeout", "must be > 0"),
    (["demo", "--requests", "0"], "--requests", "out of range"),
    (["demo", "--requests", "many"], "--requests", "whole number"),
    (["render", "iptables", "--manifests", "/tmp", "--node-name", "n", "--node-ip", "192.0.2.2",
      "--masquerade-bit", "-1"], "--masquerade-bit", "out of range"),
    (["render", "nftables", "--manifests", "/tmp", "--node-name", "n", "--node-ip", "192.0.2.2",
      "--masquerade-bit", "x"], "--masquerade-bit", "whole number"),
]


@pytest.mark.parametrize("argv,option,message", BAD_NUMBERS, ids=[" ".join(a[0][:1] + a[0][-2:]) for a in BAD_NUMBERS])
def test_numeric_options_refuse_bad_values_with_a_message(argv, option, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err, err
    assert "Traceback" not in err


def test_good_numbers_are_taken():
    args = cli.build_parser().parse_args(RUN + ["--interval", "0.25", "--max-services", "1_000",
                                                "--sync-period", "5"])
    assert (args.interval, args.max_services, args.sync_period) == (0.25, 1000, 5.0)
    assert cli.build_parser().parse_args(["bench", "--services", "10, 1_000"]).services == "10,1000"


# --- one place for configuration --------------------------------------------------------------


def test_map_size_defaults_come_from_the_shared_header():
    d = ebpf.DatapathConfig()
    assert (d.max_services, d.max_backends, d.services_map_size, d.ct_size, d.affinity_size) == tuple(
        shared.const(n) for n in ("LB_SERVICE_IDS", "LB_BACKENDS_MAP_SIZE", "LB_SERVICES_MAP_SIZE",
                                  "LB_CT_MAP_SIZE", "LB_AFFINITY_MAP_SIZE"))
    args = cli.build_parser().parse_args(RUN)
    assert config.datapath_config(args).ct_size == shared.const("LB_CT_MAP_SIZE")


FLAGS = ["--node-name", "n1", "--node-ip", "192.0.2.2", "--cluster-cidr", "10.244.0.0/16",
         "--masquerade-all", "--nodeport-addresses", "192.0.2.0/24", "--masquerade-bit", "9"]


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_run_and_render_build_the_same_configuration(mode):
    """`lbctl run --mode M` programs what `lbctl render M` prints for the same flags (nfacct
    aside: render probes it, run never has kube-proxy's nfacct counters)."""
    run = cli.build_mode(cli.build_parser().parse_args(["run", "--mode", mode, *FLAGS]))
    render_flags = ["--no-nfacct"] if mode == "iptables" else []
    rendered = config.kube_proxy_config(mode, cli.build_parser().parse_args(
        ["render", mode, "--manifests", "/tmp", *FLAGS, *render_flags]), rendering=True)
    assert run.cfg == rendered
    assert run.cfg.masquerade_bit == 9 and run.cfg.nodeport_addresses == ("192.0.2.0/24",)


def test_bad_kube_proxy_flags_are_refused_alike(capsys):
    bad = ["--node-ip", "192.0.2.300"]
    assert cli.main(["run", "--mode", "iptables", "--manifests", "/tmp", *bad]) == 2
    assert cli.main(["render", "iptables", "--manifests", "/tmp", "--node-name", "n", *bad]) == 2
    assert "is not an IP address" in capsys.readouterr().err


# --- item 1 (agent side) and item 3 (wiring) -------------------------------------------------------


class RecordingMode:
    name = "recording"
    problems: tuple = ()

    def __init__(self):
        self.calls: list[str] = []
        self.cfg = ebpf.DatapathConfig(pin_dir=PIN)

    def __getattr__(self, what):
        if what.startswith("__"):
            raise AttributeError(what)
        return lambda *a, **k: self.calls.append(what)


@pytest.mark.parametrize("mode", ["ebpf", "nftables"])
def test_run_with_a_missing_manifests_directory_changes_nothing(monkeypatch, tmp_path, caplog, mode):
    """The typo case: `--manifests /etc/lbctl/manifestz` used to remove every programmed
    service (and, from nftables mode, the kube-proxy table) and exit 0."""
    recording = RecordingMode()
    monkeypatch.setattr(cli, "build_mode", lambda args: recording)
    code = cli.main(["run", "--mode", mode, "--manifests", str(tmp_path / "manifestz"),
                     "--pin-dir", PIN, "--node-ip", "192.0.2.2"])
    assert code == 1
    assert recording.calls == [], "the mode was not started: nothing loaded, detached or removed"
    assert "does not exist" in caplog.text and "nothing on this node was changed" in caplog.text
    assert running_agents() == []


def test_run_gives_the_source_a_state_file_of_its_pin_dir(monkeypatch, tmp_path):
    import lbctl.sources.manifests as manifests

    made = {}

    class Source:
        def __init__(self, directory, interval, state_path=None, node_port_range=None):
            made.update(directory=directory, state_path=state_path, node_port_range=node_port_range)

        def poll(self):
            from lbctl.sources.base import SourceUnavailable
            raise SourceUnavailable("test", "stop here")

    monkeypatch.setattr(manifests, "ManifestSource", Source)
    monkeypatch.setattr(cli, "build_mode", lambda args: RecordingMode())
    assert cli.main(["run", "--manifests", str(tmp_path), "--pin-dir", PIN]) == 1
    assert made["state_path"] == dump.source_state_file(PIN)
    assert os.path.dirname(made["state_path"]) == dump.state_dir()
    assert dump.source_state_file(PIN) != dump.source_state_file(DEFAULT_PIN_DIR)
    assert made["node_port_range"] == (30000, 32767)    # kube-apiserver's default
    made.clear()
    assert cli.main(["run", "--manifests", str(tmp_path), "--pin-dir", PIN,
                     "--service-node-port-range", "20000-22767"]) == 1
    assert made["node_port_range"] == (20000, 22767)


def test_render_validates_node_ports_against_the_range_it_is_given(tmp_path, capsys):
    """`render` and `run` take the same --service-node-port-range (cli.config)."""
    from kubeproxy_cases import write_cli_manifests

    write_cli_manifests(tmp_path)          # nodePort 30001
    base = ["render", "iptables", "--manifests", str(tmp_path), "--node-name", "test-node",
            "--node-ip", "192.0.2.2", "--no-random-fully", "--no-nfacct", "--no-tcp-be-liberal"]
    assert cli.main(base) == 0
    out, err = capsys.readouterr()
    assert "30001" in out and err == ""
    assert cli.main(base + ["--service-node-port-range", "31000-32000"]) == 0
    out, err = capsys.readouterr()
    assert "svc1" in err and "31000-32000" in err and "30001" not in out
