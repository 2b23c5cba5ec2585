"""`lbctl bench --k8s-latency`: how long a change in the API server takes to reach the datapath.

A lab in network namespaces and a real control plane (``lbctl.lab.kube``: etcd, kube-apiserver,
kube-controller-manager; `make k8s-bins`), the agent as `lbctl run --source kubernetes` in a
process of its own (eBPF mode, on the lab's host veths only, its own pin dir), and:

    default/web  10.96.1.10:80/TCP -> web-0, web-1, web-2 (Pods; the real EndpointSlice
                 controller makes its slices)
    bench/svc-NNNNNN  10.96.16.0 + i, port 80 -> 8080, selector-less, one hand-made
                 EndpointSlice each with one endpoint in 10.128.0.0/12 (no pod has those):
                 they are there to be stored and walked past, N-1 of them

For each number of services N, in increasing order: the synthetic services still missing are
created through the API server as fast as it accepts them, by a thread pool of the official
client, while no agent runs (the rate printed is the API server's; an agent taking in a burst
is tests/test_k8s_burst.py's subject); then the agent is started on an empty datapath and the
time until every frontend is in the maps is printed (its first list and sync at N); then K
endpoint changes, and the agent is stopped (it detaches and unpins). A change: a web pod's Ready condition is
flipped through the pod's status subresource (what a kubelet's readiness probe does), False then
True, cycling over the three pods, one change at a time. For each change, from the moment the
write is sent (t0):

    maps      t0 -> the pinned maps hold the change. The maps are polled (one frontend's slots,
              every POLL_SECONDS); once they hold it, the agent's own time of that sync is read
              from its status file (``last_sync.time``, taken right after the sync wrote the
              maps). Both are upper bounds of when the maps changed: the earlier is kept
              ("agent" or "poll").
    traffic   t0 -> a client in a lab pod sees the traffic move. The probe connects to the
              ClusterIP one connection after another (at most PROBE_RATE per second) and reports
              which pod answered each; a removed pod: the start of the first connection after
              the last one it answered (confirmed by CONFIRM answers from the others); an added
              pod: the start of the first connection it answered. The resolution is the gap
              between two answers of one pod, ~3 probe periods (15 ms): a removal may read
              that much early (the removed pod was not picked by chance), an addition late.
    metric    the agent's kubeproxy_network_programming_duration_seconds histogram from its
              /metrics, scraped after each change: the change's observation is the increase of
              _sum over the increase of _count. Its start is the EndpointSlice's
              endpoints.kubernetes.io/last-change-trigger-time, which the API carries at second
              precision (the pod condition's lastTransitionTime): it reads up to 1 s high. A
              source that gives no trigger times leaves it empty; the report says so.

Changes are spaced by GAP_SECONDS after the previous one reached the maps: `lbctl run` syncs a
change after a quiet period at once, and changes within --min-sync-period (1 s) of a sync wait
for it: what is measured is a single change, not coalescing.

Printed: p50, p99 and max of each, per N (with K changes p99 is the largest of few samples:
read it as "the worst seen"). Written: a JSON report with every raw sample, and a PNG plot.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbctl.lab import cluster as lab
from lbctl.lab import netns

DEFAULT_COUNTS = "1000,10000"
DEFAULT_CHANGES = 20
SYNTHETIC_NAMESPACE = "bench"
SYNTHETIC_VIPS = ipaddress.ip_network("10.96.16.0/20").network_address   # + i, up to the /16's end
SYNTHETIC_LIMIT = 2 ** 16 - 16 * 256 - 2                                   # addresses left in 10.96/16
FAKE_ENDPOINTS = ipaddress.ip_network("10.128.0.0/12")
SERVICE_PORT, TARGET_PORT = 80, 8080
BURST_LABEL = "lbctl.io/bench"                 # on every synthetic object: what to delete
POLL_SECONDS = 0.005                           # maps poll period: the maps figure's resolution
PROBE_RATE = 200.0                             # probe connections per second at most
CONFIRM = 30                                   # answers from the others that confirm a removal
GAP_SECONDS = 1.2                              # after a change reached the maps (min-sync-period 1 s)
CHANGE_TIMEOUT = 30.0                          # per change, per figure
METRIC = "kubeproxy_network_programming_duration_seconds"

Progress = Callable[[str], None]


class BenchError(RuntimeError):
    """The benchmark cannot run or its agent failed; the message says what and where to look."""


# --- the pure parts: summaries, histograms, the probe's verdicts ------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of values; None for none."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile {q}: must lie in 0..1")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """count, p50, p99, max (seconds) of the measured values, and how many are missing (None:
    a change not seen within the timeout, or not observed by the metric)."""
    measured = [v for v in values if v is not None]
    return {"count": len(measured), "missing": len(values) - len(measured),
            "p50": percentile(measured, 0.50), "p99": percentile(measured, 0.99),
            "max": max(measured) if measured else None}


def parse_histogram(text: str, name: str = METRIC) -> dict[str, Any]:
    """One histogram from a Prometheus text exposition, summed over its labels:
    {"count", "sum", "buckets": [[le, cumulative count], ...]} (zeros when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    count, total = 0.0, 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_count":
                count += sample.value
            elif sample.name == f"{name}_sum":
                total += sample.value
            elif sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return {"count": int(count), "sum": total,
            "buckets": [[le, int(c)] for le, c in sorted(buckets.items())]}


def observation(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """The mean of what a histogram observed between two scrapes (one change: its value);
    None when it observed nothing."""
    seen = after["count"] - before["count"]
    if seen <= 0:
        return None
    return (after["sum"] - before["sum"]) / seen


def traffic_moved(records: Sequence[tuple[float, str | None]], t0: float, pod: str, added: bool,
                  confirm: int = CONFIRM) -> float | None:
    """Seconds from t0 until the probe saw the traffic move, from its records (connection start
    time, the pod that answered or None), in start order. Added: the first connection `pod`
    answered after t0. Removed: the first connection after the last one `pod` answered, once
    `confirm` answers from other pods followed; None while not (yet) seen."""
    after = [(start, who) for start, who in records if start >= t0]
    if added:
        return next((start - t0 for start, who in after if who == pod), None)
    last = max((i for i, (_, who) in enumerate(after) if who == pod), default=-1)
    rest = after[last + 1:]
    if sum(1 for _, who in rest if who is not None and who != pod) < confirm:
        return None
    return rest[0][0] - t0


def synthetic_vip(index: int) -> str:
    return str(SYNTHETIC_VIPS + index)


def fake_endpoint(index: int) -> list[str]:
    """Synthetic service i's one endpoint, in FAKE_ENDPOINTS (no pod has it)."""
    return [str(FAKE_ENDPOINTS.network_address + 1 + index)]


def synthetic_objects(namespace: str, first: int, count: int, *,
                      vip: Callable[[int], str] = synthetic_vip,
                      endpoints: Callable[[int], list[str]] = fake_endpoint,
                      limit: int = SYNTHETIC_LIMIT,
                      target_port: int = TARGET_PORT) -> list[tuple[dict, dict]]:
    """(Service, EndpointSlice) pairs i = first..first+count-1: selector-less ClusterIP
    services at vip(i), port 80 -> target_port, one EndpointSlice each listing endpoints(i)
    (by default one in FAKE_ENDPOINTS)."""
    if first + count > limit:
        raise BenchError(f"{first + count:,} synthetic services: at most {limit:,} fit "
                         f"in the service CIDR")
    pairs = []
    for i in range(first, first + count):
        name = f"svc-{i:06d}"
        labels = {BURST_LABEL: "synthetic"}
        service = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": namespace, "labels": labels},
                   "spec": {"clusterIP": vip(i), "ports": [
                       {"name": "http", "port": SERVICE_PORT, "targetPort": target_port, "protocol": "TCP"}]}}
        slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": f"{name}-1", "namespace": namespace, "labels": {
                      **labels, "kubernetes.io/service-name": name,
                      "endpointslice.kubernetes.io/managed-by": "lbctl-bench"}},
                  "addressType": "IPv4",
                  "ports": [{"name": "http", "port": target_port, "protocol": "TCP"}],
                  "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in endpoints(i)]}
        pairs.append((service, slice_))
    return pairs


# --- many objects through the API server, as fast as it takes them --------------------------------


def bulk_client(kubeconfig: str, workers: int) -> Any:
    """An official-client ApiClient whose connection pool holds a connection per worker."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = workers
    cfg.retries = 0      # retried here, counted and named (urllib3 would resend a POST silently)
    return client.ApiClient(cfg)


def _consume(response: Any) -> None:
    """Read a raw (_preload_content=False) answer to its end and give its connection back: a
    connection released with its body unread would hand the next request a stale answer."""
    response.read()
    response.release_conn()


@dataclass(frozen=True)
class Bulk:
    """What apply_objects did: seconds, requests and how many were retried (and why, first)."""

    seconds: float
    requests: int
    retries: int
    first_retry: str = ""


def _with_retries(call: Callable[[], Any], ok_status: int, done: Callable[[], bool],
                  why: list[str]) -> int:
    """call(), again on 429/5xx or a dropped connection (5 tries); returns the retries.
    `ok_status` counts as done (409 for a create of what exists, 404 for a delete of what is
    gone), and so does any refusal when done() says an earlier try did it (a create whose answer
    was lost: its retry is refused "clusterIP already allocated", 422)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    for attempt in range(5):
        try:
            _consume(call())
            return attempt
        except ApiException as exc:
            if exc.status == ok_status or done():
                return attempt
            if exc.status != 429 and exc.status < 500 or attempt == 4:
                raise
            why.append(f"{exc.status} {exc.reason}")
        except HTTPError as exc:
            if attempt == 4:
                raise
            why.append(repr(exc))
        time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def apply_objects(kubeconfig: str, pairs: Sequence[tuple[dict, dict]], *, delete: bool = False,
                  workers: int = 16) -> Bulk:
    """Create (or delete) each (Service, EndpointSlice) pair on a pool of `workers` threads, each
    pair by one worker, the Service first on create and last on delete. Returns the seconds it
    took (Bulk). Picklable arguments: it runs in a process of its own where the caller's threads would
    share its interpreter (``in_subprocess``)."""
    from kubernetes import client

    api = bulk_client(kubeconfig, workers)
    core: Any = client.CoreV1Api(api)      # typed Any: bodies are plain dicts, as the API takes
    discovery: Any = client.DiscoveryV1Api(api)

    def exists(read: Callable[[], Any]) -> bool:
        from kubernetes.client.exceptions import ApiException
        try:
            _consume(read())
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    why: list[str] = []

    def one(pair: tuple[dict, dict]) -> int:
        service, slice_ = pair
        ns, name, slice_name = (service["metadata"]["namespace"], service["metadata"]["name"],
                                slice_["metadata"]["name"])
        read_service = lambda: core.read_namespaced_service(name, ns, _preload_content=False)
        read_slice = lambda: discovery.read_namespaced_endpoint_slice(slice_name, ns, _preload_content=False)
        if delete:
            return (_with_retries(lambda: discovery.delete_namespaced_endpoint_slice(
                        slice_name, ns, _preload_content=False), 404, lambda: not exists(read_slice), why)
                    + _with_retries(lambda: core.delete_namespaced_service(
                        name, ns, _preload_content=False), 404, lambda: not exists(read_service), why))
        return (_with_retries(lambda: core.create_namespaced_service(ns, service, _preload_content=False),
                              409, lambda: exists(read_service), why)
                + _with_retries(lambda: discovery.create_namespaced_endpoint_slice(
                    ns, slice_, _preload_content=False), 409, lambda: exists(read_slice), why))

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(workers) as pool:
            retries = sum(pool.map(one, pairs))
    finally:
        api.close()
    return Bulk(time.monotonic() - started, 2 * len(pairs), retries, why[0] if why else "")


def in_subprocess(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a fresh interpreter (multiprocessing's spawn: safe beside threads),
    so that a caller's own threads (an agent) neither slow it nor are slowed by it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


# --- what the maps hold for one frontend ---------------------------------------------------------


class FrontendReader:
    """One frontend's backends read from the pinned maps: slot 0, its slots, their backends.
    A few lookups (not a walk of every map, as `lbctl dump maps` does): cheap at any N."""

    def __init__(self, pin_dir: str):
        from lbctl.datapath.ebpf.bpfsys import BpfMap

        self._stack = contextlib.ExitStack()
        self.services = self._stack.enter_context(BpfMap.open_pinned(os.path.join(pin_dir, "lb4_services")))
        self.backend_map = self._stack.enter_context(BpfMap.open_pinned(os.path.join(pin_dir, "lb4_backends")))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> FrontendReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backends(self, vip: str, port: int, proto: int = 6) -> list[str] | None:
        """Sorted "address:port" of the frontend's backends; None when there is no frontend."""
        from lbctl.datapath.ebpf import decode, shared

        scope = shared.const("LB_SCOPE_EXTERNAL")
        value = self.services.lookup(shared.service_key(vip, port, proto, 0, scope))
        if value is None:
            return None
        _, count, _, _ = decode.service_value(value)
        found = []
        for slot in range(1, count + 1):
            slot_value = self.services.lookup(shared.service_key(vip, port, proto, slot, scope))
            if slot_value is None:
                continue
            backend = self.backend_map.lookup(shared.u32(decode.service_value(slot_value)[0]))
            if backend is not None:
                address, bport, _, _ = decode.backend(backend)
                found.append(f"{decode.address(address)}:{decode.port(bport)}")
        return sorted(found)

    def has(self, vip: str, port: int, proto: int = 6) -> bool:
        from lbctl.datapath.ebpf import shared

        key = shared.service_key(vip, port, proto, 0, shared.const("LB_SCOPE_EXTERNAL"))
        return self.services.lookup(key) is not None


# --- the probe: a client in a lab pod ------------------------------------------------------------


def probe_main(argv: list[str] | None = None) -> int:
    """`python -m lbctl.bench.k8s_latency probe --target IP:PORT`: one TCP connection after
    another, each printed as "<start wall time> <pod or -error>", until --max-seconds or stdin
    closes (the bench's end)."""
    from lbctl.lab.client import tcp_request

    parser = argparse.ArgumentParser(prog="lbctl.bench.k8s_latency probe")
    parser.add_argument("--target", required=True)
    parser.add_argument("--rate", type=float, default=PROBE_RATE)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    period, deadline = 1.0 / args.rate, time.monotonic() + args.max_seconds
    next_at = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        start = time.time()
        outcome = tcp_request(target, args.timeout)
        print(f"{start:.6f} {outcome.pod or '-' + str(outcome.error)}", flush=True)
        next_at = max(next_at + period, time.monotonic())
        stop.wait(max(0.0, next_at - time.monotonic()))
    return 0


class Probe:
    """The probe running in a pod's namespace; `records` grows as its lines arrive."""

    def __init__(self, ns: str, target: str, max_seconds: float):
        argv = ["ip", "netns", "exec", ns,
                *netns.python_argv("lbctl.bench.k8s_latency", "probe", "--target", target,
                                   "--max-seconds", str(max_seconds))]
        self.records: list[tuple[float, str | None]] = []
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=netns.python_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            start, _, who = line.strip().partition(" ")
            self.records.append((float(start), None if who.startswith("-") else who))

    def answered(self, since: float) -> dict[str, int]:
        seen: dict[str, int] = {}
        for start, who in list(self.records):
            if start >= since:
                seen[str(who)] = seen.get(str(who), 0) + 1
        return seen

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


# --- the agent, as `lbctl run --source kubernetes` -----------------------------------------------


class AgentProcess:
    """`lbctl run --source kubernetes` for the lab's node, its own pin dir and metrics port."""

    def __init__(self, kubeconfig: str, spec: LatencySpec, log_path: Path):
        from lbctl.lab.kube import free_port

        self.spec = spec
        self.metrics_port = free_port()
        self.log_path = log_path
        argv = netns.python_argv(
            "lbctl.cli.main", "run", "--source", "kubernetes", "--kubeconfig", kubeconfig,
            "--node-name", lab.NODE_NAME, "--devices", f"veth{spec.prefix}*", "--uplink-devices", "none",
            "--pin-dir", spec.pin_dir, "--healthz-bind-address", "",
            "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}", "--detach-on-exit")
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=netns.python_env(), start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the agent exited ({self.proc.returncode}): "
                             f"{lab.log_tail(self.log_path)} (log {self.log_path})")

    def synced_once(self) -> bool:
        self.check()
        status = self.status() or {}
        return bool(status.get("last_successful_sync")) and os.path.exists(
            os.path.join(self.spec.pin_dir, "lb4_services"))

    def status(self) -> dict | None:
        from lbctl.agent import status

        try:
            with open(status.status_file(self.spec.pin_dir)) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return None

    def histogram(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return parse_histogram(r.read().decode())

    def stop(self) -> None:
        """SIGTERM (it detaches and unpins: --detach-on-exit), SIGKILL after 30 s; then the eBPF
        mode's cleanup of its pin dir, whatever the agent managed."""
        from lbctl.datapath.ebpf import loader as ebpf
        from lbctl.datapath.ebpf.mode import EbpfMode

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        from lbctl.agent import status

        EbpfMode.cleanup(ebpf.DatapathConfig(pin_dir=self.spec.pin_dir))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status.status_file(self.spec.pin_dir))


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySpec:
    counts: tuple[int, ...] = (1000, 10000)
    changes: int = DEFAULT_CHANGES
    prefix: str = "lbkb"
    pod_cidr: str = "10.244.214.0/24"
    gateway: str = "10.244.214.1"
    web_vip: str = "10.96.1.10"
    pin_dir: str = "/sys/fs/bpf/lbctl-bench-k8s"
    workers: int = 16                  # API writers of the synthetic services
    change_timeout: float = CHANGE_TIMEOUT
    gap: float = GAP_SECONDS

    def lab_spec(self) -> lab.LabSpec:
        web = lab.ServiceSpec("default", "web", self.web_vip, (lab.PortSpec("http", SERVICE_PORT, "TCP", TARGET_PORT),),
                              ("web-0", "web-1", "web-2"))
        return lab.LabSpec(prefix=self.prefix, pod_cidr=self.pod_cidr, gateway=self.gateway,
                           service_cidr="10.96.0.0/16", clients=("client-0",), services=(web,),
                           kubernetes=True)


@dataclass
class Change:
    index: int
    pod: str
    ready: bool                        # True: the pod comes back (added), False: removed
    t_write: float                     # wall clock just before the write was sent
    maps_seconds: float | None = None
    maps_source: str = ""              # "agent" (its status file's sync time) or "poll"
    traffic_seconds: float | None = None
    metric_seconds: float | None = None


@dataclass
class Row:
    services: int                      # service ports the agent holds: N (web + N-1 synthetic)
    created: int = 0                   # synthetic services created for this row
    create_seconds: float = 0.0
    create_per_second: float = 0.0     # objects (Service + EndpointSlice) per second
    create_retries: int = 0            # requests retried (429, 5xx, a dropped connection)
    converge_seconds: float = 0.0      # agent start -> every frontend in the maps
    changes: list[Change] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)
    histogram: dict[str, Any] = field(default_factory=dict)   # the metric at the row's end


@dataclass
class Report:
    counts: list[int]
    changes: int
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    metric_note: str = ""
    seconds: float = 0.0


def run_latency(spec: LatencySpec, progress: Progress = print, work_dir: Path | None = None) -> Report:
    """The whole benchmark: lab and control plane up, agent started, each N measured, and
    everything removed again (lab, control plane, the agent's pins and filters)."""
    counts = sorted(set(spec.counts))
    if counts[-1] - 1 > SYNTHETIC_LIMIT:
        raise BenchError(f"--services {counts[-1]:,}: at most {SYNTHETIC_LIMIT + 1:,} fit in the service CIDR")
    report = Report(counts=counts, changes=spec.changes,
                    machine={"cpus": os.cpu_count(), "kernel": os.uname().release})
    started = time.monotonic()
    lab.check_conflicts(spec.lab_spec())
    progress(f"lab {spec.prefix!r} and a control plane (etcd, kube-apiserver, kube-controller-manager)...")
    state = lab.lab_up(spec.lab_spec())
    agent = probe = None
    try:
        assert state.made.kube_dir
        from lbctl.lab.kube import ControlPlane

        cp = ControlPlane.attach(Path(state.made.kube_dir))
        kubeconfig = str(cp.kubeconfig)
        cp.kubectl("create", "namespace", SYNTHETIC_NAMESPACE)
        pods = {name: state.pods[name].ip for name in ("web-0", "web-1", "web-2")}
        with tempfile.TemporaryDirectory(prefix="lbctl-bench-k8s-") as tmp:
            logs = work_dir or Path(tmp)
            progress(f"control plane up in {time.monotonic() - started:.1f} s")
            probe = Probe(state.pods["client-0"].ns, f"{spec.web_vip}:{SERVICE_PORT}", max_seconds=3600.0)
            have = 0
            for n in counts:
                row = Row(services=n)
                report.rows.append(row)
                create(row, have, n - 1, kubeconfig, spec, progress)
                have = n - 1
                agent = AgentProcess(kubeconfig, spec, logs / f"agent-{n}.log")
                try:
                    converge(row, agent, pods, spec, progress)
                    with FrontendReader(spec.pin_dir) as reader:
                        measure_changes(row, cp, state, pods, spec, reader, agent, probe, progress)
                    row.histogram = agent.histogram()
                finally:
                    agent.stop()
                    agent = None
                progress(format_row(row))
        if not any(c.metric_seconds is not None for r in report.rows for c in r.changes):
            report.metric_note = (f"{METRIC} observed nothing: the agent's source gives no "
                                  "EndpointSlice trigger times (endpoints.kubernetes.io/"
                                  "last-change-trigger-time) on this build")
    finally:
        if probe is not None:
            probe.stop()
        if agent is not None:
            agent.stop()
        lab.lab_down(spec.prefix)
    report.seconds = time.monotonic() - started
    return report


def wait_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def create(row: Row, have: int, want: int, kubeconfig: str, spec: LatencySpec, progress: Progress) -> None:
    """Create synthetic services have..want-1 as fast as the API server takes them (no agent
    runs meanwhile: the rate is the API server's on this machine)."""
    pairs = synthetic_objects(SYNTHETIC_NAMESPACE, have, want - have)
    row.created = len(pairs)
    if not pairs:
        return
    progress(f"[{row.services:,} services] creating {len(pairs):,} Services and their "
             f"EndpointSlices ({spec.workers} writers)...")
    bulk = apply_objects(kubeconfig, pairs, workers=spec.workers)
    row.create_seconds, row.create_retries = bulk.seconds, bulk.retries
    row.create_per_second = bulk.requests / bulk.seconds
    progress(f"[{row.services:,} services] created in {row.create_seconds:.1f} s "
             f"({row.create_per_second:,.0f} objects/s" + (f"; {bulk.retries} retried, first: {bulk.first_retry}"
                                                          if bulk.retries else "") + ")")


def converge(row: Row, agent: AgentProcess, pods: dict[str, str], spec: LatencySpec, progress: Progress) -> None:
    """From the agent's start until every frontend is in the maps (its first list and sync)."""
    started = time.monotonic()
    wait_until(agent.synced_once, 300.0, "the agent's first sync")
    vips = [synthetic_vip(i) for i in range(row.services - 1)]
    web = sorted(f"{ip}:{TARGET_PORT}" for ip in pods.values())
    with FrontendReader(spec.pin_dir) as reader:
        def all_in() -> bool:
            agent.check()
            return (reader.backends(spec.web_vip, SERVICE_PORT) == web
                    and all(reader.has(vip, SERVICE_PORT) for vip in vips))
        wait_until(all_in, 300.0, f"{row.services:,} frontends in the maps", interval=0.2)
    row.converge_seconds = time.monotonic() - started
    progress(f"[{row.services:,} services] agent started; every frontend in the maps after "
             f"{row.converge_seconds:.1f} s")


def pod_ready_patch(ready: bool) -> dict:
    """What a kubelet's status manager sends when a readiness probe starts or stops passing."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = "True" if ready else "False"
    return {"status": {"conditions": [{"type": t, "status": status, "lastTransitionTime": now}
                                      for t in ("ContainersReady", "Ready")],
                       "containerStatuses": [{"name": "server", "ready": ready}]}}


def measure_changes(row: Row, cp: Any, state: lab.LabState, pods: dict[str, str], spec: LatencySpec,
                    reader: FrontendReader, agent: AgentProcess, probe: Probe, progress: Progress) -> None:
    core = cp.core()
    ready = dict.fromkeys(pods, True)
    tag = f"[{row.services:,} services]"
    time.sleep(spec.gap)      # the row's last sync was just now: the first change must not wait for it
    try:
        for k in range(spec.changes):
            pod = f"web-{(k // 2) % 3}"
            coming = not ready[pod]
            before = agent.histogram()
            want = sorted(f"{ip}:{TARGET_PORT}" for name, ip in pods.items()
                          if (ready[name] if name != pod else coming))
            seen = len(probe.records)       # the probe's records from here on: the loop stays cheap
            change = Change(index=k, pod=pod, ready=coming, t_write=time.time())
            core.patch_namespaced_pod_status(pod, "default", pod_ready_patch(coming), _preload_content=False)
            ready[pod] = coming
            deadline = time.monotonic() + spec.change_timeout
            while time.monotonic() < deadline and (change.maps_seconds is None or change.traffic_seconds is None):
                now = time.time()
                if change.maps_seconds is None and reader.backends(spec.web_vip, SERVICE_PORT) == want:
                    synced = agent_sync_time(agent, change.t_write)
                    if synced is not None and synced < now:
                        change.maps_seconds, change.maps_source = synced - change.t_write, "agent"
                    else:
                        change.maps_seconds, change.maps_source = now - change.t_write, "poll"
                if change.traffic_seconds is None:
                    change.traffic_seconds = traffic_moved(probe.records[seen:], change.t_write, pod, coming)
                time.sleep(POLL_SECONDS)
            agent.check()
            change.metric_seconds = observation(before, agent.histogram())
            row.changes.append(change)
            progress(f"\r{tag} change {k + 1}/{spec.changes} ({pod} {'added' if coming else 'removed'}): "
                     f"maps {ms(change.maps_seconds)}, traffic {ms(change.traffic_seconds)}, "
                     f"metric {ms(change.metric_seconds)}   ")
            time.sleep(spec.gap)
    finally:
        for pod, is_ready in ready.items():
            if not is_ready:
                core.patch_namespaced_pod_status(pod, "default", pod_ready_patch(True), _preload_content=False)
    row.summary = {"maps": summary([c.maps_seconds for c in row.changes]),
                   "traffic": summary([c.traffic_seconds for c in row.changes]),
                   "metric": summary([c.metric_seconds for c in row.changes])}


def agent_sync_time(agent: AgentProcess, t0: float, wait: float = 0.2) -> float | None:
    """When the agent's sync of a change after t0 ended, from its status file (written right
    after the sync, so it may trail the maps a little: read for up to `wait` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        last = (agent.status() or {}).get("last_sync") or {}
        if last.get("kind") == "change" and last.get("time", 0) > t0:
            return float(last["time"])
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_SECONDS)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


# --- output --------------------------------------------------------------------------------------


def format_row(row: Row) -> str:
    lines = [f"\n[{row.services:,} services] {len(row.changes)} changes "
             f"(p50 / p99 / max; timeouts):"]
    for name, label in (("maps", "API write -> maps"), ("traffic", "API write -> traffic moved"),
                        ("metric", METRIC)):
        s = row.summary.get(name) or summary([])
        if not s["count"]:
            lines.append(f"  {label:<48} no samples" + (f" ({s['missing']} timed out)" if name != "metric" else ""))
            continue
        lines.append(f"  {label:<48} {ms(s['p50']):>9} / {ms(s['p99']):>9} / {ms(s['max']):>9}"
                     + (f"; {s['missing']} timed out" if s["missing"] and name != "metric" else ""))
    return "\n".join(lines)


def format_report(report: Report) -> str:
    lines = [f"{'SERVICES':>9} {'CREATED':>8} {'OBJ/S':>6} {'CONVERGE':>9}  {'MAPS p50':>9} {'p99':>8} "
             f"{'TRAFFIC p50':>11} {'p99':>8} {'METRIC p50':>10} {'p99':>8}"]
    for r in report.rows:
        s = r.summary
        lines.append(f"{r.services:>9,} {r.created:>8,} {r.create_per_second:>6,.0f} {r.converge_seconds:>8.1f}s  "
                     f"{ms(s['maps']['p50']):>9} {ms(s['maps']['p99']):>8} "
                     f"{ms(s['traffic']['p50']):>11} {ms(s['traffic']['p99']):>8} "
                     f"{ms(s['metric']['p50']):>10} {ms(s['metric']['p99']):>8}")
    if report.metric_note:
        lines.append(f"note: {report.metric_note}")
    lines.append(f"({report.changes} changes per row, so p99 is the worst seen; the run took "
                 f"{report.seconds:.0f} s)")
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = (("maps", "API write -> maps"), ("traffic", "API write -> traffic moved"),
             ("metric", "network_programming_duration (metric)"))
    width = 0.8 / len(names)
    for j, (name, label) in enumerate(names):
        for i, row in enumerate(report.rows):
            values = [getattr(c, f"{name}_seconds") for c in row.changes]
            values = [v * 1000 for v in values if v is not None]
            if values:
                ax.scatter([i + (j - 1) * width] * len(values), values, s=10, alpha=0.6,
                           color=f"C{j}", label=label if i == 0 else None)
    if report.metric_note:
        ax.text(0.01, 0.01, f"metric: {report.metric_note}", transform=ax.transAxes, fontsize=6, wrap=True)
    ax.set_xticks(range(len(report.rows)))
    ax.set_xticklabels([f"{r.services:,} services" for r in report.rows])
    ax.set_ylabel("milliseconds after the API write")
    ax.set_yscale("log")
    ax.set_title(f"lbctl bench --k8s-latency: endpoint change to datapath ({report.changes} changes each)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_dict(report: Report) -> dict:
    return asdict(report)


# --- the CLI -------------------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace) -> LatencySpec:
    """`lbctl bench --k8s-latency` options -> LatencySpec; BenchError names a bad one."""
    counts = tuple(int(c) for c in (args.services or DEFAULT_COUNTS).split(","))
    if min(counts) < 1:
        raise BenchError("--services: every count must be at least 1")
    if max(counts) - 1 > SYNTHETIC_LIMIT:
        raise BenchError(f"--services {max(counts):,}: at most {SYNTHETIC_LIMIT + 1:,} fit in the service CIDR")
    return LatencySpec(counts=counts, changes=args.changes or DEFAULT_CHANGES, change_timeout=args.change_timeout)


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(JSON, PNG) paths: --plot for the plot if given, else under --out-dir."""
    out = Path(args.out_dir)
    return out / "bench-k8s-latency.json", Path(args.plot) if args.plot else out / "bench-k8s-latency.png"


def cmd_bench_k8s_latency(args: argparse.Namespace) -> int:
    import logging

    out = sys.stderr if args.json else sys.stdout
    tty = out.isatty()

    def progress(msg: str) -> None:
        if msg.startswith("\r") and not tty:
            msg = msg[1:].rstrip()
        elif not msg.startswith("\r") and tty:
            msg = "\n" + msg if getattr(progress, "inline", False) else msg
        end = "" if msg.startswith("\r") else "\n"
        progress.inline = msg.startswith("\r")   # type: ignore[attr-defined]
        print(msg, end=end, file=out, flush=True)

    for name in ("lbctl.lab", "kubernetes", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    json_path, png_path = output_paths(args)
    try:
        spec = spec_from_args(args)
        progress(f"lbctl bench --k8s-latency: {spec.changes} endpoint changes at each of "
                 f"{', '.join(f'{n:,}' for n in spec.counts)} services")
        report = run_latency(spec, progress)
    except (BenchError, lab.LabError, ValueError) as exc:
        print(f"\nlbctl bench: {exc}", file=sys.stderr)
        return 1
    data = report_dict(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1))
    plot(report, png_path)
    if args.json:
        print(json.dumps(data | {"json": str(json_path), "plot": str(png_path)}, indent=2))
    else:
        print("\n" + format_report(report))
        print(f"raw samples: {json_path}; plot: {png_path}")
    failed = [c for r in report.rows for c in r.changes if c.maps_seconds is None or c.traffic_seconds is None]
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        sys.exit(probe_main(sys.argv[2:]))
    print("usage: python -m lbctl.bench.k8s_latency probe --target IP:PORT", file=sys.stderr)
    sys.exit(2)
