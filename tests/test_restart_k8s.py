"""The agent restarted 100 times under traffic, against the real API server.

`lbctl run --source kubernetes` runs as a process of its own and is stopped by SIGTERM or
killed by SIGKILL, in turn; half of the stops are timed during a sync. Meanwhile a lab client
pod keeps traffic going through the ClusterIPs, and the endpoints keep changing: pods flip
Ready while the agent is up (the change a sync is killed in) and while it is down, and new pods
are added in both states. The Services, Pods and node live in the real API server
(tests/kubeapi.py), the EndpointSlices are made by the real EndpointSlice controller.

A kill "during a sync" is timed from the agent's own log (-v 4): the test arms the kill on the
line the Kubernetes source writes when it applies the watch event of the changed EndpointSlice
(the sync of it follows at once: --min-sync-period 0). A SIGKILL counts as landing in the
sync when the agent died without writing the line that ends that sync (-v 2, "sync (ebpf,
change)"): after the change arrived, before it was programmed. A SIGTERM counts when the agent
logged receiving it before that line (it lets the turn under way end, then exits; one that
comes before the turn began exits without the sync, which the next start makes). The change is
a pod of `web` flipping Ready, which also changes every port of `bulk` (90 ports selecting the
same pods): a sync of ~100 frontends (~100 ms here), so that a kill finds one in progress.
`--interval 0.25` bounds how long an idle agent takes to notice a SIGTERM (its select wait).

What is counted, and must hold at every restart:

* new connections and requests: TCP connections to web:80 and to bulk's ports, each reading the
  answering pod's line, and UDP request/replies to dns:53, each from a new socket (a new flow):
  every one must succeed (no timeout, reset or unreachable; no TCP retransmission either:
  nothing was dropped). Endpoints that change stay served by their pods meanwhile (a pod that is
  not Ready keeps answering, as a pod whose readiness probe fails does), so a request to the
  backend an outdated datapath picks succeeds too: only a datapath that stops serving, drops or
  resets fails one;
* long-lived flows ("no flow moved"): TCP connections to web:81 (an echo port) and connected
  UDP sockets to dns:53, each pinged every half second; every reply must come from the pod
  that answered the first one. Every TCP flow is counted, those to pods that flip Ready too: a
  TCP endpoint that stops being Ready stays listed in its slice, and the datapath, as
  kube-proxy (which leaves TCP conntrack entries alone), lets its established flows finish
  (the backend drains: in no slot, still in lb4_backends). UDP flows are counted only to
  endpoints that stay Ready the whole test (dns-0, dns-1; flows that landed elsewhere are
  closed at once): as kube-proxy flushes the UDP conntrack entries of an endpoint it stops
  using, the datapath makes a UDP flow whose backend left choose again;
* after each restart the maps equal the desired state computed from a fresh list of the API
  server, once the API server's slices show the changes made (the controller acts a little
  later): the same backends in every frontend's slots, the same draining backends, no slot
  beyond a frontend's count and no other backend that no slot names.

Restarts are cheap because the agent adopts its pinned programs instead of compiling them again
(lbctl.datapath.ebpf.loader, "the programs across restarts"): the programs stay attached and the
maps pinned while the agent is down, and the next start replaces each filter by itself. The
timings are printed (pytest -s), never asserted.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from conftest import TEST_PIN_DIR, config_for_tests
from nsutil import socket_in, strict_node, thread_in, wait_for

from lbctl.agent.status import status_file
from lbctl.datapath.ebpf import bpfsys, decode, shared
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.lab import cluster as lab
from lbctl.model.desired import desired_state, service_ports
from lbctl.sources.kubernetes import KubernetesSource

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.kube]

PREFIX = f"lbr{os.getpid() % 1000}"
PIN_DIR = TEST_PIN_DIR + "-restart"
POD_CIDR, GATEWAY = "10.244.211.0/24", "10.244.211.1"
WEB_IP, DNS_IP, BULK_IP = "10.96.211.10", "10.96.211.53", "10.96.211.20"
ECHO_PORT = 8081                 # the long-lived flows' port on web pods (this test's echo server)
BULK_PORTS = range(1000, 1090)   # bulk: 90 ports, port p to p + BULK_TARGET of the web pods
# Each of bulk's ports has a target port of its own: two service ports to one backend port would
# make a client port reused for the second meet the backend's TIME_WAIT socket of the first,
# whose timestamps (offset per connection) need not look older; the backend's challenge ACK then
# costs the SYN a retransmission. The datapath translates destinations only (no source port
# remap to avoid that, as netfilter's NAT does): a known limit, not what this test is about.
BULK_TARGET = 8000
RESTARTS = 100
CONVERGE = 60.0                  # seconds for a change to reach the maps: a safety net only
TIMEOUT = 3.0                    # seconds a request or a ping may take: a safety net only
F_DRAINING = shared.const("LB_BACKEND_F_DRAINING")

STABLE_WEB, CHURN_WEB, SPARE_WEB = ("web-0", "web-1"), ("web-2", "web-3"), ("web-4", "web-5", "web-6", "web-7")
STABLE_DNS, CHURN_DNS, SPARE_DNS = ("dns-0", "dns-1"), ("dns-2",), ("dns-3",)
# the cycle at which a spare pod is registered, and whether the agent is then up or down
ADDED = {10: ("web-4", "down"), 33: ("web-5", "up"), 50: ("dns-3", "down"), 60: ("web-6", "down"),
         84: ("web-7", "up")}

LAB_SERVICES = (   # what the lab's servers listen on (the echo port is this test's own server)
    lab.ServiceSpec("default", "web", WEB_IP, (lab.PortSpec("http", 80, "TCP", 8080),
                                               *(lab.PortSpec(f"b{p}", p, "TCP", p + BULK_TARGET) for p in BULK_PORTS)),
                    STABLE_WEB + CHURN_WEB + SPARE_WEB),
    lab.ServiceSpec("default", "dns", DNS_IP, (lab.PortSpec("dns", 53, "UDP", 5353),),
                    STABLE_DNS + CHURN_DNS + SPARE_DNS),
)
SERVICES = {   # name -> (cluster IP, selected app, [(port name, port, protocol, target port)])
    "web": (WEB_IP, "web", [("http", 80, "TCP", 8080), ("echo", 81, "TCP", ECHO_PORT)]),
    "dns": (DNS_IP, "dns", [("dns", 53, "UDP", 5353)]),
    "bulk": (BULK_IP, "web", [(f"b{p}", p, "TCP", p + BULK_TARGET) for p in BULK_PORTS]),
}


def service_json(namespace: str, name: str) -> str:
    ip, app, ports = SERVICES[name]
    return json.dumps({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": name, "namespace": namespace},
                       "spec": {"clusterIP": ip, "selector": {"app": app},
                                "ports": [{"name": n, "port": p, "protocol": proto, "targetPort": t}
                                          for n, p, proto, t in ports]}})


# --- what makes restarts cheap: the pinned programs adopted ---------------------------------------


def _program_ids(dp: ebpf.EbpfDatapath) -> dict[str, int]:
    return {name: bpfsys.prog_info(fd).id for name, fd in dp.program_fds().items()}


def _map_ids(dp: ebpf.EbpfDatapath) -> set[int]:
    return {m.info.id for m in dp.maps.values()}


def test_a_restart_adopts_the_pinned_programs_and_never_ones_bound_to_unpinned_maps():
    """A second load of the same source and configuration takes the very programs the first
    pinned (no compile); programs whose maps were unpinned since are compiled again, on the
    maps pinned now; remove_pins leaves nothing."""
    cfg = config_for_tests(pin_dir=TEST_PIN_DIR + "-adopt")
    try:
        first = ebpf.EbpfDatapath(cfg).load()
        ids, maps = _program_ids(first), _map_ids(first)
        first.close()
        dirs = [n for n in os.listdir(cfg.pin_dir) if n.startswith(ebpf.PROGRAMS_PREFIX)]
        assert len(dirs) == 1 and sorted(os.listdir(os.path.join(cfg.pin_dir, dirs[0]))) == sorted(ebpf.PROGRAM_TYPES)
        again = ebpf.EbpfDatapath(cfg).load()
        assert again.bpf is None and _program_ids(again) == ids and _map_ids(again) == maps
        again.close()
        for name in ebpf.MAPS:   # the maps unpinned (the programs' pins left): new maps next
            os.unlink(os.path.join(cfg.pin_dir, name))
        fresh = ebpf.EbpfDatapath(cfg).load()
        try:
            assert fresh.bpf is not None and not set(_program_ids(fresh).values()) & set(ids.values())
            used = {i for fd in fresh.program_fds().values() for i in bpfsys.prog_info(fd).map_ids}
            assert _map_ids(fresh) <= used and not _map_ids(fresh) & maps
        finally:
            fresh.close()
        assert len([n for n in os.listdir(cfg.pin_dir) if n.startswith(ebpf.PROGRAMS_PREFIX)]) == 1
    finally:
        ebpf.remove_pins(cfg.pin_dir)
    assert not os.path.exists(cfg.pin_dir)


def test_the_program_digest_covers_the_source_and_the_flags():
    cfg = config_for_tests()
    texts = {path: path.read_bytes() for path in ebpf.SOURCES}
    digest = ebpf.program_digest(cfg, texts)
    assert ebpf.program_digest(cfg, dict(texts)) == digest
    assert ebpf.program_digest(cfg, {**texts, ebpf.XDP_SOURCE: texts[ebpf.XDP_SOURCE] + b"\n"}) != digest
    assert ebpf.program_digest(config_for_tests(ct_size=16384), texts) != digest


# --- the pods as the API server knows them -----------------------------------------------------


class Pods:
    """The lab's backends registered as Pods; which are Ready; what each service should hold."""

    def __init__(self, cp, state: lab.LabState, namespace: str, node: str):
        self.cp, self.state, self.namespace, self.node = cp, state, namespace, node
        self.ready: dict[str, bool] = {}
        self.flips = Counter[str]()
        self.added: list[str] = []
        self._turns = {"web": itertools.count(), "dns": itertools.count()}

    def add(self, pod: str) -> None:
        app = pod.split("-")[0]
        ports = (("http", 8080, "TCP"), ("echo", ECHO_PORT, "TCP")) if app == "web" else (("dns", 5353, "UDP"),)
        self.cp.create_pod(self.namespace, pod, node=self.node, ip=self.ip(pod), labels={"app": app}, ports=ports)
        self.ready[pod] = True
        self.added.append(pod)

    def flip(self, app: str) -> str:
        """Flips the Ready condition of the next pod of `app` that may change (round robin)."""
        churn = [p for p in self.ready if p.startswith(f"{app}-") and p not in STABLE_WEB + STABLE_DNS]
        pod = churn[next(self._turns[app]) % len(churn)]
        self.ready[pod] = not self.ready[pod]
        self.cp.set_pod_ready(self.namespace, pod, self.ready[pod])
        self.flips[pod] += 1
        return pod

    def ip(self, pod: str) -> str:
        return self.state.pods[pod].ip

    def client(self, index: int = 0) -> str:
        return self.state.pods[self.state.clients[index]].ns

    def expected(self) -> dict[str, list[str]]:
        """Frontend -> backends, for the frontends whose backends this test changes."""
        def backends(app: str, port: int, proto: str = "TCP") -> list[str]:
            return sorted(f"{self.ip(p)}:{port}/{proto}" for p, ready in self.ready.items()
                          if ready and p.startswith(f"{app}-"))
        return {f"{WEB_IP}:80/TCP": backends("web", 8080), f"{WEB_IP}:81/TCP": backends("web", ECHO_PORT),
                f"{DNS_IP}:53/UDP": backends("dns", 5353, "UDP"),
                **{f"{BULK_IP}:{p}/TCP": backends("web", p + BULK_TARGET) for p in (BULK_PORTS[0], BULK_PORTS[-1])}}


@pytest.fixture(scope="module")
def pods(kube_control_plane, kube_node, tmp_path_factory):
    spec = lab.LabSpec(prefix=PREFIX, pod_cidr=POD_CIDR, gateway=GATEWAY, services=LAB_SERVICES)
    state = lab.lab_up(spec, tmp_path_factory.mktemp("restart-lab-manifests"))
    namespace = f"lbr-{os.getpid()}"
    cp = kube_control_plane
    try:
        cp.kubectl("create", "namespace", namespace)
        wait_for(lambda: cp.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] == 200,
                 CONVERGE, what="the namespace's default serviceaccount")
        registered = Pods(cp, state, namespace, kube_node)
        for pod in STABLE_WEB + CHURN_WEB + STABLE_DNS + CHURN_DNS:
            registered.add(pod)
        for name in SERVICES:
            cp.kubectl("apply", "-f", "-", input=service_json(namespace, name))
        with strict_node(PREFIX, state.host_links(), POD_CIDR):
            yield registered
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        lab.lab_down(state.prefix)


# --- the maps against the API server ------------------------------------------------------------


def programmed(pin_dir: str = PIN_DIR) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """What the pinned maps hold: frontend -> the backends in its slots 1..count; the backends in
    no slot flagged draining (their established flows finish); and what nothing should hold:
    slots beyond a count or without a frontend, backends in no slot that are not draining."""
    with bpfsys.BpfMap.open_pinned(os.path.join(pin_dir, "lb4_services")) as services, \
            bpfsys.BpfMap.open_pinned(os.path.join(pin_dir, "lb4_backends")) as backends_map:
        backends = {decode.u32(k)[0]: decode.backend(v) for k, v in backends_map.items()}
        frontends, slots, _ = decode.services(services.items(), 0)

    def endpoint(address, port, proto, *_) -> str:
        return f"{decode.address(address)}:{decode.port(port)}/{decode.PROTOCOLS[proto].value}"
    state, leftovers, named = {}, [], set()
    for raw, (_, count, _, _) in frontends.items():
        have = slots.get(raw, {})
        named |= set(have.values())
        state[endpoint(*raw[:3])] = sorted(endpoint(*backends[have[s]]) if have.get(s) in backends
                                           else f"slot {s}: backend id {have.get(s)} missing"
                                           for s in range(1, count + 1))
        leftovers += [f"{endpoint(*raw[:3])} slot {s} beyond count {count}" for s in have if s > count]
    leftovers += [f"{endpoint(*raw[:3])}: slots without a frontend" for raw in slots.keys() - frontends.keys()]
    draining = sorted(endpoint(*b) for i, b in backends.items() if i not in named and b[3] & F_DRAINING)
    leftovers += [f"backend {i} ({endpoint(*b)}) in no slot, not draining" for i, b in backends.items()
                  if i not in named and not b[3] & F_DRAINING]
    return state, draining, leftovers


def wanted(cp, node: str) -> tuple[dict[str, list[str]], list[str]]:
    """The desired state from a fresh list of the API server: frontend -> backends, and the
    backends that only drain (listed but not used: a TCP endpoint that is not Ready)."""
    source = KubernetesSource(cp.api(), node, ready_timeout=CONVERGE)
    try:
        snapshot = source.poll()
    finally:
        source.stop()
    desired, _ = desired_state(service_ports(snapshot), node)
    used = {b for entry in desired.services.values() for b in entry.backends}
    draining = {b for entry in desired.services.values() for b in entry.draining} - used
    return ({str(fe): sorted(str(b) for b in entry.backends) for fe, entry in desired.services.items()},
            sorted(str(b) for b in draining))


def converged(pods: Pods) -> None:
    """Waits until the API server's slices show every change made (the EndpointSlice controller
    acts a little later), then until the maps equal the desired state from it, nothing left over."""
    expected = pods.expected()
    wait_for(lambda: all(wanted(pods.cp, pods.node)[0].get(fe) == b for fe, b in expected.items()),
             CONVERGE, interval=0.1, what=f"the API server's slices to show {expected}")
    last: list = []

    def equal() -> bool:
        want = wanted(pods.cp, pods.node)
        have = programmed()
        last[:] = [want, have]
        return have == (*want, [])
    try:
        wait_for(equal, CONVERGE, interval=0.1, what="the maps to equal the desired state")
    except AssertionError:
        (want, want_draining), (have, draining, leftovers) = last
        diff = {fe: (have.get(fe), want.get(fe)) for fe in have.keys() | want.keys() if have.get(fe) != want.get(fe)}
        raise AssertionError(f"maps differ from the API server's desired state (frontend: (maps, API)): "
                             f"{diff}; draining {draining}, wanted {want_draining}; left over: {leftovers}") from None


# --- the agent as a process ---------------------------------------------------------------------

EVENT = re.compile(r"EndpointSlice (\S+)/(\S+) (added|modified|deleted) \(resourceVersion")
SYNC_DONE = "sync (ebpf, change)"


class AgentProcess:
    """`lbctl run --source kubernetes` with its log read line by line by a thread, which can be
    armed to send a signal the moment a line matches (no round trip through the test's thread)."""

    def __init__(self, pods: Pods):
        self.lines: list[str] = []
        self.times: list[float] = []             # when each line was read (since EPOCH)
        self.changed = threading.Condition()
        self._armed: tuple[re.Pattern, int] | None = None
        self.killed_at: int | None = None        # index of the line the armed signal answered
        self.started = time.monotonic()
        lbctl = os.path.join(os.path.dirname(sys.executable), "lbctl")
        self.proc = subprocess.Popen(
            [lbctl, "run", "--source", "kubernetes", "--kubeconfig", str(pods.cp.kubeconfig),
             "--master", pods.cp.server, "--hostname-override", pods.node, "--pin-dir", PIN_DIR,
             "--devices", f"veth{PREFIX}*", "--uplink-devices", "none", "--xdp", "off",
             "--max-services", "1024", "--max-backends", "4096", "--services-map-size", "8192",
             "--ct-size", "8192", "--min-sync-period", "0", "--interval", "0.25", "--healthz-bind-address", "",
             "--metrics-bind-address", "", "--max-seconds", "900", "-v", "4"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.times.append(time.monotonic() - EPOCH)
                if self._armed is not None and self._armed[0].search(line):
                    os.kill(self.proc.pid, self._armed[1])
                    self.killed_at, self._armed = len(self.lines) - 1, None
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_line(self, text: str, after: int = 0, timeout: float = CONVERGE) -> int:
        """The index of the first line from `after` on that contains `text`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = next((i for i in range(after, len(self.lines)) if text in self.lines[i]), None)
                if found is not None:
                    return found
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(f"the agent exited ({self.proc.returncode}) before logging "
                                         f"{text!r}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"the agent did not log {text!r} within {timeout:.0f}s:\n{self.tail()}")
                self.changed.wait(0.5)

    def arm(self, pattern: re.Pattern, sig: int) -> None:
        with self.changed:
            self._armed = (pattern, sig)

    def wait_killed(self, timeout: float = CONVERGE) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.killed_at is not None, timeout):
                raise AssertionError(f"the armed line never came within {timeout:.0f}s:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def tail(self, lines: int = 30) -> str:
        return "".join(self.lines[-lines:])

    def story(self) -> str:
        """The log without the HTTP client's debugging, each line with the time it was read."""
        return "".join(f"{t:9.3f} {line}" for t, line in zip(self.times, self.lines)
                       if " lbctl" in line and "Service " not in line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)


# --- traffic ------------------------------------------------------------------------------------

EPOCH = time.monotonic()         # what the times in failures and in the agents' log count from
TCP_INFO_TOTAL_RETRANS = 100     # offset of tcpi_total_retrans in struct tcp_info (<linux/tcp.h>)


def retransmissions(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, TCP_INFO_TOTAL_RETRANS)[0]


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError("closed without a whole line")
        data += chunk
    return data.decode().strip()


@dataclass
class Tally:
    """What one kind of traffic did: requests made, failures (what, when), retransmissions."""

    made: int = 0
    failed: list[str] = field(default_factory=list)
    retransmitted: int = 0
    answers: Counter[str] = field(default_factory=Counter)


class EchoServers:
    """TCP servers on ECHO_PORT in the web pods, keeping every connection open and answering each
    line with "<pod> <line>": one thread, one selector."""

    def __init__(self, pods: Pods, names: tuple[str, ...]):
        self.selector = selectors.DefaultSelector()
        self.listeners = []
        for name in names:
            listener = socket_in(pods.state.pods[name].ns, kind=socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", ECHO_PORT))
            listener.listen(64)
            listener.setblocking(False)
            self.listeners.append(listener)
            self.selector.register(listener, selectors.EVENT_READ, (name, None))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            for key, _ in self.selector.select(0.2):
                name, conn = key.data
                if conn is None:
                    try:
                        accepted, _ = key.fileobj.accept()
                    except OSError:
                        continue
                    self.selector.register(accepted, selectors.EVENT_READ, (name, accepted))
                    continue
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(conn)
                    conn.close()
                    continue
                lines = data.decode(errors="replace").splitlines()
                conn.sendall("".join(f"{name} {line}\n" for line in lines).encode())

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


@dataclass
class Flow:
    """A long-lived flow: its socket, the pod that answered first, pings and what went wrong."""

    proto: str
    sock: socket.socket
    pod: str
    pings: int = 0
    problems: list[str] = field(default_factory=list)


class Traffic:
    """Continuous traffic from the client pod, until stop(): long-lived flows pinged every
    PING_EVERY seconds, new TCP connections and UDP requests paced by PACE (bounded by
    MAX_REQUESTS each)."""

    PING_EVERY, PACE, MAX_REQUESTS = 0.5, 0.03, 40_000

    def __init__(self, pods: Pods):
        self.pods = pods
        self.stop_event = threading.Event()
        self.flows = self._open_flows("tcp", (WEB_IP, 81), STABLE_WEB + CHURN_WEB, 16) + \
            self._open_flows("udp", (DNS_IP, 53), STABLE_DNS, 6)
        self.tcp, self.udp = Tally(), Tally()
        self.lock = threading.Lock()
        self.progress = threading.Condition(self.lock)   # a ping round or a request done
        self.rounds = 0         # ping rounds done (every flow pinged once)
        self.cycle = 0          # the restart under way, to say when a failure happened
        self.stopped = False
        # bulk's connections from the other client pod (the load spread over both)
        self.threads = [threading.Thread(target=self._ping, daemon=True),
                        thread_in(pods.client(0), self._requests, "tcp", WEB_IP, (80,)),
                        thread_in(pods.client(1), self._requests, "tcp", BULK_IP, BULK_PORTS),
                        thread_in(pods.client(0), self._requests, "udp", DNS_IP, (53,))]
        for t in self.threads:
            t.start()

    def _open_flows(self, proto: str, target: tuple[str, int], stable: tuple[str, ...], want: int) -> list[Flow]:
        """Flows to `target` that landed on a pod in `stable` (those to other pods are closed)."""
        kept: list[Flow] = []
        for _ in range(20 * want):
            if len(kept) == want:
                break
            sock = socket_in(self.pods.client(), kind=socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            sock.settimeout(TIMEOUT)
            sock.connect(target)
            pod = self._ask(sock, proto)
            if pod in stable:
                kept.append(Flow(proto, sock, pod))
            else:
                sock.close()
        assert len(kept) == want, f"only {len(kept)} {proto} flows landed on {stable}"
        return kept

    @staticmethod
    def _ask(sock: socket.socket, proto: str) -> str:
        if proto == "tcp":
            sock.sendall(b"ping\n")
            return read_line(sock).split()[0]
        sock.send(b"ping\n")
        return sock.recv(512).decode().split()[0]

    def _ping(self) -> None:
        while not self.stop_event.wait(self.PING_EVERY):
            for flow in self.flows:
                try:
                    pod = self._ask(flow.sock, flow.proto)
                except OSError as exc:
                    pod = f"error {exc!r}"
                flow.pings += 1
                if pod != flow.pod:
                    flow.problems.append(f"restart {self.cycle}: answered by {pod}, not {flow.pod}")
            with self.progress:
                self.rounds += 1
                self.progress.notify_all()

    def _requests(self, proto: str, ip: str, ports) -> None:
        tally = self.tcp if proto == "tcp" else self.udp
        used: dict[int, str] = {}    # client port -> its last request (for the failure's story)
        for n in range(self.MAX_REQUESTS):
            if self.stop_event.wait(self.PACE):
                return
            target = (ip, ports[n % len(ports)])
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            began = time.monotonic()
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.settimeout(TIMEOUT)
                sport = 0
                try:
                    sock.connect(target)
                    sport = sock.getsockname()[1]
                    if proto == "tcp":
                        pod = read_line(sock).split()[0]
                        retrans = retransmissions(sock)
                    else:
                        sock.send(b"lbctl-restart\n")
                        pod, retrans = sock.recv(512).decode().split()[0], 0
                    problem = None
                except OSError as exc:
                    pod, retrans, problem = "", 0, f"restart {self.cycle}: {proto} {target}: {exc!r}"
            with self.progress:
                self.progress.notify_all()
                tally.made += 1
                if pod:
                    tally.answers[pod] += 1
                tally.retransmitted += retrans > 0
                if retrans:
                    problem = (f"restart {self.cycle}: {proto} {target} answered by {pod} after "
                               f"{retrans} retransmission(s), {time.monotonic() - began:.3f}s")
                if problem:
                    tally.failed.append(f"{problem} (at {began - EPOCH:.3f}s, client port {sport}, "
                                        f"its last use: {used.get(sport, 'none')})")
            used[sport] = f"{target} answered by {pod or '?'} at {began - EPOCH:.3f}s"

    def checkpoint(self) -> None:
        """Waits until every flow was pinged, and new connections and requests were made, after
        this call: each restart is followed by traffic of every kind."""
        with self.progress:
            rounds, tcp, udp = self.rounds, self.tcp.made, self.udp.made
            assert self.progress.wait_for(lambda: self.rounds >= rounds + 2 and self.tcp.made >= tcp + 3
                                          and self.udp.made >= udp + 2, CONVERGE), "traffic stalled"

    def problems(self) -> list[str]:
        with self.lock:
            return (self.tcp.failed + self.udp.failed + [p for f in self.flows for p in f.problems]
)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.stop_event.set()
        for t in self.threads:
            t.join(TIMEOUT + 5)
        for flow in self.flows:
            if flow.proto == "tcp" and retransmissions(flow.sock):
                flow.problems.append(f"{retransmissions(flow.sock)} retransmission(s) on a long-lived connection")
            flow.sock.close()


# --- the test -----------------------------------------------------------------------------------


@dataclass
class Restart:
    cycle: int
    signal: str
    timed: bool              # armed on a change's watch event
    in_sync: bool = False    # ... and the agent died before that sync ended
    exit_code: int = 0
    down: float = 0.0        # seconds from the signal to the agent's exit
    start: float = 0.0       # seconds from the new agent's start to its first sync
    cycle_seconds: float = 0.0


def stop_agent(agent: AgentProcess, pods: Pods, record: Restart, sig: int) -> None:
    """Stops the agent with `sig` and waits for its exit: at once, or (record.timed) the moment
    it applies the watch event of a pod of web flipping Ready, the sync of ~100 frontends
    following it. Then says whether the signal landed in that sync: SIGKILL, the agent died
    without ending it; SIGTERM, the agent said it received the signal after the event and then
    ended the sync (SIGTERM lets the turn under way end)."""
    if record.timed:
        agent.arm(re.compile(rf"EndpointSlice {pods.namespace}/(bulk|web)-\S+ modified"), sig)
        pods.flip("web")
        agent.wait_killed()
    else:
        agent.signal(sig)
    sent = time.monotonic()
    record.exit_code = agent.wait()
    record.down = time.monotonic() - sent
    assert record.exit_code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), agent.tail()
    if not record.timed:
        return
    after = agent.lines[agent.killed_at:]
    done = next((i for i, line in enumerate(after) if SYNC_DONE in line), None)
    if sig == signal.SIGKILL:
        record.in_sync = done is None
    else:
        received = next(i for i, line in enumerate(after) if "SIGTERM received" in line)
        record.in_sync = done is not None and received < done


def test_restarts_under_traffic_move_no_flow_and_lose_no_connection(pods):
    """RESTARTS restarts (SIGTERM and SIGKILL in turn; every other pair timed during a sync)
    under continuous traffic while endpoints change; see the module docstring."""
    began = time.monotonic()
    echo = EchoServers(pods, STABLE_WEB + CHURN_WEB + SPARE_WEB)
    agent = AgentProcess(pods)
    agents = [agent]
    traffic = None
    records: list[Restart] = []
    try:
        agent.wait_line(SYNC_DONE, timeout=CONVERGE)
        first_start = time.monotonic() - agent.started
        converged(pods)
        traffic = Traffic(pods)
        for cycle in range(RESTARTS):
            cycle_began = time.monotonic()
            traffic.cycle = cycle
            sig = signal.SIGTERM if cycle % 2 == 0 else signal.SIGKILL
            record = Restart(cycle, sig.name, timed=cycle % 4 >= 2)
            added = ADDED.get(cycle)
            if added and added[1] == "up":
                pods.add(added[0])
                converged(pods)
            stop_agent(agent, pods, record, sig)
            # while the agent is down
            pods.flip("dns")
            if cycle % 3 == 0:
                pods.flip("web")
            if added and added[1] == "down":
                pods.add(added[0])
            agent = AgentProcess(pods)
            agents.append(agent)
            agent.wait_line(SYNC_DONE)
            record.start = time.monotonic() - agent.started
            converged(pods)
            record.cycle_seconds = time.monotonic() - cycle_began
            records.append(record)
            traffic.checkpoint()
            problems = traffic.problems()
            assert not problems, (f"restart {cycle} ({record}): {problems[:10]}\n"
                                  + "\n".join(a.story() for a in agents[-3:]))
        traffic.stop()
        problems = traffic.problems()
        assert not problems, problems[:10]
        with open(status_file(PIN_DIR)) as f:
            assert json.load(f)["last_sync"]["result"] == "ok"
    finally:
        if traffic is not None:
            traffic.stop()
        agent.stop()
        echo.close()
        EbpfMode.cleanup(ebpf.DatapathConfig(pin_dir=PIN_DIR, devices=(f"veth{PREFIX}*",)))
    report(records, traffic, first_start, time.monotonic() - began, pods)
    assert len(records) == RESTARTS
    assert Counter(r.signal for r in records) == {"SIGTERM": RESTARTS // 2, "SIGKILL": RESTARTS // 2}
    assert any(r.in_sync for r in records if r.signal == "SIGKILL"), "no SIGKILL landed in a sync"


def report(records: list[Restart], traffic: Traffic | None, first_start: float, wall: float, pods: Pods) -> None:
    assert traffic is not None
    def spread(values) -> str:
        values = sorted(values)
        return (f"median {statistics.median(values):.2f}s, p90 {values[int(0.9 * (len(values) - 1))]:.2f}s, "
                f"max {values[-1]:.2f}s")
    timed = [r for r in records if r.timed]
    print(f"\n{len(records)} restarts in {wall:.0f}s ({wall / max(1, len(records)):.2f}s per cycle): "
          + ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.signal for r in records).items()))
          + f"; {len(timed)} timed on a change, {sum(r.in_sync for r in timed)} landed in its sync "
          + f"(SIGTERM {sum(r.in_sync for r in timed if r.signal == 'SIGTERM')}, "
          + f"SIGKILL {sum(r.in_sync for r in timed if r.signal == 'SIGKILL')})")
    print(f"first start (compiles the programs): {first_start:.2f}s to the first sync; "
          f"restarts, start to first sync: {spread(r.start for r in records)}; "
          f"signal to exit: {spread(r.down for r in records)}; whole cycle: {spread(r.cycle_seconds for r in records)}")
    pings = sum(f.pings for f in traffic.flows)
    print(f"new TCP connections {traffic.tcp.made} (failed {len(traffic.tcp.failed)}, retransmitted "
          f"{traffic.tcp.retransmitted}), UDP requests {traffic.udp.made} (failed {len(traffic.udp.failed)}); "
          f"long-lived flows {len(traffic.flows)} "
          f"({sum(f.proto == 'tcp' for f in traffic.flows)} TCP, {sum(f.proto == 'udp' for f in traffic.flows)} UDP), "
          f"{pings} pings, moved or failed {sum(len(f.problems) for f in traffic.flows)}")
    print(f"endpoint changes: {sum(pods.flips.values())} Ready flips {dict(pods.flips)}, "
          f"{len(pods.added) - len(STABLE_WEB + CHURN_WEB + STABLE_DNS + CHURN_DNS)} pods added; answers: {dict(traffic.tcp.answers + traffic.udp.answers)}")
