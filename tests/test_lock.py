"""One agent per node: the lock next to the pinned maps' state, and who is refused."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lbctl.agent import lock as agent_lock
from lbctl.agent.lock import AgentLock, AgentRunning, lock_path, running_agents
from lbctl.cli import main as cli
from lbctl.cli.demo import DEMO_PIN_DIR
from lbctl.datapath import base as modes
from lbctl.datapath.base import DEFAULT_PIN_DIR

PIN = "/sys/fs/bpf/lbctl-t-lock"


def test_the_lock_lives_in_the_run_dir_keyed_by_pin_dir(tmp_path):
    assert lock_path(DEFAULT_PIN_DIR, str(tmp_path)) == str(tmp_path / "agent-sys_fs_bpf_lbctl.lock")
    assert lock_path(PIN, str(tmp_path)) != lock_path(DEFAULT_PIN_DIR, str(tmp_path))


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with AgentLock(PIN, "lbctl run --mode ebpf", str(tmp_path)) as first:
        assert open(first.path).read().splitlines() == [str(os.getpid()), PIN, "lbctl run --mode ebpf"]
        with pytest.raises(AgentRunning) as refused:
            AgentLock(PIN, "lbctl run --mode nftables", str(tmp_path)).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and "lbctl run --mode ebpf" in message
        assert "one agent per node" in message
        assert [h.pid for h in running_agents(str(tmp_path))] == [os.getpid()]
        with AgentLock(PIN + "-other", "lbctl run", str(tmp_path)):   # another datapath: its own lock
            assert len(running_agents(str(tmp_path))) == 2
    assert os.listdir(tmp_path) == [], "released: the file is gone"
    AgentLock(PIN, "lbctl run", str(tmp_path)).acquire().release()


def test_another_process_holds_it_and_a_dead_holder_leaves_none(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from lbctl.agent.lock import AgentLock
        lock = AgentLock({PIN!r}, "lbctl run --mode iptables", {str(tmp_path)!r}).acquire()
        print("held", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AgentRunning, match=f"pid {holder.pid}"):
            AgentLock(PIN, "lbctl run", str(tmp_path)).acquire()
    finally:
        holder.kill()         # as a crash would: the kernel drops the lock, the file stays
        holder.wait()
    assert os.path.exists(lock_path(PIN, str(tmp_path)))
    assert running_agents(str(tmp_path)) == [], "a dead holder is no agent"
    assert os.listdir(tmp_path) == [], "its stale file removed on the way"
    AgentLock(PIN, "lbctl run", str(tmp_path)).acquire().release()


def test_a_waiter_never_locks_a_file_its_holder_removed(tmp_path, monkeypatch):
    """The holder removes the file as it lets go; one who opened it just before must not take
    a lock on the removed file (two agents would then run): it tries again on a fresh one."""
    first = AgentLock(PIN, "lbctl run", str(tmp_path)).acquire()
    real_open = os.open
    opened = []

    def open_then_holder_leaves(path, *args):
        fd = real_open(path, *args)
        if not opened:
            opened.append(fd)
            first.release()           # between our open and our flock
        return fd

    monkeypatch.setattr(agent_lock.os, "open", open_then_holder_leaves)
    second = AgentLock(PIN, "lbctl run", str(tmp_path)).acquire()
    monkeypatch.undo()
    assert os.fstat(second.fd).st_ino == os.stat(second.path).st_ino
    with pytest.raises(AgentRunning):
        AgentLock(PIN, "lbctl run", str(tmp_path)).acquire()
    second.release()


# --- who is refused (item 5) -----------------------------------------------------------------------


class NeverStarted:
    name = "never"
    problems: tuple = ()

    def __getattr__(self, what):
        raise AssertionError(f"the mode was used ({what}) although the agent was refused")


@pytest.mark.parametrize("mode", ["ebpf", "iptables", "nftables", "ipvs"])
def test_lbctl_run_next_to_an_agent_exits_naming_it(monkeypatch, tmp_path, caplog, mode):
    monkeypatch.setattr(cli, "build_mode", lambda args: NeverStarted())
    with AgentLock(PIN, "lbctl run --mode ebpf"):
        code = cli.main(["run", "--mode", mode, "--manifests", str(tmp_path), "--pin-dir", PIN,
                         "--node-ip", "192.0.2.2"])
    assert code == 1
    assert f"pid {os.getpid()}" in caplog.text and "one agent per node" in caplog.text


@pytest.mark.parametrize("other", [PIN + "-other", DEMO_PIN_DIR])
def test_lbctl_run_next_to_an_agent_of_another_pin_dir_is_refused(monkeypatch, tmp_path, caplog, other):
    """Another pin dir (or the demo's) is another datapath on the same links and tables."""
    monkeypatch.setattr(cli, "build_mode", lambda args: NeverStarted())
    with AgentLock(other, "lbctl run --mode ebpf"):
        code = cli.main(["run", "--manifests", str(tmp_path), "--pin-dir", PIN])
    assert code == 1
    assert f"pid {os.getpid()}" in caplog.text and other in caplog.text
    assert not os.path.exists(lock_path(PIN)), "its own lock let go"


def test_cleanup_while_an_agent_runs_needs_force(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(modes, "cleanup_mode", lambda name, pin: calls.append(name) or [])
    with AgentLock(DEFAULT_PIN_DIR, "lbctl run --mode ebpf"):
        assert cli.main(["cleanup", "--keep-labs"]) == 1
        err = capsys.readouterr().err
        assert "refused" in err and "--force" in err and f"pid {os.getpid()}" in err
        assert calls == []
        assert cli.main(["cleanup", "--keep-labs", "--pin-dir", PIN]) == 1, "an agent of any pin dir"
        assert calls == []
        assert cli.main(["cleanup", "--keep-labs", "--force"]) == 0
        assert calls == list(modes.MODES)
        assert "--force: removing what a running agent programs" in capsys.readouterr().err
    assert running_agents() == []


def test_the_demo_refuses_to_run_next_to_an_agent(monkeypatch, capsys):
    from lbctl.cli import demo

    monkeypatch.setattr(demo, "_demo", lambda *a: pytest.fail("the demo started beside an agent"))
    with AgentLock(DEFAULT_PIN_DIR, "lbctl run --mode ebpf"):
        assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and f"pid {os.getpid()}" in err
    assert running_agents() == [], "the demo's own lock is released"


def test_the_demo_has_a_lab_maps_and_links_of_its_own():
    from lbctl.cli import demo
    from lbctl.datapath.ebpf import loader as ebpf
    from lbctl.lab import cluster as lab

    cfg, spec = demo.demo_config(), demo.demo_spec()
    default_lab = lab.default_spec()
    assert cfg.pin_dir != DEFAULT_PIN_DIR and cfg.tc_name != ebpf.TC_NAME
    assert spec.prefix != default_lab.prefix and cfg.devices == (f"veth{spec.prefix}*",)
    import ipaddress
    assert not ipaddress.ip_network(spec.pod_cidr).overlaps(ipaddress.ip_network(default_lab.pod_cidr))
    spec.validate()
