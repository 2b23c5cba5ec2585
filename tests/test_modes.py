"""The iptables and nftables modes: what they run, when, and what they leave.

Against a fake runner (no root): which syncs are full and which partial, the exact restore /
nft input of each, kube-proxy's jump-rule ensuring (-C then -I), conntrack clean-up of stale UDP
entries, counters, retries after a failure, mode switching, the CLI.

Against the kernel (root), inside throwaway network namespaces so that nothing on the node is
touched: the rendered transactions apply; a chain of partial syncs leaves exactly what a full
sync of the same state makes on a fresh node; cleanup leaves iptables-save and the nft ruleset
as they were, foreign rules included; `lbctl run --mode iptables|nftables` then `lbctl cleanup`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubeproxy_cases import ep, info, port, service
from netfilter_state import iptables_state, nft_state

from lbctl.cli import main as cli
from lbctl.datapath import base as modes
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.kubeproxy import (
    IptablesConfig,
    NftablesConfig,
    iptables_mode,
    proxier,
    render_iptables,
    render_iptables_partial,
    render_jump_chains,
    render_jump_rules,
    render_nftables,
)
from lbctl.datapath.kubeproxy.iptables_mode import IptablesMode, cleanup_restore, parse_save
from lbctl.datapath.kubeproxy.nftables_mode import NftablesMode, Rendered, partial_transaction
from lbctl.datapath.kubeproxy.proxier import Completed, ProxierOptions, count_changes, stale_udp_conntrack

NODE = "node-a"
ICFG = IptablesConfig(node_name=NODE, node_ips=("192.0.2.2",), cluster_cidr="10.244.0.0/16")
NCFG = NftablesConfig(node_name=NODE, node_ips=("192.0.2.2",), cluster_cidr="10.244.0.0/16")
WEB_VIP, DNS_VIP = "10.96.0.10", "10.96.0.53"


# --- states ----------------------------------------------------------------------------------------


def state(web=("10.244.0.4", "10.244.0.5", "10.244.0.6"), dns=("10.244.0.7", "10.244.0.8"),
          affinity=False, node_port=None, external_ips=(), dns_exists=True, extra=False,
          web_terminating=(), web_remote=()):
    """The lab's services, varied: endpoints, affinity, NodePort, externalIPs, a service more."""
    fields = dict(external_ips=tuple(external_ips))
    if affinity:
        fields.update(session_affinity="ClientIP", session_affinity_timeout=300)
    if node_port:
        fields["type"] = "NodePort"
    web_svc = service("default", "web", WEB_VIP, port("http", 80, node_port=node_port, target_port=8080),
                      **fields)
    web_eps = [ep(ip, 8080, node="elsewhere" if ip in web_remote else NODE,
                  ready=ip not in web_terminating, terminating=ip in web_terminating) for ip in web]
    ports = [info(web_svc, "http", *web_eps)]
    if dns_exists:
        dns_svc = service("default", "dns", DNS_VIP, port("dns", 53, "UDP", target_port=5353),
                          port("dns-tcp", 53, "TCP", target_port=5353))
        dns_eps = [ep(ip, 5353, node=NODE) for ip in dns]
        ports += [info(dns_svc, "dns", *dns_eps, protocol="UDP"),
                  info(dns_svc, "dns-tcp", *dns_eps, protocol="TCP")]
    if extra:
        extra_svc = service("other", "extra", "10.96.0.99", port("p", 9000, target_port=9000))
        ports.append(info(extra_svc, "p", ep("10.244.0.9", 9000, node=NODE)))
    return ports


# A walk through changes a cluster makes, each a partial sync after the first.
STEPS = [
    ("initial", state()),
    ("web endpoint removed", state(web=("10.244.0.4", "10.244.0.5"))),
    ("service added", state(web=("10.244.0.4", "10.244.0.5"), extra=True)),
    ("dns without endpoints", state(dns=(), extra=True)),
    ("dns endpoints back", state(extra=True)),
    ("session affinity on", state(affinity=True, extra=True)),
    ("affinity, endpoint removed", state(web=("10.244.0.4", "10.244.0.6"), affinity=True, extra=True)),
    ("affinity off", state(web=("10.244.0.4", "10.244.0.6"), extra=True)),
    ("NodePort and externalIP", state(node_port=30080, external_ips=("198.18.0.10",), extra=True)),
    ("terminating and remote endpoints", state(web_terminating=("10.244.0.4",), web_remote=("10.244.0.5",))),
    ("dns deleted", state(dns_exists=False)),
    ("nothing", []),
]


# --- a fake runner ---------------------------------------------------------------------------------


class FakeRunner:
    """Records every command; answers from ``replies`` (argv prefix -> Completed or a list of them,
    consumed in order), else success with no output."""

    def __init__(self, **kwargs):
        self.calls: list[tuple[list[str], str | None]] = []
        self.replies: dict[tuple[str, ...], list[Completed]] = {}

    def on(self, *prefix: str, code: int = 0, stdout: str = "", stderr: str = "", times: int = 1000):
        self.replies[prefix] = [Completed(code, stdout, stderr)] * times
        return self

    def run(self, argv, input=None):
        argv = list(argv)
        self.calls.append((argv, input))
        for prefix in sorted(self.replies, key=len, reverse=True):
            if tuple(argv[:len(prefix)]) == prefix and self.replies[prefix]:
                return self.replies[prefix].pop(0)
        return Completed(0)

    def commands(self, first: str | None = None) -> list[list[str]]:
        return [argv for argv, _ in self.calls if first is None or argv[0] == first]

    def inputs(self, first: str) -> list[str]:
        return [text for argv, text in self.calls if argv[0] == first and text is not None]

    def clear(self) -> None:
        self.calls.clear()


def iptables_runner() -> FakeRunner:
    """-C finds no rule (exit 1) the first time round, as on a fresh node."""
    return FakeRunner().on("iptables", "-w", "5", "-W", "100000", "-C", code=1, times=len(render_jump_rules(ICFG)))


# --- iptables mode -------------------------------------------------------------------------------


def test_first_sync_is_full_ensures_jump_rules_then_restores():
    runner = iptables_runner()
    mode = IptablesMode(ICFG, runner=runner)
    result = mode.sync(STEPS[0][1])
    assert not result.errors and result.added == 3 and result.backends_added == 7
    iptables = runner.commands("iptables")
    chains, rules = render_jump_chains(ICFG), render_jump_rules(ICFG)
    assert iptables[:len(chains)] == chains                          # EnsureChain
    checks_and_inserts = iptables[len(chains):]
    expected = []
    for rule in rules:                                               # EnsureRule: -C, then -I
        expected += [["-C" if w == "-I" else w for w in rule], rule]
    assert checks_and_inserts == expected
    assert runner.inputs("iptables-restore") == [render_iptables(STEPS[0][1], ICFG)]
    restore = next(argv for argv, _ in runner.calls if argv[0] == "iptables-restore")
    assert "--noflush" in restore


def test_present_jump_rules_are_not_inserted_again():
    runner = FakeRunner()          # every -C succeeds
    IptablesMode(ICFG, runner=runner).sync(STEPS[0][1])
    assert not [argv for argv in runner.commands("iptables") if "-I" in argv]


def test_later_syncs_are_partial_and_every_nth_is_full():
    runner = iptables_runner()
    mode = IptablesMode(ICFG, ProxierOptions(full_sync_every=3), runner=runner)
    kinds = []
    previous = None
    for _, ports in STEPS[:7]:
        runner.clear()
        assert not mode.sync(ports).errors
        (text,) = runner.inputs("iptables-restore")
        if runner.commands("iptables"):          # jump rules are ensured on full syncs only
            assert text == render_iptables(ports, ICFG)
            kinds.append("full")
        else:
            assert text == render_iptables_partial(previous, ports, ICFG)
            kinds.append("partial")
        previous = ports
    assert kinds == ["full", "partial", "partial", "full", "partial", "partial", "full"]
    assert (mode.full_syncs, mode.partial_syncs) == (3, 0)


def test_full_sync_deletes_stale_chains_the_kernel_still_holds():
    runner = iptables_runner().on("iptables-save", "-t", "nat", stdout=(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SEP-STALESTALESTALE1 - [0:0]\n:DOCKER - [0:0]\nCOMMIT\n"))
    IptablesMode(ICFG, runner=runner).sync(STEPS[0][1])
    (text,) = runner.inputs("iptables-restore")
    assert "-X KUBE-SEP-STALESTALESTALE1" in text.splitlines()
    assert "DOCKER" not in text


def test_failed_restore_is_reported_and_retried_in_full():
    runner = iptables_runner()
    mode = IptablesMode(ICFG, runner=runner)
    mode.sync(STEPS[0][1])
    runner.on("iptables-restore", code=1, stderr="iptables-restore: line 7 failed", times=1)
    result = mode.sync(STEPS[1][1])
    assert result.errors and "line 7 failed" in result.errors[0] and mode.needs_retry
    runner.clear()
    retried = mode.sync(None)
    assert not retried.errors and not mode.needs_retry
    assert runner.inputs("iptables-restore") == [render_iptables(STEPS[1][1], ICFG)]
    assert retried.backends_removed == 1, "counted against what the kernel held"


def test_cleanup_removes_only_kube_proxy_objects():
    saved = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:DOCKER-USER - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A INPUT -s 192.0.2.99/32 -j DROP
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j DOCKER-USER
-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
"""
    text, what = cleanup_restore(parse_save(saved))
    assert text.splitlines() == [
        "*filter",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]",
        '-D INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-D FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "-X KUBE-SERVICES",
        "-X KUBE-FORWARD",
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]",
        '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-X KUBE-SERVICES",
        "-X KUBE-SVC-AAAAAAAAAAAAAAAA",
        "COMMIT",
    ]
    assert len(what) == 7


def test_cleanup_without_kube_proxy_chains_writes_nothing():
    runner = FakeRunner().on("iptables-save", stdout="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    assert IptablesMode.cleanup(runner) == []
    assert not runner.commands("iptables-restore") and not runner.commands("ip6tables-restore")


def test_config_from_probes_like_render():
    cfg = iptables_mode.config_from("n", ["192.0.2.2"], "10.244.0.0/16", tcp_be_liberal=True)
    assert cfg.nfacct is False and cfg.tcp_be_liberal is True and cfg.node_ips == ("192.0.2.2",)


# --- conntrack and counters ----------------------------------------------------------------------


def conntrack(*match):
    return ["conntrack", "-D", "-p", "udp", *match]


def test_removed_udp_endpoint_loses_its_conntrack_entries():
    before, after = state(), state(dns=("10.244.0.7",))
    assert stale_udp_conntrack(before, after, NODE) == [conntrack("--orig-dst", DNS_VIP, "--dst-nat", "10.244.0.8")]


def test_removed_tcp_endpoint_keeps_its_connections():
    assert stale_udp_conntrack(state(), state(web=("10.244.0.4",)), NODE) == []


def test_udp_node_port_and_external_ips_are_cleared_too():
    def udp(eps, **kw):
        svc = service("default", "u", "10.96.0.77", port("u", 53, "UDP", node_port=30053), type="NodePort", **kw)
        return [info(svc, "u", *[ep(ip, 53, node=NODE) for ip in eps])]
    assert stale_udp_conntrack(udp(["10.244.0.7", "10.244.0.8"], external_ips=("198.18.0.1",)),
                               udp(["10.244.0.7"], external_ips=("198.18.0.1",)), NODE) == [
        conntrack("--dport", "30053", "--dst-nat", "10.244.0.8"),
        conntrack("--orig-dst", "10.96.0.77", "--dst-nat", "10.244.0.8"),
        conntrack("--orig-dst", "198.18.0.1", "--dst-nat", "10.244.0.8"),
    ]
    assert stale_udp_conntrack(udp([]), udp(["10.244.0.7"]), NODE) == [
        conntrack("--orig-dst", "10.96.0.77"), conntrack("--dport", "30053")]


def test_udp_service_gaining_endpoints_or_deleted_is_cleared():
    assert stale_udp_conntrack(state(dns=()), state(), NODE) == [conntrack("--orig-dst", DNS_VIP)]
    assert stale_udp_conntrack(state(), state(dns_exists=False), NODE) == [conntrack("--orig-dst", DNS_VIP)]
    assert stale_udp_conntrack([], state(), NODE) == [conntrack("--orig-dst", DNS_VIP)], "at start"
    assert stale_udp_conntrack(state(), state(), NODE) == []


def test_endpoint_that_stops_serving_is_cleared_but_terminating_serving_is_not():
    def dns(ready, serving):
        svc = service("default", "dns", DNS_VIP, port("dns", 53, "UDP", target_port=5353))
        return [info(svc, "dns", ep("10.244.0.7", 5353, node=NODE),
                     ep("10.244.0.8", 5353, node=NODE, ready=ready, serving=serving, terminating=not ready))]
    assert stale_udp_conntrack(dns(True, True), dns(False, True), NODE) == []
    assert stale_udp_conntrack(dns(True, True), dns(False, False), NODE) == [
        conntrack("--orig-dst", DNS_VIP, "--dst-nat", "10.244.0.8")]


def test_conntrack_nothing_deleted_is_not_an_error():
    runner = FakeRunner().on("conntrack", code=1, stderr="conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.")
    assert proxier.delete_conntrack(runner, [conntrack("--orig-dst", DNS_VIP)]) == []
    runner = FakeRunner().on("conntrack", code=1, stderr="conntrack v1.4.7: Operation not permitted")
    (warning,) = proxier.delete_conntrack(runner, [conntrack("--orig-dst", DNS_VIP)])
    assert "Operation not permitted" in warning


def test_sync_runs_the_conntrack_clean_up_after_the_restore():
    runner = iptables_runner()
    mode = IptablesMode(ICFG, runner=runner)
    mode.sync(state())
    runner.clear()
    mode.sync(state(dns=("10.244.0.7",)))
    assert [argv[0] for argv, _ in runner.calls] == ["iptables-restore", "conntrack"]


def test_counters():
    r = count_changes(state(), state(web=("10.244.0.4", "10.244.0.9"), dns_exists=False, extra=True), NODE)
    assert (r.added, r.updated, r.removed, r.backends_added, r.backends_removed) == (1, 1, 2, 2, 6)
    assert not count_changes(state(), state(), NODE).changed


def test_ipv6_only_services_are_reported():
    svc = service("default", "v6", "fd00::10", port("p", 80))
    mode = IptablesMode(ICFG, runner=iptables_runner())
    mode.sync([info(svc, "p", ep("fd00::1", 80))])
    (problem,) = mode.problems
    assert "default/v6" in str(problem) and "IPv4 proxier" in str(problem)


# --- nftables mode -------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def nft_transactions(runner: FakeRunner) -> list[str]:
    return [text for argv, text in runner.calls if argv[:2] == ["nft", "-f"]]


def test_nft_first_sync_is_kube_proxys_whole_transaction():
    runner = FakeRunner()
    mode = NftablesMode(NCFG, runner=runner)
    assert not mode.sync(state()).errors
    (tx,) = nft_transactions(runner)
    assert tx == render_nftables(state(), NCFG)
    assert "delete chain ip kube-proxy nat-prerouting" in tx.splitlines()


def test_nft_later_full_syncs_do_not_reset_base_chains():
    runner = FakeRunner()
    mode = NftablesMode(NCFG, ProxierOptions(full_sync_every=1), runner=runner)
    mode.sync(state())
    runner.clear()
    mode.sync(state())
    (tx,) = nft_transactions(runner)
    assert "delete chain ip kube-proxy nat-prerouting" not in tx.splitlines()
    assert "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }" in tx.splitlines()


def test_nft_partial_sync_rewrites_only_the_changed_service():
    runner = FakeRunner()
    clock = Clock()
    mode = NftablesMode(NCFG, runner=runner, clock=clock)
    mode.sync(state())
    runner.clear()
    mode.sync(state(web=("10.244.0.4", "10.244.0.5")))
    (tx,) = nft_transactions(runner)
    lines = tx.splitlines()
    assert not any("add table" in line or "nat-prerouting" in line for line in lines)
    assert not any("default/dns" in line for line in lines), "dns did not change"
    assert "flush chain ip kube-proxy service-SUSTUHLJ-default/web/tcp/http" in lines
    (stale,) = [line for line in lines if "10.244.0.6" in line]     # unlinked and emptied only
    chain = stale.removeprefix("flush chain ip kube-proxy ")
    assert chain.startswith("endpoint-") and chain.endswith("-default/web/tcp/http__10.244.0.6/8080")
    assert not any(line.startswith("delete chain") for line in lines)
    assert list(mode.stale_chains) == [chain]

    runner.clear()
    mode.housekeeping()
    assert nft_transactions(runner) == [], "not before a second has passed"
    clock.now += 1.0
    mode.housekeeping()
    assert nft_transactions(runner) == [f"delete chain ip kube-proxy {chain}\n"]
    assert mode.stale_chains == {}


def test_nft_stale_chain_deletion_is_retried():
    runner = FakeRunner()
    clock = Clock()
    mode = NftablesMode(NCFG, runner=runner, clock=clock)
    mode.sync(state())
    mode.sync(state(dns=()))
    clock.now += 1.5
    runner.on("nft", "-f", code=1, stderr="Error: Could not process rule: Device or resource busy", times=1)
    assert mode.delete_stale_chains() == 0 and mode.stale_chains
    clock.now += 1.0
    assert mode.delete_stale_chains() == 6 and not mode.stale_chains   # 2 ports x (service + 2 endpoints)


def test_nft_service_chain_used_again_is_not_deleted():
    mode = NftablesMode(NCFG, runner=FakeRunner(), clock=Clock())
    mode.sync(state())
    mode.sync(state(dns=()))
    assert mode.stale_chains
    mode.sync(state())
    assert mode.stale_chains == {}


def test_nft_partial_of_the_same_state_is_empty():
    rendered = Rendered.parse(render_nftables(state(affinity=True), NCFG))
    assert partial_transaction(rendered, rendered, set()) == ([], [])


def test_nft_failed_transaction_is_retried_in_full():
    runner = FakeRunner()
    mode = NftablesMode(NCFG, runner=runner)
    mode.sync(state())
    runner.on("nft", "-f", code=1, stderr="Error: No such file or directory", times=1)
    assert mode.sync(state(dns=())).errors and mode.needs_retry
    runner.clear()
    assert not mode.sync(None).errors
    (tx,) = nft_transactions(runner)
    assert tx.startswith("add table ip kube-proxy")


def test_nft_cleanup_deletes_the_tables_that_exist():
    runner = FakeRunner().on("nft", "list", "tables", "ip", stdout="table ip filter\ntable ip kube-proxy\n")
    runner.on("nft", "list", "tables", "ip6", stdout="table ip6 other\n")
    assert NftablesMode.cleanup(runner) == ["nftables table ip kube-proxy"]
    assert ["nft", "delete", "table", "ip", "kube-proxy"] in runner.commands("nft")
    assert not [argv for argv in runner.commands("nft") if argv[:3] == ["nft", "delete", "table"] and argv[3] == "ip6"]


# --- switching modes, the CLI ----------------------------------------------------------------------


def test_start_removes_the_other_modes_objects(monkeypatch):
    calls = []
    monkeypatch.setattr(modes, "cleanup_mode", lambda name, pin: calls.append((name, pin)) or [])
    IptablesMode(ICFG, ProxierOptions(ebpf_pin_dir="/sys/fs/bpf/x"), runner=FakeRunner()).start()
    assert calls == [("ebpf", "/sys/fs/bpf/x"), ("nftables", "/sys/fs/bpf/x"), ("ipvs", "/sys/fs/bpf/x")]
    calls.clear()
    NftablesMode(NCFG, runner=FakeRunner()).start()
    assert [name for name, _ in calls] == ["ebpf", "iptables", "ipvs"]


def test_a_mode_that_cannot_start_leaves_the_others_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(modes, "cleanup_mode", lambda name, pin: calls.append(name) or [])
    runner = FakeRunner().on("nft", "list", "tables", code=1, stderr="nft: command not found")
    with pytest.raises(ebpf.DatapathError, match="nftables"):
        NftablesMode(NCFG, runner=runner).start()
    assert calls == []


def test_another_modes_failing_cleanup_does_not_stop_the_switch(monkeypatch):
    def cleanup(name, pin):
        if name == "ipvs":
            raise OSError("boom")
        return [f"{name} thing"]
    monkeypatch.setattr(modes, "cleanup_mode", cleanup)
    assert modes.cleanup_other_modes("iptables") == ["ebpf thing", "nftables thing"]


def test_cli_ipvs_start_failure_exits_1_without_touching_other_modes(monkeypatch, tmp_path, caplog):
    """The real IPVS mode on this kernel, which has no IPVS: it says so before touching anything."""
    calls = []
    monkeypatch.setattr(modes, "cleanup_mode", lambda name, pin: calls.append(name) or [])
    code = cli.main(["run", "--mode", "ipvs", "--manifests", str(tmp_path), "--node-ip", "192.0.2.2",
                     "--max-seconds", "1"])
    assert code == 1 and calls == []
    assert "IPVS is not available" in caplog.text


def test_cli_rejects_bad_kube_proxy_flags(tmp_path):
    assert cli.main(["run", "--mode", "iptables", "--manifests", str(tmp_path), "--node-ip", "nope"]) == 2
    assert cli.main(["run", "--mode", "nftables", "--manifests", str(tmp_path), "--node-ip", "192.0.2.2",
                     "--cluster-cidr", "10.244.0.0/33"]) == 2


def test_cli_builds_each_mode_from_flags(tmp_path):
    args = cli.build_parser().parse_args([
        "run", "--mode", "nftables", "--node-name", "n1", "--node-ip", "192.0.2.2", "--node-ip", "192.0.2.3",
        "--cluster-cidr", "10.244.0.0/16", "--masquerade-all", "--nodeport-addresses", "192.0.2.0/24",
        "--full-sync-every", "7", "--pin-dir", "/sys/fs/bpf/y"])
    mode = cli.build_mode(args)
    assert isinstance(mode, NftablesMode)
    assert mode.cfg == NftablesConfig(node_name="n1", node_ips=("192.0.2.2", "192.0.2.3"),
                                      cluster_cidr="10.244.0.0/16", masquerade_all=True,
                                      nodeport_addresses=("192.0.2.0/24",))
    assert mode.options == ProxierOptions(full_sync_every=7, ebpf_pin_dir="/sys/fs/bpf/y")
    args.mode = "iptables"
    mode = cli.build_mode(args)
    assert isinstance(mode, IptablesMode) and mode.cfg.masquerade_all and mode.cfg.node_name == "n1"


def test_cli_cleanup_covers_every_mode(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(modes, "cleanup_mode", lambda name, pin: calls.append(name) or [f"{name} x"])
    assert cli.main(["cleanup", "--keep-labs", "--pin-dir", "/sys/fs/bpf/z"]) == 0
    assert calls == list(modes.MODES)
    assert "removed 4 datapath object(s)" in capsys.readouterr().out


# --- layering ----------------------------------------------------------------------------------------


def _lbctl_imports(path: Path) -> set[str]:
    """Every lbctl module a source file imports, at the top or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lbctl"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lbctl")}
    return found


KUBEPROXY = Path(cli.__file__).parents[1] / "datapath" / "kubeproxy"


def test_kube_proxy_modes_import_only_downwards():
    """The kube-proxy modes stand on the model and lbctl.datapath.base alone: not on the eBPF
    datapath, the CLI, the agent, the benchmarks, the lab or the test doubles."""
    above = ("lbctl.datapath.ebpf", "lbctl.cli", "lbctl.agent", "lbctl.bench", "lbctl.lab", "lbctl.testing",
             "lbctl.sources")
    for path in sorted(KUBEPROXY.rglob("*.py")):
        wrong = sorted(m for m in _lbctl_imports(path) if m.startswith(above))
        assert not wrong, f"{path.relative_to(KUBEPROXY)} imports {wrong}"


@pytest.mark.parametrize("layer,below", [
    ("desired", ()), ("rules", ("desired",)), ("kernel", ("desired",)), ("mode", ("desired", "rules", "kernel"))])
def test_ipvs_layers_import_only_the_ones_below(layer, below):
    package = "lbctl.datapath.kubeproxy.ipvs"
    used = {m.split(".")[4] for m in _lbctl_imports(KUBEPROXY / "ipvs" / f"{layer}.py") if m.startswith(package + ".")}
    assert used <= set(below), f"ipvs/{layer}.py imports {sorted(used - set(below))}"


# --- in the kernel (throwaway network namespaces) ------------------------------------------------


needs_root = pytest.mark.root


@pytest.fixture
def netns_factory():
    made = []

    def make() -> str:
        name = f"lbm{os.getpid() % 10000}x{len(made)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return name
    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert not [n for n in made if n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout]


@needs_root
@pytest.mark.root
def test_iptables_partial_syncs_leave_what_a_full_sync_makes(netns_factory):
    evolved, fresh = proxier.HostRunner(netns_factory()), proxier.HostRunner(netns_factory())
    mode = IptablesMode(ICFG, ProxierOptions(full_sync_every=1000), runner=evolved)
    for name, ports in STEPS:
        assert not mode.sync(ports).errors, name
        reference = IptablesMode(ICFG, runner=fresh)
        assert not reference.sync(ports).errors
        assert iptables_state(evolved) == iptables_state(fresh), f"after {name!r}"
        IptablesMode.cleanup(fresh)
    assert mode.full_syncs == 1 and mode.partial_syncs == len(STEPS) - 1


@needs_root
@pytest.mark.root
def test_nftables_partial_syncs_leave_what_a_full_sync_makes(netns_factory):
    evolved, fresh = proxier.HostRunner(netns_factory()), proxier.HostRunner(netns_factory())
    clock = Clock()
    mode = NftablesMode(NCFG, ProxierOptions(full_sync_every=1000), runner=evolved, clock=clock)
    table = ("ip", "kube-proxy")
    for name, ports in STEPS:
        assert not mode.sync(ports).errors, name
        clock.now += 1.0
        mode.housekeeping()                       # stale chains deleted a second later
        assert not mode.stale_chains
        reference = NftablesMode(NCFG, runner=fresh)
        assert not reference.sync(ports).errors
        assert nft_state(evolved, table) == nft_state(fresh, table), f"after {name!r}"
        NftablesMode.cleanup(fresh)
    assert mode.full_syncs == 1 and mode.partial_syncs == len(STEPS) - 1


@needs_root
@pytest.mark.root
def test_cleanup_leaves_the_ruleset_as_it_was(netns_factory):
    """Foreign rules, chains and tables survive; ours are gone; nothing else changed."""
    ns = proxier.HostRunner(netns_factory())
    for argv in (["iptables", "-A", "INPUT", "-s", "192.0.2.99", "-j", "DROP"],
                 ["iptables", "-t", "nat", "-N", "KUBE-KUBELET-CANARY"],
                 ["nft", "add", "table", "inet", "foreign"],
                 ["nft", "add", "chain", "inet", "foreign", "c", "{ type filter hook input priority 0 ; }"],
                 ["nft", "add", "rule", "inet", "foreign", "c", "tcp", "dport", "22", "accept"]):
        assert ns.run(argv).ok, argv
    before_nft, before_ipt = nft_state(ns), iptables_state(ns)
    for mode in (IptablesMode(ICFG, runner=ns), NftablesMode(NCFG, runner=ns)):
        for _, ports in STEPS[:6]:
            assert not mode.sync(ports).errors
    assert "KUBE-SERVICES" in iptables_state(ns)["nat"] and ("ip", "kube-proxy") in nft_state(ns)
    removed = IptablesMode.cleanup(ns) + NftablesMode.cleanup(ns)
    assert "nftables table ip kube-proxy" in removed
    assert iptables_state(ns) == before_ipt
    assert nft_state(ns) == before_nft


@needs_root
@pytest.mark.root
def test_cleanup_on_a_fresh_node_leaves_no_table(netns_factory):
    ns = proxier.HostRunner(netns_factory())
    mode = IptablesMode(ICFG, runner=ns)
    assert not mode.sync(STEPS[0][1]).errors
    IptablesMode.cleanup(ns)
    assert ns.run(["nft", "list", "ruleset"]).stdout.strip() == ""


def lbctl(*args: str, netns: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("lbctl"))
    return subprocess.run(["ip", "netns", "exec", netns, exe, *args], capture_output=True, text=True,
                          timeout=timeout)


@needs_root
@pytest.mark.root
@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_lbctl_run_then_cleanup(netns_factory, tmp_path, mode):
    """`lbctl run --mode M` programs the node and leaves the rules serving on exit; `lbctl
    cleanup` removes them; `--mode` switching removes the other mode's rules."""
    from kubeproxy_cases import write_cli_manifests

    ns = netns_factory()
    runner = proxier.HostRunner(ns)
    manifests = write_cli_manifests(tmp_path)
    other = "nftables" if mode == "iptables" else "iptables"
    done = lbctl("run", "--mode", other, "--manifests", str(manifests), "--node-ip", "192.0.2.2",
                 "--max-seconds", "0.5", netns=ns)
    assert done.returncode == 0, done.stderr
    done = lbctl("run", "--mode", mode, "--manifests", str(manifests), "--node-ip", "192.0.2.2",
                 "--cluster-cidr", "10.244.0.0/16", "--max-seconds", "0.5", netns=ns)
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stderr and f"left by the {other} mode" in done.stderr
    save = runner.run(["iptables-save"]).stdout
    tables = runner.run(["nft", "list", "tables"]).stdout
    if mode == "iptables":
        assert "KUBE-SVC-" in save and "kube-proxy" not in tables
    else:
        assert "KUBE-" not in save and "table ip kube-proxy" in tables
    done = lbctl("cleanup", "--keep-labs", netns=ns)
    assert done.returncode == 0, done.stderr
    assert runner.run(["nft", "list", "ruleset"]).stdout.strip() == ""


@needs_root
@pytest.mark.root
def test_lbctl_run_ipvs_says_the_kernel_lacks_it(netns_factory, tmp_path):
    ns = netns_factory()
    if Path("/proc/net/ip_vs").exists():   # a kernel with IPVS: nothing to refuse here
        return
    done = lbctl("run", "--mode", "ipvs", "--manifests", str(tmp_path), "--node-ip", "192.0.2.2",
                 "--max-seconds", "1", netns=ns)
    assert done.returncode == 1
    assert "IPVS is not available" in done.stderr
    assert proxier.HostRunner(ns).run(["nft", "list", "ruleset"]).stdout.strip() == ""
