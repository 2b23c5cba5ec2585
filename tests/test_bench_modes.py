"""`lbctl bench --modes`: the datapaths side by side, at tiny scale.

What is checked is the shape of the result, never a number of the measurement: every mode is
there for every service count, every backend answered through every mode, ratios to "none" are
positive numbers, the real service sits last in the renderers' order (and in the kernel's
KUBE-SERVICES), the plot is written, and the node is left as it was. Timings on a shared 2-core
VM are not something a test can assert.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
from pathlib import Path

import pytest
from conftest import TEST_PIN_DIR

from lbctl.bench import modes as bench_modes
from lbctl.cli import main as cli
from lbctl.lab import cluster as lab
from lbctl.model.objects import EndpointInfo, Protocol, Service, ServicePort, ServicePortInfo

PREFIX = f"lbq{os.getpid() % 1000}"
MODES = ("none", "ebpf", "iptables", "nftables")
COUNTS = (1, 3)


def tiny_spec() -> bench_modes.BenchSpec:
    """Its own prefix, pod CIDR, service CIDR and pin dir: it meets neither `lbctl bench` nor
    the other suites' labs (10.244.0, 100-179, 200-202, 210; the CLI bench uses 220; the
    two-node test below 223-224). A two-node `lbctl bench` (220-221) running at the same time
    would overlap: lab_up refuses that rather than share the CIDR."""
    return bench_modes.BenchSpec(prefix=PREFIX, pod_cidr="10.244.221.0/24", gateway="10.244.221.1",
                                 service_cidr="10.96.221.0/24", real_vip="10.96.221.10",
                                 pin_dir=TEST_PIN_DIR + "-bench-modes", connections=200, rounds=2,
                                 workers=2, max_seconds=20.0)


def web(vip: str = "10.96.221.10") -> ServicePortInfo:
    port = ServicePort("http", 80, Protocol.TCP, 8080)
    return ServicePortInfo(Service("default", "web", cluster_ips=(vip,), ports=(port,)), port,
                           (EndpointInfo("10.244.221.3", 8080, node_name=lab.NODE_NAME),))


# --- without root: the desired state, the CLI, the output ----------------------------------------


def test_synthetic_services_are_distinct_and_the_real_one_is_last():
    ports = bench_modes.synthetic_ports(1000)
    assert len(ports) == 1000
    assert len({p.service.cluster_ip for p in ports}) == 1000
    assert all(1 <= len(p.endpoints) <= 2 for p in ports)
    addresses = [e.address for p in ports for e in p.endpoints]
    assert len(set(addresses)) == len(addresses)
    assert bench_modes.synthetic_ports(1000) == ports          # the same desired state every time
    assert bench_modes.render_position(ports + [web()], "default/web") == 1001
    assert bench_modes.render_position([web()] + ports, "default/web") == 1001


def test_cli_bench_keeps_the_program_bench_and_adds_modes(monkeypatch):
    seen = {}

    def recorder(kind):
        def record(args):
            seen[kind] = args
            return 0
        return record

    monkeypatch.setattr("lbctl.bench.prog.cmd_bench", recorder("program"))
    monkeypatch.setattr(bench_modes, "cmd_bench_modes", recorder("modes"))
    assert cli.main(["bench", "--repeat", "10"]) == 0
    assert seen["program"].services == "10,100000" and seen["program"].repeat == 10
    assert cli.main(["bench", "--modes", "none,ebpf", "--services", "3", "--connections", "200",
                     "--rounds", "1", "--json"]) == 0
    args = seen["modes"]
    assert (args.modes, args.services, args.connections, args.rounds, args.json) == \
        ("none,ebpf", "3", 200, 1, True)


def test_unknown_modes_and_counts_are_refused_by_name():
    with pytest.raises(bench_modes.BenchError, match="ipvs.*no IPVS"):
        bench_modes.preflight(["none", "ipvs"], tiny_spec())
    with pytest.raises(bench_modes.BenchError, match="each mode once"):
        bench_modes.preflight(["none", "none"], tiny_spec())
    with pytest.raises(bench_modes.BenchError, match="at least 1"):
        bench_modes.parse_counts("10,0")


def test_table_and_plot_from_a_report(tmp_path):
    results = []
    for n in COUNTS:
        for i, mode in enumerate(MODES):
            r = bench_modes.ModeResult(mode=mode, services=n, real_service_position=n,
                                       sync_seconds=None if mode == "none" else 0.01,
                                       connections=200, conn_per_second=1000.0 - 100 * i,
                                       ratio_to_none=1.0 - 0.1 * i, p50_us=200, p99_us=900,
                                       answers={"web-0": 67, "web-1": 67, "web-2": 66})
            results.append(r)
    report = bench_modes.BenchReport(modes=list(MODES), counts=list(COUNTS),
                                     spec=dataclasses.asdict(tiny_spec()), results=results)
    text = bench_modes.format_report(report)
    for mode in MODES:
        assert f"\n{mode:<9} " in text
    bench_modes.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


# --- as root: the real thing, tiny ---------------------------------------------------------------


def node_state() -> dict:
    from netfilter_state import iptables_state, nft_state

    return {"iptables": iptables_state(), "nft": nft_state(),
            "netns": sorted(n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                      text=True).stdout.split() if n.startswith(PREFIX)),
            "links": sorted(p.name for p in Path("/sys/class/net").iterdir()
                            if p.name.startswith(f"veth{PREFIX}")),
            "pins": os.path.exists(tiny_spec().pin_dir)}


@pytest.mark.root
@pytest.mark.netns
def test_every_mode_every_backend_nothing_left_behind(tmp_path):
    before = node_state()
    lines: list[str] = []
    report = bench_modes.run_bench_modes(MODES, COUNTS, tiny_spec(), progress=lines.append)
    plot = tmp_path / "bench-modes.png"
    bench_modes.plot(report, plot)

    assert [(r.services, r.mode) for r in report.results] == [(n, m) for n in COUNTS for m in MODES]
    for r in report.results:
        where = f"{r.mode} at {r.services} service(s)"
        assert r.failure is None, f"{where}: {r.failure}\n" + "\n".join(lines)
        assert set(r.answers) == {"web-0", "web-1", "web-2"}, where
        assert all(count > 0 for count in r.answers.values()), where
        assert r.connections > 0 and r.conn_per_second > 0, where
        assert isinstance(r.ratio_to_none, float) and math.isfinite(r.ratio_to_none) \
            and r.ratio_to_none > 0, where
        assert 0 < r.p50_us <= r.p99_us, where
        assert r.real_service_position == r.services, where      # the real service sorts last
        if r.mode == "none":
            assert r.sync_seconds is None
        else:
            assert r.sync_seconds is not None and r.sync_seconds >= 0, where
        if r.mode == "iptables":
            assert r.kernel_position == f"rule {r.services} of {r.services + 1} in nat KUBE-SERVICES"
    assert [r.ratio_to_none for r in report.results if r.mode == "none"] == [1.0] * len(COUNTS)
    assert plot.stat().st_size > 0
    assert report.left_behind == [] and report.ok
    assert not lab.state_path(PREFIX).exists()
    assert node_state() == before


def two_node_spec() -> bench_modes.BenchSpec:
    """A prefix, pod CIDRs (10.244.223-224), service CIDR and lab network (172.18.223) of its own."""
    return dataclasses.replace(tiny_spec(), prefix=PREFIX + "n", pod_cidr="10.244.223.0/24",
                               gateway="10.244.223.1", service_cidr="10.96.223.0/24",
                               real_vip="10.96.223.10", pin_dir=TEST_PIN_DIR + "-bench-2n",
                               connections=150, rounds=1, nodes=2)


def test_two_node_placement_and_node_port():
    spec = two_node_spec()
    placement = dict(spec.lab_spec(MODES).placement)
    assert {placement[bench_modes.client_pod(m)] for m in MODES} == {0}
    assert {placement[p] for p in spec.backend_pods} == {1}
    assert spec.node_pin_dir(0) != spec.node_pin_dir(1) != spec.pin_dir
    assert tiny_spec().node_pin_dir(0) == tiny_spec().pin_dir, "one node: the pin dir as before"
    converted = bench_modes.node_port_of(web())
    assert converted.service.type == "NodePort" and converted.port.node_port == bench_modes.NODE_PORT
    assert converted.service.ports == (converted.port,) and converted.endpoints == web().endpoints


@pytest.mark.root
@pytest.mark.netns
def test_two_nodes_cross_node_and_node_port_from_outside():
    """--nodes 2: a client pod on node 0 to the ClusterIP of backends on node 1 through every
    mode, and the outside client to node 0's NodePort (XDP on node 0's eth0 in ebpf mode)."""
    spec = two_node_spec()
    before = node_state()
    lines: list[str] = []
    report = bench_modes.run_bench_modes(MODES, (2,), spec, progress=lines.append)
    log = "\n".join(lines)
    cases = [(r.mode, r.case) for r in report.results]
    assert cases == [(m, "ClusterIP") for m in MODES[:1]] + [
        (m, case) for m in MODES[1:] for case in ("ClusterIP", "NodePort")], log
    for r in report.results:
        where = f"{r.mode} {r.case}"
        assert r.failure is None, f"{where}: {r.failure}\n{log}"
        assert set(r.answers) == {"web-0", "web-1", "web-2"} and all(r.answers.values()), where
        assert r.connections > 0 and 0 < r.p50_us <= r.p99_us, where
        assert (r.ratio_to_none is not None) == (r.case == "ClusterIP"), where
    ebpf_rows = [r for r in report.results if r.mode == "ebpf"]
    assert {r.uplink_mode for r in ebpf_rows} <= {"xdp-native", "xdp-generic"}, "XDP on node 0's eth0"
    text = bench_modes.format_report(report)
    assert f"NodePort {bench_modes.NODE_PORT} from the outside client to node 0" in text
    assert "2 nodes: client pods on node 0, backends on node 1" in text
    assert report.left_behind == [] and report.ok
    assert not lab.state_path(spec.prefix).exists()
    assert not any(os.path.exists(spec.node_pin_dir(i)) for i in range(2))
    assert node_state() == before
