"""The Kubernetes source against an in-process list/watch double, for the faults the real API
server cannot be made to show at a chosen moment: 410 Gone in the middle of a watch, a watch
dropped mid-stream, calls failing before the first list. (tests/test_agent_k8s.py runs the
source and the agent against the real API server.)"""
from __future__ import annotations

import time

import pytest

from lbctl.sources.base import Source, SourceUnavailable
from lbctl.sources.kubernetes import (
    PROXY_LABEL_SELECTOR,
    KubernetesSource,
    jittered,
    next_backoff,
)
from lbctl.testing.kubefake import FakeCluster, FakeHTTPError

TIMEOUT = 10.0   # a safety net for the watch threads, never the assertion


def service(name: str, ip: str, port: int = 80, namespace: str = "default", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": port,
                                                                    "targetPort": 8080, "protocol": "TCP"}],
                     "selector": {"app": name}, **spec}}


def endpointslice(name: str, svc: str, *addresses: str, namespace: str = "default",
                  address_type: str = "IPv4") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": address_type,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


@pytest.fixture
def cluster():
    return FakeCluster()


@pytest.fixture
def source(cluster):
    src = KubernetesSource(None, "node-a", watched=cluster.kinds(), server="fake", initial_backoff=0.01,
                           max_backoff=0.05, ready_timeout=TIMEOUT)
    yield src
    src.stop()


def next_snapshot(source, timeout: float = TIMEOUT):
    """Polls until the source has news (the watch threads apply events asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            snapshot = source.poll()
        except SourceUnavailable:
            snapshot = None
        if snapshot is not None:
            return snapshot
        time.sleep(0.01)
    pytest.fail("no snapshot from the source")


def settle(source, cluster, timeout: float = TIMEOUT) -> None:
    """Waits until the source's store holds exactly the fake cluster's objects and versions."""
    def held(kind):
        with source._lock:
            return {key: o.rv for key, o in source._store[kind].items()}

    def truth(collection):
        return {key.lstrip("/"): o["metadata"]["resourceVersion"] for key, o in collection.objects.items()}

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if held("Service") == truth(cluster.services) and held("EndpointSlice") == truth(cluster.slices):
            return
        time.sleep(0.01)
    pytest.fail("the source did not catch up")


def endpoints(snapshot, key: str) -> list[str]:
    return sorted(e.addresses[0] for s in snapshot.slices.get(key, ()) for e in s.endpoints)


def test_lists_then_watches_with_kube_proxys_selectors(cluster, source):
    cluster.services.put(service("web", "10.96.0.10"))
    cluster.slices.put(endpointslice("web-a", "web", "10.244.0.5"))
    cluster.nodes.put({"kind": "Node", "metadata": {"name": "node-a"}})
    assert isinstance(source, Source)
    first = source.poll()
    assert list(first.services) == ["default/web"]
    assert endpoints(first, "default/web") == ["10.244.0.5"]
    assert source.node["metadata"]["name"] == "node-a"
    assert source.poll() is None                     # nothing new
    cluster.slices.put(endpointslice("web-a", "web", "10.244.0.5", "10.244.0.6"))
    assert endpoints(next_snapshot(source), "default/web") == ["10.244.0.5", "10.244.0.6"]
    cluster.services.delete("default", "web")
    assert next_snapshot(source).services == {}
    # what kube-proxy asks for: both label requirements on Services and EndpointSlices, the
    # Node by name; watches from the list's resourceVersion with bookmarks
    for collection in (cluster.services, cluster.slices):
        assert {c["label_selector"] for c in collection.calls} == {PROXY_LABEL_SELECTOR}
        assert all(c["allow_watch_bookmarks"] and c["resource_version"] for c in collection.calls if c.get("watch"))
    assert {c["field_selector"] for c in cluster.nodes.calls} == {"metadata.name=node-a"}


def test_slices_of_one_service_are_merged_and_dual_stack_objects_read(cluster, source):
    cluster.services.put(service("web", "10.96.0.10", ipFamilies=["IPv4", "IPv6"],
                                 ipFamilyPolicy="PreferDualStack",
                                 clusterIPs=["10.96.0.10", "fd00::10"]))
    cluster.slices.put(endpointslice("web-a", "web", "10.244.0.5"))
    cluster.slices.put(endpointslice("web-b", "web", "10.244.0.6"))
    cluster.slices.put(endpointslice("web-v6", "web", "fd00:244::5", address_type="IPv6"))
    snapshot = source.poll()
    assert snapshot.services["default/web"].cluster_ips == ("10.96.0.10", "fd00::10")
    assert [s.name for s in snapshot.slices["default/web"]] == ["web-a", "web-b", "web-v6"]
    from lbctl.model.desired import service_ports
    (info,) = service_ports(snapshot)
    assert [e.address for e in info.endpoints] == ["10.244.0.5", "10.244.0.6"]   # the IPv4 family


def test_a_bad_object_is_one_problem_naming_it_and_the_rest_stays(cluster, source):
    cluster.services.put(service("web", "10.96.0.10"))
    cluster.services.put(service("bad", "10.96.0.11", port=70000))
    snapshot = source.poll()
    assert list(snapshot.services) == ["default/web"]
    (problem,) = snapshot.problems
    assert problem.obj == "Service default/bad" and "70000" in problem.message
    cluster.services.put(service("bad", "10.96.0.11", port=81))
    snapshot = next_snapshot(source)
    assert sorted(snapshot.services) == ["default/bad", "default/web"] and snapshot.problems == ()


def test_a_repeated_event_changes_nothing(cluster, source):
    cluster.services.put(service("web", "10.96.0.10"))
    first = source.poll()
    obj = cluster.services.objects["default/web"]
    cluster.services.history.append((cluster.services.history[-1][0], "MODIFIED", obj))  # a resend
    cluster.services.drop_watches()                  # the resend reaches a new watch too
    cluster.slices.put(endpointslice("web-a", "web", "10.244.0.5"))
    second = next_snapshot(source)
    assert second.services["default/web"] is first.services["default/web"]
    assert source.events == 1                         # the slice only


def test_gone_mid_watch_relists_and_keeps_what_did_not_change(cluster, source):
    """410 while the source was cut off: it lists again, and the relist replaces the store:
    deleted objects go, changed ones change, unchanged ones stay the very same objects (so the
    datapath sees no change for them). No event is lost."""
    cluster.services.put(service("web", "10.96.0.10"))
    cluster.services.put(service("db", "10.96.0.11"))
    cluster.services.put(service("old", "10.96.0.12"))
    first = source.poll()
    cluster.services.fail_next = [ConnectionRefusedError("cut")] * 3   # the next calls fail...
    cluster.services.drop_watches()                   # ...after the open watch drops mid-stream
    cluster.services.put(service("db", "10.96.0.11", port=5432))
    cluster.services.delete("default", "old")
    cluster.services.compact()                        # etcd compacted meanwhile: the rv is gone
    snapshot = next_snapshot(source)
    assert sorted(snapshot.services) == ["default/db", "default/web"]
    assert snapshot.services["default/db"].ports[0].port == 5432
    assert snapshot.services["default/web"] is first.services["default/web"]
    assert source.relists == 1
    assert source.poll() is None


def test_a_relist_with_nothing_changed_is_no_news(cluster, source):
    cluster.services.put(service("web", "10.96.0.10"))
    source.poll()
    cluster.next_rv()                                 # other resources moved etcd's revision on
    cluster.services.compact()
    cluster.services.drop_watches()
    deadline = time.monotonic() + TIMEOUT
    while source.relists == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.relists == 1
    assert source.poll() is None


def test_a_watch_dropped_mid_stream_resumes_from_its_resource_version(cluster, source):
    """Every change made while the watch was down arrives once, in order: no relist needed."""
    cluster.services.put(service("web", "10.96.0.10"))
    source.poll()
    cluster.services.drop_watches()
    cluster.services.fail_next = [ConnectionResetError("reset")]
    for port in (81, 82, 83):
        cluster.services.put(service("web", "10.96.0.10", port=port))
    cluster.services.put(service("db", "10.96.0.11"))
    settle(source, cluster)
    snapshot = source.poll()
    assert snapshot.services["default/web"].ports[0].port == 83
    assert "default/db" in snapshot.services
    assert source.relists == 0 and source.events == 4
    resumed = [c for c in cluster.services.calls if c.get("watch")][1:]
    assert [int(c["resource_version"]) for c in resumed][-1] >= int(
        cluster.services.objects["default/web"]["metadata"]["resourceVersion"]) - 3


def test_bookmarks_move_the_resource_version_on(cluster, source):
    cluster.services.put(service("web", "10.96.0.10"))
    source.poll()
    cluster.slices.put(endpointslice("other", "other", "10.244.0.9"))   # rv moves on elsewhere
    cluster.services.bookmark()
    deadline = time.monotonic() + TIMEOUT
    target = str(cluster.rv)
    cluster.services.drop_watches()
    while time.monotonic() < deadline:
        watches = [c for c in cluster.services.calls if c.get("watch")]
        if watches and watches[-1]["resource_version"] == target:
            break
        time.sleep(0.01)
    assert [c for c in cluster.services.calls if c.get("watch")][-1]["resource_version"] == target


def test_never_listed_is_unavailable_not_no_services(cluster):
    cluster.services.fail_next = [ConnectionRefusedError("refused")] * 1000
    src = KubernetesSource(None, "node-a", watched=cluster.kinds(), server="https://api:6443",
                           initial_backoff=0.01, max_backoff=0.02, ready_timeout=0.3)
    try:
        with pytest.raises(SourceUnavailable, match="Kubernetes API server https://api:6443: not listed yet"):
            src.poll()
        with pytest.raises(SourceUnavailable):
            src.poll()                               # later polls do not wait
        cluster.services.fail_next = []
        assert list(next_snapshot(src).services) == []
    finally:
        src.stop()


def test_http_errors_are_retried(cluster, source):
    cluster.services.put(service("web", "10.96.0.10"))
    source.poll()
    cluster.services.fail_next = [FakeHTTPError(500, "Internal Server Error"), FakeHTTPError(429, "slow down")]
    cluster.services.drop_watches()
    cluster.services.put(service("db", "10.96.0.11"))
    assert "default/db" in next_snapshot(source).services


def test_backoff_doubles_to_its_cap_with_jitter():
    delays, delay = [], 0.0
    for _ in range(8):
        delay = next_backoff(delay, 0.8, 30.0)
        delays.append(delay)
    assert delays == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    assert jittered(1.0, lambda: 0.0) == 1.0 and jittered(1.0, lambda: 0.999) == pytest.approx(1.999)


def test_fileno_wakes_on_news(cluster, source):
    import select

    cluster.services.put(service("web", "10.96.0.10"))
    source.poll()
    assert select.select([source.fileno()], [], [], 0)[0] == []
    cluster.services.put(service("db", "10.96.0.11"))
    assert select.select([source.fileno()], [], [], TIMEOUT)[0] == [source.fileno()]
    next_snapshot(source)
    assert select.select([source.fileno()], [], [], 0)[0] == []
