"""The agent's loop without a kernel: an unreadable source at start and later, the periodic
resync, links whose attach failed retried every turn."""
from __future__ import annotations

import logging
import os
import threading

import pytest
from test_modes import ICFG, STEPS, FakeRunner

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.base import SyncResult
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.datapath.kubeproxy.iptables_mode import IptablesMode
from lbctl.datapath.kubeproxy.proxier import ProxierOptions
from lbctl.model.objects import ClusterSnapshot
from lbctl.sources.base import SourceUnavailable

DOWN = SourceUnavailable("manifests directory /etc/lbctl/manifestz", "does not exist")


class ScriptedSource:
    """poll() answers from a script: a snapshot, None, or an exception to raise."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def poll(self):
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        return answer


class RecordingMode:
    """A mode that records what the agent asks of it."""

    name = "recording"
    problems: tuple = ()

    def __init__(self):
        self.calls: list[str] = []
        self.synced: list = []

    def start(self):
        self.calls.append("start")

    def sync(self, ports=None):
        self.calls.append("sync" if ports is not None else "retry")
        if ports is not None:
            self.synced.append(ports)
        return SyncResult()

    def resync(self):
        self.calls.append("resync")
        return SyncResult(updated=1)

    def stop(self, detach):
        self.calls.append(f"stop(detach={detach})")

    def dump(self):
        return {}


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def snapshot() -> ClusterSnapshot:
    return ClusterSnapshot(services={}, slices={}, problems=())


# --- item 1: an unreadable source is never "no services" -----------------------------------------


def test_a_source_unreadable_at_start_stops_the_agent_before_the_kernel():
    mode = RecordingMode()
    agent = Agent(ScriptedSource(DOWN), mode=mode, options=AgentOptions(interval=0.01))
    with pytest.raises(SourceUnavailable, match="does not exist"):
        agent.run(threading.Event(), max_seconds=5)
    assert mode.calls == [], "nothing started, synced, detached or removed"


def test_a_source_that_goes_away_keeps_everything_and_is_retried(caplog):
    caplog.set_level(logging.INFO, logger="lbctl.agent.loop")
    first = snapshot()
    back = ClusterSnapshot(services={}, slices={}, problems=())
    mode = RecordingMode()
    agent = Agent(ScriptedSource(DOWN, DOWN, DOWN, back), mode=mode,
                  options=AgentOptions(interval=0.01, sync_period=1e9))
    agent.turn(first=first)
    for _ in range(3):
        agent.turn()
    assert mode.calls == ["sync"], "nothing synced (so nothing removed) while the source is down"
    errors = [r for r in caplog.records if "does not exist" in r.getMessage() and r.levelno == logging.ERROR]
    assert len(errors) == 1, "the outage is logged once"
    assert "keeping every service programmed" in errors[0].getMessage()
    agent.turn()
    assert mode.calls == ["sync", "sync"] and not mode.synced[-1]
    assert any(r.getMessage().startswith("resolved: manifests directory") for r in caplog.records)


# --- item 6: the periodic resync ------------------------------------------------------------------


def test_resync_every_sync_period():
    clock = Clock()
    mode = RecordingMode()
    agent = Agent(ScriptedSource(), mode=mode, options=AgentOptions(sync_period=30), clock=clock)
    agent.turn()
    assert mode.calls == [], "nothing programmed yet: nothing to resync"
    agent.turn(first=snapshot())
    clock.now = 29.9
    agent.turn()
    assert mode.calls == ["sync"]
    clock.now = 30.0
    agent.turn()
    assert mode.calls == ["sync", "resync"] and agent.resyncs == 1
    assert agent.syncs == 1, "a resync is no sync of a change (what tests and callers wait for)"
    clock.now = 59.0
    agent.turn()
    clock.now = 60.0
    agent.turn()
    assert mode.calls == ["sync", "resync", "resync"]


def test_resync_of_a_mode_without_one_is_a_sync_of_the_last_state():
    class Plain(RecordingMode):
        resync = None     # type: ignore[assignment]

    clock = Clock()
    mode = Plain()
    agent = Agent(ScriptedSource(), mode=mode, options=AgentOptions(sync_period=5), clock=clock)
    agent.turn(first=snapshot())
    clock.now = 5
    agent.turn()
    assert mode.calls == ["sync", "retry"]


def test_kube_proxy_modes_resync_in_full():
    runner = FakeRunner()
    mode = IptablesMode(ICFG, ProxierOptions(full_sync_every=1000), runner=runner)
    ports = STEPS[1][1]
    assert not mode.sync(ports).errors and mode.full_syncs == 1
    assert not mode.sync(ports).errors and mode.full_syncs == 1, "a partial sync"
    assert not mode.resync().errors
    assert mode.full_syncs == 2 and mode.partial_syncs == 0


def test_ebpf_resync_repins_and_rewrites_what_cleanup_removed(monkeypatch, tmp_path):
    """`lbctl cleanup --force` under a running agent: the resync pins the maps again and
    rewrites the names file (the maps themselves are the reconciler's business)."""
    from lbctl.datapath.ebpf import dump
    from lbctl.datapath.ebpf.reconcile import BACKENDS, SERVICES, Reconciler
    from lbctl.testing.fakemap import FakeMap

    mode = EbpfMode(ebpf.DatapathConfig(pin_dir=str(tmp_path / "pins")), switch_modes=False)
    mode.datapath = ebpf.EbpfDatapath(mode.cfg)
    mode.reconciler = Reconciler({SERVICES: FakeMap(), BACKENDS: FakeMap()}, 10, 10)
    mode._switched = False
    repinned = []
    monkeypatch.setattr(ebpf, "repin", lambda dp: repinned.append(dp) or ["lb4_services"])
    mode.sync([])
    names = dump.state_file(mode.cfg.pin_dir)
    dump.remove_names(mode.cfg.pin_dir)
    assert not mode.resync().errors
    assert repinned == [mode.datapath]
    assert os.path.exists(names), "the names file is written again"
    dump.remove_names(mode.cfg.pin_dir)


# --- item 5: the demo's mode leaves other modes alone ---------------------------------------------


@pytest.mark.parametrize("switch", [True, False])
def test_switching_modes_only_when_asked(monkeypatch, switch):
    from lbctl.datapath.ebpf import dump
    from lbctl.datapath.ebpf import mode as ebpf_mode
    from lbctl.datapath.ebpf.reconcile import BACKENDS, SERVICES, Reconciler
    from lbctl.testing.fakemap import FakeMap

    calls = []
    monkeypatch.setattr(ebpf_mode, "cleanup_other_modes", lambda *a: calls.append(a) or [])
    mode = EbpfMode(ebpf.DatapathConfig(pin_dir="/sys/fs/bpf/lbctl-t-switch"), switch_modes=switch)
    mode.datapath = ebpf.EbpfDatapath(mode.cfg)
    mode.reconciler = Reconciler({SERVICES: FakeMap(), BACKENDS: FakeMap()}, 10, 10)
    mode._switched = False
    mode.sync([])
    assert bool(calls) == switch
    dump.remove_names(mode.cfg.pin_dir)


# --- item 8: a link whose attach failed is retried every turn, its reason logged once -------------


class Link(dict):
    def __init__(self, index: int, name: str):
        super().__init__(index=index)
        self.name = name

    def get_attr(self, attr):
        return self.name if attr == "IFLA_IFNAME" else None


class LinksOnly:
    def __init__(self, *links):
        self.links = list(links)

    def get_links(self):
        return self.links


def test_a_failed_attach_is_retried_and_its_reason_logged_once(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lbctl.mode")
    from lbctl.datapath.ebpf.reconcile import BACKENDS, SERVICES, Reconciler
    from lbctl.testing.fakemap import FakeMap

    mode = EbpfMode(ebpf.DatapathConfig(pin_dir="/sys/fs/bpf/lbctl-t-attach", devices=("veth*",)))
    mode.datapath = ebpf.EbpfDatapath(mode.cfg)
    mode.reconciler = Reconciler({SERVICES: FakeMap(), BACKENDS: FakeMap()}, 10, 10)
    outcomes: list = [OSError(22, "Invalid argument")] * 3 + [["ingress pref 27 holds another tool's matchall filter"]]

    def attach(*_):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(ebpf, "attach", attach)
    ipr = LinksOnly(Link(7, "veth1"))
    for _ in range(3):
        mode.attach_links(ipr)
        assert mode.pending_links and 7 not in mode.attached
    mode.attach_links(ipr)
    assert not mode.pending_links and mode.attached == {7: "veth1"}
    failures = [r for r in caplog.records if "could not attach to veth1" in r.getMessage()]
    assert len(failures) == 1 and "Invalid argument" in failures[0].getMessage()
    assert any("another tool's matchall" in r.getMessage() for r in caplog.records)
    assert any("attached to veth1 (ifindex 7) after all" in r.getMessage() for r in caplog.records)


def test_the_loop_retries_pending_links_on_every_turn():
    """No waiting for the 30 s link scan: a link whose attach failed is tried at each turn."""
    stop = threading.Event()

    class FlakyLinks(RecordingMode):
        def __init__(self):
            super().__init__()
            self.tries = 0

        def attach_links(self, ipr, verify=False):
            self.tries += 1
            if self.tries == 4:
                stop.set()

        @property
        def pending_links(self):
            return self.tries < 4

    mode = FlakyLinks()
    agent = Agent(ScriptedSource(snapshot()), mode=mode,
                  options=AgentOptions(interval=0.001, link_rescan=1e9, sync_period=1e9))
    agent.run(stop, max_seconds=60)
    assert mode.tries == 4, "the start's scan, then one per turn until it worked"
    assert mode.calls == ["start", "sync", "stop(detach=False)"]


# --- review fixes: the switch waits, failures are retried with backoff, a resync that fails -----


def _fake_ebpf_mode(monkeypatch, calls, pin_dir="/sys/fs/bpf/lbctl-t-switch-wait"):
    from lbctl.datapath.ebpf import mode as ebpf_mode
    from lbctl.datapath.ebpf.reconcile import BACKENDS, SERVICES, Reconciler
    from lbctl.testing.fakemap import FakeMap

    monkeypatch.setattr(ebpf_mode, "cleanup_other_modes", lambda *a: calls.append(a) or [])
    mode = EbpfMode(ebpf.DatapathConfig(pin_dir=pin_dir))
    mode.datapath = ebpf.EbpfDatapath(mode.cfg)
    mode.reconciler = Reconciler({SERVICES: FakeMap(), BACKENDS: FakeMap()}, 10, 10)
    mode._switched = False
    return mode


def test_switching_modes_waits_for_every_link(monkeypatch):
    """Coming from nftables mode, its table stays while a pod link has no eBPF program yet."""
    from lbctl.datapath.ebpf import dump

    calls: list = []
    mode = _fake_ebpf_mode(monkeypatch, calls)
    mode.failed[7] = ("veth7", "busy")
    mode.sync([])
    assert calls == [], "not while a link is pending"
    mode.failed.clear()
    mode.sync([])
    assert len(calls) == 1
    dump.remove_names(mode.cfg.pin_dir)


def test_a_names_file_that_cannot_be_written_is_no_failure(monkeypatch, caplog):
    from lbctl.datapath.ebpf import dump
    from lbctl.datapath.ebpf import mode as ebpf_mode

    calls: list = []
    mode = _fake_ebpf_mode(monkeypatch, calls)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ebpf_mode.dump, "write_names", full)
    assert not mode.sync([]).errors
    assert "could not write the service names" in caplog.text
    assert len(calls) == 1, "programmed: the switch goes ahead"
    monkeypatch.undo()
    dump.remove_names(mode.cfg.pin_dir)


class FailingMode(RecordingMode):
    """Every sync fails (needs a retry); resync raises."""

    needs_retry = True

    def sync(self, ports=None):
        super().sync(ports)
        return SyncResult(errors=["injected"])

    def resync(self):
        self.calls.append("resync")
        raise OSError(5, "injected")


def test_a_failed_sync_is_retried_with_backoff():
    clock = Clock()
    mode = FailingMode()
    agent = Agent(ScriptedSource(snapshot()), mode=mode, clock=clock,
                  options=AgentOptions(interval=1.0, sync_period=30.0))
    agent.turn()
    retries_at = []
    for second in range(1, 40):
        clock.now = float(second)
        before = mode.calls.count("retry")
        agent.turn()
        if mode.calls.count("retry") > before:
            retries_at.append(second)
    assert retries_at == [1, 3, 7, 15, 31], "1 s, doubling, at most the sync period"


def test_a_resync_that_fails_waits_for_the_next_period(caplog):
    clock = Clock()
    mode = RecordingMode()
    mode.resync = FailingMode.resync.__get__(mode)
    agent = Agent(ScriptedSource(snapshot()), mode=mode, clock=clock,
                  options=AgentOptions(interval=1.0, sync_period=30.0))
    agent.turn()
    for second in range(31, 45):
        clock.now = float(second)
        agent.turn()
    assert mode.calls.count("resync") == 1, "not every turn"
