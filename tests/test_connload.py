"""connload (tools/connload.c, built by `make bench-tools`) against nginx from Debian, between two
network namespaces of this test (prefix "lbcl", 10.244.236.0/24):

    lbcl<N>-cli  10.244.236.1/24 --veth-- lbcl<N>-srv  10.244.236.2/24, 10.244.236.3/24
                                                        nginx on .2:80 (the default backend),
                                                        .2:8080 and .3:8080 (access logs: round
                                                        robin), .2:8404 (answers 404); nothing on
                                                        .2:82 (refused); .2:81 dropped (timeouts);
                                                        .2:8444 a socket that resets

What is checked is what the benchmarks rely on: the open loop's schedule (the only timed check,
coarse: ±10% of 500/s), that every connection is counted once and by outcome, that the samples
file has one line per connection and agrees with the summary's exact percentiles, that the
concurrency cap is counted and does not hide waiting (latency from the schedule), and that a run
is bounded (--duration, --max-connections, --timeout).
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading

import pytest
from nsutil import socket_in

from lbctl.bench import load
from lbctl.lab import netns

PID = os.getpid() % 10000
CLI, SRV = f"lbcl{PID}-cli", f"lbcl{PID}-srv"
CLI_IP, SRV_IP, SRV_IP2 = "10.244.236.1", "10.244.236.2", "10.244.236.3"
DROP_PORT, REFUSED_PORT, RESET_PORT = 81, 82, 8444


# --- no root: the Python side and connload's arguments -----------------------------------------


def test_nearest_rank_percentiles():
    s = load.summarize([float(v) for v in range(100, 0, -1)])
    assert (s.n, s.min, s.p50, s.p90, s.p99, s.p999, s.max, s.mean) == (100, 1, 50, 90, 99, 100, 100, 50.5)
    one = load.summarize([7.0])
    assert (one.p50, one.p999, one.max) == (7.0, 7.0, 7.0)
    assert load.summarize([]).n == 0


def test_missing_binary_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setenv(load.CONNLOAD_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(load.LoadError, match="not an executable"):
        load.connload_path()
    monkeypatch.delenv(load.CONNLOAD_ENV)
    monkeypatch.setattr(load, "CONNLOAD_BUILT", tmp_path / "build" / "connload")
    monkeypatch.setattr(load.shutil, "which", lambda name: None)
    with pytest.raises(load.LoadError, match="make bench-tools"):
        load.connload_path()


@pytest.mark.parametrize("args, message", [
    (["--target", "10.0.0.1:80"], "--duration SECONDS is required"),
    (["--duration", "1"], "--target IP:PORT is required"),
    (["--target", "10.0.0.1", "--duration", "1"], "bad target '10.0.0.1'"),
    (["--target", "10.0.0.1:70000", "--duration", "1"], "bad target"),
    (["--target", "10.0.0.1:80", "--duration", "1", "--rate", "-1"], "--rate wants a number >= 0"),
    (["--target", "10.0.0.1:80", "--duration", "1", "--mode", "udp"], "--mode is http or connect"),
    (["--target", "10.0.0.1:80", "--duration", "1", "--threads", "4", "--concurrency", "2"],
     "--threads must not exceed --concurrency"),
])
def test_bad_arguments_are_refused(args, message):
    proc = subprocess.run([str(load.connload_path()), *args], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_nginx_config_serves_the_body():
    text = load.nginx_config(load.Path("/tmp/x"), "10.0.0.1", 80, 'say "hi"\n', status=404)
    assert "listen 10.0.0.1:80 backlog=4096;" in text and 'return 404 "say \\"hi\\"\\n";' in text
    assert "access_log off;" in text and "worker_processes 1;" in text and "daemon off;" in text


# --- the lab ---------------------------------------------------------------------------------


class ResetServer:
    """Accepts connections in SRV and closes each with SO_LINGER 0: the client sees a RST."""

    def __init__(self, address: str, port: int):
        self.sock = socket_in(SRV, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The two namespaces, the nginx servers and the reset server; all removed afterwards, and
    checked gone."""
    tmp = tmp_path_factory.mktemp("connload")
    servers: list[load.Nginx] = []
    reset = None
    netns.add_netns(CLI)
    try:
        netns.add_netns(SRV)
        netns.ip("link", "add", "lbcl-c", "netns", CLI, "type", "veth", "peer", "name", "lbcl-s", "netns", SRV)
        netns.ip_batch([f"addr add {CLI_IP}/24 dev lbcl-c", "link set lbcl-c up"], ns=CLI)
        netns.ip_batch([f"addr add {SRV_IP}/24 dev lbcl-s", f"addr add {SRV_IP2}/24 dev lbcl-s",
                        "link set lbcl-s up"], ns=SRV)
        netns.run_in(SRV, ["nft", "-f", "-"], input=(
            "table inet lbcl {\n chain input {\n  type filter hook input priority 0;\n"
            f"  tcp dport {DROP_PORT} drop\n }}\n}}\n"))
        ns_argv = netns.enter_argv(SRV)
        logs = {SRV_IP: tmp / "rr-a.log", SRV_IP2: tmp / "rr-b.log"}
        servers.append(load.start_nginx(ns_argv, SRV_IP, 80, workdir=tmp / "main"))
        for address, log in logs.items():
            servers.append(load.start_nginx(ns_argv, address, 8080, body=f"{address}\n", access_log=log,
                                            workdir=tmp / f"rr-{address}"))
        servers.append(load.start_nginx(ns_argv, SRV_IP, 8404, status=404, workdir=tmp / "404"))
        reset = ResetServer(SRV_IP, RESET_PORT)
        yield {"ns_argv": netns.enter_argv(CLI), "logs": logs}
    finally:
        if reset is not None:
            reset.stop()
        for server in servers:
            server.stop()
        netns.del_link("lbcl-c", CLI)
        netns.del_netns(SRV)
        netns.del_netns(CLI)
    assert all(not netns.pid_alive(s.pid) for s in servers), "an nginx survived"
    assert not netns.netns_exists(CLI) and not netns.netns_exists(SRV)


def run(lab, targets, **kw) -> load.LoadResult:
    return load.run_connload(lab["ns_argv"], targets, **kw)


def no_errors(r: load.LoadResult) -> bool:
    return r.errors_total == 0 and set(r.errors) == set(load.OUTCOMES[1:])


# --- the runs ----------------------------------------------------------------------------------



@pytest.mark.root
@pytest.mark.netns
def test_open_loop_keeps_the_offered_rate(lab):
    """500/s for 2 s: 1,000 connections on the schedule t0 + k/500, every one answered 200, the
    rate within 10% (±10% at 500/s leaves the scheduler a wide margin even on a loaded machine),
    and the summary's exact percentiles are those of the samples."""
    r = run(lab, [(SRV_IP, 80)], duration=2, rate=500, concurrency=64)
    assert r.scheduled == r.started == 1000 and r.unstarted == 0 and r.capped == 0
    assert r.connections_ok == 1000 and no_errors(r), r.errors
    assert r.offered_rate == 500 and 450 <= r.achieved_rate <= 550, r.achieved_rate
    s = r.samples
    assert s is not None and len(s) == 1000 and set(s.outcome) == {"ok"} and set(s.target) == {0}
    assert all(abs(sched - k * 2000) < 0.002 for k, sched in enumerate(s.sched_us))
    assert all(start >= sched for start, sched in zip(s.start_us, s.sched_us))
    assert all(c is not None and req is not None and 0 < c <= req for c, req in zip(s.connect_us, s.request_us))
    for summary, values in ((r.connect_us, s.connect_us), (r.request_us, s.request_us),
                            (r.schedule_latency_us, s.schedule_latency_us())):
        mine = load.summarize([v for v in values if v is not None])
        assert summary.n == mine.n == 1000
        for name in ("min", "p50", "p90", "p99", "p999", "max", "mean"):
            assert getattr(summary, name) == pytest.approx(getattr(mine, name), abs=0.01), name
    assert r.cpu_user_s + r.cpu_sys_s > 0 and r.cpu_us_per_connection is not None


@pytest.mark.root
@pytest.mark.netns
def test_threads_share_one_schedule(lab):
    r = run(lab, [(SRV_IP, 80)], duration=1, rate=500, threads=2, concurrency=8)
    assert r.scheduled == r.connections_ok == 500 and no_errors(r) and r.threads == 2
    assert r.samples is not None
    assert all(abs(sched - k * 2000) < 0.002 for k, sched in enumerate(r.samples.sched_us))


@pytest.mark.root
@pytest.mark.netns
def test_closed_loop_completes_connections(lab):
    r = run(lab, [(SRV_IP, 80)], duration=1, rate=0, concurrency=4)
    assert r.offered_rate is None and r.connections_ok > 0 and no_errors(r)
    assert r.scheduled == r.started == r.connections_ok and r.samples is not None and len(r.samples) == r.connections_ok
    assert r.achieved_rate > 0 and r.request_us.n == r.connections_ok


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.parametrize("rate, threads", [(1000, 1), (0, 2)])
def test_max_connections_stops_the_run(lab, rate, threads):
    r = run(lab, [(SRV_IP, 80)], duration=30, rate=rate, threads=threads, concurrency=8, max_connections=50)
    assert r.started == r.connections_ok == 50 and no_errors(r)
    assert r.samples is not None and len(r.samples) == 50
    assert r.wall_s < 30


@pytest.mark.root
@pytest.mark.netns
def test_round_robin_splits_evenly(lab):
    """Two targets alternate by connection number, and each nginx logs half of the requests."""
    before = {a: _lines(p) for a, p in lab["logs"].items()}
    r = run(lab, [(SRV_IP, 8080), (SRV_IP2, 8080)], duration=1, rate=200)
    assert r.connections_ok == 200 and no_errors(r) and r.targets == [f"{SRV_IP}:8080", f"{SRV_IP2}:8080"]
    assert r.samples is not None and r.samples.target == [k % 2 for k in range(200)]
    assert {a: _lines(p) - before[a] for a, p in lab["logs"].items()} == {SRV_IP: 100, SRV_IP2: 100}


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.root
@pytest.mark.netns
def test_connect_mode_sends_nothing(lab):
    r = run(lab, [(SRV_IP, 80)], duration=0.5, rate=100, mode="connect")
    assert r.mode == "connect" and r.connections_ok == 50 and no_errors(r)
    assert r.connect_us.n == 50 and r.request_us.n == 0 and r.schedule_latency_us.n == 50
    assert r.samples is not None and set(r.samples.request_us) == {None}


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.parametrize("port, kind", [(REFUSED_PORT, "refused"), (8404, "bad_response"),
                                        (RESET_PORT, "reset")])
def test_failures_are_counted_by_kind(lab, port, kind):
    r = run(lab, [(SRV_IP, port)], duration=0.5, rate=40)
    assert r.scheduled == 20 and r.connections_ok == 0
    assert r.errors == {k: (20 if k == kind else 0) for k in load.OUTCOMES[1:]}
    assert r.samples is not None and r.samples.outcome == [kind] * 20
    assert r.schedule_latency_us.n == 0 and r.achieved_rate == 0


@pytest.mark.root
@pytest.mark.netns
def test_dropped_syns_time_out_after_the_timeout(lab):
    r = run(lab, [(SRV_IP, DROP_PORT)], duration=0.5, rate=20, timeout_ms=300)
    assert r.scheduled == 10 and r.errors["timeout"] == 10 and r.connections_ok == 0
    s = r.samples
    assert s is not None and s.outcome == ["timeout"] * 10 and set(s.connect_us) == {None}
    assert all(end - start >= 300_000 for start, end in zip(s.start_us, s.end_us))


@pytest.mark.root
@pytest.mark.netns
def test_the_concurrency_cap_is_counted_not_hidden(lab):
    """One connection in flight, each taking its 200 ms timeout, 100 due per second: the ones
    that found no slot are capped and start late (their latency counts from the schedule), the
    ones still waiting at the end are unstarted; nothing is lost."""
    r = run(lab, [(SRV_IP, DROP_PORT)], duration=0.5, rate=100, concurrency=1, timeout_ms=200)
    s = r.samples
    assert s is not None and r.scheduled == 50 and r.started == len(s) and r.started + r.unstarted == 50
    assert 2 <= r.started < 50 and r.capped in (r.started - 1, r.started)
    assert r.errors["timeout"] == r.started
    # the second connection was due 10 ms in but started when the first timed out
    assert s.start_us[1] - s.sched_us[1] >= 190_000
