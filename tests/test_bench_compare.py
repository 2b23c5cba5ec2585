"""`lbctl bench --compare` (lbctl.bench.compare): its pure parts — the options, the statistics,
the targets verdicts, the report (markdown, JSON, plots) — on made-up rows; the whole run is
`make bench` (minutes, a real control plane and kube-proxy), not a test."""
from __future__ import annotations

import json
import os

import pytest

from lbctl.bench import compare
from lbctl.bench.compare import CompareError, CompareSpec, ModeRow, Report, Run
from lbctl.cli.main import build_parser


def args(*argv: str):
    return build_parser().parse_args(["bench", "--compare", *argv])


def test_options_become_the_spec():
    spec = compare.spec_from_args(args("--services", "1,1000", "--modes", "direct,ebpf,kube-proxy-iptables",
                                       "--runs", "5", "--rate", "500", "--duration", "2",
                                       "--mode-max", "kube-proxy-iptables=1000"))
    assert spec.counts == (1, 1000) and spec.modes == ("direct", "ebpf", "kube-proxy-iptables")
    assert (spec.runs, spec.rate, spec.duration, spec.changes) == (5, 500.0, 2.0, 5)
    assert spec.mode_max == (("kube-proxy-iptables", 1000),)
    assert spec.skipped("kube-proxy-iptables", 10000) == 1000
    assert spec.skipped("kube-proxy-iptables", 1000) is None and spec.skipped("ebpf", 10**6) is None
    default = compare.spec_from_args(args())
    assert default.counts == (1, 1000, 10000) and default.modes == compare.MODES


@pytest.mark.parametrize("text", ["iptables", "iptables=", "iptables=0", "iptables=-3", "iptables=x"])
def test_a_bad_mode_max_is_refused(text):
    with pytest.raises(CompareError, match="--mode-max"):
        compare.parse_mode_max(text)


@pytest.mark.parametrize("spec,match", [
    (CompareSpec(modes=("direct", "ipvs")), "--modes ipvs"),
    (CompareSpec(counts=(1, 70000)), "--services 70,000"),
    (CompareSpec(endpoints=61), "--endpoints 61"),
    (CompareSpec(modes=("direct", "ebpf"), mode_max=(("nftables", 10),)), "--mode-max nftables"),
])
def test_impossible_specs_are_refused_before_anything_starts(spec, match):
    with pytest.raises(CompareError, match=match):
        spec.validate()


def test_the_cli_says_what_is_wrong_and_exits_2(capsys):
    from lbctl.cli.main import main
    assert main(["bench", "--compare", "--modes", "direct,bogus"]) == 2
    assert "--modes bogus: not a mode" in capsys.readouterr().err


def test_each_mode_has_its_own_client_pod_and_the_backends_are_on_node_1():
    spec = CompareSpec()
    lab_spec = spec.lab_spec()
    clients = {spec.client(m) for m in spec.modes}
    assert len(clients) == len(spec.modes)
    placement = dict(lab_spec.placement)
    assert all(placement[c] == 0 for c in clients) and placement["client-probe"] == 0
    assert all(placement[b] == 1 for b in spec.backends) and len(spec.backends) == 10


def test_median_min_max_ignores_missing_values():
    assert compare.median_min_max([3.0, None, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert compare.median_min_max([None]) is None
    assert compare.mmm([10.0, 30.0, 20.0]) == "20 (10-30)"


def test_other_processes_system_time_is_counted_but_not_the_loads_nor_this_ones():
    import subprocess
    import time
    # dd in 1-byte blocks: two syscalls a byte, nearly all system time, for as long as it runs
    dd = subprocess.Popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=100000000"],
                          stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        snapshot = compare.user_system_ticks()
    finally:
        dd.kill()
        dd.wait()
    assert os.getpid() not in snapshot
    comm, ticks = snapshot[dd.pid]
    assert comm == "dd" and ticks > 0
    assert all(snapshot[p][0] != "kthreadd" for p in snapshot)          # kernel threads stay out
    everyone = sum(t for _, t in snapshot.values())
    assert everyone - sum(t for c, t in snapshot.values() if c != "dd") == ticks
    assert compare.process_ticks(2**22 + 7) == (0, 0)      # gone: nothing


def run(cpu: float, p99: float, rate: float, kind: str = "fixed") -> Run:
    return Run(kind=kind, offered_rate=1000.0 if kind == "fixed" else 0.0, achieved_rate=rate,
               connections=1000, errors={}, elapsed_s=1.0, connect_us={"p50": p99 / 2, "p99": p99},
               request_us={"p50": p99, "p99": 2 * p99}, cpu_ticks={}, background_system_ticks=0,
               proxy_cpu_s=0.0, cpu_us_per_conn=cpu, user_us_per_conn=1.0)


def row(mode: str, n: int, cpu: list[float], p99: float = 200.0, **kw) -> ModeRow:
    r = ModeRow(mode=mode, services=n, **kw)
    r.runs = [run(c, p99, 1000.0) for c in cpu] + [run(c, p99, 8000.0, "max") for c in cpu]
    return r


def report() -> Report:
    spec = CompareSpec(counts=(1, 10000), modes=("direct", "ebpf", "kube-proxy-iptables",
                                                 "kube-proxy-nftables"),
                       mode_max=(("kube-proxy-nftables", 1),))
    rep = Report(spec=compare.asdict(spec), machine={
        "kernel": "6.18", "cpus": 2, "cpu_model": "x", "kubernetes": "v1.37.2", "kube-proxy": "v1.37.2",
        "nginx": "nginx/1.22.1", "iptables": "iptables v1.8.9", "nft": "nftables v1.0.6"})
    changes = [{"pod": "web-0", "ready": False, "traffic_s": 0.05, "metric_s": 0.06}]
    rep.rows = [row("direct", 1, [20.0, 21.0]), row("direct", 1, [22.0]),
                row("ebpf", 1, [21.0, 22.0, 23.0], program_seconds=14.0, sync_seconds=0.1, changes=changes),
                row("kube-proxy-iptables", 1, [30.0, 31.0, 32.0], target_position=1, service_rules=2),
                row("kube-proxy-nftables", 1, [25.0, 25.0, 25.0]),
                row("direct", 10000, [20.0, 20.0]),
                row("ebpf", 10000, [21.0, 21.0, 21.0], sync_seconds=0.8, program_seconds=15.0, changes=changes),
                row("kube-proxy-iptables", 10000, [90.0, 95.0, 99.0], target_position=10000, service_rules=10001),
                ModeRow(mode="kube-proxy-nftables", services=10000, skipped="not run: --mode-max kube-proxy-nftables=1")]
    return rep


def test_direct_rows_of_one_count_merge_into_one_baseline():
    merged = report().row("direct", 1)
    assert merged is not None and len(merged.fixed()) == 3 and len(merged.max_runs()) == 3


def test_targets_are_judged_with_their_numbers():
    lines = compare.targets(report())
    text = "\n".join(lines)
    assert "1 services: eBPF CPU/conn 22 us vs direct 21 us (+5%; target within 5%): met" in text
    assert "10,000 services: eBPF CPU/conn 21 us vs direct 20 us (+5%; target within 5%): met" in text
    assert "10,000 services: eBPF CPU/conn 21 us vs kube-proxy iptables 95 us (0.22x; target at most 1/3): met" in text
    assert not any("nftables" in line and "10,000" in line for line in lines)   # skipped: no verdict
    assert "eBPF first sync 0.80 s" in text and "target ≤ 1 s): met" in text
    assert "ebpf endpoint change to traffic p99 50 ms (target ≤ 100 ms for eBPF): met" in text
    assert "eBPF CPU/conn from 1 to 10,000 services: 21-22 us" in text


def test_a_row_off_by_more_than_the_target_is_missed():
    rep = report()
    rep.rows[6] = row("ebpf", 10000, [40.0, 41.0, 42.0], sync_seconds=2.0)
    text = "\n".join(compare.targets(rep))
    assert "10,000 services: eBPF CPU/conn 41 us vs direct 20 us (+105%; target within 5%): missed" in text
    assert "eBPF first sync 2.00 s" in text and "missed" in text
    assert "target flat ±10%): missed" in text


def test_the_markdown_has_one_line_per_mode_and_count_and_says_what_was_not_run():
    text = compare.markdown(report())
    table = [line for line in text.splitlines() if line.startswith("| 1") and "|" in line[2:]]
    assert len(table) == 8, table
    assert "| 10,000 | kube-proxy-nftables | not run: --mode-max kube-proxy-nftables=1 |" in text
    assert "10,000: kube-proxy-iptables target at rule 10,000 of 10,001" in text
    assert "Targets:" in text and "Linux 6.18, 2 CPUs" in text


def test_the_json_holds_every_run_and_the_summary(tmp_path):
    out = compare.report_dict(report())
    text = json.dumps(out)
    back = json.loads(text)
    assert len(back["rows"]) == 9 and back["targets"] == compare.targets(report())
    assert {(s["mode"], s["services"]) for s in back["summary"]} >= {("ebpf", 10000), ("direct", 1)}
    assert back["rows"][0]["runs"][0]["connect_us"]["p99"] == 200.0


def test_the_plots_are_written(tmp_path):
    made = compare.plot(report(), tmp_path)
    assert {p.name for p in made} == {"compare-cpu.png", "compare-p99.png", "compare-maxrate.png",
                                      "compare-control-plane.png"}
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in made)
