"""`lbctl bench --k8s-latency` (lbctl.bench.k8s_latency): its pure parts (percentiles, summaries,
the metric's histogram, the probe's verdict, the options), and one short real run whose JSON must
be complete with positive samples (their values are the benchmark's business, not a test's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lbctl.bench import k8s_latency as bench
from lbctl.cli.main import build_parser

# --- percentiles and summaries -------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]          # 1..100
    assert bench.percentile(values, 0.5) == 50.0
    assert bench.percentile(values, 0.99) == 99.0
    assert bench.percentile(values, 1.0) == 100.0
    assert bench.percentile(values, 0.0) == 1.0
    assert bench.percentile([3.0, 1.0, 2.0], 0.5) == 2.0   # unsorted input
    assert bench.percentile([7.0], 0.99) == 7.0
    assert bench.percentile([], 0.5) is None
    with pytest.raises(ValueError):
        bench.percentile([1.0], 99)


def test_summary_counts_missing_samples_apart():
    s = bench.summary([0.2, None, 0.1, 0.4, None])
    assert s == {"count": 3, "missing": 2, "p50": 0.2, "p99": 0.4, "max": 0.4}
    assert bench.summary([]) == {"count": 0, "missing": 0, "p50": None, "p99": None, "max": None}


# --- the metric ----------------------------------------------------------------------------------

EXPOSITION = """\
# HELP kubeproxy_network_programming_duration_seconds In Cluster Network Programming Latency in seconds
# TYPE kubeproxy_network_programming_duration_seconds histogram
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="0.0"} 0.0
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="0.25"} 1.0
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="1.0"} 3.0
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="+Inf"} 3.0
kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"} 3.0
kubeproxy_network_programming_duration_seconds_sum{ip_family="IPv4"} 1.5
# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds
# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram
kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="+Inf"} 9.0
kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 9.0
kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family="IPv4"} 99.0
"""


def test_the_histogram_is_read_from_the_exposition_and_no_other():
    h = bench.parse_histogram(EXPOSITION)
    assert h["count"] == 3 and h["sum"] == 1.5
    assert h["buckets"] == [[0.0, 0], [0.25, 1], [1.0, 3], [float("inf"), 3]]
    assert bench.parse_histogram("") == {"count": 0, "sum": 0.0, "buckets": []}


def test_one_change_is_the_increase_of_sum_over_count():
    before = {"count": 3, "sum": 1.5}
    assert bench.observation(before, {"count": 4, "sum": 2.0}) == pytest.approx(0.5)
    assert bench.observation(before, {"count": 5, "sum": 2.5}) == pytest.approx(0.5)   # two: their mean
    assert bench.observation(before, before) is None                                   # nothing observed


# --- the probe's verdict -------------------------------------------------------------------------


def records(*answers: str | None, start: float = 100.0, period: float = 0.01):
    return [(start + i * period, who) for i, who in enumerate(answers)]


def test_an_added_pod_counts_from_its_first_answer_after_the_write():
    r = records("web-0", "web-2", "web-1", "web-0", "web-2", "web-2")     # 100.00, 100.01, ...
    assert bench.traffic_moved(r, 100.015, "web-2", added=True) == pytest.approx(0.025)   # the one at 100.04
    assert bench.traffic_moved(r, 100.015, "web-9", added=True) is None


def test_a_removed_pod_counts_from_the_connection_after_its_last_answer_once_confirmed():
    r = records("web-1", "web-0", "web-1", "web-2", "web-0", "web-2", "web-0")
    # web-1 answered last at 100.02; the first connection after it started at 100.03
    assert bench.traffic_moved(r, 100.005, "web-1", added=False, confirm=4) == pytest.approx(0.025)
    assert bench.traffic_moved(r, 100.005, "web-1", added=False, confirm=5) is None    # not confirmed yet
    # errors do not confirm
    assert bench.traffic_moved(records("web-1", None, None, None), 100.0, "web-1", added=False, confirm=1) is None


# --- the synthetic services ----------------------------------------------------------------------


def test_synthetic_services_are_unique_and_selector_less():
    pairs = bench.synthetic_objects("bench", 5, 3)
    vips = [svc["spec"]["clusterIP"] for svc, _ in pairs]
    assert vips == ["10.96.16.5", "10.96.16.6", "10.96.16.7"]
    assert all("selector" not in svc["spec"] for svc, _ in pairs)
    for svc, eps in pairs:
        assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == svc["metadata"]["name"]
        assert eps["ports"][0]["name"] == svc["spec"]["ports"][0]["name"]
    endpoints = {eps["endpoints"][0]["addresses"][0] for _, eps in pairs}
    assert len(endpoints) == 3 and all(e.startswith("10.128.") for e in endpoints)
    with pytest.raises(bench.BenchError):
        bench.synthetic_objects("bench", bench.SYNTHETIC_LIMIT, 1)


# --- the options ---------------------------------------------------------------------------------


def bench_args(*argv: str):
    return build_parser().parse_args(["bench", *argv])


def test_k8s_latency_options_and_defaults():
    args = bench_args("--k8s-latency")
    spec = bench.spec_from_args(args)
    assert spec.counts == (1000, 10000) and spec.changes == 20 and spec.change_timeout == 30.0
    assert bench.output_paths(args) == (bench.Path("out/bench-k8s-latency.json"),
                                        bench.Path("out/bench-k8s-latency.png"))
    args = bench_args("--k8s-latency", "--services", "10,1_000", "--changes", "3", "--out-dir", "/tmp/x",
                      "--plot", "/tmp/p.png")
    spec = bench.spec_from_args(args)
    assert spec.counts == (10, 1000) and spec.changes == 3
    assert bench.output_paths(args) == (bench.Path("/tmp/x/bench-k8s-latency.json"), bench.Path("/tmp/p.png"))
    with pytest.raises(bench.BenchError):
        bench.spec_from_args(bench_args("--k8s-latency", "--services", "100000"))


@pytest.mark.parametrize("argv", [["--changes", "0"], ["--change-timeout", "-1"], ["--services", "0"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench_args("--k8s-latency", *argv)
    assert "error" in capsys.readouterr().err


def test_the_other_benches_keep_their_flags():
    args = bench_args("--services", "10", "--repeat", "5")
    assert not args.k8s_latency and args.modes is None and args.services == "10" and args.repeat == 5
    args = bench_args("--modes", "none,ebpf", "--connections", "10")
    assert args.modes == "none,ebpf" and not args.k8s_latency


def test_k8s_latency_and_modes_together_are_refused(capsys):
    from lbctl.cli.main import main

    assert main(["bench", "--k8s-latency", "--modes", "ebpf"]) == 2
    assert "two benchmarks" in capsys.readouterr().err


# --- one short real run --------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.kube
def test_a_short_run_writes_a_complete_report(tmp_path):
    """N=10, K=3 through the CLI: lab, control plane, agent, probe, all removed afterwards."""
    from lbctl.lab import cluster as lab

    proc = subprocess.run([sys.executable, "-m", "lbctl.cli.main", "bench", "--k8s-latency", "--services", "10",
                           "--changes", "3", "--out-dir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    report = json.loads((tmp_path / "bench-k8s-latency.json").read_text())
    assert (tmp_path / "bench-k8s-latency.png").stat().st_size > 0
    assert printed["rows"] == report["rows"]
    assert report["counts"] == [10] and report["changes"] == 3 and report["seconds"] > 0
    (row,) = report["rows"]
    assert row["services"] == 10 and row["created"] == 9 and row["create_seconds"] > 0
    assert row["converge_seconds"] > 0
    assert [(c["index"], c["pod"], c["ready"]) for c in row["changes"]] == [
        (0, "web-0", False), (1, "web-0", True), (2, "web-1", False)]
    for change in row["changes"]:
        assert change["t_write"] > 0
        assert change["maps_seconds"] > 0 and change["maps_source"] in ("agent", "poll")
        assert change["traffic_seconds"] > 0
        assert change["metric_seconds"] is None or change["metric_seconds"] >= 0
    for name in ("maps", "traffic"):
        assert row["summary"][name]["count"] == 3 and row["summary"][name]["missing"] == 0
    assert {"count", "sum", "buckets"} <= set(row["histogram"])
    metric_seen = sum(c["metric_seconds"] is not None for c in row["changes"])
    assert row["summary"]["metric"]["count"] == metric_seen
    assert bool(report["metric_note"]) == (metric_seen == 0)
    assert not lab.state_path("lbkb").exists(), "the bench left its lab up"
    assert not os.path.exists(bench.LatencySpec().pin_dir), "the bench left its maps pinned"
