"""The status file and `lbctl status`: what the agent writes after each sync (atomically, for
root only), how it reads when the agent runs and when it does not, the counts (the same for every
mode), and the files the agent keeps made root-only."""
from __future__ import annotations

import json
import os
import stat

import pytest
from kubeproxy_cases import ep, info, port, service

from lbctl.agent import status
from lbctl.agent.health import ProxyHealth
from lbctl.agent.lock import AgentLock
from lbctl.cli import main as cli
from lbctl.datapath.base import SyncResult

PIN = "/sys/fs/bpf/lbctl-status-test"


def ports():
    web = service("default", "web", "10.96.0.10", port("http", 80, node_port=30080), port("https", 443),
                  type="LoadBalancer", external_ips=("192.0.2.50",), load_balancer_ips=("192.0.2.100",))
    dns = service("kube-system", "dns", "10.96.0.53", port("dns", 53, "UDP"))
    endpoints = (ep("10.244.0.5", 8080, "node-a"), ep("10.244.1.5", 8080, "node-b"))
    return [info(web, "http", *endpoints), info(web, "https", ep("10.244.0.5", 8443, "node-a")),
            info(dns, "dns", ep("10.244.0.9", 53, "node-a"))]


def test_counts_are_mode_independent():
    assert status.counts(ports()) == {"services": 2, "service_ports": 3, "backends": 4,
                                      "frontends": 4 + 3 + 1}   # web:http 4 (cluster, node, ext, lb)


def test_changes_count_services_and_endpoint_sets():
    before = ports()
    after = [before[0], info(before[1].service, "https", ep("10.244.0.6", 8443, "node-a")), before[2]]
    assert status.changes(None, before) == (2, 2)
    assert status.changes(before, after) == (0, 1)
    assert status.changes(after, after[:2]) == (1, 1), "dns removed"


def test_no_local_endpoints():
    svc = service("default", "local", "10.96.0.20", port("p", 80), internal_traffic_policy="Local")
    remote = [info(svc, "p", ep("10.244.1.5", 80, "node-b"))]
    assert status.no_local_endpoints(remote, "node-a") == (1, 0)
    assert status.no_local_endpoints([info(svc, "p")], "node-a") == (0, 0), "no endpoints at all: not counted"


def test_status_file_after_each_sync(agent_run_dir):
    ops = status.Operations(mode="iptables", source="manifests /etc/lbctl", pin_dir=PIN, node_name="node-a",
                            health=ProxyHealth(60), listeners={"healthz": "0.0.0.0:10256"})
    path = status.status_file(PIN)
    assert os.path.dirname(path) == str(agent_run_dir)
    first = json.loads(open(path).read())
    assert first["last_sync"] is None and first["mode"] == "iptables"
    ops.queued()
    ops.synced("change", SyncResult(added=3), 0.0042, True, ports(), ["Service default/x: bad port"])
    ops.synced("retry", SyncResult(errors=["iptables-restore: exit 1"]), 0.1, False)
    data = json.loads(open(path).read())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert data["last_sync"]["result"] == "failed" and data["last_sync"]["errors"] == ["iptables-restore: exit 1"]
    assert data["counts"]["services"] == 2 and data["syncs"] == {"change": 1, "retry": 1, "resync": 0}
    assert data["last_successful_sync"] is not None and data["problems"] == []
    # this agent's file only: the run directory is shared with other tests' agents (a SIGKILLed
    # one in the restart suite may leave its own temporary file)
    mine = os.path.basename(path)
    assert not [n for n in os.listdir(agent_run_dir) if n.startswith(mine) and n.endswith(".tmp")], \
        "written atomically"

    text = status.format_status(data, running=False)
    assert "NOT RUNNING" in text and "manifests /etc/lbctl" in text and "retry" in text
    assert "sync error: iptables-restore: exit 1" in text
    assert "2 service(s), 3 service port(s), 8 frontend(s), 4 backend(s)" in text


def test_lbctl_status_says_whether_an_agent_runs(agent_run_dir, capsys):
    for name in os.listdir(agent_run_dir):
        if name.startswith("status-"):
            os.unlink(agent_run_dir / name)
    assert cli.main(["status"]) == 1
    assert "no lbctl agent runs on this node" in capsys.readouterr().err
    ops = status.Operations(mode="ebpf", source="manifests d", pin_dir=PIN)
    ops.synced("change", SyncResult(added=1), 0.001, True, ports())
    assert cli.main(["status"]) == 1
    assert "NOT RUNNING: no agent holds the lock" in capsys.readouterr().out
    with AgentLock(PIN, "lbctl run --mode ebpf"):
        assert cli.main(["status", "--pin-dir", PIN]) == 0
        out = capsys.readouterr().out
        assert f"running (pid {os.getpid()})" in out and "mode:       ebpf" in out
        assert cli.main(["status", "--json"]) == 0
        [entry] = [e for e in json.loads(capsys.readouterr().out) if e["pin_dir"] == PIN]
        assert entry["running"] is True and entry["counts"]["service_ports"] == 3
    os.unlink(status.status_file(PIN))


def test_restrict_files(tmp_path, monkeypatch):
    run, pins = tmp_path / "run", tmp_path / "pins"
    for d in (run, pins):
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
    (run / "agent-x.json").write_text("{}")
    os.chmod(run / "agent-x.json", 0o644)
    (pins / "lb4_services").write_text("")
    os.chmod(pins / "lb4_services", 0o644)
    (pins / "trace-123").mkdir()
    monkeypatch.setenv("LBCTL_RUN_DIR", str(run))
    changed = status.restrict_files(str(pins))
    assert len(changed) == 4
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700 and stat.S_IMODE(os.stat(pins).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run / "agent-x.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pins / "lb4_services").st_mode) == 0o600
    assert status.restrict_files(str(pins)) == []


@pytest.mark.root
def test_pins_on_bpffs_are_made_root_only(tmp_path, monkeypatch):
    """A pin left world-readable by an earlier run (older umask) is chmod-ed on bpffs."""
    from conftest import TEST_PIN_DIR

    from lbctl.datapath.ebpf import bpfsys

    pin_dir = TEST_PIN_DIR + "-perms"
    monkeypatch.setenv("LBCTL_RUN_DIR", str(tmp_path))
    os.makedirs(pin_dir)
    fd = bpfsys.map_create(1, "lbctl_perm", 4, 4, 4)     # BPF_MAP_TYPE_HASH
    try:
        path = os.path.join(pin_dir, "lb4_services")
        bpfsys.obj_pin(fd, path)
        os.chmod(pin_dir, 0o755)
        os.chmod(path, 0o644)
        assert mode_of(path) == 0o644
        assert path in status.restrict_files(pin_dir)
        assert mode_of(path) == 0o600 and mode_of(pin_dir) == 0o700
    finally:
        os.close(fd)
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
        os.rmdir(pin_dir)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class FakeMode:
    """A mode whose syncs succeed or fail on demand."""
    name = "fake"
    problems = ()

    def __init__(self):
        self.fail = False
        self.synced = []

    def sync(self, ports):
        self.synced.append(ports)
        return SyncResult(errors=["kernel said no"] if self.fail else [], added=0 if ports is None else len(ports))

    @property
    def needs_retry(self):
        return self.fail


class Snapshots:
    def __init__(self):
        self.next = None

    def poll(self):
        snapshot, self.next = self.next, None
        return snapshot


def test_the_agent_loop_drives_health_and_status():
    """queued when a change is polled (and from the start), updated after a sync that worked;
    a sync that keeps failing leaves the change pending until /healthz is 503."""
    from lbctl.agent.loop import Agent, AgentOptions
    from lbctl.model.objects import ClusterSnapshot

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()
    proxy = ProxyHealth(timeout=60, clock=clock)
    ops = status.Operations(mode="fake", source="test", pin_dir=PIN, health=proxy, write_status=False)
    clock.now = 61
    assert not proxy.is_healthy(), "the first sync is awaited from the start"
    source, mode = Snapshots(), FakeMode()
    agent = Agent(source, mode=mode, observer=ops, options=AgentOptions(interval=1, sync_period=30), clock=clock)
    source.next = ClusterSnapshot()
    agent.turn()
    assert proxy.is_healthy() and ops.last_sync["kind"] == "change" and ops.last_sync["result"] == "ok"

    mode.fail = True
    source.next = ClusterSnapshot()
    clock.now = 100
    agent.turn()
    assert ops.last_sync["result"] == "failed" and ops.last_sync["errors"] == ["kernel said no"]
    clock.now = 159
    agent.turn()                                  # a retry (backoff passed), failing again
    assert ops.syncs["retry"] == 1 and proxy.is_healthy(), "pending, not late yet"
    clock.now = 160
    assert not proxy.is_healthy() and proxy.answer("/healthz")[0] == 503
    mode.fail = False                             # the kernel takes it: the next sync works
    agent.turn()
    assert proxy.is_healthy() and ops.last_sync["result"] == "ok"
