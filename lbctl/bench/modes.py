"""`lbctl bench --modes none,ebpf,iptables,nftables`: the datapaths side by side, end to end.

The same desired state is programmed by each datapath mode on this machine in turn, and real TCP
connections from a client pod measure what it costs a new connection. One run measures every
mode, so the ratios between modes are comparable even where absolute numbers are not (they move
from run to run on a small VM; the ratios are what to publish).

The lab (``lbctl.lab.cluster``, prefix "lbb", pods in 10.244.220.0/24):

    client-none, client-ebpf, client-iptables, client-nftables   one client pod per mode
    web-0 .. web-2                                                the real service's backends

With ``--nodes 2`` (``BenchSpec.nodes``) the lab is the multi-node one (lbctl.lab.cluster:
each node a namespace with eth0 on the lab bridge): every client pod on node 0, every backend
on node 1, so each connection is forwarded across the lab network; each mode runs on every node
(its own pin dir, tc filter name and nft table; node name, node IP and eth0 as uplink as the
parity suite gives them), and default/web is also a NodePort (NODE_PORT, eTP Cluster): a second
measurement per mode runs the client in the lab's outside namespace against node 0's address,
node 0 forwarding to the remote backends with the source masqueraded (XDP on eth0 in ebpf mode,
kube-proxy's chains otherwise). Those rows are reported under their own header, without a ratio
to "none" (there is no NodePort without a load balancer); SYNC s is the slowest node's.

The services, one desired state for every mode, built as ``ServicePortInfo`` objects:

* ``default/web`` 10.96.220.10:80/TCP -> the 3 backend pods: the *real* service, read from the
  lab's own manifests exactly as the agent would read them;
* N-1 synthetic ClusterIP services ``bench/svc-NNNNNN`` on 10.100.0.0/14 (port 80/TCP -> 8080),
  each with 1 or 2 fake endpoints in 10.128.0.0/12, a range no pod uses. Nothing sends to them:
  they are there to be walked past (iptables) or stored (nftables maps, BPF hash maps).

kube-proxy's iptables mode matches a new connection against ``KUBE-SERVICES`` one rule per service
port, in the order the renderer writes them: service key order (``common.proxied_ports``). The
real service sorts last ("bench/..." < "default/web"), so its first packet walks past all N-1
synthetic rules: iptables' worst case. The position is computed from the renderer's order and,
for the iptables mode, read back from ``iptables-save``; both are reported.

Per number of services, per mode:

    none       no load balancer: the client connects to the backend pod IPs (round robin)
    ebpf       EbpfMode: own pin dir, tc filters on the lab's host veths only (own filter name)
    iptables   kube-proxy v1.32's iptables mode (IptablesMode), one iptables-restore --noflush
    nftables   kube-proxy v1.32's nftables mode (NftablesMode), one nft -f transaction

each mode is started (ebpf: program compiled and attached, plus an empty first sync, which is
where EbpfMode removes the other modes' objects; the kube-proxy modes do that in start()), then
one sync programs all N services from scratch and is timed ("SYNC s"; for the kube-proxy modes
split into time in iptables/nft commands and time in Python), then the client makes
``connections`` short TCP connections (connect, read the backend's one-line answer, close) on
``workers`` processes, bounded by ``max_seconds``, ``rounds`` times. Reported: connections per
second (the median round), its ratio to "none", median and p99 of connect+first-reply latency
over every connection, and which backend answered each one (every backend must answer). Then
the mode is stopped and its kernel objects removed before the next one starts. Node settings
are the parity suite's: node name "lab-node", node IP the lab gateway, cluster CIDR
10.244.0.0/16, iptables with tcp_be_liberal.

What makes the numbers trustworthy (each was a measured problem first):

* One client pod per mode. Backends close first, so each holds a TIME_WAIT socket per client
  port for 60 s. A client's TCP timestamps are offset per (source, destination) address pair:
  connections to the ClusterIP carry other timestamps than connections straight to a pod IP, so
  a port reused across modes from one client met PAWS in the backend's TIME_WAIT and waited for
  a SYN retransmit (1 s): ~1% of connections, a third of the rate. Per-mode clients never mix.
* Before every measurement the node's conntrack entries from the lab's pods are deleted: a
  flow DNATed by iptables/nftables has the reply tuple of an earlier direct connection from the
  same port to the same backend ("none", ebpf: netfilter sees those already translated), and
  netfilter drops such a clash.
* A warm-up round of "none" after the lab comes up (the first measurement was consistently the
  slowest), and ``rounds`` rounds per row with the median reported.

What is slow, measured (2-core dev VM, Debian 12: iptables 1.8.9 nf_tables backend, nftables
1.0.6, Linux 6.18), and why:

* iptables-restore --noflush of 10,000 services (90,000 lines): ~40 s, all userspace CPU in
  xtables-nft-multi, growing about quadratically (2,500: 1.5 s, 5,000: 7 s). Without --noflush
  the same input takes 2 s and iptables-legacy-restore 0.9 s; kube-proxy always passes
  --noflush.
* nft -f of kube-proxy's 10,000-service transaction (120,000 lines): ~100 s, all kernel time in
  __nft_set_trans_bind, which walks the whole transaction for every anonymous set a rule binds
  (one ``numgen ... vmap`` per service): quadratic (2,500: 1.5 s, 5,000: 21 s). The modes'
  HostRunner gives a command 60 s, so `lbctl run --mode nftables` cannot finish a full sync of
  10,000 services on this machine; the bench's runner gives ``sync_timeout`` (300 s).

Those two syncs are most of the default run's time (about 3.5 minutes); the measurements are
about 1.5 s per row.

The iptables and nftables modes own node-wide objects (KUBE-* chains, ``table ip kube-proxy``):
the bench refuses to start when another proxy has them on this node, rather than wipe them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import loader as ebpf
from lbctl.lab import cluster as lab
from lbctl.lab import netns
from lbctl.lab.client import tcp_request
from lbctl.model.objects import EndpointInfo, Protocol, Service, ServicePort, ServicePortInfo

MODES = ("none", "ebpf", "iptables", "nftables")
DEFAULT_COUNTS = "10,1000,10000"
CLUSTER_CIDR = "10.244.0.0/16"                       # as the parity suite: pods are not masqueraded
SYNTHETIC_VIPS = ipaddress.ip_network("10.100.0.0/14")   # cluster IPs of the synthetic services
FAKE_ENDPOINTS = ipaddress.ip_network("10.128.0.0/12")   # their endpoints: no pod has these
SYNTHETIC_NAMESPACE = "bench"                        # sorts before "default": the real one is last
SERVICE_PORT, TARGET_PORT = 80, 8080
WARMUP_PER_WORKER = 5                                # connections per worker before the clock starts
STALLED_US = 200_000                                 # a connection this slow met a retransmit
NODE_PORT = 31220                                    # default/web's nodePort on a multi-node lab
CLUSTER_IP_CASE = "ClusterIP"                        # a client pod to default/web's cluster IP
NODE_PORT_CASE = "NodePort"                          # the outside client to node 0's NodePort

Progress = Callable[[str], None]


def client_pod(mode: str) -> str:
    """Each mode has its own client pod (see the module docstring: TIME_WAIT)."""
    return f"client-{mode}"


@dataclass(frozen=True)
class BenchSpec:
    """Where the bench lab lives and how hard the client pushes."""

    prefix: str = "lbb"
    pod_cidr: str = "10.244.220.0/24"
    gateway: str = "10.244.220.1"
    service_cidr: str = "10.96.220.0/24"
    real_vip: str = "10.96.220.10"
    backends: int = 3
    pin_dir: str = "/sys/fs/bpf/lbctl-bench-modes"
    connections: int = 5000          # per round, per mode and number of services
    max_seconds: float = 10.0        # per round, whichever comes first
    rounds: int = 3                  # conn/s is the median round
    workers: int = 4                 # client processes, one connection in flight each
    timeout: float = 2.0             # seconds per connection before it counts as a timeout
    sync_timeout: float = 300.0      # seconds one iptables-restore / nft command may take
    nodes: int = 1                   # 1: the root namespace is the node; 2+: clients on node 0,
                                     # backends on node 1, an agent per node (multi-node lab)

    @property
    def backend_pods(self) -> tuple[str, ...]:
        return tuple(f"web-{i}" for i in range(self.backends))

    def node_pin_dir(self, index: int) -> str:
        """Each node's agent has its own pin dir (and so its own tc filter name and nft table)."""
        return self.pin_dir if self.nodes == 1 else f"{self.pin_dir}-node{index}"

    def lab_spec(self, modes: Sequence[str] = MODES) -> lab.LabSpec:
        web = lab.ServiceSpec("default", "web", self.real_vip,
                              (lab.PortSpec("http", SERVICE_PORT, "TCP", TARGET_PORT),),
                              self.backend_pods)
        return lab.LabSpec(prefix=self.prefix, pod_cidr=self.pod_cidr, gateway=self.gateway,
                           service_cidr=self.service_cidr,
                           clients=tuple(client_pod(m) for m in modes), services=(web,),
                           server_max_seconds=1800.0, nodes=self.nodes,
                           placement=self.placement(modes))

    def placement(self, modes: Sequence[str]) -> tuple[tuple[str, int], ...]:
        """Several nodes: every client on node 0, every backend on node 1, so that each
        connection crosses the lab network (forwarded, and for NodePorts masqueraded, by node 0)."""
        if self.nodes == 1:
            return ()
        return (tuple((client_pod(m), 0) for m in modes)
                + tuple((pod, 1) for pod in self.backend_pods))


@dataclass
class ModeResult:
    mode: str
    services: int
    real_service_position: int           # 1-based, in the order the renderers write services
    start_seconds: float | None = None    # None for "none"
    sync_seconds: float | None = None
    sync_command_seconds: float | None = None   # of which in iptables-restore/nft/... (kube-proxy modes)
    sync_commands: dict[str, float] = field(default_factory=dict)   # command -> seconds
    stop_seconds: float | None = None    # stop, and removal of its kernel objects
    kernel_position: str | None = None   # iptables: the real service's rule in KUBE-SERVICES
    connections: int = 0                 # answered
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    conn_per_second: float = 0.0
    ratio_to_none: float | None = None
    p50_us: float = 0.0
    p99_us: float = 0.0
    answers: dict[str, int] = field(default_factory=dict)
    rounds_conn_per_second: list[float] = field(default_factory=list)
    stalled: int = 0                     # connections slower than STALLED_US (a lost SYN costs 1 s)
    failure: str | None = None           # why this measurement does not count
    case: str = CLUSTER_IP_CASE          # ClusterIP from a client pod, or NodePort from outside
    uplink_mode: str | None = None       # ebpf on a multi-node lab: how node 0's uplink is served


class BenchError(RuntimeError):
    """The bench cannot run on this node as it is; the message says why and what to do."""


# --- the desired state -------------------------------------------------------------------------


def synthetic_ports(count: int, node_name: str = lab.NODE_NAME) -> list[ServicePortInfo]:
    """``count`` ClusterIP services with 1 or 2 endpoints each that nothing will ever answer."""
    if count + 1 >= SYNTHETIC_VIPS.num_addresses or 2 * count + 1 >= FAKE_ENDPOINTS.num_addresses:
        raise BenchError(f"{count:,} synthetic services do not fit in {SYNTHETIC_VIPS} "
                         f"(at most {SYNTHETIC_VIPS.num_addresses - 2:,})")
    vip0, ep0 = int(SYNTHETIC_VIPS.network_address) + 1, int(FAKE_ENDPOINTS.network_address) + 1
    port = ServicePort("http", SERVICE_PORT, Protocol.TCP, TARGET_PORT)
    ports, next_ep = [], ep0
    for i in range(count):
        vip = str(ipaddress.IPv4Address(vip0 + i))
        service = Service(SYNTHETIC_NAMESPACE, f"svc-{i:06d}", cluster_ips=(vip,),
                          ports=(port,), has_selector=True, origin="lbctl bench (synthetic)")
        endpoints = []
        for _ in range(1 + i % 2):
            endpoints.append(EndpointInfo(str(ipaddress.IPv4Address(next_ep)), TARGET_PORT,
                                          node_name=node_name))
            next_ep += 1
        ports.append(ServicePortInfo(service, port, tuple(endpoints)))
    return ports


def real_ports(state: lab.LabState) -> list[ServicePortInfo]:
    """The lab's service as the agent sees it: from its manifests."""
    from lbctl.model.desired import service_ports
    from lbctl.sources.manifests import SourceUnavailable, load_manifests

    try:
        snapshot = load_manifests(state.manifests_dir)
    except SourceUnavailable as exc:
        raise BenchError(f"the bench lab's manifests: {exc}") from None
    if snapshot.problems:
        raise BenchError(f"the bench lab's manifests: {'; '.join(map(str, snapshot.problems))}")
    ports = list(service_ports(snapshot))
    if state.spec.nodes == 1:
        return ports
    return [node_port_of(p) for p in ports]


def node_port_of(info: ServicePortInfo) -> ServicePortInfo:
    """The service as type NodePort (eTP Cluster) on NODE_PORT: the multi-node lab's NodePort case."""
    port = dataclasses.replace(info.port, node_port=NODE_PORT)
    service = dataclasses.replace(info.service, type="NodePort", ports=tuple(
        dataclasses.replace(p, node_port=NODE_PORT) if p == info.port else p for p in info.service.ports))
    return dataclasses.replace(info, service=service, port=port)


def render_position(ports: Sequence[ServicePortInfo], real_key: str) -> int:
    """1-based position of ``real_key`` among service ports in the order both renderers write."""
    from lbctl.datapath.kubeproxy import common

    order = [p.view.service_key for p in common.proxied_ports(ports, 4, lab.NODE_NAME)]
    return order.index(real_key) + 1


# --- the nodes and their modes --------------------------------------------------------------------


@dataclass(frozen=True)
class BenchNode:
    """Where one node's mode runs: its namespace (None: the root namespace), name, node IP, pod
    links, pin dir and uplink (None on the one-node lab: no uplink programs, as before)."""

    name: str
    ns: str | None
    ip: str
    links: tuple[str, ...]
    pin_dir: str
    uplink: str | None = None


def bench_nodes(state: lab.LabState, spec: BenchSpec) -> list[BenchNode]:
    if spec.nodes == 1:
        return [BenchNode(lab.NODE_NAME, None, spec.gateway, tuple(state.host_links()), spec.pin_dir)]
    return [BenchNode(n.name, n.ns, n.ip, tuple(state.host_links(n.name)), spec.node_pin_dir(n.index),
                      n.uplink) for n in state.node_list()]



class TimingRunner:
    """The kube-proxy modes' command runner, adding up the time spent in each command.

    ``timeout`` replaces HostRunner's 60 s: on this kind of machine one nft or iptables-restore
    transaction of 10,000 services can take longer than that (see the module docstring).
    """

    def __init__(self, timeout: float):
        from lbctl.datapath.kubeproxy.proxier import HostRunner

        self.inner = HostRunner(timeout=timeout)
        self.seconds = 0.0
        self.by_command: Counter[str] = Counter()

    def run(self, argv, input=None):
        started = time.monotonic()
        try:
            return self.inner.run(argv, input)
        finally:
            took = time.monotonic() - started
            self.seconds += took
            self.by_command[argv[0]] += took


def ebpf_config(spec: BenchSpec, links: Sequence[str], biggest: int,
                node: BenchNode | None = None) -> ebpf.DatapathConfig:
    """Maps sized for the largest run, so every run loads the same program."""
    from lbctl.bench.prog import _pow2

    endpoints = 2 * biggest + spec.backends
    return ebpf.DatapathConfig(
        pin_dir=node.pin_dir if node else spec.pin_dir, max_services=_pow2(biggest + 1),
        max_backends=_pow2(endpoints + 1), services_map_size=_pow2(biggest + endpoints + 1),
        ct_size=_pow2(4 * spec.rounds * (spec.connections + spec.workers * WARMUP_PER_WORKER)),
        devices=tuple(links), node_name=node.name if node else lab.NODE_NAME,
        uplink_devices=(node.uplink,) if node and node.uplink else ())


def make_mode(name: str, spec: BenchSpec, links: Sequence[str], biggest: int, runner=None,
              node: BenchNode | None = None):
    """The mode as the parity suite builds it (same node name, node IP, cluster CIDR); with
    ``node``, that node's (multi-node lab: its name, node IP, pin dir and uplink)."""
    from lbctl.datapath.ebpf.mode import EbpfMode, ProxySettings
    from lbctl.datapath.kubeproxy import iptables_mode, nftables_mode, proxier

    if name == "ebpf":
        if node is None or node.uplink is None:
            return EbpfMode(ebpf_config(spec, links, biggest, node))
        return EbpfMode(ebpf_config(spec, links, biggest, node),
                        settings=ProxySettings(node_ips=(node.ip,), cluster_cidr=CLUSTER_CIDR))
    options = proxier.ProxierOptions(ebpf_pin_dir=node.pin_dir if node else spec.pin_dir)
    settings: dict[str, Any] = dict(node_name=node.name if node else lab.NODE_NAME,
                                    node_ips=(node.ip if node else spec.gateway,),
                                    cluster_cidr=CLUSTER_CIDR)
    if name == "iptables":
        return iptables_mode.IptablesMode(
            iptables_mode.config_from(**settings, tcp_be_liberal=True), options, runner)
    if name == "nftables":
        return nftables_mode.NftablesMode(nftables_mode.config_from(**settings), options, runner)
    raise ValueError(f"unknown mode {name!r}")


def remove_mode_objects(name: str, spec: BenchSpec, pin_dir: str | None = None) -> list[str]:
    from lbctl.datapath.base import cleanup_mode

    return cleanup_mode(name, pin_dir or spec.pin_dir) if name != "none" else []


def iptables_position(vip: str) -> str:
    """Where the rule for ``vip`` sits in nat KUBE-SERVICES, as the kernel holds it."""
    from lbctl.datapath.kubeproxy.iptables_mode import parse_save

    saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    chain = [r for r in parse_save(saved).get("nat", {}).get("rules", [])
             if r.split()[1] == "KUBE-SERVICES"]
    for i, rule in enumerate(chain, 1):
        if f"-d {vip}/32" in rule:
            return f"rule {i:,} of {len(chain):,} in nat KUBE-SERVICES"
    return f"not found in nat KUBE-SERVICES ({len(chain):,} rules)"


# --- what the node must not have, and must not be left with ------------------------------------


def foreign_proxy_objects() -> list[str]:
    """kube-proxy objects someone else has on this node (the bench would replace them)."""
    found = []
    for save in ("iptables-save", "ip6tables-save"):
        saved = subprocess.run([save], capture_output=True, text=True).stdout
        chains = {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":")}
        found += [f"{save[:-5]} chain {c}" for c in sorted(chains) if c.startswith("KUBE-")][:3]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [t.strip() for t in tables.splitlines()
              if t.strip() in ("table ip kube-proxy", "table ip6 kube-proxy")]
    return found


def bpf_filters(links: Sequence[str]) -> list[tuple[str, str]]:
    """(link, filter name) of every BPF tc filter at clsact ingress or egress of ``links``."""
    from pyroute2 import IPRoute

    found = []
    with IPRoute() as ipr:
        for link in links:
            indexes = ipr.link_lookup(ifname=link)
            for parent in (ebpf.TC_INGRESS, ebpf.TC_EGRESS) if indexes else ():
                try:
                    filters = list(ipr.get_filters(indexes[0], parent=parent))
                except Exception:
                    continue
                for f in filters:
                    opts = f.get_attr("TCA_OPTIONS")
                    if f.get_attr("TCA_KIND") == "bpf" and opts is not None and hasattr(opts, "get_attr"):
                        found.append((link, opts.get_attr("TCA_BPF_NAME") or "?"))
    return found


def foreign_filters(links: Sequence[str], ours: str | None) -> list[str]:
    """BPF filters on the lab's links other than ours (named ``ours``): another agent attaching
    to every veth would load-balance the bench's traffic in every mode."""
    return sorted({f"{name} on {link}" for link, name in bpf_filters(links) if name != ours})


def forget_conntrack(spec: BenchSpec, state: lab.LabState | None = None) -> None:
    """Deletes the node's conntrack entries of the lab's pods, before each measurement.

    Entries of an earlier measurement live on (TIME_WAIT: 120 s) and would make this one's
    connections clash: a flow DNATed to a backend by iptables or nftables has the reply tuple
    of a direct connection to that backend from the same client port ("none", ebpf, which
    netfilter sees already translated), and netfilter drops the SYN of such a clash; the client
    retransmits it a second later. Only entries from the lab's pod CIDR are touched (on a
    multi-node lab: on every node, from the clients' pod CIDR and from the lab network, where
    the outside client and the nodes' masqueraded connections come from).
    """
    if spec.nodes == 1 or state is None:
        subprocess.run(["conntrack", "-D", "-s", spec.pod_cidr], capture_output=True, text=True)
        return
    for node in state.node_list():
        for source in (spec.pod_cidr, str(state.spec.lab_network())):
            subprocess.run([*node.enter(), "conntrack", "-D", "-s", source], capture_output=True, text=True)


def forget_time_wait(state: lab.LabState, spec: BenchSpec) -> None:
    """Closes the backends' TIME_WAIT sockets (``ss -K``, in the backend pods only), before each
    round of the NodePort case. Every connection from outside reaches the backends masqueraded
    to node 0's one address, so the TIME_WAIT sockets of the earlier rounds and modes (60 s)
    hold ever more of that address's ports: measured, successive rounds slowed down (9,100,
    7,200, 6,000 conn/s) and later modes met SYN retransmits (1 s) on a reused port. A real
    node's backends meet the same, but it would make each mode pay for the ones before it."""
    for pod in spec.backend_pods:
        subprocess.run([*netns.enter_argv(state.pods[pod].ns), "ss", "-K", "-t", "state", "time-wait"],
                       capture_output=True, text=True)


def leftovers(spec: BenchSpec) -> list[str]:
    """What the bench could have left on the node: empty when the node is as before."""
    from pyroute2 import IPRoute

    left = [f"netns {n}" for n in netns.list_netns() if n.startswith(f"{spec.prefix}-")]
    left += [f"link {p.name}" for p in Path("/sys/class/net").iterdir()
             if p.name.startswith(f"veth{spec.prefix}") and p.name[len(f"veth{spec.prefix}"):].isdigit()]
    tc_name = ebpf.DatapathConfig(pin_dir=spec.pin_dir).tc_name
    with IPRoute() as ipr:
        left += [f"tc filter {tc_name} on {name}" for _, name in ebpf.attached_links(ipr, tc_name)]
    for pin_dir in dict.fromkeys([spec.pin_dir, *(spec.node_pin_dir(i) for i in range(spec.nodes))]):
        if os.path.exists(pin_dir):
            left.append(f"pin dir {pin_dir}")
    if lab.state_path(spec.prefix).exists():
        left.append(f"lab state {lab.state_path(spec.prefix)}")
    return left + foreign_proxy_objects()


def preflight(modes: Sequence[str], spec: BenchSpec) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        hint = " (the ipvs mode is not benched: this kernel has no IPVS)" if "ipvs" in unknown else ""
        raise BenchError(f"unknown mode(s) {', '.join(unknown)}{hint}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise BenchError(f"--modes {','.join(modes)}: each mode once")
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, tc, iptables, nft)")
    needs = {"iptables": ["iptables-restore", "iptables-save"], "nftables": ["nft"]}
    missing = sorted({tool for m in modes for tool in needs.get(m, []) + ["conntrack"]
                      if not shutil.which(tool)})
    if missing:
        raise BenchError(f"{', '.join(missing)} not installed (`make setup` installs them)")
    theirs = foreign_proxy_objects()
    if theirs:
        raise BenchError(f"this node already has kube-proxy objects ({', '.join(theirs)}): another "
                         f"proxy (or `lbctl run --mode iptables|nftables`, or an interrupted bench) "
                         f"is programming it, and the bench would remove them. Stop it, or remove "
                         f"them with `lbctl cleanup --keep-labs`, then run the bench again")


# --- the client (runs inside the client pod) ----------------------------------------------------


def timed_request(target: tuple[str, int], timeout: float):
    """One new TCP connection (the lab client's): (Outcome, microseconds until its answer)."""
    started = time.perf_counter_ns()
    outcome = tcp_request(target, timeout)
    return outcome, (0.0 if outcome.error else (time.perf_counter_ns() - started) / 1000)


def client_worker(index: int, workers: int, targets: list[tuple[str, int]], count: int,
                  max_seconds: float, timeout: float, barrier) -> dict:
    """Requests index, index+workers, ... of ``count``; request i goes to targets[i % len]."""
    for i in range(WARMUP_PER_WORKER):
        timed_request(targets[(index + i) % len(targets)], timeout)
    barrier.wait(timeout=60 + WARMUP_PER_WORKER * timeout)
    started = time.monotonic()
    deadline = started + max_seconds
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for i in range(index, count, workers):
        if time.monotonic() >= deadline:
            break
        outcome, took = timed_request(targets[i % len(targets)], timeout)
        if outcome.error:
            errors[outcome.error if outcome.error != "other" else f"other:{outcome.detail}"] += 1
        else:
            answers[outcome.pod or "?"] += 1
            latencies.append(round(took, 1))
    return {"started": started, "ended": time.monotonic(), "answers": answers, "errors": errors,
            "latencies": latencies}


def _worker_main(queue, barrier, index: int, workers: int, targets: list[tuple[str, int]], count: int,
                 max_seconds: float, timeout: float) -> None:
    """A worker process: always reports, so the parent never waits for a dead one."""
    try:
        queue.put(client_worker(index, workers, targets, count, max_seconds, timeout, barrier))
    except BaseException as exc:
        now = time.monotonic()
        queue.put({"started": now, "ended": now, "answers": {}, "latencies": [],
                   "errors": {f"other:worker {type(exc).__name__}": 1}})


def run_client(targets: list[tuple[str, int]], count: int, max_seconds: float, workers: int,
               timeout: float) -> dict:
    """``workers`` processes (a process each, so the GIL does not serialise them), started
    together after a few warm-up connections each; their results merged."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(queue, barrier, w, workers, targets, count, max_seconds, timeout))
             for w in range(workers)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for part in parts:
        answers.update(part["answers"])
        errors.update(part["errors"])
        latencies += part["latencies"]
    elapsed = max(p["ended"] for p in parts) - min(p["started"] for p in parts)
    return {"answers": dict(sorted(answers.items())), "errors": dict(errors),
            "latencies_us": latencies, "elapsed": elapsed}


def client_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbctl.bench.modes client")
    parser.add_argument("--targets", required=True, help="IP:PORT[,IP:PORT...], used round robin")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="measure this many times in a row")
    args = parser.parse_args(argv)
    targets = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in args.targets.split(",")]
    print(json.dumps([run_client(targets, args.count, args.max_seconds, args.workers, args.timeout)
                      for _ in range(args.rounds)]))
    return 0


def client_in(state: lab.LabState, spec: BenchSpec, client: str, targets: list[str],
              ns: str | None = None) -> list[dict]:
    """Runs the client in pod ``client`` (or in namespace ``ns``): one report per round."""
    argv = netns.python_argv("lbctl.bench.modes", "client", "--targets", ",".join(targets),
                             "--count", str(spec.connections), "--max-seconds", str(spec.max_seconds),
                             "--workers", str(spec.workers), "--timeout", str(spec.timeout),
                             "--rounds", str(spec.rounds))
    round_limit = spec.max_seconds + (WARMUP_PER_WORKER + 1) * spec.timeout
    proc = netns.run_in(ns or state.pods[client].ns, argv, env=netns.python_env(),
                        timeout=spec.rounds * round_limit + 60)
    return json.loads(proc.stdout)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


# --- one measurement ---------------------------------------------------------------------------


def measure(name: str, ports: Sequence[ServicePortInfo], state: lab.LabState, spec: BenchSpec,
            biggest: int, position: int, progress: Progress, verbose: bool = False) -> list[ModeResult]:
    """Start mode ``name`` (on every node), sync ``ports``, run the client, stop and clean the
    mode. One result, ClusterIP from a client pod; on a multi-node lab and for a load balancer,
    a second one: NodePort from the outside client to node 0, the backends on node 1."""
    n = len(ports)
    tag = f"[{n:,} services] {name}"
    result = ModeResult(mode=name, services=n, real_service_position=position)
    results = [result]
    if spec.nodes > 1 and name != "none":
        results.append(ModeResult(mode=name, services=n, real_service_position=position, case=NODE_PORT_CASE))
    nodes = bench_nodes(state, spec)
    running: list[tuple[BenchNode, Any]] = []
    try:
        if name == "none":
            targets = [f"{ip}:{TARGET_PORT}" for ip in state.backend_ips("default/web")]
        else:
            parts = []
            for node in nodes:
                runner = TimingRunner(spec.sync_timeout) if name != "ebpf" else None
                mode = make_mode(name, spec, node.links, biggest, runner, node)
                running.append((node, mode))
                part = ModeResult(mode=name, services=n, real_service_position=position)
                expected = [*node.links, *([node.uplink] if node.uplink and name == "ebpf" else [])]
                part.start_seconds = netns.in_netns(node.ns, start_mode, mode, expected, progress, verbose)
                netns.in_netns(node.ns, sync_mode, mode, ports, runner, part)
                parts.append(part)
            slowest = max(parts, key=lambda p: p.sync_seconds or 0.0)   # nodes sync side by side
            result.start_seconds = max(p.start_seconds or 0.0 for p in parts)
            result.sync_seconds, result.sync_commands = slowest.sync_seconds, slowest.sync_commands
            result.sync_command_seconds = slowest.sync_command_seconds
            result.kernel_position = (netns.in_netns(nodes[0].ns, iptables_position, spec.real_vip)
                                      if name == "iptables" else
                                      "an element of the service-ips verdict map" if name == "nftables"
                                      else "a key of the lb4_services hash map")
            split = ""
            if name != "ebpf":
                slowest_cmds = ", ".join(f"{cmd} {secs:.2f} s" for cmd, secs in
                                         sorted(result.sync_commands.items(), key=lambda kv: -kv[1])[:2])
                in_python = (result.sync_seconds or 0.0) - (result.sync_command_seconds or 0.0)
                split = f" ({slowest_cmds}; {in_python:.2f} s in Python)"
            where = f" on each of {len(nodes)} nodes" if len(nodes) > 1 else ""
            if name == "ebpf" and nodes[0].uplink:
                served = {up: how for up, how in running[0][1].uplinks.values()}
                for r in results:
                    r.uplink_mode = served.get(nodes[0].uplink, "not attached")
                where += f" (node 0's {nodes[0].uplink}: {result.uplink_mode})"
            progress(f"{tag}: started in {result.start_seconds:.2f} s, synced {n:,} services{where} in "
                     f"{result.sync_seconds:.2f} s{split}")
            targets = [f"{spec.real_vip}:{SERVICE_PORT}"]
        for index, node in enumerate(nodes):
            ours = running[index][1].cfg.tc_name if name == "ebpf" else None
            foreign = netns.in_netns(node.ns, foreign_filters, node.links, ours)
            if foreign:
                raise BenchError(f"BPF tc filters not ours on the lab's links ({', '.join(foreign)}): "
                                 f"another agent is load-balancing them; stop it (or run it with "
                                 f"--devices that exclude veth{spec.prefix}*)")
        forget_conntrack(spec, state)
        fill(result, client_in(state, spec, client_pod(name), targets), spec)
        report_progress(tag, result, progress)
        if len(results) > 1:
            outside, rounds = results[1], []
            for _ in range(spec.rounds):   # each round from no TIME_WAIT on the backends
                forget_time_wait(state, spec)
                forget_conntrack(spec, state)
                rounds += client_in(state, dataclasses.replace(spec, rounds=1), client_pod(name),
                                    [f"{nodes[0].ip}:{NODE_PORT}"], ns=state.outside_ns)
            fill(outside, rounds, spec)
            report_progress(f"{tag} NodePort from outside", outside, progress)
    except (BenchError, ebpf.DatapathError, netns.NetnsError, subprocess.SubprocessError,
            ValueError, OSError) as exc:
        for r in results:
            if r.failure is None and r.connections == 0:
                r.failure = f"{type(exc).__name__}: {exc}"
        progress(f"{tag}: FAILED: {type(exc).__name__}: {exc}")
    finally:
        started = time.monotonic()
        for node, mode in running:
            try:
                netns.in_netns(node.ns, mode.stop, True)
            finally:
                netns.in_netns(node.ns, remove_mode_objects, name, spec, node.pin_dir)
        if running:
            result.stop_seconds = time.monotonic() - started
            if result.stop_seconds > 1:
                progress(f"{tag}: stopped and removed its objects in {result.stop_seconds:.2f} s")
    return results


def report_progress(tag: str, result: ModeResult, progress: Progress) -> None:
    progress(f"{tag}: {result.connections:,} connections in {result.elapsed_seconds:.2f} s: "
             f"{result.conn_per_second:,.0f} conn/s (median of "
             f"{', '.join(f'{c:,.0f}' for c in result.rounds_conn_per_second)}), "
             f"p50 {result.p50_us:,.0f} us, "
             f"p99 {result.p99_us:,.0f} us, answers {result.answers}"
             + (f", errors {result.errors}" if result.errors else "")
             + (f", {result.stalled} stalled (>= {STALLED_US // 1000} ms)" if result.stalled else "")
             + (f" -- {result.failure}" if result.failure else ""))


def start_mode(mode, links: Sequence[str], progress: Progress, verbose: bool) -> float:
    """Starts ``mode`` as `lbctl run` does; the seconds it took.

    eBPF: compile and load (bcc), attach to the lab's links, then an empty first sync, which is
    where EbpfMode removes the other modes' objects (the kube-proxy modes do it in start()), so
    that the timed sync is only the programming of the services.
    """
    started = time.monotonic()
    if mode.name != "ebpf":
        mode.start()
        return time.monotonic() - started
    with captured_stderr() as said:
        mode.start()
    if said() and verbose:
        sys.stderr.write(said())
    elif said():
        progress(f"  (the BPF compiler printed {len(said().splitlines())} line(s) of warnings; "
                 f"-v shows them)")
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        mode.attach_links(ipr)
    if sorted(mode.attached.values()) != sorted(links):
        raise BenchError(f"attached to {sorted(mode.attached.values())}, not to every lab link "
                         f"{sorted(links)}")
    empty = mode.sync([])
    if empty.errors:
        raise BenchError(f"first (empty) sync failed: {'; '.join(empty.errors)}")
    return time.monotonic() - started


def sync_mode(mode, ports: Sequence[ServicePortInfo], runner: TimingRunner | None,
              result: ModeResult) -> None:
    """One sync of every service, timed; for the kube-proxy modes, time in commands too."""
    before = dict(runner.by_command) if runner else {}
    started = time.monotonic()
    sync = mode.sync(ports)
    result.sync_seconds = time.monotonic() - started
    if runner:
        result.sync_commands = {cmd: round(secs - before.get(cmd, 0.0), 3)
                                for cmd, secs in runner.by_command.items()
                                if secs - before.get(cmd, 0.0) > 0}
        result.sync_command_seconds = sum(result.sync_commands.values())
    if sync.errors or getattr(mode, "needs_retry", False):
        raise BenchError(f"sync failed after {result.sync_seconds:.1f} s: "
                         f"{'; '.join(sync.errors) or 'needs a retry'}")


@contextlib.contextmanager
def captured_stderr():
    """Collects what this process (and C libraries in it: bcc's clang) writes to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read())


def fill(result: ModeResult, rounds: list[dict], spec: BenchSpec) -> None:
    """Conn/s: the median round; latency percentiles: over every connection of every round."""
    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for r in rounds:
        answers.update(r["answers"])
        errors.update(r["errors"])
        latencies += r["latencies_us"]
        answered = sum(r["answers"].values())
        result.rounds_conn_per_second.append(round(answered / r["elapsed"], 1) if r["elapsed"] > 0 else 0.0)
    latencies.sort()
    result.answers = dict(sorted(answers.items()))
    result.errors = {k: v for k, v in errors.items() if v}
    result.connections = sum(answers.values())
    result.elapsed_seconds = sum(r["elapsed"] for r in rounds)
    result.conn_per_second = statistics.median(result.rounds_conn_per_second)
    result.p50_us = statistics.median(latencies) if latencies else 0.0
    result.p99_us = percentile(latencies, 0.99)
    result.stalled = sum(1 for us in latencies if us >= STALLED_US)
    silent = [pod for pod in spec.backend_pods if not result.answers.get(pod)]
    if silent:
        result.failure = f"backend(s) {', '.join(silent)} never answered"
    elif result.connections == 0:
        result.failure = "no connection answered"


# --- the whole run -----------------------------------------------------------------------------


@dataclass
class BenchReport:
    modes: list[str]
    counts: list[int]
    spec: dict
    results: list[ModeResult]
    elapsed_seconds: float = 0.0
    left_behind: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.left_behind and not any(r.failure for r in self.results)


def run_bench_modes(modes: Sequence[str], counts: Sequence[int], spec: BenchSpec = BenchSpec(),
                    progress: Progress = print, verbose: bool = False) -> BenchReport:
    started = time.monotonic()
    modes, counts = list(modes), list(counts)
    if not modes or not counts or min(counts) < 1:
        raise BenchError("give at least one mode and service counts >= 1")
    preflight(modes, spec)
    biggest = max(counts)
    synthetic = synthetic_ports(biggest - 1)     # built once; a prefix of it per count
    remove_leftovers(modes, spec)                # our own pins from an interrupted run
    if spec.nodes == 1:
        progress(f"lab {spec.prefix!r}: {len(modes)} client pods and {spec.backends} backends in "
                 f"{spec.pod_cidr}, "
                 f"default/web on {spec.real_vip}:{SERVICE_PORT}")
    else:
        progress(f"lab {spec.prefix!r}: {spec.nodes} nodes; {len(modes)} client pods on node 0 "
                 f"({spec.pod_cidr}), {spec.backends} backends on node 1; default/web on "
                 f"{spec.real_vip}:{SERVICE_PORT} and NodePort {NODE_PORT} (from the outside client "
                 f"to node 0); each mode runs on every node")
    results: list[ModeResult] = []
    state = lab.lab_up(spec.lab_spec(modes))
    try:
        real = real_ports(state)
        warm_up(state, spec, progress)
        for n in counts:
            ports = synthetic[:n - 1] + real
            position = render_position(ports, "default/web")
            progress(f"[{n:,} services] default/web is service port {position:,} of {len(ports):,} "
                     f"in the renderers' order" + (" (last)" if position == len(ports) else ""))
            row = [r for name in modes
                   for r in measure(name, ports, state, spec, biggest, position, progress, verbose)]
            base = next((r for r in row if r.mode == "none" and not r.failure), None)
            for r in row:
                if base is not None and base.conn_per_second > 0 and not r.failure \
                        and r.case == CLUSTER_IP_CASE:
                    r.ratio_to_none = r.conn_per_second / base.conn_per_second
            results += row
    finally:
        lab.lab_down(spec.prefix)
        remove_leftovers(modes, spec)
        forget_conntrack(spec)
    report = BenchReport(modes=modes, counts=counts, spec=asdict(spec), results=results,
                         left_behind=leftovers(spec))
    report.elapsed_seconds = time.monotonic() - started
    return report


def remove_leftovers(modes: Sequence[str], spec: BenchSpec) -> None:
    """One node: every mode's objects on this node, as before. Several: only the nodes' pins
    (their namespaces, and the rules in them, go with the lab); nothing of the root namespace."""
    if spec.nodes == 1:
        for name in modes:
            remove_mode_objects(name, spec)
        return
    if "ebpf" in modes:
        for index in range(spec.nodes):
            remove_mode_objects("ebpf", spec, spec.node_pin_dir(index))


def warm_up(state: lab.LabState, spec: BenchSpec, progress: Progress) -> None:
    """One unreported round of "none" after the lab comes up: the first measurement was
    consistently the slowest (new namespaces, servers that had not yet answered a burst), which
    would skew the first baseline. Only the "none" client: a mode's client that had talked to
    the pod IPs directly would meet PAWS in the backends' TIME_WAIT (module docstring)."""
    short = dataclasses.replace(spec, connections=min(spec.connections, 2000), rounds=1)
    targets = [f"{ip}:{TARGET_PORT}" for ip in state.backend_ips("default/web")]
    started = time.monotonic()
    client_in(state, short, client_pod("none"), targets)
    forget_conntrack(spec, state)
    progress(f"warm-up: {short.connections:,} connections straight to the backends in "
             f"{time.monotonic() - started:.1f} s (not reported)")


# --- output --------------------------------------------------------------------------------------


HEADER = (f"{'MODE':<9} {'SYNC s':>7} {'CONN/S':>8} {'VS NONE':>8} {'P50 us':>8} {'P99 us':>8}  "
          f"ANSWERS")


def format_row(r: ModeResult) -> str:
    sync = f"{r.sync_seconds:.2f}" if r.sync_seconds is not None else "-"
    ratio = f"{r.ratio_to_none:.2f}" if r.ratio_to_none is not None else "-"
    answers = "/".join(str(v) for _, v in sorted(r.answers.items())) or "-"
    tail = ""
    if r.stalled:
        tail += f"  {r.stalled} took >= {STALLED_US // 1000} ms"
    if r.errors:
        tail += f"  errors {r.errors}"
    if r.failure:
        tail += f"  FAILED: {r.failure}"
    return (f"{r.mode:<9} {sync:>7} {r.conn_per_second:>8,.0f} {ratio:>8} {r.p50_us:>8,.0f} "
            f"{r.p99_us:>8,.0f}  {answers}{tail}")


def format_report(report: BenchReport) -> str:
    spec = report.spec
    lines = []
    for n in report.counts:
        row = [r for r in report.results if r.services == n and r.case == CLUSTER_IP_CASE]
        outside = [r for r in report.results if r.services == n and r.case == NODE_PORT_CASE]
        position = row[0].real_service_position if row else 0
        lines.append("")
        lines.append(f"{n:,} services: default/web ({spec['backends']} backends) is service port "
                     f"{position:,} of {n:,} in KUBE-SERVICES order")
        lines.append(HEADER)
        lines += [format_row(r) for r in row]
        kernel = next((r.kernel_position for r in row if r.mode == "iptables" and r.kernel_position), None)
        if kernel:
            lines.append(f"  iptables: default/web's cluster IP is {kernel}")
        if outside:
            lines.append(f"NodePort {NODE_PORT} from the outside client to node 0, every backend on "
                         f"node 1 (forwarded over the lab network, masqueraded to node 0):")
            lines.append(HEADER)
            lines += [format_row(r) for r in outside]
    lines.append("")
    if spec.get("nodes", 1) > 1:
        lines.append(f"{spec['nodes']} nodes: client pods on node 0, backends on node 1, each mode "
                     f"on every node (SYNC s: the slowest node's); VS NONE only for the ClusterIP rows")
    lines.append(f"per row: {spec['rounds']} rounds of {spec['connections']:,} connections (or "
                 f"{spec['max_seconds']:.0f} s) on {spec['workers']} client processes; CONN/S is "
                 f"the median round, VS NONE its ratio to the no-load-balancer baseline of the "
                 f"same run; P50/P99: connect to first reply, over all rounds; ANSWERS per backend pod")
    lines.append(f"total {report.elapsed_seconds:.0f} s; left behind: "
                 f"{', '.join(report.left_behind) or 'nothing'}")
    return "\n".join(lines)


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = "none" in report.modes
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(report.modes):
        points = [(r.services, r.ratio_to_none if relative else r.conn_per_second)
                  for r in report.results if r.mode == name and not r.failure and r.case == CLUSTER_IP_CASE]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        style: dict[str, Any] = dict(linestyle="--", color="grey") if name == "none" else dict(marker="o")
        ax.plot(xs, ys, label=name, **style)
        for x, y in points:
            if name != "none":
                ax.annotate(f"{y:.2f}" if relative else f"{y:,.0f}", (x, y), fontsize=7,
                            textcoords="offset points", ha="center",
                            xytext=(0, 5 if index % 2 else -11))   # neighbours above and below
    ax.set_xscale("log")
    ax.set_xticks(report.counts)
    ax.set_xticklabels([f"{n:,}" for n in report.counts])
    ax.set_xlabel("services programmed (the measured one last in KUBE-SERVICES)")
    ax.set_ylabel("new TCP connections/s relative to no load balancer" if relative
                  else "new TCP connections/s")
    if relative:
        ax.set_ylim(bottom=0)
    ax.set_title("lbctl bench --modes: connection rate through each datapath", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(c.replace("_", "")) for c in text.split(",") if c.strip()]
    except ValueError:
        raise BenchError(f"--services {text!r}: expected comma-separated numbers, e.g. "
                         f"{DEFAULT_COUNTS}") from None
    if not counts or min(counts) < 1:
        raise BenchError(f"--services {text!r}: every count must be at least 1")
    return counts


def cmd_bench_modes(args) -> int:
    """`lbctl bench --modes ...` (options in lbctl.cli.main)."""
    import logging

    out = sys.stderr if args.json else sys.stdout
    progress = lambda msg: print(msg, file=out, flush=True)
    if not getattr(args, "verbose", False):
        # The modes log every start, attach and sync at INFO: the progress lines say it shorter.
        for name in ("lbctl.mode", "lbctl.datapath.kubeproxy", "lbctl.ipvs", "lbctl.datapath.ebpf.reconcile", "lbctl.datapath.ebpf.loader"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        counts = parse_counts(args.services or DEFAULT_COUNTS)
        spec = BenchSpec(connections=args.connections, max_seconds=args.seconds,
                         workers=args.workers, rounds=args.rounds, sync_timeout=args.sync_timeout,
                         nodes=getattr(args, "nodes", 1))
        if not 1 <= spec.nodes <= 16:
            raise BenchError(f"--nodes {spec.nodes}: 1 to 16")
        if min(spec.connections, spec.workers, spec.rounds) < 1 or spec.max_seconds <= 0:
            raise BenchError("--connections, --workers, --rounds and --seconds must be positive")
        progress(f"lbctl bench --modes {','.join(modes)}: new TCP connections to one ClusterIP "
                 f"among {', '.join(f'{n:,}' for n in counts)} services, each datapath in turn")
        report = run_bench_modes(modes, counts, spec, progress, getattr(args, "verbose", False))
    except (BenchError, lab.LabError) as exc:
        print(f"lbctl bench: {exc}", file=sys.stderr)
        return 1
    if args.plot:
        plot(report, Path(args.plot))
    if args.json:
        print(json.dumps(asdict(report) | {"ok": report.ok, "plot": args.plot}, indent=2))
    else:
        print(format_report(report))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        sys.exit(client_main(sys.argv[2:]))
    print("usage: python -m lbctl.bench.modes client --targets IP:PORT[,...] --count N", file=sys.stderr)
    sys.exit(2)
