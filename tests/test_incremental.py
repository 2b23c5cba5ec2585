"""Incremental syncs: the desired-state cache and the reconciler's visit of changed frontends
give exactly what a full pass gives, on seeded random change sequences (services changed,
added, removed; the node's addresses changed; restarts, resyncs and failed writes in between);
one endpoint change next to 10,000 services is a handful of map writes, from the manifests
source and from the Kubernetes source."""
from __future__ import annotations

import ipaddress
import json
import random
import time

import pytest

from lbctl.datapath.ebpf import dump, maglev
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.datapath.ebpf.reconcile import (
    AFFINITY,
    BACKEND_STATS,
    BACKENDS,
    SERVICE_STATS,
    SERVICES,
    SOURCE_RANGES,
    Reconciler,
)
from lbctl.model.desired import DesiredCache, NodeAddresses, PortsCache, desired_state, service_ports
from lbctl.model.objects import (
    ClusterSnapshot,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Protocol,
    Service,
    ServicePort,
)
from lbctl.testing.fakemap import FakeMap

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
MAP_NAMES = (SERVICES, BACKENDS, AFFINITY, SERVICE_STATS, BACKEND_STATS, SOURCE_RANGES, maglev.MAGLEV)
NODES = ("node-a", "node-b")


# --- random clusters -----------------------------------------------------------------------------


def random_service(rnd: random.Random, name: str) -> Service:
    """A service drawn from few addresses, so that frontends are often claimed twice."""
    kind = rnd.choice(("ClusterIP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName"))
    ips = rnd.choice(((f"10.96.0.{rnd.randint(1, 6)}",), (f"10.96.0.{rnd.randint(1, 6)}",), (),
                      ("fd00::1", f"10.96.0.{rnd.randint(1, 6)}"), ("fd00::2",)))
    ports = []
    for port_name, number, proto in rnd.sample((("http", 80, TCP), ("dns", 53, UDP), ("alt", 8080, TCP),
                                                 ("sig", 9000, SCTP)), rnd.randint(1, 2)):
        node_port = 30000 + rnd.randint(0, 3) if kind in ("NodePort", "LoadBalancer") else None
        ports.append(ServicePort(port_name, number, proto, number, node_port))
    return Service(
        "default", name, type=kind, cluster_ips=ips, ports=tuple(ports),
        session_affinity=rnd.choice(("None", "ClientIP")), session_affinity_timeout=rnd.choice((10, 10800)),
        external_ips=tuple(rnd.sample(("192.0.2.1", "192.0.2.2", "10.96.0.1"), rnd.randint(0, 1))),
        load_balancer_ips=tuple(rnd.sample(("198.51.100.1", "198.51.100.2"), rnd.randint(0, 1)))
        if kind == "LoadBalancer" else (),
        load_balancer_source_ranges=rnd.choice(((), ("192.168.0.0/16",), ("203.0.113.0/24", "10.0.0.0/8"))),
        external_traffic_policy=rnd.choice(("Cluster", "Local")),
        internal_traffic_policy=rnd.choice(("Cluster", "Cluster", "Local")),
        has_selector=True, load_balancing=rnd.choice(("random", "random", "maglev")),
        maglev_table_size=rnd.choice((0, 7)))


def random_slices(rnd: random.Random, service: Service) -> tuple[EndpointSlice, ...]:
    slices = []
    for n in range(rnd.randint(0, 2)):
        endpoints = tuple(
            Endpoint((f"10.244.0.{rnd.randint(1, 9)}",), ready=(ready := rnd.random() < 0.7),
                     serving=ready or rnd.random() < 0.5, terminating=not ready and rnd.random() < 0.6,
                     node_name=rnd.choice(NODES))
            for _ in range(rnd.randint(0, 4)))
        ports = tuple(EndpointPort(p.name, p.port + rnd.choice((0, 0, 1)), p.protocol) for p in service.ports)
        slices.append(EndpointSlice(service.namespace, f"{service.name}-{n}", service.name, ports=ports,
                                    endpoints=endpoints))
    return tuple(slices)


def random_node(rnd: random.Random) -> NodeAddresses:
    return NodeAddresses(nodeport_ips=tuple(rnd.sample(("192.168.1.1", "192.168.1.2"), rnd.randint(0, 2))),
                         node_ip=rnd.choice((None, "192.168.1.1", "192.168.7.7")))


def changes(seed: int, steps: int):
    """(snapshot, node, event) per step: a few services change, appear or go each step, the
    node's addresses now and then; ``event`` asks for a restart, a resync or a failed write."""
    rnd = random.Random(seed)
    services: dict[str, Service] = {}
    slices: dict[str, tuple[EndpointSlice, ...]] = {}
    node = random_node(rnd)
    for i in range(8):
        s = random_service(rnd, f"svc-{i}")
        services[s.key], slices[s.key] = s, random_slices(rnd, s)
    for _ in range(steps):
        for _ in range(rnd.randint(1, 3)):
            key = rnd.choice(sorted(services))
            what = rnd.random()
            if what < 0.4:      # an endpoint change: new slices only
                slices[key] = random_slices(rnd, services[key])
            elif what < 0.6:    # the Service changed
                services[key] = random_service(rnd, services[key].name)
            elif what < 0.8 and len(services) > 2:
                del services[key]
                if rnd.random() < 0.5:
                    del slices[key]     # orphan slices stay, sometimes (the source keeps them)
            else:
                s = random_service(rnd, f"svc-{rnd.randint(0, 14)}")
                services[s.key], slices[s.key] = s, random_slices(rnd, s)
        if rnd.random() < 0.1:
            node = random_node(rnd)
        event = rnd.choices(("", "restart", "resync", "fail"), (14, 1, 1, 2))[0]
        yield ClusterSnapshot(services=dict(services), slices=dict(slices)), node, event


# --- the desired state ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_the_cache_gives_the_full_pass_result_and_says_what_changed(seed):
    cache, ports_cache = DesiredCache(), PortsCache()
    before: dict = {}
    incremental_updates = 0
    for snapshot, node, event in changes(seed, 60):
        ports = service_ports(snapshot, ports_cache)
        holders = {fe: e.name for fe, e in before.items()}
        if event == "restart":      # a new agent: empty caches, holders from the maps
            cache, ports_cache = DesiredCache(), PortsCache()
            ports = service_ports(snapshot, ports_cache)
        full, full_problems = desired_state(ports, "node-a", holders, node, maglev_table_size=13)
        state, problems, changed = cache.update(ports, "node-a", node, 13,
                                                holders if event == "restart" else None)
        assert dict(state.services) == dict(full.services)
        assert problems == full_problems
        if changed is not None:
            incremental_updates += 1
            differ = {fe for fe in before.keys() | full.services.keys()
                      if before.get(fe) != full.services.get(fe)}
            assert changed == differ
        before = dict(full.services)
    assert incremental_updates > 40, "most updates were incremental"


def test_a_node_change_is_a_full_pass_and_an_exception_empties_the_cache():
    snapshot, node, _ = next(changes(3, 1))
    ports = service_ports(snapshot)
    cache = DesiredCache()
    cache.update(ports, "node-a", node)
    assert cache.update(ports, "node-a", node)[2] == frozenset(), "nothing new"
    other = NodeAddresses(nodeport_ips=("192.168.9.9",))
    assert cache.update(ports, "node-a", other)[2] is None
    assert cache.full_passes == 2
    with pytest.raises(AttributeError):   # a bug upstream, say
        cache.update([*ports, "not a service port"], "node-a", other)   # type: ignore[list-item]
    assert cache.empty
    assert cache.update(ports, "node-a", other)[:2] == desired_state(ports, "node-a", node=other)


# --- the reconciler ------------------------------------------------------------------------------


class FlakyMap(FakeMap):
    """Refuses its next write once ``fail_next`` is set (a full map, an EPERM)."""

    fail_next = False

    def _fail(self, op, key):
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, f"injected: {op} in {self.name}")
        super()._fail(op, key)


def fake_maps(kind=FakeMap) -> dict:
    return {name: kind(name, percpu=name.endswith("stats")) for name in MAP_NAMES}


def logs(maps: dict) -> dict:
    out = {name: list(m.log) for name, m in maps.items() if m.log}
    for m in maps.values():
        m.log.clear()
    return out


def programmed(maps: dict, limits: tuple[int, int]) -> tuple[dict, dict]:
    """What the maps hold, read back by a new reconciler, without ids: frontend -> (backends
    per slot, internal scope's, flags, affinity, source ranges, Maglev table); backend -> flags."""
    r = Reconciler(maps, *limits)
    of = {i: b for b, i in r.backend_ids.items()}
    tables = {key: (size, frozenset(of[i] for i in ids)) for key, (size, ids) in r.maglev.have.items()}
    frontends = {
        fe: (tuple(of[i] for i in p.backend_ids),
             None if p.internal_ids is None else tuple(of[i] for i in p.internal_ids),
             p.flags, p.affinity_timeout, p.source_ranges,
             tables.get(maglev.table_key(p.service_id, 0)), tables.get(maglev.table_key(p.service_id, 1)))
        for fe, p in r.services.items()}
    return frontends, {b: r.backend_flags[i] for b, i in r.backend_ids.items()}


@pytest.mark.parametrize("limits", [(64, 256), (6, 12)], ids=["roomy", "few-ids"])
@pytest.mark.parametrize("seed", range(12))
def test_incremental_syncs_write_what_full_syncs_write(seed, limits):
    """The same desired states through two reconcilers: one told what changed, one comparing
    everything. The same writes in the same order and the same bytes in the maps, until the
    incremental side restarts, resyncs or fails a write (each starts its ids afresh from the
    maps); the same services, backends and tables always. With few ids, services and backends
    that get none are reported, and tried again by the next syncs (no failed writes there: after
    one, which service keeps an id depends on what the failed sync had done)."""
    full_maps, inc_maps = fake_maps(), fake_maps(FlakyMap)
    full_r, inc_r = Reconciler(full_maps, *limits), Reconciler(inc_maps, *limits)
    cache, ports_cache = DesiredCache(), PortsCache()
    same_ids = True
    rnd = random.Random(seed)
    visits = []
    for snapshot, node, event in changes(seed, 60):
        ports = service_ports(snapshot, ports_cache)
        state, _, changed = cache.update(ports, "node-a", node, 13)
        if event == "restart":
            inc_r = Reconciler(inc_maps, *limits)
        if event == "fail" and limits[0] > 6:   # with few ids, who gets one depends on the past
            inc_maps[rnd.choice((SERVICES, BACKENDS))].fail_next = True
        full_result = full_r.sync(state)
        inc_result = inc_r.resync(state) if event == "resync" else inc_r.sync(state, changed)
        for m in inc_maps.values():
            m.fail_next = False
        full_log, inc_log = logs(full_maps), logs(inc_maps)
        if inc_r.dirty:
            assert inc_result.errors
            same_ids = False
            continue
        if event in ("restart", "resync"):
            same_ids = False
        else:
            visits.append((inc_r.visited, len(state.services)))
        if same_ids:
            assert inc_log == full_log
            assert {n: m.data for n, m in inc_maps.items()} == {n: m.data for n, m in full_maps.items()}
            assert inc_r.names == full_r.names
        assert sorted(inc_result.errors) == sorted(full_result.errors) or not same_ids
        assert programmed(inc_maps, limits) == programmed(full_maps, limits)
        assert sorted(inc_r.names.values()) == sorted(full_r.names.values())
    visited, every = (sum(column) for column in zip(*visits))
    assert visited < every, "the incremental syncs visited fewer frontends than there are"


def test_a_frontend_that_could_not_be_programmed_is_tried_again_by_the_next_incremental_sync():
    from lbctl.datapath.ebpf.reconcile import entry
    from lbctl.model.objects import Backend, DesiredState, Frontend

    maps = fake_maps()
    r = Reconciler(maps, 2, 100)     # one service id
    a, b = Frontend("10.96.0.1", 80, TCP), Frontend("10.96.0.2", 80, TCP)
    web = entry("default/a", a, Backend("10.244.0.1", 80, TCP))
    db = entry("default/b", b, Backend("10.244.0.2", 80, TCP))
    r.sync(DesiredState({a: web}))
    result = r.sync(DesiredState({a: web, b: db}), {b})
    assert result.errors and b not in r.services
    assert r.sync(DesiredState({b: db}), {a}).removed == 1, "a goes, its id is free"
    assert b in r.services, "b, not in this sync's changes, was tried again"


# --- 10,000 services, one endpoint change --------------------------------------------------------

COUNT = 10_000


def fake_mode(tmp_path) -> tuple[EbpfMode, dict]:
    maps = fake_maps()
    mode = EbpfMode(ebpf.DatapathConfig(pin_dir=str(tmp_path / "pins"), node_name="node-a",
                                        max_services=1 << 16, max_backends=1 << 16),
                    switch_modes=False, addresses=lambda: ["192.168.1.1"])
    mode.datapath = ebpf.EbpfDatapath(mode.cfg)
    mode.reconciler = Reconciler(maps, 1 << 16, 1 << 16)
    mode._switched = True
    return mode, maps


def writes(maps: dict) -> dict[str, int]:
    """Updates + deletes per map since the last call."""
    return {name: len(entries) for name, entries in logs(maps).items()}


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.96.0.0")) + 1 + i))


def pod(i: int, j: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.200.0.0")) + 2 * i + j))


def service_doc(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i:05d}", "namespace": "bench"},
            "spec": {"clusterIP": vip(i), "clusterIPs": [vip(i)], "selector": {"app": f"a{i}"},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def slice_doc(i: int, addresses: list[str]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"svc-{i:05d}-abcde", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i:05d}"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": "node-a"}
                          for a in addresses]}


def sync_timed(mode: EbpfMode, ports_cache: PortsCache, snapshot) -> float:
    started = time.perf_counter()
    result = mode.sync(service_ports(snapshot, ports_cache))
    assert not result.errors
    return time.perf_counter() - started


def full_pass_time(mode: EbpfMode, snapshot) -> float:
    """What the same sync costs without the caches (as every sync did before them): every
    service port computed, every frontend compared, nothing left to write."""
    started = time.perf_counter()
    state, _ = desired_state(service_ports(snapshot), "node-a", node=mode._node)
    result = mode.reconciler.sync(state)
    elapsed = time.perf_counter() - started
    assert not result.changed and not writes(mode.reconciler.maps)
    return elapsed


def report(source: str, full: float, incremental: float, counted: dict) -> None:
    print(f"\n{source}: one endpoint change next to {COUNT:,} services: full pass {full * 1000:.1f} ms, "
          f"incremental sync {incremental * 1000:.1f} ms; map writes {counted}")


def test_one_endpoint_change_from_the_manifests_source_is_a_handful_of_writes(tmp_path, monkeypatch):
    from lbctl.sources.manifests import ManifestSource

    monkeypatch.setenv("LBCTL_RUN_DIR", str(tmp_path / "run"))
    directory = tmp_path / "manifests"
    directory.mkdir()
    per_file = 100
    for f in range(COUNT // per_file):
        docs = []
        for i in range(f * per_file, (f + 1) * per_file):
            docs += [service_doc(i), slice_doc(i, [pod(i, 0), pod(i, 1)])]
        (directory / f"apps-{f:03d}.json").write_text(json.dumps({"kind": "List", "apiVersion": "v1",
                                                                  "items": docs}))
    source = ManifestSource(directory)
    mode, maps = fake_mode(tmp_path)
    ports_cache = PortsCache()
    snapshot = source.poll()
    assert snapshot is not None and not snapshot.problems and len(snapshot.services) == COUNT
    sync_timed(mode, ports_cache, snapshot)
    assert sum(writes(maps).values()) > 2 * COUNT

    # one more endpoint for svc-04242, in a file of 100 services
    changed = 4242
    path = directory / f"apps-{changed // per_file:03d}.json"
    doc = json.loads(path.read_text())
    for item in doc["items"]:
        if item["kind"] == "EndpointSlice" and item["metadata"]["name"] == f"svc-{changed:05d}-abcde":
            item["endpoints"].append({"addresses": ["10.250.0.1"], "conditions": {"ready": True}})
    path.write_text(json.dumps(doc))
    snapshot = source.poll()
    assert snapshot is not None
    incremental = sync_timed(mode, ports_cache, snapshot)
    counted = writes(maps)
    # the new backend and its counters, its slot, the frontend's count
    assert counted == {BACKENDS: 1, BACKEND_STATS: 1, SERVICES: 2}
    assert mode._cache.computed == 1, "the other 99 services of that file were not computed again"
    assert mode.reconciler.visited == 1
    report("manifests", full_pass_time(mode, snapshot), incremental, counted)
    dump.remove_names(mode.cfg.pin_dir)


def test_one_endpoint_change_from_the_kubernetes_source_is_a_handful_of_writes(tmp_path, monkeypatch):
    from lbctl.sources.kubernetes import KubernetesSource
    from lbctl.testing.kubefake import FakeCluster

    monkeypatch.setenv("LBCTL_RUN_DIR", str(tmp_path / "run"))
    cluster = FakeCluster()
    for i in range(COUNT):
        cluster.services.put(service_doc(i))
        cluster.slices.put(slice_doc(i, [pod(i, 0), pod(i, 1)]))
    source = KubernetesSource(None, "node-a", watched=cluster.kinds(), server="fake", ready_timeout=60)
    try:
        mode, maps = fake_mode(tmp_path)
        ports_cache = PortsCache()
        snapshot = source.poll()
        assert snapshot is not None and len(snapshot.services) == COUNT
        sync_timed(mode, ports_cache, snapshot)
        writes(maps)

        gone = 777     # one endpoint of svc-00777 goes (its pod was deleted)
        cluster.slices.put(slice_doc(gone, [pod(gone, 0)]))
        deadline = time.monotonic() + 30
        while (snapshot := source.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert snapshot is not None
        incremental = sync_timed(mode, ports_cache, snapshot)
        counted = writes(maps)
        # the frontend's count first, then its surplus slot; the backend no slot names goes
        assert counted == {SERVICES: 2, BACKENDS: 1}
        assert mode._cache.computed == 1 and mode.reconciler.visited == 1
        report("kubernetes", full_pass_time(mode, snapshot), incremental, counted)
    finally:
        source.stop()
        dump.remove_names(mode.cfg.pin_dir)


def test_a_resync_after_incremental_syncs_finds_nothing_to_repair(tmp_path, monkeypatch):
    """Many small syncs, then the periodic full compare: the maps are what a full pass wants."""
    monkeypatch.setenv("LBCTL_RUN_DIR", str(tmp_path / "run"))
    mode, maps = fake_mode(tmp_path)
    ports_cache = PortsCache()
    for snapshot, node, _ in changes(5, 40):
        mode._addresses = lambda node=node: list(node.nodeport_ips)
        assert not mode.sync(service_ports(snapshot, ports_cache)).errors
    assert not mode.reconciler.resync(mode.desired).changed
    state, _ = desired_state(mode._ports, "node-a", node=mode._node)
    assert dict(mode.desired.services) == dict(state.services)
    dump.remove_names(mode.cfg.pin_dir)



# --- coalescing ----------------------------------------------------------------------------------


def test_changes_faster_than_min_sync_period_coalesce_into_one_sync_of_the_newest():
    from test_agent import RecordingMode, ScriptedSource

    from lbctl.agent.loop import Agent, AgentOptions

    def snapshot(ip: str) -> ClusterSnapshot:
        web = Service("default", "web", cluster_ips=(ip,), ports=(ServicePort("http", 80, TCP, 8080),))
        return ClusterSnapshot(services={web.key: web})

    a, b, c = snapshot("10.96.0.1"), snapshot("10.96.0.2"), snapshot("10.96.0.3")
    clock = [50.0]
    mode = RecordingMode()
    agent = Agent(ScriptedSource(a, b, None, c, None, None), mode=mode, clock=lambda: clock[0],
                  options=AgentOptions(interval=1.0, min_sync_period=2.0, sync_period=1000.0))
    agent.turn()                  # a change after a quiet period: synced at once
    for step in (0.5, 0.5, 0.5):   # b, nothing, c: within 2 s of that sync
        clock[0] += step
        agent.turn()
        assert len(mode.synced) == 1
    assert agent._wait() == pytest.approx(0.5), "the loop wakes when the held change is due"
    clock[0] += 0.5
    agent.turn()
    assert [p[0].service.cluster_ips for p in mode.synced] == [("10.96.0.1",), ("10.96.0.3",)]
    clock[0] += 5
    agent.turn()
    assert len(mode.synced) == 2, "nothing held any more"
