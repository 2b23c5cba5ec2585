"""`lbctl trace` runs the datapath's own decision: it must agree with the real program on every
path, and leave every map byte-identical.

Each agreement test sets a state up with the real program, traces a packet (checking that no
map changed), then sends the same packet through the real program: same verdict, same output
frame, same counters."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import test_bpf_prog
from conftest import TEST_PIN_DIR
from test_bpf_prog import B1, B2, B3, CLIENT, VIP, ct_entry, global_stat, run, run_egress, set_fields

from lbctl.datapath.ebpf import bpfsys, dump, shared
from lbctl.datapath.ebpf import trace as tr
from lbctl.datapath.ebpf.packets import TCP_ACK, TCP_FIN, frame
from lbctl.datapath.ebpf.reconcile import entry
from lbctl.model.objects import DesiredState, Frontend, Protocol

WEB = {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080"])}
THREE = {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080", f"{B2}:8080", f"{B3}:8080"])}
DNS = {"kube-system/dns:dns": (f"{VIP}:53/UDP", [f"{B1}:5353"])}


def lbctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbctl.cli.main", *args], capture_output=True, text=True)


# --- arguments (no root) -------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["10.244.0.2:99999", "10.96.0.10:80"], "port '99999' out of range (1-65535)"),
    (["10.244.0.2:0", "10.96.0.10:80"], "port '0' out of range"),
    (["10.244.0.2", "10.96.0.10:80"], "use IP:PORT"),
    (["10.244.0.300:1", "10.96.0.10:80"], "is not an IPv4 address"),
    (["10.244.0.2:1", "10.96.0.10:80/sctp"], "the datapath balances tcp and udp"),
    (["10.244.0.2:1", "10.96.0.10:80", "--tcp-flags", "SX"], "--tcp-flags 'SX'"),
])
def test_bad_arguments_are_named_without_a_traceback(argv, message):
    done = lbctl("trace", *argv, "--pin-dir", "/nonexistent/lbctl")
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_nothing_pinned_is_an_error_that_creates_nothing(tmp_path):
    pin_dir = f"/sys/fs/bpf/lbctl-test-none-{os.getpid()}"
    done = lbctl("trace", "10.244.0.2:40000", "10.96.0.10:80/tcp", "--pin-dir", pin_dir)
    assert done.returncode == 1, done
    assert f"no lbctl maps pinned under {pin_dir}" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(pin_dir)


# --- against the real program --------------------------------------------------------------------

def program(dp, services: dict[str, tuple], affinity: int = 0) -> None:
    """test_bpf_prog.program, and the service names the agent would record for them."""
    test_bpf_prog.program(dp, services, affinity)
    names = {}
    for name, (frontend, _) in services.items():
        address, rest = frontend.split(":")
        port, proto = rest.split("/")
        names[dp.reconciler.services[Frontend(address, int(port), Protocol(proto))].service_id] = name
    dump.write_names(dp.cfg.pin_dir, names)


@pytest.fixture(autouse=True)
def no_names_left(request):
    yield
    if "datapath" in request.fixturenames:
        dump.remove_names(TEST_PIN_DIR)


@pytest.fixture(scope="module")
def tracer(loaded_datapath):
    with tr.Tracer(loaded_datapath.cfg.pin_dir) as t:
        yield t


def snapshot(dp) -> dict[str, list]:
    return {name: sorted(m.items()) for name, m in dp.maps.items()}


def counters(dp) -> dict[str, int]:
    return {name: global_stat(dp, name) for name in shared.stat_names()}


def agrees(dp, tracer, packet: tr.Packet, uplink: bool = False) -> tr.Trace:
    """Traces `packet`, checks that no map changed, then runs it through the real program
    (ingress, and egress when the trace did; the uplink's with `uplink`) and checks both
    decided the same."""
    before = snapshot(dp)
    t = tracer.trace(packet, uplink)
    assert snapshot(dp) == before, "the trace changed a map"
    seen = counters(dp)
    ingress, egress = (dp.uplink_ingress_fd, dp.uplink_egress_fd) if uplink else (dp.prog_fd, dp.egress_fd)
    res = bpfsys.prog_test_run(ingress, packet.frame())
    out = res.data
    real = [(tr.VERDICTS[res.retval], tr.read_frame(out))]
    if len(t.steps) == 2:
        res = bpfsys.prog_test_run(egress, out)
        real.append((tr.VERDICTS[res.retval], tr.read_frame(res.data)))
    assert [(s.verdict, s.output) for s in t.steps] == real
    counted = sorted(n for n, v in counters(dp).items() if v != seen[n])
    assert sorted({n for s in t.steps for n in s.counted}) == counted
    return t


@pytest.mark.root
def test_a_tracked_flow_is_a_conntrack_hit(datapath, tracer):
    program(datapath, THREE)
    chosen = tr.read_frame(run(datapath, frame(CLIENT, VIP, 41000, 80, "tcp"))[1]).dst
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41000, VIP, 80, "tcp", "A"))
    assert t.decision == "conntrack_hit" and t.backend == f"{chosen}:8080"
    assert t.service == "default/web:http" and t.output.dst == chosen
    text = "\n".join(t.lines())
    assert "default/web:http" in text and f"{chosen}:8080" in text and "conntrack_hit" in text


@pytest.mark.root
@pytest.mark.parametrize("proto,port,flags,decision", [
    ("tcp", 80, "S", "reselect"),            # a SYN after expiry: a new flow
    ("tcp", 80, "A", "conntrack_hit"),       # a segment of an expired flow keeps its backend
    ("udp", 53, "", "reselect"),
])
def test_an_expired_entry(datapath, tracer, proto, port, flags, decision):
    program(datapath, {**WEB, **DNS})
    run(datapath, frame(CLIENT, VIP, 41001, port, proto))
    key, _ = ct_entry(datapath, CLIENT, VIP, 41001, port, proto=6 if proto == "tcp" else 17)
    set_fields(datapath, key, last_seen=1)
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41001, VIP, port, proto, flags))
    assert t.decision == decision
    assert ("expired" in t.reason) == (decision == "reselect")


@pytest.mark.root
def test_a_syn_on_a_closed_flow_chooses_again(datapath, tracer):
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 41002, 80, "tcp"))
    run(datapath, frame(CLIENT, VIP, 41002, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    run_egress(datapath, frame(B1, CLIENT, 8080, 41002, "tcp", flags=TCP_FIN | TCP_ACK))
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41002, VIP, 80, "tcp", "S"))
    assert t.decision == "reselect" and "closed tuple" in t.reason


@pytest.mark.root
def test_a_deleted_backend_makes_the_flow_choose_again(datapath, tracer):
    program(datapath, DNS)
    run(datapath, frame(CLIENT, VIP, 41003, 53, "udp"))
    program(datapath, {"kube-system/dns:dns": (f"{VIP}:53/UDP", [f"{B2}:5353"])})
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41003, VIP, 53, "udp", ""))
    assert t.decision == "reselect" and "deleted or changed" in t.reason
    assert t.backend == f"{B2}:5353" and t.output.dst == B2


@pytest.mark.root
def test_no_endpoints_with_the_drop_flag_is_a_drop(datapath, tracer):
    """The old Python trace called this a reject: the program drops it."""
    fe = Frontend(VIP, 80, Protocol.TCP)
    e = dataclasses.replace(entry("default/web:http", fe), drop_without_backends=True)
    assert not datapath.reconciler.sync(DesiredState({fe: e})).errors
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41004, VIP, 80, "tcp", "S"))
    assert t.decision == "drop" and "internalTrafficPolicy Local" in t.reason


@pytest.mark.root
@pytest.mark.parametrize("proto,port,decision", [("tcp", 80, "reject_rst"), ("udp", 53, "reject_icmp")])
def test_no_endpoints_is_a_reject(datapath, tracer, proto, port, decision):
    program(datapath, {"default/empty:http": (f"{VIP}:80/TCP", []),
                       "default/empty:dns": (f"{VIP}:53/UDP", [])})
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41005, VIP, port, proto, "S" if proto == "tcp" else ""))
    assert t.decision == decision and t.output.src == VIP and t.output.dst == CLIENT


@pytest.mark.root
def test_hairpin_both_ways(datapath, tracer):
    program(datapath, WEB)
    t = agrees(datapath, tracer, tr.Packet(B1, 41006, VIP, 80, "tcp", "S"))
    assert t.decision == "new_flow" and any("hairpin" in n for n in t.notes)
    assert (t.output.src, t.output.dst) == (tr.HAIRPIN_ADDR, B1) and t.steps[0].verdict == "redirect"
    t = agrees(datapath, tracer, tr.Packet(B1, 8080, tr.HAIRPIN_ADDR, 41006, "tcp", "SA"))
    assert t.decision == "revnat" and (t.output.src, t.output.sport, t.output.dst) == (VIP, 80, B1)


@pytest.mark.root
def test_affinity_sends_a_new_connection_back(datapath, tracer):
    program(datapath, THREE, affinity=10800)
    first = tr.read_frame(run(datapath, frame(CLIENT, VIP, 41007, 80, "tcp"))[1]).dst
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41008, VIP, 80, "tcp", "S"))
    assert t.decision == "new_flow" and "sessionAffinity" in t.reason
    assert t.output.dst == first and t.steps[0].has("affinity")


@pytest.mark.root
def test_replies_and_what_is_no_service(datapath, tracer):
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 41009, 80, "tcp"))
    t = agrees(datapath, tracer, tr.Packet(B1, 8080, CLIENT, 41009, "tcp", "SA"))
    assert t.decision == "revnat" and t.steps[-1].hook == "egress" and t.output.src == VIP
    assert t.service == "default/web:http"
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 1, "10.244.9.9", 80, "tcp", "S"))
    assert t.decision == "pass" and "no service" in t.reason
    key, _ = ct_entry(datapath, CLIENT, VIP, 41009, 80)
    datapath.maps["lb4_ct"].delete(key)                   # as the LRU would
    t = agrees(datapath, tracer, tr.Packet(B1, 8080, CLIENT, 41009, "tcp", "A"))
    assert t.decision == "pass" and "evicted" in t.reason


@pytest.mark.root
def test_a_new_flow_names_its_slot(datapath, tracer):
    program(datapath, THREE)
    before = snapshot(datapath)
    t = tracer.trace(tr.Packet(CLIENT, 41010, VIP, 80, "tcp", "S"))
    assert snapshot(datapath) == before
    assert t.decision == "new_flow" and 1 <= t.steps[0].slot <= 3 and t.steps[0].count == 3
    assert t.backend == f"{t.output.dst}:8080" and t.output.dst in (B1, B2, B3)
    assert ct_entry(datapath, CLIENT, VIP, 41010, 80)[1] is None, "no flow was recorded"


@pytest.mark.root
def test_the_cli_prints_and_leaves_no_pins(datapath):
    program(datapath, WEB)
    done = lbctl("trace", f"{CLIENT}:41011", f"{VIP}:80/tcp", "--pin-dir", TEST_PIN_DIR)
    assert done.returncode == 0, done.stderr
    assert "new_flow" in done.stdout and f"{B1}:8080" in done.stdout
    done = lbctl("trace", f"{CLIENT}:41011", f"{VIP}:80/tcp", "--json", "--pin-dir", TEST_PIN_DIR)
    data = json.loads(done.stdout)
    assert data["decision"] == "new_flow" and data["output"]["dst"] == B1
    assert not [n for n in os.listdir(os.path.dirname(TEST_PIN_DIR)) if n.startswith("lbctl-trace-")]
    assert ct_entry(datapath, CLIENT, VIP, 41011, 80)[1] is None


@pytest.mark.root
def test_partial_pins_are_refused_and_nothing_is_pinned(loaded_datapath):
    pin_dir = f"/sys/fs/bpf/lbctl-test-partial-{os.getpid()}"
    os.makedirs(pin_dir)
    try:
        bpfsys.obj_pin(loaded_datapath.maps["lb4_services"].fd, os.path.join(pin_dir, "lb4_services"))
        with pytest.raises(tr.TraceError, match="missing: lb4_backends"):
            tr.trace(pin_dir, tr.Packet(CLIENT, 1, VIP, 80, "tcp"))
        assert os.listdir(pin_dir) == ["lb4_services"]
    finally:
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
        os.rmdir(pin_dir)


# --- leftovers and errors --------------------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_leftover_pin_dir_of_a_dead_trace_is_removed(tmp_path):
    """A trace killed (SIGKILL) during its compile leaves its private pins; the next trace and
    `lbctl cleanup` remove those whose process is gone, and nothing else."""
    dead = tmp_path / f"lbctl-trace-{dead_pid()}-0a1b2c3d"
    live = tmp_path / f"lbctl-trace-{os.getpid()}-0a1b2c3d"
    other = tmp_path / "lbctl-trace-notes"
    for d in (dead, live, other):
        d.mkdir()
        (d / "lb4_ct").write_text("")
    assert tr.remove_stale_pin_dirs(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()
    assert tr.pins_parent("/sys/fs/bpf/lbctl/") == "/sys/fs/bpf"


def test_the_trace_build_must_be_pointed_at_its_pins():
    assert tr._replace_pin_dir(['-DLB_PIN_DIR="/sys/fs/bpf/lbctl"', "-DX=1"], "/p") == ['-DLB_PIN_DIR="/p"', "-DX=1"]
    with pytest.raises(ValueError, match="no LB_PIN_DIR"):
        tr._replace_pin_dir(["-DX=1"], "/p")


@pytest.mark.root
def test_a_trace_starting_removes_leftovers_of_dead_traces(datapath):
    program(datapath, WEB)
    leftover = os.path.join(tr.pins_parent(TEST_PIN_DIR), f"lbctl-trace-{dead_pid()}-0a1b2c3d")
    os.mkdir(leftover)
    bpfsys.obj_pin(datapath.maps["lb4_ct"].fd, os.path.join(leftover, "lb4_ct"))
    tr.trace(TEST_PIN_DIR, tr.Packet(CLIENT, 41020, VIP, 80, "tcp"))
    assert not os.path.exists(leftover)


@pytest.mark.root
def test_os_errors_are_trace_errors(datapath, tracer, monkeypatch):
    program(datapath, WEB)

    def refuse(*_args):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(tr, "prog_test_run", refuse)
        with pytest.raises(tr.TraceError, match="running the trace build .ingress. failed: Permission denied"):
            tracer.trace(tr.Packet(CLIENT, 41021, VIP, 80, "tcp"))
    with monkeypatch.context() as m:
        m.setattr(tr.os, "mkdir", refuse)
        with pytest.raises(tr.TraceError, match="cannot pin the maps again under .*lbctl-trace-"):
            tr.trace(TEST_PIN_DIR, tr.Packet(CLIENT, 41021, VIP, 80, "tcp"))
    assert not [n for n in os.listdir(tr.pins_parent(TEST_PIN_DIR)) if n.startswith(f"lbctl-trace-{os.getpid()}-")]


@pytest.mark.root
def test_a_rst_to_a_rejecting_service_is_dropped_not_called_itp_local(datapath, tracer):
    """No endpoints, reject: a RST is not answered with a RST, so the program drops it. The
    trace says so from the program's own flag, not from the drop."""
    program(datapath, {"default/empty:http": (f"{VIP}:80/TCP", [])})
    t = agrees(datapath, tracer, tr.Packet(CLIENT, 41022, VIP, 80, "tcp", "R"))
    assert t.decision == "drop" and "internalTrafficPolicy" not in t.reason and "RST" in t.reason
    assert not t.steps[0].has("svc_drop")


@pytest.mark.root
def test_replies_of_an_expired_flow(datapath, tracer):
    """A late FIN of a closed flow is translated; a SYN-ACK on the expired tuple is someone
    else's (the pod's own connection): passed untouched."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 41023, 80, "tcp"))
    run_egress(datapath, frame(B1, CLIENT, 8080, 41023, "tcp", flags=TCP_ACK))
    run(datapath, frame(CLIENT, VIP, 41023, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    run_egress(datapath, frame(B1, CLIENT, 8080, 41023, "tcp", flags=TCP_FIN | TCP_ACK))
    key, _ = ct_entry(datapath, CLIENT, VIP, 41023, 80)
    set_fields(datapath, key, last_seen=1)
    t = agrees(datapath, tracer, tr.Packet(B1, 8080, CLIENT, 41023, "tcp", "FA"))
    assert t.decision == "revnat" and t.output.src == VIP
    set_fields(datapath, key, last_seen=1)
    t = agrees(datapath, tracer, tr.Packet(B1, 8080, CLIENT, 41023, "tcp", "SA"))
    assert t.decision == "pass" and "expired" in t.reason and t.output.src == B1


def test_sigterm_during_a_trace_unwinds_it(monkeypatch):
    """SIGTERM (or SIGHUP) while tracing is an exception, so the trace's `finally` removes its
    temporary pins; the handlers are restored afterwards."""
    import argparse
    import signal

    from lbctl.cli import main

    unwound = []

    def fake_trace(pin_dir, packet, uplink=False):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):
                pass
        finally:
            unwound.append(packet)
        raise AssertionError("SIGTERM did not interrupt the trace")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(tr, "trace", fake_trace)
    args = argparse.Namespace(source="10.244.0.2:1", destination="10.96.0.10:80/tcp", tcp_flags="S",
                              pin_dir="/nonexistent/lbctl", json=False, uplink=False)
    with pytest.raises(SystemExit) as exc:
        main.cmd_trace(args)
    assert exc.value.code == 128 + signal.SIGTERM and unwound
    assert signal.getsignal(signal.SIGTERM) == before


NODE, OUTSIDE = "172.18.0.2", "172.18.0.100"


def nodeport(dp, flags: int, backends: list[str]) -> None:
    """A NodePort frontend NODE:30080/TCP written straight into the maps (service id 9)."""
    for i, b in enumerate(backends, 1):
        dp.maps["lb4_backends"].update(shared.u32(i), shared.backend_value(b, 8080, 6))
    dp.maps["lb4_services"].update(shared.service_key(NODE, 30080, 6),
                                   shared.service_value(count=len(backends), flags=flags, service_id=9))
    for i in range(1, len(backends) + 1):
        dp.maps["lb4_services"].update(shared.service_key(NODE, 30080, 6, slot=i),
                                       shared.service_value(backend_id=i, service_id=9))


@pytest.mark.root
def test_uplink_nodeport_from_outside_is_masqueraded_and_its_reply_translated(datapath, tracer):
    nodeport(datapath, shared.const("LB_SVC_F_NODEPORT"), [B1])
    t = agrees(datapath, tracer, tr.Packet(OUTSIDE, 42000, NODE, 30080, "tcp", "S"), uplink=True)
    assert t.decision == "new_flow" and t.output.dst == B1 and t.steps[0].hook == "uplink-in"
    assert any("masquerade mark (0x4000)" in n for n in t.notes)
    bpfsys.prog_test_run(datapath.uplink_ingress_fd, frame(OUTSIDE, NODE, 42000, 30080, "tcp"))
    reply = agrees(datapath, tracer, tr.Packet(B1, 8080, OUTSIDE, 42000, "tcp", "SA"), uplink=True)
    assert reply.decision == "revnat" and (reply.output.src, reply.output.sport) == (NODE, 30080)
    assert [s.hook for s in reply.steps] == ["uplink-in", "uplink-out"]


@pytest.mark.root
def test_uplink_etp_local_without_a_local_endpoint_says_which_drop(datapath, tracer):
    flags = sum(shared.const(f"LB_SVC_F_{f}") for f in ("NODEPORT", "ETP_LOCAL", "DROP"))
    nodeport(datapath, flags, [])
    datapath.write_config(drop_rule=True)
    t = agrees(datapath, tracer, tr.Packet(OUTSIDE, 42001, NODE, 30080, "tcp", "S"), uplink=True)
    assert t.decision == "drop" and "externalTrafficPolicy Local" in t.reason and "0x8000" in t.reason
