"""Socket-level load balancing of host-originated traffic (bpf/prog/lbctl_sock.c, sock.py).

BPF_PROG_TEST_RUN does not run cgroup sock_addr programs, so they are tested for real: the lab's
pods serve, the eBPF mode runs with --cgroup-root at a cgroup of this test's own (never the
machine's root cgroup), and a probe process (tests/test_sock_lb_probe.py) that joined that cgroup
makes the socket calls a node's process would make. The lab's node is this machine's root
network namespace; a probe is also run inside a pod's namespace (nsenter --net) to compare the
socket path with the tc path on the same route.

The lab's "unreachable" route for the service CIDR makes a connect() that the programs did not
rewrite fail with EHOSTUNREACH at once: nothing leaves for a VIP.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_PIN_DIR, config_for_tests

from lbctl.datapath.ebpf import dump, shared, sock
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.lab import cluster as lab
from lbctl.model.objects import EndpointInfo, Protocol, Service, ServicePort, ServicePortInfo

PREFIX = f"lbs{os.getpid() % 1000}"
OCTET = 205
PIN_DIR = TEST_PIN_DIR + "-sock"
CGROUP = f"{sock.DEFAULT_CGROUP_ROOT}/lbctl-test-{os.getpid()}"
PROBE = Path(__file__).with_name("test_sock_lb_probe.py")
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP

WEB_VIP, DNS_VIP, AFFINITY_VIP, EMPTY_VIP, LOCAL_VIP = (f"10.96.{OCTET}.{i}" for i in (10, 53, 11, 12, 13))
EXTERNAL_IP = f"10.96.{OCTET}.200"      # in the service CIDR: unreachable unless rewritten
NODE_PORT, NODE_PORT_UDP = 30080, 30053


# --- the table part: pure, no root -------------------------------------------------------------

def _reverse(cookie: int, backend: str, port: int, vip: str, vport: int, proto: int = UDP) -> tuple[bytes, bytes]:
    key = shared.new("lb4_reverse_sk_key", cookie=cookie, address=shared.be32(backend), port=shared.be16(port))
    value = shared.new("lb4_reverse_sk_value", address=shared.be32(vip), port=shared.be16(vport),
                       proto=proto, service_id=7)
    return key, value


def _frontend(vip: str, port: int, count: int, ids: list[int], scope: int = 0, proto: int = UDP) -> list:
    rows = [(shared.service_key(vip, port, proto, 0, scope), shared.service_value(count=count, service_id=7))]
    rows += [(shared.service_key(vip, port, proto, slot, scope), shared.service_value(backend_id=i, service_id=7))
             for slot, i in enumerate(ids, 1)]
    return rows


def _backends(*rows: tuple[int, str, int, int]) -> list:
    return [(shared.u32(i), shared.backend_value(address, port, UDP, flags)) for i, address, port, flags in rows]


DRAINING = shared.const("LB_BACKEND_F_DRAINING")


@pytest.mark.parametrize("what,services,backends,stale", [
    ("backend still in a slot", _frontend("10.96.0.53", 53, 1, [1]), _backends((1, "10.244.0.7", 5353, 0)), False),
    ("backend gone from lb4_backends", _frontend("10.96.0.53", 53, 1, [2]), _backends((2, "10.244.0.8", 5353, 0)), True),
    ("backend left this service, serves another", _frontend("10.96.0.53", 53, 1, [2]) + _frontend("10.96.0.54", 53, 1, [1]),
     _backends((1, "10.244.0.7", 5353, 0), (2, "10.244.0.8", 5353, 0)), True),
    ("backend draining (terminating, serving)", _frontend("10.96.0.53", 53, 0, []), _backends((1, "10.244.0.7", 5353, DRAINING)), False),
    ("only in the internal scope (eTP Local)", _frontend("10.96.0.53", 53, 0, []) + _frontend("10.96.0.53", 53, 1, [1], scope=1),
     _backends((1, "10.244.0.7", 5353, 0)), False),
    ("in a surplus slot beyond count", _frontend("10.96.0.53", 53, 1, [2, 1]), _backends((1, "10.244.0.7", 5353, 0), (2, "10.244.0.8", 5353, 0)), True),
])
def test_which_udp_sockets_are_stale(what, services, backends, stale):
    reverse = [_reverse(99, "10.244.0.7", 5353, "10.96.0.53", 53)]
    found = sock.stale_reverse_entries(reverse, services, backends)
    assert bool(found) == stale, what
    if stale:
        assert found == {(99, socket.inet_aton("10.244.0.7"), 5353): reverse[0][0]}


def test_tcp_entries_are_never_stale():
    reverse = [_reverse(5, "10.244.0.7", 8080, "10.96.0.10", 80, proto=TCP)]
    assert sock.stale_reverse_entries(reverse, [], []) == {}


def test_cgroup_root_must_be_a_cgroup2_directory(tmp_path):
    with pytest.raises(Exception, match="not in a cgroup v2 hierarchy"):
        sock.check_cgroup(str(tmp_path))
    with pytest.raises(Exception, match="no such directory"):
        sock.check_cgroup(str(tmp_path / "missing"))


def test_cli_cgroup_root_flag():
    from lbctl.cli import config
    from lbctl.cli.main import build_parser

    def cfg(*argv):
        return config.datapath_config(build_parser().parse_args(["run", *argv]))

    assert cfg().cgroup_root is None                     # off unless asked: never the whole machine by default
    assert cfg("--cgroup-root").cgroup_root == sock.DEFAULT_CGROUP_ROOT
    assert cfg("--cgroup-root", "/sys/fs/cgroup/unified/x").cgroup_root == "/sys/fs/cgroup/unified/x"


# --- the kernel part ---------------------------------------------------------------------------

class Probe:
    """A process in `cgroup` (None: wherever pytest is), in netns `ns` (None: the node's)."""

    def __init__(self, cgroup: str | None, ns: str | None = None):
        argv = [sys.executable, str(PROBE)] + (["--cgroup", cgroup] if cgroup else [])
        if ns:
            argv = ["nsenter", f"--net=/run/netns/{ns}", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert "ready" in self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"probe exited ({self.proc.poll()})"
        return json.loads(line)

    def __call__(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        assert "bug" not in answer, answer
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def _port(name: str, port: int, proto: str) -> ServicePort:
    return ServicePort(name, port, Protocol(proto), port)


def service_ports(state, without: tuple[str, ...] = ()) -> list[ServicePortInfo]:
    """The test's ClusterIP services, on the lab's pods (`without`: pods left out)."""
    def eps(pods, port, node=None):
        return tuple(EndpointInfo(state.pods[p].ip, port, node_name=node) for p in pods if p not in without)

    web, dns = ("web-0", "web-1", "web-2"), ("dns-0", "dns-1")
    svc = lambda name, vip, **kw: Service("default", name, cluster_ips=(vip,), **kw)
    return [
        ServicePortInfo(svc("web", WEB_VIP), _port("http", 80, "TCP"), eps(web, 8080)),
        ServicePortInfo(svc("dns", DNS_VIP), _port("dns", 53, "UDP"), eps(dns, 5353)),
        ServicePortInfo(svc("sticky", AFFINITY_VIP, session_affinity="ClientIP"), _port("http", 80, "TCP"), eps(web, 8080)),
        ServicePortInfo(svc("empty", EMPTY_VIP), _port("http", 80, "TCP"), ()),
        ServicePortInfo(svc("empty", EMPTY_VIP), _port("dns", 53, "UDP"), ()),
        ServicePortInfo(svc("local", LOCAL_VIP, internal_traffic_policy="Local"), _port("http", 80, "TCP"),
                        eps(web, 8080, node="another-node")),
    ]


@contextlib.contextmanager
def running_node(manifests: Path):
    """The lab, a cgroup of this test's own, and the eBPF mode with socket load balancing
    attached to it (and its tc programs on the lab's pod links)."""
    state = lab.lab_up(lab.LabSpec(prefix=PREFIX, pod_cidr=f"10.244.{OCTET}.0/24",
                                   gateway=f"10.244.{OCTET}.1"), manifests)
    os.makedirs(CGROUP, exist_ok=True)
    cfg = config_for_tests(pin_dir=PIN_DIR, devices=(f"veth{PREFIX}*",), cgroup_root=CGROUP)
    mode = EbpfMode(cfg, switch_modes=False)
    try:
        mode.start()
        mode.sync(service_ports(state))
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            mode.attach_links(ipr)
        yield state, mode
    finally:
        removed = EbpfMode.cleanup(cfg)
        mode.stop(detach=False)
        lab.lab_down(PREFIX)
        os.rmdir(CGROUP)
        assert not any(os.path.exists(os.path.join(PIN_DIR, p)) for p in sock.PINS), removed


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with running_node(tmp_path_factory.mktemp("m")) as running:
        yield running


@pytest.fixture
def probe(node):
    p = Probe(CGROUP)
    yield p
    p.close()


def counters() -> dict[str, int]:
    return dump.collect(PIN_DIR)["counters"]


def pods_of(state, *names) -> dict[str, str]:
    return {state.pods[n].ip: n for n in names}


WEB = ("web-0", "web-1", "web-2")


@pytest.mark.root
@pytest.mark.netns
def test_tcp_to_a_cluster_ip_is_balanced_at_connect_and_peer_is_the_vip(node, probe):
    state, mode = node
    before = counters()
    ct_before = mode.datapath.maps["lb4_ct"].count()
    result = probe("tcp_many", addr=WEB_VIP, port=80, count=60)["answers"]
    assert {r.get("pod") for r in result} == set(WEB), result[:3]
    assert all(r["peer"] == [WEB_VIP, 80] for r in result)            # getpeername: the VIP
    assert {r["seen"] for r in result} == {state.spec.gateway}       # from the node, not masqueraded
    assert counters()["sock_connect"] - before["sock_connect"] == 60
    assert mode.datapath.maps["lb4_ct"].count() == ct_before          # no packet was balanced


@pytest.mark.root
@pytest.mark.netns
def test_connected_udp_to_a_cluster_ip(node, probe):
    state, _ = node
    assert probe("udp_connect", id="u", addr=DNS_VIP, port=53) == {"peer": [DNS_VIP, 53]}
    answers = [probe("udp_ask", id="u") for _ in range(5)]
    assert {a["from"][0] for a in answers} == {DNS_VIP} and {a["from"][1] for a in answers} == {53}
    assert len({a["pod"] for a in answers}) == 1                    # one backend, chosen once
    assert answers[0]["pod"] in ("dns-0", "dns-1")


@pytest.mark.root
@pytest.mark.netns
def test_unconnected_udp_recvfrom_names_the_vip(node, probe):
    before = counters()
    answers = [probe("udp_sendto", addr=DNS_VIP, port=53) for _ in range(40)]
    assert all(a["from"] == [DNS_VIP, 53] for a in answers), answers[:3]
    assert {a["pod"] for a in answers} == {"dns-0", "dns-1"}
    after = counters()
    assert after["sock_sendmsg"] - before["sock_sendmsg"] == 40
    assert after["sock_revnat"] - before["sock_revnat"] >= 40


@pytest.mark.root
@pytest.mark.netns
def test_session_affinity_keeps_the_host_on_one_backend(node, probe):
    answers = probe("tcp_many", addr=AFFINITY_VIP, port=80, count=20)["answers"]
    assert len({a["pod"] for a in answers}) == 1, answers


@pytest.mark.root
@pytest.mark.netns
def test_no_endpoints_is_refused_at_once(node, probe):
    before = counters()
    assert probe("tcp", addr=EMPTY_VIP, port=80)["error"] == "ECONNREFUSED"
    assert probe("udp_connect", id="e", addr=EMPTY_VIP, port=53)["error"] == "ECONNREFUSED"
    assert probe("udp_sendto", addr=EMPTY_VIP, port=53)["error"] == "ECONNREFUSED"
    assert counters()["no_backend"] - before["no_backend"] == 3


@pytest.mark.root
@pytest.mark.netns
def test_internal_traffic_policy_local_without_a_local_endpoint_fails(node, probe):
    before = counters()
    assert probe("tcp", addr=LOCAL_VIP, port=80)["error"] == "EHOSTUNREACH"
    assert counters()["drop_itp_local"] - before["drop_itp_local"] == 1


# Frontends the ClusterIP-only desired state cannot express yet are written here as the
# reconciler writes them: backends, slots, then the frontend (slot 0) last. Ids far above the
# reconciler's.
RAW_SERVICE_ID = 900


def write_frontend(maps, address: str, port: int, proto: int, backends: list[tuple[int, str, int]],
                   flags: int, scope: int = 0, drop: bool = False) -> list[bytes]:
    for backend_id, ip, bport in backends:
        maps["lb4_backends"].update(shared.u32(backend_id), shared.backend_value(ip, bport, proto))
    keys = []
    for slot, (backend_id, _, _) in enumerate(backends, 1):
        key = shared.service_key(address, port, proto, slot, scope)
        maps["lb4_services"].update(key, shared.service_value(backend_id=backend_id, service_id=RAW_SERVICE_ID))
        keys.append(key)
    flags |= shared.const("LB_SVC_F_DROP") if drop else 0
    key = shared.service_key(address, port, proto, 0, scope)
    maps["lb4_services"].update(key, shared.service_value(count=len(backends), flags=flags, service_id=RAW_SERVICE_ID))
    return [key, *keys]


@pytest.fixture
def raw_frontends(node):
    """Writes frontends straight into the maps; removes them afterwards."""
    _, mode = node
    maps = mode.datapath.maps
    written: list[bytes] = []
    backend_ids: list[int] = []

    def add(*args, **kw):
        written.extend(write_frontend(maps, *args, **kw))
        backend_ids.extend(b[0] for b in args[3])

    yield add
    for key in written:
        maps["lb4_services"].delete(key)
    for backend_id in backend_ids:
        maps["lb4_backends"].delete(shared.u32(backend_id))


def web_backends(state, base: int = 4000, port: int = 8080) -> list[tuple[int, str, int]]:
    return [(base + i, state.pods[p].ip, port) for i, p in enumerate(WEB)]


NODEPORT = shared.const("LB_SVC_F_NODEPORT")


@pytest.mark.root
@pytest.mark.netns
def test_node_port_on_a_node_address_and_on_localhost(node, probe, raw_frontends):
    state, _ = node
    gateway = state.spec.gateway
    raw_frontends(gateway, NODE_PORT, TCP, web_backends(state), NODEPORT)
    raw_frontends("127.0.0.1", NODE_PORT, TCP, web_backends(state, 4010), NODEPORT)
    dns = [(4020, state.pods["dns-0"].ip, 5353)]
    raw_frontends(gateway, NODE_PORT_UDP, UDP, dns, NODEPORT)
    for address in (gateway, "127.0.0.1", "127.0.0.7"):     # every 127/8 address, as route_localnet
        answers = probe("tcp_many", addr=address, port=NODE_PORT, count=30)["answers"]
        assert {a.get("pod") for a in answers} == set(WEB), (address, answers[:2])
        assert {tuple(a["peer"]) for a in answers} == {(address, NODE_PORT)}
    assert probe("udp_connect", id="np", addr=gateway, port=NODE_PORT_UDP) == {"peer": [gateway, NODE_PORT_UDP]}
    answer = probe("udp_ask", id="np")
    assert (answer["pod"], answer["from"]) == ("dns-0", [gateway, NODE_PORT_UDP])


@pytest.mark.root
@pytest.mark.netns
def test_a_loopback_address_is_not_taken_for_a_cluster_ip(node, probe, raw_frontends):
    """Only a NodePort frontend at 127.0.0.1 serves other 127/8 addresses."""
    state, _ = node
    raw_frontends("127.0.0.1", NODE_PORT, TCP, web_backends(state), shared.const("LB_SVC_F_CLUSTERIP"))
    assert probe("tcp", addr="127.0.0.7", port=NODE_PORT)["error"] == "ECONNREFUSED"  # nothing listens there


@pytest.mark.root
@pytest.mark.netns
def test_external_ip(node, probe, raw_frontends):
    state, _ = node
    raw_frontends(EXTERNAL_IP, 80, TCP, web_backends(state), shared.const("LB_SVC_F_EXTERNAL_IP"))
    answers = probe("tcp_many", addr=EXTERNAL_IP, port=80, count=30)["answers"]
    assert {a.get("pod") for a in answers} == set(WEB)
    assert {tuple(a["peer"]) for a in answers} == {(EXTERNAL_IP, 80)}


@pytest.mark.root
@pytest.mark.netns
def test_external_traffic_policy_local_host_traffic_uses_every_endpoint(node, probe, raw_frontends):
    """eTP Local: scope 0 has the node's endpoints (none here: drop), scope 1 all of them; the
    node's own traffic is in-cluster traffic and gets scope 1, as kube-proxy sends it to
    KUBE-SVC-*."""
    state, _ = node
    flags = NODEPORT | shared.const("LB_SVC_F_ETP_LOCAL") | shared.const("LB_SVC_F_TWO_SCOPES")
    raw_frontends(state.spec.gateway, NODE_PORT, TCP, web_backends(state, 4030),
                  shared.const("LB_SVC_F_NODEPORT"), scope=shared.const("LB_SCOPE_INTERNAL"))
    raw_frontends(state.spec.gateway, NODE_PORT, TCP, [], flags, drop=True)
    answers = probe("tcp_many", addr=state.spec.gateway, port=NODE_PORT, count=30)["answers"]
    assert {a.get("pod") for a in answers} == set(WEB), answers[:2]


@pytest.mark.root
@pytest.mark.netns
def test_a_removed_frontend_is_not_named_any_more(node, probe, raw_frontends):
    state, mode = node
    dns0 = state.pods["dns-0"].ip
    raw_frontends(EXTERNAL_IP, 53, UDP, [(4040, dns0, 5353)], shared.const("LB_SVC_F_EXTERNAL_IP"))
    assert probe("udp_connect", id="x", addr=EXTERNAL_IP, port=53) == {"peer": [EXTERNAL_IP, 53]}
    mode.datapath.maps["lb4_services"].delete(shared.service_key(EXTERNAL_IP, 53, UDP))
    before = counters()
    answer = probe("udp_ask", id="x")
    assert answer["from"] == [dns0, 5353]                        # the backend, as it is
    assert counters()["sock_revnat_stale"] - before["sock_revnat_stale"] == 1


@pytest.mark.root
@pytest.mark.netns
def test_a_udp_socket_connected_to_a_removed_backend_is_destroyed(node, probe):
    """The agent's sync that removes a backend destroys the UDP sockets the load balancer had
    connected to it (sock_diag SOCK_DESTROY): the application's next recv() fails with
    ECONNABORTED, and a new connect() to the service gets a live backend. Sockets connected
    to the backend that stays are left alone."""
    state, mode = node
    sockets = {}
    for i in range(30):       # until both backends hold a socket (each pick is uniform)
        assert "peer" in probe("udp_connect", id=f"s{i}", addr=DNS_VIP, port=53)
        sockets[f"s{i}"] = probe("udp_ask", id=f"s{i}")["pod"]
        if set(sockets.values()) == {"dns-0", "dns-1"}:
            break
    assert set(sockets.values()) == {"dns-0", "dns-1"}, sockets
    try:
        mode.sync(service_ports(state, without=("dns-0",)))
        for name, pod in sockets.items():
            if pod == "dns-0":       # a recv() learns it; the socket is left unconnected
                assert probe("udp_recv", id=name).get("error") == "ECONNABORTED", name
                assert probe("udp_ask", id=name).get("error") == "EDESTADDRREQ", name
            else:
                assert probe("udp_ask", id=name)["pod"] == "dns-1", name
        assert "peer" in probe("udp_connect", id="again", addr=DNS_VIP, port=53)
        assert probe("udp_ask", id="again")["pod"] == "dns-1"
    finally:
        mode.sync(service_ports(state))


@pytest.mark.root
@pytest.mark.netns
def test_a_pod_process_in_the_cgroup_is_balanced_at_the_socket_not_by_tc(node):
    """The same connect() from two pods: outside the cgroup the tc program DNATs it (a conntrack
    entry per flow); inside it the socket goes to the backend itself.

    Two pods, not one: a client whose connections to a backend go both ways (to the VIP through
    tc, to the pod itself through the socket programs) picks source ports and TCP timestamp
    offsets per destination it believes in, so a new SYN can meet the backend's TIME_WAIT of
    the other way's connection on the same port with an older timestamp: PAWS drops it, and the
    connect() waits for a retransmit (TcpExtPAWSTimewait in the backend)."""
    state, mode = node
    ct = mode.datapath.maps["lb4_ct"]
    for client, cgroup, ct_grows in (("client-0", None, True), ("client-1", CGROUP, False)):
        p = Probe(cgroup, state.pods[client].ns)
        try:
            before = ct.count()
            answers = p("tcp_many", addr=WEB_VIP, port=80, count=10)["answers"]
            assert {a.get("seen") for a in answers} == {state.pods[client].ip}, (cgroup, answers)
            assert {tuple(a["peer"]) for a in answers} == {(WEB_VIP, 80)}
            assert (ct.count() > before) == ct_grows
        finally:
            p.close()


@pytest.mark.root
@pytest.mark.netns
def test_a_restarted_agent_swaps_its_programs_into_the_same_links(node, probe):
    """No moment without a program: the links stay, only the program in them changes
    (BPF_LINK_UPDATE), and each hook has exactly one program attached throughout."""
    state, mode = node
    before = {row["hook"]: row for row in sock.attachments(PIN_DIR)}
    restarted = sock.SockLb(mode.cfg).load()
    try:
        changes = restarted.attach()
        assert len(changes) == 4 and all("program replaced" in c for c in changes), changes
        after = {row["hook"]: row for row in sock.attachments(PIN_DIR)}
        for hook in sock.HOOKS:
            assert after[hook.name]["link_id"] == before[hook.name]["link_id"]
            assert after[hook.name]["prog_id"] != before[hook.name]["prog_id"]
            assert sock.attached_programs(CGROUP, hook.attach_type) == [after[hook.name]["prog_id"]]
        assert restarted.attach() == []                         # idempotent
        assert probe("tcp", addr=WEB_VIP, port=80)["pod"] in WEB
    finally:
        restarted.close()


@pytest.mark.root
@pytest.mark.netns
def test_dump_shows_the_attachment_per_cgroup(node):
    state = dump.collect(PIN_DIR)
    rows = {row["hook"]: row for row in state["socket_lb"]}
    assert set(rows) == {h.name for h in sock.HOOKS}
    assert {row["cgroup"] for row in rows.values()} == {CGROUP}
    assert f"socket LB: connect4      cgroup {CGROUP}" in dump.format_table(state)


@pytest.mark.root
@pytest.mark.netns
def test_cleanup_detaches_from_the_cgroup(node, tmp_path):
    """A second datapath (its own pins, its own cgroup): after cleanup its cgroup has no
    program, its pins are gone, and a connect() from it is no longer rewritten."""
    cgroup = CGROUP + "-cleanup"
    os.makedirs(cgroup)
    cfg = config_for_tests(pin_dir=PIN_DIR + "-c", cgroup_root=cgroup)
    try:
        mode = EbpfMode(cfg, switch_modes=False)
        mode.start()
        mode.sync(service_ports(node[0]))
        p = Probe(cgroup)
        try:
            assert p("tcp", addr=WEB_VIP, port=80)["pod"] in WEB
            mode.stop(detach=True)
            for hook in sock.HOOKS:
                assert sock.attached_programs(cgroup, hook.attach_type) == []
            assert not os.path.exists(cfg.pin_dir)
            assert p("tcp", addr=WEB_VIP, port=80)["error"] == "EHOSTUNREACH"   # the lab's route
        finally:
            p.close()
    finally:
        EbpfMode.cleanup(cfg)
        os.rmdir(cgroup)


# --- connect latency, socket LB against tc (not a test: `python tests/test_sock_lb.py`) ------

def measure(count: int = 2000) -> dict:
    """Microseconds per TCP connect() (median, mean, p99, max) to a ClusterIP from a pod,
    through the tc program (client-0) and through the socket programs (client-1, in the
    cgroup), interleaved in rounds: same route, same backends. Two pods for the reason in
    test_a_pod_process_in_the_cgroup_is_balanced_at_the_socket_not_by_tc."""
    import tempfile

    with running_node(Path(tempfile.mkdtemp())) as (state, _):
        probes = {"tc": Probe(None, state.pods["client-0"].ns),
                  "socket": Probe(CGROUP, state.pods["client-1"].ns)}
        times: dict[str, list[float]] = {k: [] for k in probes}
        try:
            for _ in range(10):
                for name, p in probes.items():
                    result = p("tcp_many", addr=WEB_VIP, port=80, count=count // 10)
                    failed = [a for a in result["answers"] if "pod" not in a]
                    assert not failed, (name, failed[:3], len(failed))
                    times[name] += [a["connect_s"] for a in result["answers"]]
        finally:
            for p in probes.values():
                p.close()
    import statistics

    return {name: {"median_us": statistics.median(t) * 1e6, "mean_us": statistics.mean(t) * 1e6,
                   "p99_us": sorted(t)[int(len(t) * 0.99)] * 1e6, "max_us": max(t) * 1e6}
            for name, t in times.items()}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
