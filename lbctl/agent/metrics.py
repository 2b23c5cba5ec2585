"""Prometheus `/metrics` on `--metrics-bind-address` (127.0.0.1:10249, kube-proxy's default).

kube-proxy's names where the meaning is the same (pkg/proxy/metrics), so that dashboards and
alerts written for kube-proxy work:

    kubeproxy_sync_proxy_rules_duration_seconds{ip_family}           every sync (histogram)
    kubeproxy_sync_full_proxy_rules_duration_seconds{ip_family}      resyncs: the kernel read back
    kubeproxy_sync_partial_proxy_rules_duration_seconds{ip_family}   syncs of changes
    kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family}     last successful sync
    kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family}  last change queued
    kubeproxy_network_programming_duration_seconds{ip_family}        change in the API -> programmed,
        from each EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time, when the
        source provides it (the Kubernetes source does; a manifests directory has none)
    kubeproxy_sync_proxy_rules_service_changes_total, ..._endpoint_changes_total
        services / endpoint sets that differed from the previous sync
    kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family,traffic_policy}
    kubeproxy_proxy_healthz_total{code}, kubeproxy_proxy_livez_total{code}

lbctl's own, read from the pinned maps at scrape time (``MapCollector``, through
``lbctl.datapath.ebpf.dump.collect``, the reader `lbctl dump maps` uses):

    lbctl_map_entries{map}, lbctl_map_max_entries{map}      occupancy of each hash map
    lbctl_service_packets_total{service,frontend}, ..._bytes_total, ..._flows_total
    lbctl_datapath_packets_total{counter}                   every datapath counter (LB_STAT_*)
    lbctl_datapath_drops_total{reason}                      the counters that are drops
    lbctl_syncs_total{mode,kind,result}, lbctl_problems     the agent's syncs, objects skipped

The eBPF maps exist in eBPF mode only; in the kube-proxy modes the map metrics are absent.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

from lbctl.agent.health import JsonHandler, ListenerWithRetry, ProxyHealth

log = logging.getLogger("lbctl.agent.metrics")

DEFAULT_METRICS_BIND_ADDRESS = "127.0.0.1:10249"
IP_FAMILY = "IPv4"

SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))      # ExponentialBuckets(0.001, 2, 15)
# kube-proxy's merge() starts from make([]float64, 1): a first bucket at 0
NETWORK_PROGRAMMING_BUCKETS = ((0.0, 0.25, 0.5) + tuple(float(s) for s in range(1, 60))
                               + tuple(float(s) for s in range(60, 120, 5))
                               + tuple(float(s) for s in range(120, 301, 30)))

# Maps whose occupancy is worth watching (hash maps that fill up; the arrays are always full).
OCCUPANCY_MAPS = ("lb4_services", "lb4_backends", "lb4_ct", "lb4_affinity", "lb4_source_ranges",
                  "lb4_maglev")


class Metrics:
    """kube-proxy's sync metrics and the agent's own, in a registry of their own."""

    def __init__(self, mode: str, pin_dir: str | None = None, health: ProxyHealth | None = None):
        self.mode = mode
        disable_created_metrics()          # no *_created series: kube-proxy (Go's client) has none
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        family = ["ip_family"]
        self.sync_duration = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                                       "SyncProxyRules latency in seconds", family, buckets=SYNC_BUCKETS,
                                       registry=r)
        self.full_sync_duration = Histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                            "SyncProxyRules latency in seconds for full resyncs", family,
                                            buckets=SYNC_BUCKETS, registry=r)
        self.partial_sync_duration = Histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                               "SyncProxyRules latency in seconds for partial resyncs",
                                               family, buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", family, registry=r)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", family, registry=r)
        self.network_programming = Histogram("kubeproxy_network_programming_duration_seconds",
                                             "In Cluster Network Programming Latency in seconds", family,
                                             buckets=NETWORK_PROGRAMMING_BUCKETS, registry=r)
        self.service_changes = Counter("kubeproxy_sync_proxy_rules_service_changes",
                                       "Cumulative proxy rules Service changes", registry=r)
        self.endpoint_changes = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint changes", registry=r)
        self.no_local_endpoints = Gauge("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                                        "Number of services with a Local traffic policy and no endpoints",
                                        ["ip_family", "traffic_policy"], registry=r)
        self.syncs = Counter("lbctl_syncs", "Syncs of the datapath, by kind (change, retry, resync) "
                             "and result (ok, failed)", ["mode", "kind", "result"], registry=r)
        self.problems = Gauge("lbctl_problems", "Objects the last sync could not program (each is "
                              "logged, naming the object)", registry=r)
        self.for_family(self.sync_duration, self.full_sync_duration, self.partial_sync_duration,
                        self.last_sync, self.last_queued, self.network_programming)
        for policy in ("internal", "external"):
            self.no_local_endpoints.labels(IP_FAMILY, policy).set(0)
        self.last_queued.labels(IP_FAMILY).set(time.time())   # kube-proxy: "informers syncing"
        ProcessCollector(registry=r)
        if health is not None:
            r.register(HealthCollector(health))
        if pin_dir is not None:
            r.register(MapCollector(pin_dir))

    @staticmethod
    def for_family(*metrics) -> None:
        """Creates the IPv4 series up front, so that they are scraped (as zero) before a sync."""
        for metric in metrics:
            metric.labels(IP_FAMILY)

    def queued(self, trigger_times: Iterable[float] = ()) -> None:
        self.last_queued.labels(IP_FAMILY).set(time.time())

    def synced(self, kind: str, seconds: float, ok: bool, problems: int = 0) -> None:
        self.sync_duration.labels(IP_FAMILY).observe(seconds)
        (self.full_sync_duration if kind == "resync" else self.partial_sync_duration).labels(
            IP_FAMILY).observe(seconds)
        self.syncs.labels(self.mode, kind, "ok" if ok else "failed").inc()
        self.problems.set(problems)
        if ok:
            self.last_sync.labels(IP_FAMILY).set(time.time())

    def programmed(self, trigger_times: Iterable[float]) -> None:
        """Changes whose trigger times (wall clock, from the API) are now in the datapath."""
        now = time.time()
        for trigger in trigger_times:
            self.network_programming.labels(IP_FAMILY).observe(max(0.0, now - trigger))

    def changes(self, services: int, endpoints: int) -> None:
        self.service_changes.inc(services)
        self.endpoint_changes.inc(endpoints)

    def no_local(self, internal: int, external: int) -> None:
        self.no_local_endpoints.labels(IP_FAMILY, "internal").set(internal)
        self.no_local_endpoints.labels(IP_FAMILY, "external").set(external)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthCollector:
    """kubeproxy_proxy_healthz_total / _livez_total{code}: the answers /healthz and /livez gave."""

    def __init__(self, health: ProxyHealth):
        self.health = health

    def collect(self):
        counts = dict(self.health.counts)
        for path, name, what in (("/healthz", "kubeproxy_proxy_healthz", "healthz"),
                                 ("/livez", "kubeproxy_proxy_livez", "livez")):
            family = CounterMetricFamily(name, f"Cumulative proxy {what} HTTP status", labels=["code"])
            for code in (200, 503):
                family.add_metric([str(code)], counts.get((path, code), 0))
            yield family


def is_drop(counter: str) -> bool:
    """The datapath counters that count dropped packets (by reason)."""
    return counter.startswith("drop") or counter in ("nat_failed",)


class MapCollector:
    """lbctl's datapath, read from the pinned maps at each scrape (never cached: a scrape shows
    what the kernel holds now). A pin dir without maps (another mode, or before the first start)
    gives no series; a map that cannot be read gives lbctl_maps_readable 0 and one log line."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self._failing: str | None = None

    def describe(self):
        return []     # the series depend on the maps present: nothing to check at registration

    def collect(self):
        from lbctl.datapath.ebpf import dump

        readable = GaugeMetricFamily("lbctl_maps_readable", "1 when the pinned maps could be read "
                                     "at this scrape", labels=["pin_dir"])
        if not os.path.exists(os.path.join(self.pin_dir, "lb4_services")):
            return
        try:
            state = dump.collect(self.pin_dir)
            occupancy = self._occupancy(state)
        except (OSError, ValueError, KeyError) as exc:
            if str(exc) != self._failing:
                log.error("metrics: cannot read the maps under %s: %s", self.pin_dir, exc)
                self._failing = str(exc)
            readable.add_metric([self.pin_dir], 0)
            yield readable
            return
        if self._failing is not None:
            log.info("resolved: metrics read the maps under %s again", self.pin_dir)
            self._failing = None
        readable.add_metric([self.pin_dir], 1)
        yield readable
        yield from self._occupancy_families(occupancy)
        yield from self._service_families(state["services"])
        packets = CounterMetricFamily("lbctl_datapath_packets", "Packets by datapath counter "
                                      "(LB_STAT_*: new flows, conntrack hits, replies, drops...)",
                                      labels=["counter"])
        drops = CounterMetricFamily("lbctl_datapath_drops", "Packets the datapath dropped or marked "
                                    "for dropping, by reason", labels=["reason"])
        for name, value in state["counters"].items():
            packets.add_metric([name], value)
            if is_drop(name):
                drops.add_metric([name], value)
        yield packets
        yield drops
        yield GaugeMetricFamily("lbctl_conntrack_entries", "Conntrack map entries (two per flow)",
                                value=state["conntrack_entries"])

    def _occupancy(self, state: dict) -> dict[str, tuple[int, int]]:
        from lbctl.datapath.ebpf.bpfsys import BpfMap

        found = {}
        for name in OCCUPANCY_MAPS:
            path = os.path.join(self.pin_dir, name)
            if not os.path.exists(path):
                continue
            with BpfMap.open_pinned(path) as m:
                entries = state["conntrack_entries"] if name == "lb4_ct" else m.count()
                found[name] = (entries, m.info.max_entries)
        return found

    @staticmethod
    def _occupancy_families(occupancy: dict[str, tuple[int, int]]):
        entries = GaugeMetricFamily("lbctl_map_entries", "Entries in a BPF map", labels=["map"])
        limit = GaugeMetricFamily("lbctl_map_max_entries", "Size of a BPF map (max_entries)", labels=["map"])
        for name, (count, max_entries) in sorted(occupancy.items()):
            entries.add_metric([name], count)
            limit.add_metric([name], max_entries)
        yield entries
        yield limit

    @staticmethod
    def _service_families(services: list[dict]):
        labels = ["service", "frontend"]
        packets = CounterMetricFamily("lbctl_service_packets", "Packets to a service frontend", labels=labels)
        bytes_ = CounterMetricFamily("lbctl_service_bytes", "Bytes to a service frontend", labels=labels)
        flows = CounterMetricFamily("lbctl_service_flows", "New flows to a service frontend", labels=labels)
        backends = GaugeMetricFamily("lbctl_service_backends", "Backends a frontend balances over",
                                     labels=labels)
        for row in services:
            key = [row["name"] or f"id {row['id']}", row["frontend"]]
            packets.add_metric(key, row["packets"])
            bytes_.add_metric(key, row["bytes"])
            flows.add_metric(key, row["flows"])
            backends.add_metric(key, row["count"])
        yield from (packets, bytes_, flows, backends)


def metrics_handler(metrics: Metrics):
    class Handler(JsonHandler):
        def answer(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                return 200, metrics.exposition(), CONTENT_TYPE_LATEST
            if path == "/healthz":      # the metrics server's own liveness, as kube-proxy's
                return 200, b"ok", "text/plain; charset=utf-8"
            if path == "/proxyMode":
                return 200, metrics.mode.encode(), "text/plain; charset=utf-8"
            return None
    return Handler


def serve_metrics(metrics: Metrics, address: str = DEFAULT_METRICS_BIND_ADDRESS,
                  hard_fail: bool = False) -> ListenerWithRetry:
    return ListenerWithRetry("metrics server", address, metrics_handler(metrics), hard_fail=hard_fail).start()
