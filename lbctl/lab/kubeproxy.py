"""The real kube-proxy (the upstream binary, built by `make k8s-bins`) on a lab node.

lbctl's own iptables and nftables modes render kube-proxy's rules from its sources; the claims
lbctl makes against kube-proxy are measured against the binary itself. `KubeProxy` runs it in
a lab node's network namespace, as the DaemonSet runs it on a kind node:

    nsenter --net=/run/netns/<node ns> <bin_dir>/kube-proxy --config <work_dir>/config.yaml

with a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) written here: the mode
(iptables, nftables or ipvs), the lab's kubeconfig, hostnameOverride = the lab's Node (which the
lab registers with its InternalIP, the node's address on the lab network: kube-proxy's "primary"
node IP for nodePortAddresses), clusterCIDR with detectLocalMode ClusterCIDR (kind's),
metricsBindAddress and healthzBindAddress on the node's IP (reachable from the root namespace
over the lab's bridge), conntrack.maxPerCore 0 (never the machine-wide nf_conntrack_max or
hashsize; the per-namespace timeouts are the node's own, as on kind), minSyncPeriod 1 s and
syncPeriod 30 s (kube-proxy's defaults, written out so the benchmark report can quote them),
verbosity 2 (one line per sync with its duration), and its log in <work_dir>/kube-proxy.log.

`stop()` sends SIGTERM (kube-proxy leaves its rules on exit, by design, so that a restart does
not interrupt traffic), then runs `kube-proxy --cleanup` in the same namespace, which removes
what every mode programs (iptables chains of both families, `table ip kube-proxy` and ip6,
kube-ipvs0), but for kubelet's KUBE-FIREWALL chain, which the iptables mode duplicates and by
design never removes: with no kubelet on a lab node, stop() removes it when kube-proxy made it
(see remove_kubelet_firewall). Then it checks that nothing is left.

The node's namespace must reach the API server: the lab's control plane listens on the root
namespace's loopback, and a multi-node lab with kubernetes=True relays it into every node
(lbctl.lab.relay). `start()` says so when nothing answers there.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from lbctl.lab import kube, netns

MODES = ("iptables", "nftables", "ipvs")
BINARY = "kube-proxy"
MIN_SYNC_PERIOD = "1s"          # kube-proxy's defaults, written out
SYNC_PERIOD = "30s"
STOP_GRACE = 10.0               # seconds between SIGTERM and SIGKILL
SYNC_TIMEOUT = 120.0
LAST_SYNC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
SYNC_DURATION = "kubeproxy_sync_proxy_rules_duration_seconds"
KUBELET_FIREWALL = "KUBE-FIREWALL"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


class KubeProxyError(RuntimeError):
    """kube-proxy could not start, sync or be cleaned up; the message names the log."""


def require_binary(bin_dir: Path) -> Path:
    path = Path(bin_dir) / BINARY
    if not path.is_file() or not path.stat().st_mode & 0o111:
        raise KubeProxyError(f"no {BINARY} in {bin_dir}: build it with `make k8s-bins` "
                             f"(hack/build-k8s.sh builds it with the control plane)")
    return path


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in a Prometheus text exposition: (labels, value)."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((labels, float(m.group(3))))
    return out


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` carrying `labels` (others may differ), or None."""
    for have, value in samples(text, name):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return None


def leftovers(ns: str | None) -> list[str]:
    """What of kube-proxy is in namespace ns: KUBE- chains (IPv4 and IPv6), kube-proxy's nft
    tables, the kube-ipvs0 dummy link. Empty when it is clean."""
    found = []
    for save in ("iptables-save", "ip6tables-save"):
        done = netns.run([*netns.enter_argv(ns), save], check=False)
        chains = sorted({line.split()[0][1:] for line in done.stdout.splitlines()
                         if line.startswith(":KUBE-")})
        found += [f"{save}: chain {c}" for c in chains]
        rules = [line for line in done.stdout.splitlines()
                 if line.startswith("-A ") and "KUBE-" in line]
        found += [f"{save}: rule {r}" for r in rules[:3]]
    tables = netns.run([*netns.enter_argv(ns), "nft", "list", "tables"], check=False).stdout
    found += [f"nft {line.strip()}" for line in tables.splitlines() if line.split()[-1:] == ["kube-proxy"]]
    if netns.link_exists("kube-ipvs0", ns):
        found.append("link kube-ipvs0")
    return found


def has_kubelet_firewall(ns: str | None) -> bool:
    """Whether the filter table of ns has the KUBE-FIREWALL chain (kubelet's, see below)."""
    done = netns.run([*netns.enter_argv(ns), "iptables", "-w", "-t", "filter", "-S", KUBELET_FIREWALL],
                     check=False)
    return done.returncode == 0


def remove_kubelet_firewall(ns: str | None) -> None:
    """Remove KUBE-FIREWALL and its jumps from INPUT and OUTPUT.

    The chain is kubelet's (its anti-martian rule: drop 127.0.0.0/8 from elsewhere); the
    iptables mode writes a duplicate at every sync, in case no kubelet made it, and on purpose
    never removes it, not even with --cleanup (pkg/proxy/iptables: "we create these on startup
    but do not delete them in CleanupLeftovers"). A lab node has no kubelet: if the chain was not
    there before kube-proxy started, it is kube-proxy's, and stop() removes it."""
    enter = [*netns.enter_argv(ns), "iptables", "-w", "-t", "filter"]
    for chain in ("INPUT", "OUTPUT"):
        while netns.run([*enter, "-C", chain, "-j", KUBELET_FIREWALL], check=False).returncode == 0:
            netns.run([*enter, "-D", chain, "-j", KUBELET_FIREWALL])
    if has_kubelet_firewall(ns):
        netns.run([*enter, "-F", KUBELET_FIREWALL])
        netns.run([*enter, "-X", KUBELET_FIREWALL])


@dataclass
class KubeProxy:
    """The real kube-proxy in `ns` (None: the root namespace) as Node `node_name`.

        with KubeProxy(bin_dir, "nftables", "lbkp-node0", "lab-node", "172.18.230.2",
                       "10.244.230.0/23", kubeconfig, work_dir) as kp:
            kp.wait_synced()
            text = kp.metrics()

    extra: merged into the KubeProxyConfiguration (nested dicts merge, other values replace):
    {"nftables": {"minSyncPeriod": "0s"}}, {"clientConnection": {"qps": 50, "burst": 100}}.
    cgroup: a cgroup directory (v2 below /sys/fs/cgroup/unified, or a v1 memory group) the
    process runs in from its start, for CPU or memory accounting. tie_to_parent: it dies with the thread that started it.
    """

    bin_dir: Path
    mode: str
    ns: str | None
    node_name: str
    node_ip: str
    cluster_cidr: str
    kubeconfig: Path
    work_dir: Path
    cgroup: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tie_to_parent: bool = True
    pid: int | None = None
    metrics_port: int = 0
    healthz_port: int = 0
    started_at: float = 0.0             # wall clock (time.time()) just before the process started
    first_sync: float | None = None     # seconds from started_at to the end of its first sync
    first_sync_duration: float | None = None   # how long that sync itself took (its histogram)
    _kubelet_firewall_before: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"kube-proxy mode {self.mode!r}: use one of {', '.join(MODES)}")
        ipaddress.ip_network(self.cluster_cidr)
        ipaddress.ip_address(self.node_ip)
        self.bin_dir, self.kubeconfig, self.work_dir = (Path(self.bin_dir), Path(self.kubeconfig),
                                                        Path(self.work_dir))

    # paths and addresses

    @property
    def config_file(self) -> Path:
        return self.work_dir / "config.yaml"

    @property
    def log(self) -> Path:
        return self.work_dir / "kube-proxy.log"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.node_ip}:{self.metrics_port}/metrics"

    @property
    def healthz_url(self) -> str:
        return f"http://{self.node_ip}:{self.healthz_port}/healthz"

    def config(self) -> dict[str, Any]:
        """The KubeProxyConfiguration written to config_file."""
        periods = {"minSyncPeriod": MIN_SYNC_PERIOD, "syncPeriod": SYNC_PERIOD}
        config: dict[str, Any] = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": self.mode,
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "hostnameOverride": self.node_name,
            "clusterCIDR": self.cluster_cidr,
            "detectLocalMode": "ClusterCIDR",
            "metricsBindAddress": f"{self.node_ip}:{self.metrics_port}",
            "healthzBindAddress": f"{self.node_ip}:{self.healthz_port}",
            "nodePortAddresses": ["primary"],
            "conntrack": {"maxPerCore": 0},
            "iptables": dict(periods),
            "nftables": dict(periods),
            "ipvs": dict(periods),
            "logging": {"verbosity": 2},
        }
        return _merge(config, self.extra)

    def argv(self) -> list[str]:
        return [*netns.enter_argv(self.ns), str(require_binary(self.bin_dir)),
                f"--config={self.config_file}"]

    # start, sync, read

    def start(self) -> KubeProxy:
        """Write the configuration and start kube-proxy; returns at once (see wait_synced)."""
        if self.pid is not None:
            raise KubeProxyError(f"kube-proxy already runs as pid {self.pid}")
        require_binary(self.bin_dir)
        self._check_api_reachable()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.metrics_port:
            self.metrics_port = netns.in_netns(self.ns, _free_port, self.node_ip)
        if not self.healthz_port:
            self.healthz_port = netns.in_netns(self.ns, _free_port, self.node_ip)
        self.config_file.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.first_sync = self.first_sync_duration = None
        self._kubelet_firewall_before = has_kubelet_firewall(self.ns)
        self.started_at = time.time()
        self.pid = kube.spawn(self.argv(), self.log, self.tie_to_parent, cgroup=self.cgroup)
        return self

    def _check_api_reachable(self) -> None:
        """Fail early, naming the fix, when the kubeconfig's server does not answer in ns."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        server = urllib.parse.urlsplit(config["clusters"][0]["cluster"]["server"])
        host, port = server.hostname or "", server.port or 443

        def connects() -> bool:
            with socket.socket() as s:
                s.settimeout(2)
                return s.connect_ex((host, port)) == 0
        if not netns.in_netns(self.ns, connects):
            raise KubeProxyError(
                f"the API server {host}:{port} does not answer in netns {self.ns or '(root)'}: "
                f"a lab's control plane listens on the root namespace's loopback; relay it into "
                f"the node (lbctl.lab.relay.Relay({self.ns!r}, {port}), which a multi-node lab "
                f"with kubernetes=True starts itself)")

    def running(self) -> bool:
        return self.pid is not None and netns.pid_alive(self.pid)

    def metrics(self, timeout: float = 5.0) -> str:
        """Its /metrics (Prometheus text)."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as r:
            return str(r.read().decode())

    def healthz(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """Its /healthz: (status, the JSON it answers: lastUpdated, currentTime, nodeEligible...)."""
        try:
            with urllib.request.urlopen(self.healthz_url, timeout=timeout) as r:
                return r.status, dict(json.loads(r.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, dict(json.loads(body or b"{}"))
            except ValueError:
                return exc.code, {"body": body.decode(errors="replace")}

    def wait_synced(self, timeout: float = SYNC_TIMEOUT, family: str = "IPv4") -> float:
        """Seconds from start() to the end of kube-proxy's first complete sync of the rules.

        Read from its own metrics: kubeproxy_sync_proxy_rules_last_timestamp_seconds is set
        (to the wall clock) when a sync has programmed the rules, and only then; a sync starts
        only once the Services, EndpointSlices and the Node have been listed. Polled every 50 ms,
        so the first time it appears it is the first sync's (the next cannot come before
        minSyncPeriod). The sync's own duration (kubeproxy_sync_proxy_rules_duration_seconds,
        count 1) is kept in first_sync_duration."""
        if self.first_sync is not None:
            return self.first_sync
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            if not self.running():
                raise KubeProxyError(f"kube-proxy ({self.mode}, node {self.node_name}) exited: "
                                     f"{kube.log_tail(self.log)} (log {self.log})")
            try:
                text = self.metrics(timeout=2)
                stamp = sample(text, LAST_SYNC, ip_family=family)
                if stamp:
                    self.first_sync = stamp - self.started_at
                    count = sample(text, SYNC_DURATION + "_count", ip_family=family)
                    if count == 1:
                        self.first_sync_duration = sample(text, SYNC_DURATION + "_sum",
                                                          ip_family=family)
                    return self.first_sync
            except (OSError, urllib.error.URLError) as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise KubeProxyError(f"kube-proxy ({self.mode}) did not sync within {timeout:.0f}s "
                                     f"(metrics: {last_error or 'no sync yet'}); log {self.log}: "
                                     f"{kube.log_tail(self.log)}")
            time.sleep(0.05)

    # stop

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_GRACE, then `kube-proxy --cleanup` in the same namespace;
        raises KubeProxyError if anything of kube-proxy is left there. Idempotent."""
        if self.pid is not None:
            cmdline = netns.process_cmdline(self.pid)
            if cmdline and Path(cmdline[0]).name == BINARY:
                netns.stop_process(self.pid, grace=STOP_GRACE)
            netns.reap(self.pid)
            self.pid = None
        self.cleanup()

    def cleanup(self) -> None:
        """`kube-proxy --cleanup` in the namespace (every mode's rules), then check."""
        done = subprocess.run([*netns.enter_argv(self.ns), str(require_binary(self.bin_dir)),
                               "--cleanup", "--v=0"], capture_output=True, text=True, timeout=60)
        with open(self.log, "a") as log:
            log.write(f"--- kube-proxy --cleanup: exit {done.returncode}\n{done.stdout}{done.stderr}")
        if not self._kubelet_firewall_before:
            remove_kubelet_firewall(self.ns)
        left = leftovers(self.ns)
        if left:
            raise KubeProxyError(f"kube-proxy --cleanup (exit {done.returncode}) left in netns "
                                 f"{self.ns or '(root)'}: {'; '.join(left[:8])}; log {self.log}")

    def __enter__(self) -> KubeProxy:
        return self if self.pid is not None else self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
