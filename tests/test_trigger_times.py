"""Network programming latency: the Kubernetes source hands on each changed EndpointSlice's
endpoints.kubernetes.io/last-change-trigger-time once, and the agent observes each in
kubeproxy_network_programming_duration_seconds once it is programmed; against the fake API
and against the real API server, whose EndpointSlice controller sets the annotation."""
from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from test_agent import RecordingMode
from test_source_kubernetes import endpointslice, next_snapshot, service, settle

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.agent.metrics import Metrics
from lbctl.agent.status import Operations
from lbctl.sources.kubernetes import TRIGGER_TIME_ANNOTATION, KubernetesSource, parse_rfc3339
from lbctl.testing.kubefake import FakeCluster

TIMEOUT = 10.0   # a safety net for the watch threads, never the assertion


def rfc3339(seconds: float) -> str:
    """As Go's time.RFC3339Nano writes it (what the controller puts in the annotation)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def triggered(slice_doc: dict, seconds: float | str) -> dict:
    text = seconds if isinstance(seconds, str) else rfc3339(seconds)
    slice_doc["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: text}
    return slice_doc


@pytest.mark.parametrize("text,seconds", [
    ("2026-12-02T14:10:40Z", 1796220640.0),
    ("2026-12-02T14:10:40.5Z", 1796220640.5),
    ("2026-12-02T14:10:40.123456789Z", 1796220640.123456789),
    ("2026-12-02T16:10:40+02:00", 1796220640.0),
    ("2026-12-02t14:10:40z", 1796220640.0),
])
def test_rfc3339(text, seconds):
    assert parse_rfc3339(text) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-12-02 14:10:40", "2026-13-02T14:10:40Z",
                                  "2026-12-02T14:10:40"])
def test_not_rfc3339(text):
    assert parse_rfc3339(text) is None


@pytest.fixture
def cluster():
    return FakeCluster()


@pytest.fixture
def source(cluster):
    src = KubernetesSource(None, "node-a", watched=cluster.kinds(), server="fake", initial_backoff=0.01,
                           max_backoff=0.05, ready_timeout=TIMEOUT)
    yield src
    src.stop()


def news(source, cluster):
    """The next snapshot, once the source holds everything the fake cluster does."""
    settle(source, cluster)
    return next_snapshot(source)


def test_each_changed_slice_brings_its_trigger_time_once(cluster, source):
    source.start()
    cluster.services.put(service("web", "10.96.0.10"))
    cluster.services.put(service("db", "10.96.0.11"))
    # what the first list finds from before the agent started is not the agent's latency
    cluster.slices.put(triggered(endpointslice("db-1", "db", "10.244.0.9"), source.started - 600))
    first = source.started + 0.25
    cluster.slices.put(triggered(endpointslice("web-1", "web", "10.244.0.1"), first))
    assert news(source, cluster).trigger_times == (pytest.approx(first, abs=1e-5),)

    # the same trigger time again (a status-only rewrite of the slice): the same change
    cluster.slices.put(triggered(endpointslice("web-1", "web", "10.244.0.1", "10.244.0.2"), first))
    snapshot = news(source, cluster)
    assert len(snapshot.slices["default/web"][0].endpoints) == 2 and snapshot.trigger_times == ()

    second = first + 1.5
    cluster.slices.put(triggered(endpointslice("web-1", "web", "10.244.0.2"), second))
    cluster.slices.put(triggered(endpointslice("db-1", "db", "10.244.0.8"), second + 0.5))
    assert sorted(news(source, cluster).trigger_times) == [pytest.approx(second, abs=1e-5),
                                                            pytest.approx(second + 0.5, abs=1e-5)]

    # a relist after 410 Gone finds the same slices: no trigger counted twice
    cluster.slices.fail_next = [ConnectionRefusedError("cut")] * 2
    cluster.slices.drop_watches()
    cluster.services.put(service("cache", "10.96.0.12"))    # meanwhile, etcd moves on...
    cluster.slices.compact()                                # ...and compacts
    deadline = time.monotonic() + TIMEOUT
    while source.relists == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.relists == 1
    snapshot = news(source, cluster)
    assert "default/cache" in snapshot.services and snapshot.trigger_times == ()

    # a slice deleted, one without the annotation, one with a bad one: no trigger time
    cluster.slices.delete("default", "db-1")
    cluster.slices.put(endpointslice("web-2", "web", "10.244.0.3"))
    cluster.slices.put(triggered(endpointslice("web-3", "web", "10.244.0.4"), "soon"))
    snapshot = news(source, cluster)
    assert snapshot.trigger_times == () and not snapshot.problems


def histogram_count(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("kubeproxy_network_programming_duration_seconds_count",
                                             {"ip_family": "IPv4"}) or 0.0


def test_the_agent_observes_each_trigger_once_programmed(cluster, source, tmp_path):
    metrics = Metrics("recording")
    ops = Operations(mode="recording", source="fake", pin_dir=str(tmp_path / "pins"), metrics=metrics,
                     write_status=False)
    clock = [100.0]
    agent = Agent(source, mode=RecordingMode(), options=AgentOptions(min_sync_period=5.0),
                  clock=lambda: clock[0], observer=ops)
    source.start()
    cluster.services.put(service("web", "10.96.0.10"))
    cluster.slices.put(triggered(endpointslice("web-1", "web", "10.244.0.1"), time.time()))
    settle(source, cluster)
    agent.turn()
    assert agent.syncs == 1 and histogram_count(metrics) == 1

    # two changes within min_sync_period: one sync of both, each trigger observed once
    cluster.slices.put(triggered(endpointslice("web-1", "web", "10.244.0.2"), time.time()))
    settle(source, cluster)
    agent.turn()
    cluster.slices.put(triggered(endpointslice("web-1", "web", "10.244.0.3"), time.time() + 0.001))
    settle(source, cluster)
    agent.turn()
    assert agent.syncs == 1 and histogram_count(metrics) == 1, "held for min_sync_period"
    clock[0] += 5.0
    agent.turn()
    assert agent.syncs == 2 and histogram_count(metrics) == 3
    agent.turn()
    assert histogram_count(metrics) == 3, "nothing new, nothing observed"


# --- the real API server ---------------------------------------------------------------------------


@pytest.mark.kube
def test_the_endpointslice_controllers_trigger_times_reach_the_snapshot(kube_control_plane, kube_namespace,
                                                                       kube_node):
    from kubeapi import wait_for

    from lbctl.model.desired import service_ports

    cp, ns = kube_control_plane, kube_namespace
    src = KubernetesSource(cp.api(), kube_node, ready_timeout=60)
    seen: list[float] = []

    def poll_until(done):
        def probe():
            snapshot = src.poll()
            if snapshot is not None:
                seen.extend(snapshot.trigger_times)
                if done(snapshot):
                    return snapshot
            return None
        return wait_for(probe, "the source's snapshot")

    def web_ready(snapshot, count):
        ports = [p for p in service_ports(snapshot) if p.service.key == f"{ns}/web"]
        return bool(ports) and sum(e.ready for e in ports[0].endpoints) == count

    def annotations():
        out = cp.kubectl("-n", ns, "get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o",
                         "jsonpath={.items[*].metadata.annotations.endpoints\\.kubernetes\\.io/"
                         "last-change-trigger-time}").stdout
        return {parse_rfc3339(t) for t in out.split()}

    try:
        src.poll()
        for i in range(2):
            cp.create_pod(ns, f"web-{i}", node=kube_node, ip=f"10.244.201.{10 + i}", labels={"app": "web"})
        cp.kubectl("-n", ns, "apply", "-f", "-", input="""
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
""")
        poll_until(lambda s: web_ready(s, 2))
        (created,) = annotations()
        assert created is not None and created in seen and seen.count(created) == 1
        assert created >= src.started

        # the controller takes a pod's Ready lastTransitionTime, in whole seconds: one in the
        # same second as before is no change to it (and leaves the annotation out)
        while time.time() < created + 1.1:
            time.sleep(0.05)
        cp.set_pod_ready(ns, "web-1", False)
        poll_until(lambda s: web_ready(s, 1))
        (changed,) = annotations()
        assert changed is not None and changed > created
        assert seen.count(changed) == 1 and seen.count(created) == 1, "each change once"
    finally:
        src.stop()
