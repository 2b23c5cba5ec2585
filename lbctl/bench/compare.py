"""`lbctl bench --compare` (`make bench`): lbctl's eBPF datapath against the real kube-proxy.

One run, one lab, one API server: every mode is driven by the same Services and EndpointSlices,
measured with the same tools, in turn, so that machine noise hits them alike and the ratios
between them are what to read (absolute numbers move from run to run on a small machine).

The lab (``lbctl.lab.cluster``, prefix "lbcmp", two nodes, a real control plane from
``make k8s-bins``):

    node 0 (lab-node)     the proxy under test, one client pod per mode, the probe pod
    node 1 (lab-node-1)   the backends web-0 .. web-9: nginx from Debian on port 80 (and the
                          lab's own server on 8080, which the probe asks who answered)

so every connection is forwarded across the lab network by node 0, as on a kind cluster. The
proxy under test runs in node 0's namespace; it reaches the API server through the lab's relay
(``lbctl.lab.relay``: the control plane listens on the root namespace's loopback). Modes:

    direct               no proxy and no proxy rules at all: the client connects to the pod IPs
                         (round robin). Measured between every two other modes, so it is the
                         baseline of each and the proof that the load generator has headroom.
    ebpf                 `lbctl run --source kubernetes --mode ebpf` (tc on the pod links, XDP
                         and tc on eth0)
    kube-proxy-iptables  the real kube-proxy binary, --proxy-mode iptables (``lbctl.lab.kubeproxy``)
    kube-proxy-nftables  the real kube-proxy binary, --proxy-mode nftables
    iptables, nftables   lbctl's own renderings of kube-proxy's rules (`lbctl run --mode ...`)

The services, through the API server, for each number N in --services (increasing; objects are
only added): ``default/nginx`` (selector: the 10 web pods, port 80) and N-1 selector-less
``bench/svc-NNNNNN`` with one EndpointSlice each listing the same 10 pods: every service is a
real one that answers, 10 endpoints each, so the target can be the service whose rule kube-
proxy's iptables mode walks last. kube-proxy writes KUBE-SERVICES in Go map order (random per
sync): the target is read back from node 0's ``iptables-save`` after the sync, and its position
is reported. eBPF and nftables look services up in hash maps, where the position means nothing.

Per N and mode, the proxy is started on an empty node, and then:

    program   start -> the target answers through its ClusterIP (wall time, includes the proxy's
              start and list), and the proxy's own first-sync duration from its metrics
              (kubeproxy_sync_proxy_rules_duration_seconds, which lbctl exports too)
    settle    until the proxy's own CPU time stops growing (a sync still running would be
              measured as datapath cost)
    fixed     --runs runs at --rate new connections/s for --duration s (tools/connload, an
              open-loop C client, HTTP GET with Connection: close against nginx): the machine's
              system+softirq+irq CPU time from /proc/stat over the run, minus the system time
              of every user-space process but the load's client and servers (the control plane,
              the proxy, anything else running: others_system_ticks), per answered
              connection; connect and request latency p50/p99 of every connection
    max       the closed-loop rate (--concurrency connections in flight) for --duration s
    memory    the proxy's RSS and its memory cgroup's kernel memory (cgroup v1 memory
              controller: the proxy and every iptables-restore/nft it runs are in it, and
              nftables objects and BPF maps are charged to the cgroup that made them)
    changes   --changes endpoint changes through the API server (a web pod's Ready condition
              flipped, as a kubelet's probe does): the time until a probe in a pod on node 0
              sees the traffic move, and kubeproxy_network_programming_duration_seconds from
              the proxy's /metrics (lbctl's has the same name and definition)

then the proxy is stopped and everything it programmed removed (kube-proxy --cleanup, lbctl
cleanup) and checked gone before the next mode starts. Before every measured run node 0's
conntrack table is flushed; each mode has its own client pod (TIME_WAIT and TCP timestamps:
see lbctl.bench.modes).

Written to --out-dir (docs/benchmarks/ for `make bench`): compare.json (every raw sample,
machine, tool versions), compare.md (tables, targets met or missed), and PNG plots.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import ipaddress
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbctl.bench import k8s_latency as k8s
from lbctl.lab import cluster as lab
from lbctl.lab import netns

MODES = ("direct", "ebpf", "kube-proxy-iptables", "kube-proxy-nftables", "iptables", "nftables")
KUBE_PROXY_MODES = {"kube-proxy-iptables": "iptables", "kube-proxy-nftables": "nftables",
                    "kube-proxy-ipvs": "ipvs"}
LBCTL_MODES = ("ebpf", "iptables", "nftables")
SHORT = {"direct": "dir", "ebpf": "ebpf", "kube-proxy-iptables": "kpipt",
         "kube-proxy-nftables": "kpnft", "iptables": "ipt", "nftables": "nft"}
DEFAULT_COUNTS = "1,1000,10000"
ENDPOINTS = 10
NGINX_PORT = 80
LAB_SERVER_PORT = 8080
SYNTHETIC_NAMESPACE = "bench"
SYNTHETIC_BASE = ipaddress.IPv4Address("10.100.16.0")     # + i
SYNTHETIC_LIMIT = 65536 - 16 * 256 - 2
NGINX_VIP = "10.100.0.11"
WEB_VIP = "10.100.0.10"                                  # the lab server's: the probe's target
MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_CPU_SECONDS = 0.02        # proxy CPU per second below which it counts as idle
SETTLE_TIMEOUT = 60.0
METRIC_SYNC = "kubeproxy_sync_proxy_rules_duration_seconds"
METRIC_PROGRAMMING = k8s.METRIC

Progress = Callable[[str], None]


class CompareError(RuntimeError):
    """The benchmark cannot run or a proxy failed; the message says what and where to look."""


# --- what to run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareSpec:
    counts: tuple[int, ...] = (1, 1000, 10000)
    modes: tuple[str, ...] = MODES
    endpoints: int = ENDPOINTS
    runs: int = 3                    # fixed-rate and max-rate runs per mode and N
    rate: float = 1000.0             # offered new connections/s of the fixed-rate runs
    duration: float = 4.0            # seconds per run
    concurrency: int = 16            # connections in flight in the max-rate runs
    changes: int = 5                 # endpoint changes per mode and N
    program_timeout: float = 900.0   # seconds a proxy may take to program N services
    prefix: str = "lbcmp"
    pod_cidr: str = "10.244.240.0/24"
    gateway: str = "10.244.240.1"
    service_cidr: str = "10.100.0.0/16"
    writers: int = 16                # API clients creating the synthetic objects
    mode_max: tuple[tuple[str, int], ...] = ()   # (mode, most services it is run at)

    def skipped(self, mode: str, n: int) -> int | None:
        """The mode's --mode-max when n is above it."""
        cap = dict(self.mode_max).get(mode)
        return cap if cap is not None and n > cap else None

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(f"web-{i}" for i in range(self.endpoints))

    def client(self, mode: str) -> str:
        return f"client-{SHORT.get(mode, mode)}"

    def lab_spec(self) -> lab.LabSpec:
        web = lab.ServiceSpec("default", "web", WEB_VIP,
                              (lab.PortSpec("http", 80, "TCP", LAB_SERVER_PORT),), self.backends)
        clients = tuple(self.client(m) for m in self.modes) + ("client-probe",)
        return lab.LabSpec(prefix=self.prefix, pod_cidr=self.pod_cidr, gateway=self.gateway,
                           service_cidr=self.service_cidr, clients=clients, services=(web,),
                           server_max_seconds=7200.0, kubernetes=True, nodes=2,
                           placement=tuple((c, 0) for c in clients)
                           + tuple((b, 1) for b in self.backends))

    def validate(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise CompareError(f"--modes {','.join(unknown)}: not a mode (choose from {', '.join(MODES)})")
        if max(self.counts) - 1 > SYNTHETIC_LIMIT:
            raise CompareError(f"--services {max(self.counts):,}: at most {SYNTHETIC_LIMIT + 1:,} "
                               f"fit in {self.service_cidr}")
        capped = [m for m, _ in self.mode_max if m not in self.modes]
        if capped:
            raise CompareError(f"--mode-max {','.join(capped)}: not among --modes")
        if not 1 <= self.endpoints <= 60:
            raise CompareError(f"--endpoints {self.endpoints}: 1 to 60 (one nginx pod each)")


# --- the numbers ------------------------------------------------------------------------------


@dataclass
class Run:
    """One load run: what the client reported and what the CPUs did meanwhile."""

    kind: str                        # "fixed" | "max"
    offered_rate: float
    achieved_rate: float
    connections: int
    errors: dict[str, int]
    elapsed_s: float
    connect_us: dict[str, float]
    request_us: dict[str, float]
    cpu_ticks: dict[str, int]        # /proc/stat deltas (user, system, softirq, irq, idle, ...)
    background_system_ticks: int     # system time of every other process (others_system_ticks)
    proxy_cpu_s: float               # the proxy's own CPU time during the run
    cpu_us_per_conn: float | None    # (system+softirq+irq - background) per answered connection
    user_us_per_conn: float | None
    samples: dict[str, list] = field(default_factory=dict)


@dataclass
class ModeRow:
    mode: str
    services: int
    target: str = ""
    target_position: int | None = None      # iptables: the target's rule in KUBE-SERVICES (1-based)
    service_rules: int | None = None        # iptables: service rules in KUBE-SERVICES
    program_seconds: float | None = None    # start -> the target answers
    sync_seconds: float | None = None       # time in syncs until programmed (the proxy's metric)
    sync_count: int = 0                     # how many syncs that was (1: the first, full one)
    settle_seconds: float | None = None
    runs: list[Run] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)
    kernel_objects: dict[str, int] = field(default_factory=dict)  # rules, chains, map entries
    error: str = ""
    skipped: str = ""                       # not run, and why (--mode-max)
    stop_seconds: float | None = None

    def fixed(self) -> list[Run]:
        return [r for r in self.runs if r.kind == "fixed"]

    def max_runs(self) -> list[Run]:
        return [r for r in self.runs if r.kind == "max"]


@dataclass
class Report:
    spec: dict[str, Any]
    machine: dict[str, Any]
    rows: list[ModeRow] = field(default_factory=list)
    created: dict[str, dict[str, float]] = field(default_factory=dict)   # N -> seconds, objects/s
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, mode: str, services: int) -> ModeRow | None:
        found = [r for r in self.rows if r.mode == mode and r.services == services]
        if not found:
            return None
        if mode != "direct":
            return found[0]
        merged = ModeRow(mode="direct", services=services, target=found[0].target)
        for r in found:
            merged.runs += r.runs
        return merged


def median_min_max(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    measured = [v for v in values if v is not None]
    if not measured:
        return None
    return statistics.median(measured), min(measured), max(measured)


# --- machine accounting -----------------------------------------------------------------------


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks() -> dict[str, int]:
    """The machine's CPU time so far from /proc/stat's "cpu" line, in clock ticks."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return dict(zip(CPU_FIELDS, (int(x) for x in parts[1:1 + len(CPU_FIELDS)])))


def stat_fields(pid: int | str) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/<pid>/stat; None when it is gone. The
    fields list starts at stat field 3 (state): field k is fields[k - 3]."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    end = text.rindex(")")
    return text[text.index("(") + 1:end], text[end + 2:].split()


def process_ticks(pid: int) -> tuple[int, int]:
    """(user, system) ticks of pid and its reaped children (0, 0 when it is gone)."""
    stat = stat_fields(pid)
    if stat is None:
        return 0, 0
    fields = stat[1]
    # fields[11..14] = utime stime cutime cstime (stat fields 14..17)
    return int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14])


PF_KTHREAD = 0x00200000
LOAD_COMMS = frozenset({"nginx", "connload"})   # the load's own client and servers


def others_system_ticks(skip: frozenset[str] = LOAD_COMMS) -> int:
    """System ticks (own and reaped children's) of every user-space process but the load's
    client and servers and this one: what /proc/stat's system time holds that is not the
    datapath (the control plane, the proxy and the iptables-restore or nft it runs, whatever
    else the machine does). Kernel threads stay in: softirq work deferred to ksoftirqd and
    kworkers is the datapath's."""
    return sum(ticks for comm, ticks in user_system_ticks().values() if comm not in skip)


def user_system_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (command name, system ticks own and of reaped children) of every user-space
    process but this one."""
    out = {}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        stat = stat_fields(entry.name)
        if stat is None:
            continue
        comm, fields = stat
        # fields[6] = flags (stat field 9); fields[12], fields[14] = stime, cstime (15, 17)
        if int(fields[6]) & PF_KTHREAD:
            continue
        out[int(entry.name)] = (comm, int(fields[12]) + int(fields[14]))
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryCgroup:
    """A cgroup v1 memory controller group for one proxy: what it and its children allocate,
    user and kernel (rules, sets, maps), is charged here."""

    def __init__(self, name: str):
        self.path = MEMCG_ROOT / name
        self.available = (MEMCG_ROOT / "cgroup.procs").exists()

    def __enter__(self) -> MemoryCgroup:
        if self.available:
            self.remove()
            self.path.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def usage(self) -> dict[str, int]:
        if not self.available or not self.path.exists():
            return {}

        def read(name: str) -> int:
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return 0
        stat = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                stat[key] = int(value)
        return {"cgroup_bytes": read("memory.usage_in_bytes"),
                "kernel_bytes": read("memory.kmem.usage_in_bytes"),
                "anon_bytes": stat.get("rss", 0), "cache_bytes": stat.get("cache", 0)}

    def remove(self) -> None:
        if not self.path.exists():
            return
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


# --- the proxies under test ----------------------------------------------------------------------


class Proxy(abc.ABC):
    """A proxy process on node 0: started, asked for its metrics, stopped and cleaned up."""

    mode: str
    proc: subprocess.Popen | None = None
    metrics_url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @abc.abstractmethod
    def start(self) -> None:
        """Start the process (it programs node 0 from the API server)."""

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise CompareError(f"{self.mode}: the proxy exited ({self.proc.returncode}): "
                               f"{lab.log_tail(self.log)} (log {self.log})")

    log: Path = Path("/dev/null")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
            return str(r.read().decode())

    def histogram(self, name: str) -> dict[str, Any]:
        return k8s.parse_histogram(self.metrics(), name)

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop it and remove everything it programmed."""


def in_cgroup(cgroup: Path | None, argv: list[str]) -> list[str]:
    if cgroup is None:
        return argv
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]


class LbctlAgent(Proxy):
    """`lbctl run --source kubernetes --mode M` in node 0's namespace."""

    def __init__(self, mode: str, node: lab.Node, state: lab.LabState, kubeconfig: Path,
                 work_dir: Path, cgroup: Path | None, services: int, endpoints: int):
        from lbctl.lab.kube import free_port

        self.mode, self.node, self.state = mode, node, state
        self.pin_dir = f"{lab.BPFFS}/lbctl-bench-compare"
        port = free_port()
        self.metrics_url = f"http://{node.ip}:{port}/metrics"
        self.log = work_dir / f"lbctl-{mode}.log"
        size = 1 << max(10, (services + 16).bit_length())
        self.argv = [*node.enter(), *netns.python_argv(
            "lbctl.cli.main", "run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
            "--mode", mode, "--node-name", node.name, "--node-ip", node.ip,
            "--cluster-cidr", state.spec.cluster_cidr, "--pin-dir", self.pin_dir,
            "--healthz-bind-address", "", "--metrics-bind-address", f"{node.ip}:{port}")]
        if mode == "ebpf":
            self.argv += ["--devices", f"veth{state.prefix}*", "--uplink-devices", node.uplink,
                          "--detach-on-exit", "--max-services", str(size),
                          "--max-backends", str(1 << max(10, (services * endpoints + 16).bit_length()))]
        self.cgroup = cgroup

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(in_cgroup(self.cgroup, self.argv), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, env=netns.python_env(),
                                         start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run([*self.node.enter(), *netns.python_argv(
            "lbctl.cli.main", "cleanup", "--pin-dir", self.pin_dir, "--keep-labs", "--force")],
            env=netns.python_env(), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class RealKubeProxy(Proxy):
    """The real kube-proxy binary (lbctl.lab.kubeproxy) in node 0's namespace."""

    def __init__(self, mode: str, node: lab.Node, state: lab.LabState, kubeconfig: Path,
                 work_dir: Path, cgroup: Path | None):
        from lbctl.lab import kube
        from lbctl.lab.kubeproxy import KubeProxy

        self.mode = mode
        self.impl = KubeProxy(bin_dir=kube.binaries_dir(), mode=KUBE_PROXY_MODES[mode],
                              ns=node.ns, node_name=node.name, node_ip=node.ip,
                              cluster_cidr=state.spec.cluster_cidr, kubeconfig=kubeconfig,
                              work_dir=work_dir / mode, cgroup=cgroup)
        self.log = self.impl.log

    @property
    def pid(self) -> int:
        return int(self.impl.pid or 0)

    def start(self) -> None:
        self.impl.start()
        self.metrics_url = self.impl.metrics_url

    def check(self) -> None:
        if not self.impl.running():
            raise CompareError(f"{self.mode}: kube-proxy exited: {lab.log_tail(self.log)} (log {self.log})")

    def metrics(self) -> str:
        return str(self.impl.metrics())

    def stop(self) -> None:
        self.impl.stop()


def make_proxy(mode: str, node: lab.Node, state: lab.LabState, kubeconfig: Path, work_dir: Path,
               cgroup: Path | None, spec: CompareSpec, services: int) -> Proxy:
    if mode in KUBE_PROXY_MODES:
        return RealKubeProxy(mode, node, state, kubeconfig, work_dir, cgroup)
    return LbctlAgent(mode, node, state, kubeconfig, work_dir, cgroup, services, spec.endpoints)


# --- what is programmed in node 0 ---------------------------------------------------------------


def node_run(node: lab.Node, *argv: str, check: bool = True, timeout: float | None = None) -> str:
    try:
        out = subprocess.run([*node.enter(), *argv], capture_output=True, text=True, check=False,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        if check:
            raise CompareError(f"{' '.join(argv)} in {node.ns}: no answer in {timeout:.0f} s") from None
        return ""
    if check and out.returncode != 0:
        raise CompareError(f"{' '.join(argv)} in {node.ns}: {out.stderr.strip()}")
    return out.stdout


SERVICE_RULE = re.compile(r"^-A KUBE-SERVICES -d (\d+\.\d+\.\d+\.\d+)/32 .*-j KUBE-SVC-")


def kube_services_order(node: lab.Node) -> list[str]:
    """The ClusterIPs in KUBE-SERVICES in node's iptables, in rule order (first match wins)."""
    save = node_run(node, "iptables-save", "-t", "nat", check=False)
    return [m.group(1) for line in save.splitlines() if (m := SERVICE_RULE.match(line))]


def kernel_objects(node: lab.Node, mode: str, pin_dir: str | None) -> dict[str, int]:
    """How much the mode programmed: iptables rules and chains, nft rules, or BPF map entries."""
    counts: dict[str, int] = {}
    save = node_run(node, "iptables-save", check=False)
    counts["iptables_rules"] = sum(1 for line in save.splitlines() if line.startswith("-A "))
    counts["iptables_chains"] = sum(1 for line in save.splitlines() if line.startswith(":KUBE-"))
    # `nft list ruleset` of lbctl's v1.32 rendering at 10,000 services x 10 endpoints (100,000
    # endpoint chains) ran for 7 min and 900 MB here: the listing is given 20 s
    ruleset = node_run(node, "nft", "list", "ruleset", check=False, timeout=20.0)
    if ruleset:
        counts["nft_lines"] = len(ruleset.splitlines())
    if mode == "ebpf" and pin_dir:
        from lbctl.datapath.ebpf import bpfsys
        for name in ("lb4_services", "lb4_backends"):
            path = os.path.join(pin_dir, name)
            if os.path.exists(path):
                with bpfsys.BpfMap.open_pinned(path) as bpf_map:
                    counts[f"{name}_entries"] = bpf_map.count()
    return counts


def leftovers(node: lab.Node) -> list[str]:
    """What a proxy left in node 0 after it was stopped and cleaned up: kube-proxy's objects
    (lbctl.lab.kubeproxy.leftovers: its modes and lbctl's renderings share them), lbctl's nft
    table, XDP and tc programs."""
    from lbctl.lab import kubeproxy

    left = kubeproxy.leftovers(node.ns)
    tables = node_run(node, "nft", "list", "tables", check=False)
    left += [t for t in tables.splitlines() if "lbctl" in t]
    if " xdp" in node_run(node, "ip", "-o", "link", "show", check=False):
        left.append("an XDP program")
    if "bpf" in node_run(node, "tc", "filter", "show", "dev", node.uplink, "ingress", check=False):
        left.append(f"tc filters on {node.uplink}")
    return left


def flush_conntrack(node: lab.Node) -> None:
    node_run(node, "conntrack", "-F", check=False)


# --- load --------------------------------------------------------------------------------------


def load_run(kind: str, client: netns.Pod, targets: list[str], spec: CompareSpec,
             background: Callable[[], int], proxy_ticks: Callable[[], int]) -> Run:
    """One connload run from the client pod, with the machine's CPU accounted around it."""
    from lbctl.bench import load

    rate = spec.rate if kind == "fixed" else 0.0
    before, bg_before, px_before = cpu_ticks(), background(), proxy_ticks()
    result = load.run_connload(netns.enter_argv(client.ns), targets, duration=spec.duration,
                               rate=rate, concurrency=spec.concurrency if kind == "max" else 256,
                               mode="http", timeout_ms=2000, samples=True)
    after, bg_after, px_after = cpu_ticks(), background(), proxy_ticks()
    delta = {k: after[k] - before[k] for k in CPU_FIELDS}
    bg = bg_after - bg_before
    ok = result.connections_ok
    tick_us = 1e6 / CLK_TCK
    kernel = delta["system"] + delta["softirq"] + delta["irq"] - bg
    return Run(kind=kind, offered_rate=rate, achieved_rate=result.achieved_rate, connections=ok,
               errors=dict(result.errors), elapsed_s=result.elapsed_s,
               connect_us=asdict(result.connect_us), request_us=asdict(result.request_us),
               cpu_ticks=delta, background_system_ticks=bg,
               proxy_cpu_s=(px_after - px_before) / CLK_TCK,
               cpu_us_per_conn=kernel * tick_us / ok if ok else None,
               user_us_per_conn=(delta["user"] + delta["nice"]) * tick_us / ok if ok else None,
               samples=asdict(result.samples) if result.samples else {})


# --- the run -------------------------------------------------------------------------------------


class Bar:
    """A progress bar on stderr: steps done of the whole run, and what runs now."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = max(total, 1), 0, stream
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)

    def __call__(self, msg: str) -> None:
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.started
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * self.done / self.total:3.0f}% "
                f"{elapsed / 60:4.1f} min  {msg}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def line(self, msg: str) -> None:
        """A message that stays (the bar is redrawn below it)."""
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(msg + "\n")
        self.stream.flush()


def synthetic_vip(i: int) -> str:
    return str(SYNTHETIC_BASE + i)


def synthetic_objects(first: int, count: int, endpoints: Sequence[str]) -> list[tuple[dict, dict]]:
    """Selector-less services bench/svc-NNNNNN (port 80 -> 80) whose one EndpointSlice lists
    the real nginx pods: every synthetic service answers, with len(endpoints) endpoints."""
    return k8s.synthetic_objects(SYNTHETIC_NAMESPACE, first, count, vip=synthetic_vip,
                                 endpoints=lambda i: list(endpoints), limit=SYNTHETIC_LIMIT,
                                 target_port=NGINX_PORT)


def nginx_service() -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "nginx", "namespace": "default"},
            "spec": {"clusterIP": NGINX_VIP, "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": NGINX_PORT, "targetPort": NGINX_PORT,
                                "protocol": "TCP"}]}}


def machine_info() -> dict[str, Any]:
    def version(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "absent"
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else ""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from lbctl.lab import kube
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(),
            "nginx": version("nginx", "-v"), "wrk": version("wrk", "--version"),
            "iptables": version("iptables", "--version"), "nft": version("nft", "--version"),
            "kube-proxy": version(str(kube.binaries_dir() / "kube-proxy"), "--version"),
            "kubernetes": kube.K8S_VERSION, "clock_ticks_per_s": CLK_TCK}


def run_compare(spec: CompareSpec, bar: Bar, work_dir: Path | None = None) -> Report:
    """The whole benchmark; everything it made is removed again, whatever happens."""
    from lbctl.bench import load
    from lbctl.lab.kube import ControlPlane

    spec.validate()
    counts = sorted(set(spec.counts))
    report = Report(spec=asdict(spec), machine=machine_info())
    measured = [m for m in spec.modes if m != "direct"]
    bar.total = len(counts) * (len(measured) * (3 + 2 * spec.runs) + 2 + spec.runs)
    started = time.monotonic()
    load.connload_path()
    lab.check_conflicts(spec.lab_spec())
    bar("lab (2 nodes) and a control plane (etcd, kube-apiserver, kube-controller-manager)...")
    state = lab.lab_up(spec.lab_spec())
    servers: list[Any] = []
    probe = None
    tmp = tempfile.TemporaryDirectory(prefix="lbctl-bench-compare-")
    logs = work_dir or Path(tmp.name)
    logs.mkdir(parents=True, exist_ok=True)
    try:
        assert state.made.kube_dir
        cp = ControlPlane.attach(Path(state.made.kube_dir))
        kubeconfig = cp.kubeconfig
        for name in spec.backends:
            pod = state.pods[name]
            servers.append(load.start_nginx(netns.enter_argv(pod.ns), pod.ip, NGINX_PORT, body=name,
                                            workdir=logs / f"nginx-{name}"))
        cp.kubectl("create", "namespace", SYNTHETIC_NAMESPACE)
        cp.kubectl("apply", "-f", "-", input=json.dumps(nginx_service()))
        cp.wait_for_endpoints({("default", "nginx"): spec.backends}, time.monotonic() + 60)
        for client in [spec.client(m) for m in spec.modes] + ["client-probe"]:
            node_sysctl = ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]
            subprocess.run([*netns.enter_argv(state.pods[client].ns), *node_sysctl], check=False)
        pod_targets = [f"{state.pods[b].ip}:{NGINX_PORT}" for b in spec.backends]
        probe = k8s.Probe(state.pods["client-probe"].ns, f"{WEB_VIP}:80", max_seconds=7200.0)
        bar.line(f"lab and control plane up in {time.monotonic() - started:.1f} s; "
                 f"{spec.endpoints} nginx backends on {state.node(1).name}")
        have = 0
        for n in counts:
            create(n, have, spec, kubeconfig, [state.pods[b].ip for b in spec.backends], report, bar)
            have = n - 1
            if "direct" in spec.modes:
                measure_direct(n, state, spec, pod_targets, report, bar)
            for mode in measured:
                row = ModeRow(mode=mode, services=n)
                report.rows.append(row)
                cap = spec.skipped(mode, n)
                if cap is not None:
                    row.skipped = f"not run: --mode-max {mode}={cap:,}"
                    bar.step(3 + 2 * spec.runs)
                    continue
                try:
                    measure_mode(row, state, cp, kubeconfig, logs, spec, probe, bar)
                except CompareError as exc:
                    row.error = str(exc)
                    bar.line(f"[{n:,} services] {mode}: {exc}")
                if "direct" in spec.modes:
                    measure_direct(n, state, spec, pod_targets, report, bar)
    finally:
        if probe is not None:
            probe.stop()
        for server in servers:
            server.stop()
        lab.lab_down(spec.prefix)
        tmp.cleanup()
    report.seconds = time.monotonic() - started
    return report


def create(n: int, have: int, spec: CompareSpec, kubeconfig: Path, endpoints: list[str],
           report: Report, bar: Bar) -> None:
    pairs = synthetic_objects(have, n - 1 - have, endpoints)
    if not pairs:
        return
    bar(f"[{n:,} services] creating {len(pairs):,} Services and EndpointSlices "
        f"({spec.endpoints} endpoints each) through the API server...")
    bulk = k8s.in_subprocess(k8s.apply_objects, str(kubeconfig), pairs, workers=spec.writers)
    report.created[str(n)] = {"objects": bulk.requests, "seconds": bulk.seconds,
                              "per_second": bulk.requests / bulk.seconds, "retries": bulk.retries}
    bar.line(f"[{n:,} services] {bulk.requests:,} objects created in {bulk.seconds:.1f} s "
             f"({bulk.requests / bulk.seconds:,.0f}/s)")
    bar.step()


def measure_direct(n: int, state: lab.LabState, spec: CompareSpec, targets: list[str],
                   report: Report, bar: Bar) -> None:
    """One fixed-rate run and one max-rate run straight to the pods, with no proxy on node 0."""
    row = ModeRow(mode="direct", services=n, target="pod IPs")
    report.rows.append(row)
    node = state.node(0)
    client = state.pods[spec.client("direct")]

    for kind in ("fixed", "max"):
        flush_conntrack(node)
        bar(f"[{n:,} services] direct: {kind}-rate run")
        row.runs.append(load_run(kind, client, targets, spec, others_system_ticks, lambda: 0))
    bar.step()


def measure_mode(row: ModeRow, state: lab.LabState, cp: Any, kubeconfig: Path, logs: Path,
                 spec: CompareSpec, probe: Any, bar: Bar) -> None:
    n, mode, node = row.services, row.mode, state.node(0)
    tag = f"[{n:,} services] {mode}"
    client = state.pods[spec.client(mode)]
    left = leftovers(node)
    if left:
        raise CompareError(f"node 0 is not clean before {mode}: {', '.join(left)}")
    with MemoryCgroup(f"lbctl-bench-{SHORT[mode]}") as memcg:
        proxy = make_proxy(mode, node, state, kubeconfig, logs, memcg.path if memcg.available else None,
                           spec, n)
        t0 = time.monotonic()
        proxy.start()
        try:
            bar(f"{tag}: programming {n:,} services...")
            target = wait_programmed(row, proxy, node, client, spec, t0, bar, tag)
            bar.step()
            row.settle_seconds = settle(proxy)
            row.memory = {**memcg.usage(), "rss_bytes": rss_bytes(proxy.pid)}
            row.kernel_objects = kernel_objects(node, mode, getattr(proxy, "pin_dir", None))
            bar.step()

            def proxy_ticks() -> int:
                return sum(process_ticks(proxy.pid))
            for kind in ["fixed"] * spec.runs + ["max"] * spec.runs:
                flush_conntrack(node)
                done = len(row.runs)
                bar(f"{tag}: {kind}-rate run {done % spec.runs + 1}/{spec.runs}")
                row.runs.append(load_run(kind, client, [f"{target}:{NGINX_PORT}"], spec,
                                         others_system_ticks, proxy_ticks))
                proxy.check()
                bar.step()
            measure_changes(row, cp, proxy, probe, spec, bar, tag)
            bar.step()
        finally:
            t_stop = time.monotonic()
            proxy.stop()
            row.stop_seconds = time.monotonic() - t_stop
    left = leftovers(node)
    if left:
        raise CompareError(f"{mode} left in node 0 after stop and cleanup: {', '.join(left)}")
    bar.line(format_row(row))


def wait_programmed(row: ModeRow, proxy: Proxy, node: lab.Node, client: netns.Pod,
                    spec: CompareSpec, t0: float, bar: Bar, tag: str) -> str:
    """Until the target answers through its ClusterIP; the target is the last service in
    KUBE-SERVICES for the iptables modes, the last synthetic service otherwise."""
    n = row.services
    last = synthetic_vip(n - 2) if n > 1 else NGINX_VIP
    deadline = t0 + spec.program_timeout
    target = last
    while True:
        proxy.check()
        if row.mode in ("iptables", "kube-proxy-iptables"):
            order = kube_services_order(node)
            ours = [ip for ip in order if ip == NGINX_VIP or ip.startswith("10.100.")
                    and ip != WEB_VIP]
            if len(ours) >= n:
                target = ours[-1]
                row.target_position = order.index(target) + 1
                row.service_rules = len(order)
        if target_answers(client, target):
            row.program_seconds = time.monotonic() - t0
            break
        if time.monotonic() > deadline:
            raise CompareError(f"{row.mode}: {n:,} services not programmed within "
                               f"{spec.program_timeout:.0f} s (see {proxy.log})")
        bar(f"{tag}: programming {n:,} services... {time.monotonic() - t0:.0f} s")
        time.sleep(0.2)
    row.target = target
    # the proxy observes its sync's duration when the sync ends, a moment after the kernel has
    # the rules (kube-proxy's iptables mode: after iptables-restore returns)
    hist = proxy.histogram(METRIC_SYNC)
    deadline = time.monotonic() + 10.0
    while not hist["count"] and time.monotonic() < deadline:
        time.sleep(0.1)
        hist = proxy.histogram(METRIC_SYNC)
    row.sync_seconds, row.sync_count = (hist["sum"], hist["count"]) if hist["count"] else (None, 0)
    return target


def target_answers(client: netns.Pod, target: str) -> bool:
    out = subprocess.run([*netns.enter_argv(client.ns), "curl", "-s", "-o", "/dev/null", "-m", "1",
                          "-w", "%{http_code}", f"http://{target}:{NGINX_PORT}/"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() == "200"


def settle(proxy: Proxy) -> float:
    """Seconds until the proxy uses less than SETTLE_CPU_SECONDS of CPU per second."""
    started = time.monotonic()
    last = sum(process_ticks(proxy.pid))
    while time.monotonic() - started < SETTLE_TIMEOUT:
        time.sleep(1.0)
        proxy.check()
        now = sum(process_ticks(proxy.pid))
        if (now - last) / CLK_TCK < SETTLE_CPU_SECONDS:
            break
        last = now
    return time.monotonic() - started


def measure_changes(row: ModeRow, cp: Any, proxy: Proxy, probe: Any, spec: CompareSpec,
                    bar: Bar, tag: str) -> None:
    """Endpoint changes through the API server: a web pod's Ready flipped, one at a time."""
    core = cp.core()
    ready: dict[str, bool] = {}
    time.sleep(k8s.GAP_SECONDS)
    try:
        for k in range(spec.changes):
            pod = spec.backends[(k // 2) % len(spec.backends)]
            coming = not ready.get(pod, True)
            before = proxy.histogram(METRIC_PROGRAMMING)
            seen = len(probe.records)
            t_write = time.time()
            core.patch_namespaced_pod_status(pod, "default", k8s.pod_ready_patch(coming),
                                             _preload_content=False)
            ready[pod] = coming
            traffic = None
            deadline = time.monotonic() + k8s.CHANGE_TIMEOUT
            while traffic is None and time.monotonic() < deadline:
                time.sleep(k8s.POLL_SECONDS * 4)
                traffic = k8s.traffic_moved(probe.records[seen:], t_write, pod, coming)
            time.sleep(0.3)      # the metric is observed when the sync ends, just after the maps
            metric = k8s.observation(before, proxy.histogram(METRIC_PROGRAMMING))
            row.changes.append({"pod": pod, "ready": coming, "traffic_s": traffic, "metric_s": metric})
            bar(f"{tag}: change {k + 1}/{spec.changes}: traffic {k8s.ms(traffic)}, metric {k8s.ms(metric)}")
            time.sleep(k8s.GAP_SECONDS)
    finally:
        for pod, is_ready in ready.items():
            if not is_ready:
                core.patch_namespaced_pod_status(pod, "default", k8s.pod_ready_patch(True),
                                                 _preload_content=False)
        time.sleep(k8s.GAP_SECONDS)


# --- the report --------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def mmm(values: Sequence[float | None], digits: int = 0) -> str:
    stats = median_min_max(values)
    if stats is None:
        return "-"
    med, lo, hi = stats
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def row_stats(row: ModeRow) -> dict[str, Any]:
    fixed, maxed = row.fixed(), row.max_runs()
    traffic = [c["traffic_s"] for c in row.changes if c["traffic_s"] is not None]
    metric = [c["metric_s"] for c in row.changes if c["metric_s"] is not None]
    return {
        "cpu_us": median_min_max([r.cpu_us_per_conn for r in fixed]),
        "p50_us": median_min_max([r.connect_us.get("p50") for r in fixed]),
        "p99_us": median_min_max([r.connect_us.get("p99") for r in fixed]),
        "req_p99_us": median_min_max([r.request_us.get("p99") for r in fixed]),
        "max_rate": median_min_max([r.achieved_rate for r in maxed]),
        "errors": sum(sum(r.errors.values()) for r in row.runs),
        "traffic_p50": k8s.percentile(traffic, 0.5), "traffic_p99": k8s.percentile(traffic, 0.99),
        "metric_p50": k8s.percentile(metric, 0.5), "metric_p99": k8s.percentile(metric, 0.99),
    }


def format_row(row: ModeRow) -> str:
    s = row_stats(row)
    cpu = f"{s['cpu_us'][0]:.0f} us/conn" if s["cpu_us"] else "-"
    p99 = f"p99 {s['p99_us'][0] / 1000:.2f} ms" if s["p99_us"] else ""
    mx = f"max {s['max_rate'][0]:,.0f}/s" if s["max_rate"] else ""
    prog = f"programmed in {row.program_seconds:.1f} s" if row.program_seconds is not None else ""
    return f"[{row.services:,} services] {row.mode}: {cpu} {p99} {mx} {prog}".strip()


def markdown(report: Report) -> str:
    spec, m = report.spec, report.machine
    counts = sorted({r.services for r in report.rows})
    modes = [x for x in spec["modes"]]
    lines = [f"Machine: Linux {m['kernel']}, {m['cpus']} CPUs ({m['cpu_model']}); "
             f"{m['kubernetes']} control plane and kube-proxy ({m['kube-proxy']}); {m['nginx']}; "
             f"{m['iptables']}; {m['nft']}. Run of {report.seconds / 60:.1f} min.", "",
             f"Load: tools/connload (C, open loop), HTTP GET with `Connection: close` to nginx, "
             f"{spec['endpoints']} endpoints per service; fixed rate {spec['rate']:,.0f} conn/s for "
             f"{spec['duration']} s, {spec['runs']} runs (median, min-max); max rate closed loop with "
             f"{spec['concurrency']} in flight.", ""]
    lines += ["| services | mode | CPU us/conn (sys+softirq) | connect p50 ms | connect p99 ms | "
              "max conn/s | programmed s | own sync s | change p99 ms (probe / metric) | "
              "RSS MiB | kernel MiB | errors |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in counts:
        for mode in modes:
            row = report.row(mode, n)
            if row is None:
                continue
            if row.error or row.skipped:
                lines.append(f"| {n:,} | {mode} | {row.error or row.skipped} ||||||||||")
                continue
            s = row_stats(row)
            p50 = mmm([r.connect_us.get("p50", 0) / 1000 for r in row.fixed()], 2)
            p99 = mmm([r.connect_us.get("p99", 0) / 1000 for r in row.fixed()], 2)
            change = (f"{fmt(s['traffic_p99'] and s['traffic_p99'] * 1000)} / "
                      f"{fmt(s['metric_p99'] and s['metric_p99'] * 1000)}") if row.changes else "-"
            mem = row.memory
            lines.append(
                f"| {n:,} | {mode} | {mmm([r.cpu_us_per_conn for r in row.fixed()])} | {p50} | {p99} | "
                f"{mmm([r.achieved_rate for r in row.max_runs()])} | {fmt(row.program_seconds, '', 2)} | "
                f"{fmt(row.sync_seconds, '', 3)} | {change} | "
                f"{fmt(mem.get('rss_bytes') and mem['rss_bytes'] / 2**20, '', 1)} | "
                f"{fmt(mem.get('kernel_bytes') and mem['kernel_bytes'] / 2**20, '', 1)} | {s['errors']} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(report)]
    positions = [f"{r.services:,}: {r.mode} target at rule {r.target_position:,} of {r.service_rules:,}"
                 for r in report.rows if r.target_position]
    if positions:
        lines += ["", "Where the target service's rule was in KUBE-SERVICES: " + "; ".join(positions) + "."]
    if report.created:
        lines += ["", "Objects created through the API server: " + "; ".join(
            f"{int(n):,} services: {c['objects']:,} in {c['seconds']:.0f} s ({c['per_second']:,.0f}/s)"
            for n, c in report.created.items()) + "."]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def targets(report: Report) -> list[str]:
    """Each of issue 9's targets, met or missed, with the numbers."""
    out = []
    counts = sorted({r.services for r in report.rows})

    def stat(mode: str, n: int, key: str) -> float | None:
        row = report.row(mode, n)
        if row is None or row.error or row.skipped:
            return None
        value = row_stats(row)[key]
        return value[0] if isinstance(value, tuple) else value
    for n in counts:
        e, d = stat("ebpf", n, "cpu_us"), stat("direct", n, "cpu_us")
        ep, dp = stat("ebpf", n, "p99_us"), stat("direct", n, "p99_us")
        if e is not None and d is not None:
            ok = e <= d * 1.05
            out.append(f"{n:,} services: eBPF CPU/conn {e:.0f} us vs direct {d:.0f} us "
                       f"({e / d - 1:+.0%}; target within 5%): {'met' if ok else 'missed'}")
        if ep is not None and dp is not None:
            ok = ep <= dp * 1.05
            out.append(f"{n:,} services: eBPF connect p99 {ep / 1000:.2f} ms vs direct {dp / 1000:.2f} ms "
                       f"({ep / dp - 1:+.0%}; target within 5%): {'met' if ok else 'missed'}")
    ebpf_cpu = [stat("ebpf", n, "cpu_us") for n in counts]
    measured = [v for v in ebpf_cpu if v is not None]
    if len(measured) > 1:
        mid = statistics.median(measured)
        worst = max(abs(v / mid - 1) for v in measured)
        out.append(f"eBPF CPU/conn from {counts[0]:,} to {counts[-1]:,} services: "
                   f"{min(measured):.0f}-{max(measured):.0f} us (at most {worst:.0%} from their median; "
                   f"target flat ±10%): {'met' if worst <= 0.1 else 'missed'}")
    n = 10000 if 10000 in counts else counts[-1]
    e, ipt, nft = stat("ebpf", n, "cpu_us"), stat("kube-proxy-iptables", n, "cpu_us"), stat("kube-proxy-nftables", n, "cpu_us")
    if e is not None and ipt is not None:
        out.append(f"{n:,} services: eBPF CPU/conn {e:.0f} us vs kube-proxy iptables {ipt:.0f} us "
                   f"({e / ipt:.2f}x; target at most 1/3): {'met' if e <= ipt / 3 else 'missed'}")
    if e is not None and nft is not None:
        out.append(f"{n:,} services: eBPF CPU/conn {e:.0f} us vs kube-proxy nftables {nft:.0f} us "
                   f"(target no more): {'met' if e <= nft else 'missed'}")
    prog = report.row("ebpf", n)
    if prog is not None and prog.sync_seconds is not None:
        out.append(f"{n:,} services x {report.spec['endpoints']} endpoints: eBPF first sync "
                   f"{prog.sync_seconds:.2f} s (start to serving {fmt(prog.program_seconds, ' s', 1)}; "
                   f"target ≤ 1 s): {'met' if prog.sync_seconds <= 1.0 else 'missed'}")
    for mode in ("ebpf", "kube-proxy-iptables", "kube-proxy-nftables"):
        p99 = stat(mode, n, "traffic_p99")
        if p99 is not None:
            verdict = ("met" if p99 <= 0.1 else "missed") if mode == "ebpf" else "reference"
            out.append(f"{n:,} services: {mode} endpoint change to traffic p99 {p99 * 1000:.0f} ms "
                       f"(target ≤ 100 ms for eBPF): {verdict}")
    return out


def style(ax: Any, title: str, xlabel: str) -> None:
    """A services axis (log), title, grid and legend: every plot of this report alike."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot(report: Report, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r.services for r in report.rows})
    modes = list(report.spec["modes"])
    made = []
    figures = [
        ("compare-cpu.png", "CPU per new connection (system+softirq, us)", "cpu_us", 1.0),
        ("compare-p99.png", "connect latency p99 at fixed rate (ms)", "p99_us", 1e-3),
        ("compare-maxrate.png", "maximum new connections/s (closed loop)", "max_rate", 1.0),
    ]
    for name, title, key, scale in figures:
        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in modes:
            xs, ys, lo, hi = [], [], [], []
            for n in counts:
                row = report.row(mode, n)
                if row is None or row.error or row.skipped:
                    continue
                value = row_stats(row)[key]
                if value is None:
                    continue
                xs.append(n)
                ys.append(value[0] * scale)
                lo.append((value[0] - value[1]) * scale)
                hi.append((value[2] - value[0]) * scale)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=mode)
        style(ax, title, f"services ({report.spec['endpoints']} endpoints each)")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        if mode == "direct":
            continue
        rows = [(n, report.row(mode, n)) for n in counts]
        prog = [(n, r.program_seconds) for n, r in rows if r and r.program_seconds is not None]
        change = [(n, row_stats(r)["traffic_p99"]) for n, r in rows if r and r.changes]
        change = [(n, v * 1000) for n, v in change if v is not None]
        if prog:
            a1.plot(*zip(*prog), marker="o", label=mode)
        if change:
            a2.plot(*zip(*change), marker="o", label=mode)
    for ax, title in ((a1, "start to serving every service (s)"),
                      (a2, "endpoint change to traffic moved, p99 (ms)")):
        ax.set_yscale("log")
        style(ax, title, "services")
    fig.tight_layout()
    path = out_dir / "compare-control-plane.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)
    return made


def report_dict(report: Report) -> dict[str, Any]:
    out = asdict(report)
    out["summary"] = [{"mode": r.mode, "services": r.services, **{
        k: v for k, v in row_stats(r).items()}} for r in
        [report.row(m, n) for n in sorted({x.services for x in report.rows}) for m in report.spec["modes"]]
        if r is not None]
    out["targets"] = targets(report)
    return out


def spec_from_args(args: argparse.Namespace) -> CompareSpec:
    counts = tuple(int(c) for c in (args.services or DEFAULT_COUNTS).split(","))
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else MODES
    return CompareSpec(counts=counts, modes=modes, endpoints=args.endpoints, runs=args.runs,
                       rate=args.rate, duration=args.duration, concurrency=args.concurrency,
                       changes=args.changes or 5, mode_max=parse_mode_max(args.mode_max))


def parse_mode_max(text: str | None) -> tuple[tuple[str, int], ...]:
    """"kube-proxy-iptables=1000,iptables=1000" -> (("kube-proxy-iptables", 1000), ...)."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        mode, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise CompareError(f"--mode-max {item!r}: MODE=N with N a positive number of services")
        out.append((mode.strip(), int(count)))
    return tuple(out)


def cmd_bench_compare(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
        spec.validate()
    except (CompareError, ValueError) as exc:
        print(f"lbctl bench --compare: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = Bar(1)
    try:
        report = run_compare(spec, bar, work_dir=out_dir / "logs")
    except (CompareError, k8s.BenchError, lab.LabError) as exc:
        bar.line(f"lbctl bench --compare: {exc}")
        return 1
    (out_dir / "compare.json").write_text(json.dumps(report_dict(report), indent=1) + "\n")
    text = markdown(report)
    (out_dir / "compare.md").write_text(text)
    plots = plot(report, out_dir)
    bar.line("")
    print(text)
    print(f"written: {out_dir / 'compare.json'}, {out_dir / 'compare.md'}, "
          + ", ".join(str(p) for p in plots))
    return 0 if not any(r.error for r in report.rows) else 1

