"""The reconciler against in-memory maps: write order (across maps, one log), the invariant
"every reachable slot names an existing backend" after every single write over seeded random
sequences, restart, failure of any kind and retry, the periodic resync."""
from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from lbctl.datapath.ebpf import decode, shared
from lbctl.datapath.ebpf.reconcile import (
    BACKENDS,
    F_CLUSTERIP,
    F_SOURCE_RANGES,
    F_TWO_SCOPES,
    INTERNAL,
    SERVICES,
    SOURCE_RANGES,
    Reconciler,
    entry,
)
from lbctl.model.objects import Backend, DesiredState, Frontend, FrontendKind, Protocol
from lbctl.testing.fakemap import FakeMap

TCP, UDP = Protocol.TCP, Protocol.UDP
WEB = Frontend("10.96.0.10", 80, TCP)
DNS = Frontend("10.96.0.53", 53, UDP)


def be(i: int, port: int = 8080, proto=TCP) -> Backend:
    return Backend(f"10.244.0.{i}", port, proto)


def maps() -> dict:
    return {SERVICES: FakeMap(SERVICES), BACKENDS: FakeMap(BACKENDS), "lb4_affinity": FakeMap("a"),
            "lb_service_stats": FakeMap("s", percpu=True), "lb_backend_stats": FakeMap("b", percpu=True),
            SOURCE_RANGES: FakeMap(SOURCE_RANGES)}


def state(*entries) -> DesiredState:
    return DesiredState({e.frontend: e for e in entries})


def slot_of(key: bytes) -> tuple[str, int]:
    k = shared.view("lb4_service_key", key)
    return shared.from_be32(k.address), k.backend_slot


def contents(m) -> dict:
    """frontend -> (count, [backend address per slot])"""
    backends = {shared.parse_u32(k): shared.from_be32(shared.view("lb4_backend", v).address)
                for k, v in m[BACKENDS].data.items()}
    out = {}
    for k, v in m[SERVICES].data.items():
        key, val = shared.view("lb4_service_key", k), shared.view("lb4_service_value", v)
        if key.scope:
            continue     # the internal scope: see scoped_contents
        fe = (shared.from_be32(key.address), shared.from_be16(key.dport))
        row = out.setdefault(fe, [None, {}])
        if key.backend_slot == 0:
            row[0] = val.count
        else:
            row[1][key.backend_slot] = backends.get(val.backend_id, "MISSING")
    return {fe: (count, [slots[i] for i in sorted(slots)]) for fe, (count, slots) in out.items()}


def test_first_sync_writes_backends_then_slots_then_frontend():
    m = maps()
    r = Reconciler(m, 100, 100)
    result = r.sync(state(entry("default/web:http", WEB, be(2), be(3))))
    assert (result.added, result.backends_added) == (1, 2)
    assert contents(m) == {("10.96.0.10", 80): (2, ["10.244.0.2", "10.244.0.3"])}
    order = [slot_of(k)[1] for op, k in m[SERVICES].log]
    assert order == [1, 2, 0], "frontend (slot 0) is written after its slots"
    assert len(m[BACKENDS].log) == 2


def test_shrinking_writes_count_before_deleting_surplus_slots():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2), be(3), be(4))))
    m[SERVICES].log.clear()
    r.sync(state(entry("w", WEB, be(2), be(4))))
    ops = [(op, slot_of(k)[1]) for op, k in m[SERVICES].log]
    assert ops == [("update", 2), ("update", 0), ("delete", 3)]
    assert contents(m) == {("10.96.0.10", 80): (2, ["10.244.0.2", "10.244.0.4"])}
    assert len(m[BACKENDS].data) == 2, "the unused backend is deleted"


def test_removing_a_service_deletes_frontend_first():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2), be(3)), entry("d", DNS, be(5, 53, UDP))))
    m[SERVICES].log.clear()
    result = r.sync(state(entry("d", DNS, be(5, 53, UDP))))
    assert result.removed == 1
    ops = [(op, slot_of(k)) for op, k in m[SERVICES].log]
    assert ops[0] == ("delete", ("10.96.0.10", 0))
    assert contents(m) == {("10.96.0.53", 53): (1, ["10.244.0.5"])}


def test_unchanged_state_writes_nothing():
    m = maps()
    r = Reconciler(m, 100, 100)
    desired = state(entry("w", WEB, be(2)))
    r.sync(desired)
    m[SERVICES].log.clear()
    m[BACKENDS].log.clear()
    assert not r.sync(desired).changed
    assert m[SERVICES].log == [] and m[BACKENDS].log == []


def test_restart_restores_ids_and_writes_nothing():
    m = maps()
    first = Reconciler(m, 100, 100)
    desired = state(entry("w", WEB, be(2), be(3)), entry("d", DNS, be(5, 53, UDP)))
    first.sync(desired)
    m[SERVICES].log.clear()
    second = Reconciler(m, 100, 100)   # a new agent on the same (pinned) maps
    assert second.services == first.services
    assert second.backend_ids == first.backend_ids
    assert not second.sync(desired).changed
    assert m[SERVICES].log == []


def test_no_endpoints_is_a_frontend_with_count_zero():
    m = maps()
    Reconciler(m, 100, 100).sync(state(entry("e", WEB)))
    assert contents(m) == {("10.96.0.10", 80): (0, [])}


def test_failed_write_resyncs_from_the_maps_and_converges():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2))))
    desired = state(entry("w", WEB, be(2), be(3)), entry("d", DNS, be(5, 53, UDP)))
    m[SERVICES].fail_on.add(("update", shared.service_key("10.96.0.53", 53, 17, 0)))
    result = r.sync(desired)
    assert result.errors and r.dirty
    # whatever was written, every frontend present names only existing backends
    for count, backends in contents(m).values():
        if count is None:   # slots whose frontend was not written yet: unreachable
            continue
        assert len(backends) >= count and "MISSING" not in backends[:count]
    m[SERVICES].fail_on.clear()
    assert not r.sync(desired).errors
    assert contents(m) == {("10.96.0.10", 80): (2, ["10.244.0.2", "10.244.0.3"]),
                           ("10.96.0.53", 53): (1, ["10.244.0.5"])}
    assert not Reconciler(m, 100, 100).sync(desired).changed


def test_leftover_slots_from_an_interrupted_sync_are_removed():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2))))
    m[SERVICES].update(shared.service_key("10.96.0.10", 80, 6, 5), shared.service_value(backend_id=1))
    r2 = Reconciler(m, 100, 100)
    r2.sync(state(entry("w", WEB, be(2))))
    assert contents(m) == {("10.96.0.10", 80): (1, ["10.244.0.2"])}


def backend_flags(m) -> dict:
    return {shared.from_be32(shared.view("lb4_backend", v).address): shared.view("lb4_backend", v).flags
            for v in m[BACKENDS].data.values()}


def test_draining_backend_stays_in_the_backend_map_flagged():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2), be(3))))
    e = entry("w", WEB, be(2))
    r.sync(state(dataclasses.replace(e, draining=(be(3),))))
    assert contents(m) == {("10.96.0.10", 80): (1, ["10.244.0.2"])}
    draining = shared.const("LB_BACKEND_F_DRAINING")
    assert backend_flags(m) == {"10.244.0.2": 0, "10.244.0.3": draining}
    assert Reconciler(m, 100, 100).backend_flags == r.backend_flags, "restored"
    r.sync(state(entry("w", WEB, be(2), be(3))))   # ready again
    assert backend_flags(m) == {"10.244.0.2": 0, "10.244.0.3": 0}


def test_affinity_is_programmed_restored_and_forgotten():
    m = maps()
    r = Reconciler(m, 100, 100)
    desired = state(dataclasses.replace(entry("w", WEB, be(2)), affinity_timeout=600))
    r.sync(desired)
    frontend = shared.view("lb4_service_value", m[SERVICES].data[shared.service_key("10.96.0.10", 80, 6)])
    assert frontend.affinity_timeout == 600 and frontend.flags & shared.const("LB_SVC_F_AFFINITY")
    assert not Reconciler(m, 100, 100).sync(desired).changed, "restored with its timeout"
    sid = r.services[WEB].service_id
    m["lb4_affinity"].update(shared.new("lb4_affinity_key", client=1, service_id=sid), b"\0" * 16)
    m["lb4_affinity"].update(shared.new("lb4_affinity_key", client=1, service_id=sid + 1), b"\0" * 16)
    r.sync(state())
    assert [shared.view("lb4_affinity_key", k).service_id for k in m["lb4_affinity"].data] == [sid + 1]


def test_running_out_of_ids_is_a_clear_error():
    m = maps()
    r = Reconciler(m, 100, 3)   # backend ids 1 and 2 only
    result = r.sync(state(entry("w", WEB, be(2), be(3), be(4))))
    assert result.errors and "no free backend id" in result.errors[0]
    assert contents(m) == {}, "the service is not half-made"


def test_service_names_for_dump():
    m = maps()
    r = Reconciler(m, 100, 100)
    desired = state(entry("default/web:http", WEB, be(2)))
    r.sync(desired)
    assert r.service_names(desired) == {r.services[WEB].service_id: "default/web:http"}


def test_removals_come_first_so_a_full_map_takes_a_swap():
    """Removing one service and adding another of the same size fits a map that is full."""
    m = maps()
    m[SERVICES].max_entries = 2
    r = Reconciler(m, 100, 100)
    assert not r.sync(state(entry("w", WEB, be(2)))).errors
    result = r.sync(state(entry("d", DNS, be(5, 53, UDP))))
    assert not result.errors, result.errors
    assert contents(m) == {("10.96.0.53", 53): (1, ["10.244.0.5"])}


def test_a_service_that_gets_no_id_does_not_block_the_others():
    m = maps()
    r = Reconciler(m, 2, 100)   # one service id
    other = Frontend("10.96.0.99", 80, TCP)
    result = r.sync(state(entry("a", WEB, be(2)), entry("b", other, be(3))))
    assert len(result.errors) == 1 and "no free service id" in result.errors[0] and not r.dirty
    assert contents(m) == {("10.96.0.10", 80): (1, ["10.244.0.2"])}
    # the first service still follows its endpoints
    assert not r.sync(state(entry("a", WEB, be(4)), entry("b", other, be(3)))).removed
    assert contents(m)[("10.96.0.10", 80)] == (1, ["10.244.0.4"])


def test_more_endpoints_than_slots_is_reported_not_raised():
    m = maps()
    r = Reconciler(m, 100, 1 << 17)
    many = [Backend(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 80, TCP) for i in range(0x10000)]
    result = r.sync(state(entry("big", WEB, *many), entry("d", DNS, be(5, 53, UDP))))
    assert any("65535" in e for e in result.errors), result.errors
    assert list(contents(m)) == [("10.96.0.53", 53)]


# --- the order of writes across maps, and the invariant after every single write ---------------


def shared_log_maps(check=None) -> tuple[dict, list]:
    """Maps that record every write in one journal (map, op, key); `check(maps)` runs after
    each single write."""
    journal: list = []
    m: dict = {}
    hook = (lambda *_: check(m)) if check else None
    m.update({name: FakeMap(name, percpu=name.endswith("stats"), journal=journal, after_write=hook)
              for name in (SERVICES, BACKENDS, "lb4_affinity", "lb_service_stats", "lb_backend_stats",
                           SOURCE_RANGES)})
    return m, journal


def reachable_slots_name_backends(m) -> None:
    """For every frontend in the services map with count n, slots 1..n exist and name backends
    present in the backends map: what a packet can reach is whole. A frontend flagged
    TWO_SCOPES makes its internal scope reachable: its slot 0 exists and its slots are whole
    too. A frontend flagged SOURCE_RANGES has its ranges in lb4_source_ranges (none would drop
    every client)."""
    backends = m[BACKENDS].data
    data = m[SERVICES].data
    ranges = {decode.source_range(k)[0] for k in m[SOURCE_RANGES].data} if SOURCE_RANGES in m else set()

    def whole(address, dport, proto, scope, front):
        head = data.get(shared.service_key(address, dport, proto, 0, scope))
        assert head is not None, f"{front}: scope {scope} reachable but its slot 0 is missing"
        value = shared.view("lb4_service_value", head)
        for slot in range(1, value.count + 1):
            raw = data.get(shared.service_key(address, dport, proto, slot, scope))
            assert raw is not None, f"{front}: scope {scope} slot {slot} reachable but missing"
            backend_id = shared.view("lb4_service_value", raw).backend_id
            assert shared.u32(backend_id) in backends, \
                f"{front}: scope {scope} slot {slot} names missing backend {backend_id}"
        return value

    for key in list(data):
        k = shared.view("lb4_service_key", key)
        if k.backend_slot or k.scope:
            continue
        address, dport = shared.from_be32(k.address), shared.from_be16(k.dport)
        front = f"{address}:{dport}"
        value = whole(address, dport, k.proto, 0, front)
        if value.flags & F_TWO_SCOPES:
            inner = whole(address, dport, k.proto, INTERNAL, front)
            assert inner.service_id == value.service_id
        if value.flags & F_SOURCE_RANGES:
            assert value.service_id in ranges, f"{front}: checks source ranges it has none of"


def test_write_order_across_maps_in_one_log():
    m, journal = shared_log_maps(reachable_slots_name_backends)
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2), be(3))))
    assert [(name, op) for name, op, _ in journal] == [
        ("lb_backend_stats", "update"), ("lb_backend_stats", "update"),   # counters of new ids zeroed
        (BACKENDS, "update"), (BACKENDS, "update"),                        # backends first
        ("lb_service_stats", "update"),
        (SERVICES, "update"), (SERVICES, "update"),                        # slots 1, 2
        (SERVICES, "update"),                                              # the frontend last
    ]
    assert slot_of(journal[-1][2])[1] == 0
    journal.clear()
    # swap a backend and drop one: new backend, slots, frontend (count), surplus slot, old backends
    r.sync(state(entry("w", WEB, be(4))))
    assert [(name, op, slot_of(k)[1] if name == SERVICES else shared.parse_u32(k))
            for name, op, k in journal if name in (SERVICES, BACKENDS)] == [
        (BACKENDS, "update", 3), (SERVICES, "update", 1), (SERVICES, "update", 0),
        (SERVICES, "delete", 2), (BACKENDS, "delete", 1), (BACKENDS, "delete", 2)]
    journal.clear()
    r.sync(state())   # removal: frontend, then its slot, then the backend
    assert [(name, op, slot_of(k)[1] if name == SERVICES else shared.parse_u32(k))
            for name, op, k in journal if name in (SERVICES, BACKENDS)] == [
        (SERVICES, "delete", 0), (SERVICES, "delete", 1), (BACKENDS, "delete", 3)]


def random_states(seed: int, steps: int):
    """A seeded walk through desired states: services added and removed, endpoints changed,
    affinity and drop flags toggled, frontends of every kind, eTP Local (a second slot set)
    and source ranges coming and going; few addresses and ids, so ids are recycled."""
    rng = random.Random(seed)
    frontends = [Frontend(f"10.96.0.{i}", 80 + i % 2, TCP if i % 3 else UDP) for i in range(1, 9)]
    pool = [be(i, 8080, TCP) for i in range(2, 14)] + [be(i, 53, UDP) for i in range(2, 8)]
    cidrs = ["198.51.100.0/24", "172.18.0.0/16", "10.96.0.1/32", "0.0.0.0/0"]
    current: dict = {}
    for _ in range(steps):
        for _ in range(rng.randint(1, 3)):
            fe = rng.choice(frontends)
            if fe in current and rng.random() < 0.35:
                del current[fe]
                continue
            candidates = [b for b in pool if b.protocol == fe.protocol]
            chosen = rng.sample(candidates, rng.randint(0, 4))
            e = entry(f"ns/{fe.address}", fe, *chosen)
            e = dataclasses.replace(e, kind=rng.choice(list(FrontendKind)))
            if rng.random() < 0.2:
                e = dataclasses.replace(e, affinity_timeout=rng.choice((10, 600)))
            if rng.random() < 0.2:
                left = [b for b in candidates if b not in chosen]
                e = dataclasses.replace(e, draining=tuple(sorted(rng.sample(left, min(2, len(left))))))
            if e.kind.external and rng.random() < 0.5:     # eTP Local: every endpoint inside
                inner = tuple(sorted(set(chosen) | set(rng.sample(candidates, rng.randint(0, 3)))))
                e = dataclasses.replace(e, internal_backends=inner, drop_without_backends=bool(inner))
            if e.kind is FrontendKind.LOAD_BALANCER and rng.random() < 0.6:
                e = dataclasses.replace(e, source_ranges=tuple(rng.sample(cidrs, rng.randint(1, 3))))
            current[fe] = e
        yield DesiredState(dict(current))


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_keep_every_reachable_slot_whole(seed):
    """After every single write, every slot a packet can reach names an existing backend (both
    scopes) and every range check finds its ranges; every sync converges to exactly the desired
    state, even when random writes fail (an OSError or any other exception) and the next sync
    starts from a re-read of the maps."""
    m, _ = shared_log_maps(reachable_slots_name_backends)
    rng = random.Random(1000 + seed)
    r = Reconciler(m, 9, 20)        # ids for all 8 frontends and 18 backends, barely: recycled all the time
    for desired in random_states(seed, 40):
        faults = []
        if rng.random() < 0.3:       # make one write of this sync fail
            target = m[rng.choice((SERVICES, BACKENDS, SERVICES, SOURCE_RANGES))]
            keys = list(target.data) or [shared.u32(1)]
            fault = (rng.choice(("update", "delete")), rng.choice(keys))
            error = rng.choice((OSError(5, "injected"), ValueError("injected"), KeyError("injected")))
            target.raise_on[fault] = error
            faults.append((target, fault))
        first = r.sync(desired)
        for target, fault in faults:
            del target.raise_on[fault]
        result = r.sync(desired) if r.dirty or first.errors else first
        assert not result.errors, result.errors
        assert scoped_contents(m) == expected_scoped(desired)
        assert not Reconciler(m, 9, 20).sync(desired).changed, "a restart finds what it wants"


def expected_contents(desired: DesiredState) -> dict:
    return {(fe.address, fe.port): (len(e.backends), [b.address for b in e.backends])
            for fe, e in desired.services.items()}


def scoped_contents(m) -> dict:
    """(address, port, scope) -> (count, flags, [backend address per slot]), and
    ("ranges", address, port) -> sorted CIDRs."""
    backends = {shared.parse_u32(k): shared.from_be32(shared.view("lb4_backend", v).address)
                for k, v in m[BACKENDS].data.items()}
    out: dict = {}
    by_id: dict = {}
    for k, v in m[SERVICES].data.items():
        key, val = shared.view("lb4_service_key", k), shared.view("lb4_service_value", v)
        fe = (shared.from_be32(key.address), shared.from_be16(key.dport), key.scope)
        row = out.setdefault(fe, [None, None, {}])
        if key.backend_slot == 0:
            row[0], row[1] = val.count, val.flags
            if key.scope == 0:
                by_id[val.service_id] = fe[:2]
        else:
            row[2][key.backend_slot] = backends.get(val.backend_id, "MISSING")
    result = {fe: (count, flags, [slots[i] for i in sorted(slots)]) for fe, (count, flags, slots) in out.items()}
    for k in m[SOURCE_RANGES].data:
        service_id, cidr = decode.source_range(k)
        result.setdefault(("ranges", *by_id.get(service_id, ("?", service_id))), []).append(cidr)
    return {k: sorted(v) if k[0] == "ranges" else v for k, v in result.items()}


def expected_scoped(desired: DesiredState) -> dict:
    from lbctl.datapath.ebpf.reconcile import service_flags

    out: dict = {}
    for fe, e in desired.services.items():
        flags = service_flags(e)
        out[(fe.address, fe.port, 0)] = (len(e.backends), flags, [b.address for b in e.backends])
        if e.internal_backends is not None:
            out[(fe.address, fe.port, INTERNAL)] = (len(e.internal_backends), flags,
                                                     [b.address for b in e.internal_backends])
        if e.source_ranges:
            out[("ranges", fe.address, fe.port)] = sorted(str(ipaddress.ip_network(c)) for c in e.source_ranges)
    return out


def test_internal_scope_is_written_before_the_frontend_that_reaches_it_and_removed_after():
    m, journal = shared_log_maps(reachable_slots_name_backends)
    r = Reconciler(m, 100, 100)
    nodeport = Frontend("172.18.0.2", 30080, TCP)
    local = dataclasses.replace(entry("w", nodeport, be(2)), kind=FrontendKind.NODE_PORT,
                                internal_backends=(be(2), be(3)), drop_without_backends=True)
    r.sync(state(local))
    writes = [(op, slot_of(k), shared.view("lb4_service_key", k).scope) for name, op, k in journal if name == SERVICES]
    assert writes == [("update", ("172.18.0.2", 1), 1), ("update", ("172.18.0.2", 2), 1),
                      ("update", ("172.18.0.2", 0), 1), ("update", ("172.18.0.2", 1), 0),
                      ("update", ("172.18.0.2", 0), 0)]
    front = shared.view("lb4_service_value", m[SERVICES].data[shared.service_key("172.18.0.2", 30080, 6)])
    assert front.flags == (shared.const("LB_SVC_F_NODEPORT") | shared.const("LB_SVC_F_DROP")
                           | shared.const("LB_SVC_F_ETP_LOCAL") | F_TWO_SCOPES)
    assert not Reconciler(m, 100, 100).sync(state(local)).changed, "both scopes restored"
    journal.clear()
    r.sync(state(dataclasses.replace(local, internal_backends=None, drop_without_backends=False)))   # eTP Cluster
    writes = [(op, slot_of(k), shared.view("lb4_service_key", k).scope) for name, op, k in journal if name == SERVICES]
    assert writes == [("update", ("172.18.0.2", 0), 0), ("delete", ("172.18.0.2", 0), 1),
                      ("delete", ("172.18.0.2", 1), 1), ("delete", ("172.18.0.2", 2), 1)]
    r.sync(state(local))
    journal.clear()
    r.sync(state())
    writes = [(op, slot_of(k), shared.view("lb4_service_key", k).scope) for name, op, k in journal if name == SERVICES]
    assert writes[0] == ("delete", ("172.18.0.2", 0), 0), "the frontend goes first"
    assert m[SERVICES].data == {}


def test_source_ranges_arrive_before_the_flag_and_leave_after_it():
    m, journal = shared_log_maps(reachable_slots_name_backends)
    r = Reconciler(m, 100, 100)
    lb = Frontend("203.0.113.7", 80, TCP)
    e = dataclasses.replace(entry("w", lb, be(2)), kind=FrontendKind.LOAD_BALANCER,
                            source_ranges=("198.51.100.0/24", "10.1.2.3/32"))
    r.sync(state(e))
    names = [(name, op) for name, op, _ in journal if name in (SERVICES, SOURCE_RANGES)]
    assert names == [(SOURCE_RANGES, "update"), (SOURCE_RANGES, "update"), (SERVICES, "update"),
                     (SERVICES, "update")]
    sid = r.services[lb].service_id
    assert sorted(decode.source_range(k) for k in m[SOURCE_RANGES].data) == [
        (sid, "10.1.2.3/32"), (sid, "198.51.100.0/24")]
    key = shared.view("lb4_source_range_key", shared.source_range_key(sid, "198.51.100.0/24"))
    assert (key.prefixlen, key.service_id) == (32 + 24, sid), "the service id is always matched whole"
    assert not Reconciler(m, 100, 100).sync(state(e)).changed, "restored"
    journal.clear()
    r.sync(state(dataclasses.replace(e, source_ranges=("198.51.100.0/24", "192.0.2.0/24"))))
    assert [(name, op) for name, op, _ in journal if name in (SERVICES, SOURCE_RANGES)] == [
        (SOURCE_RANGES, "update"), (SERVICES, "update"), (SOURCE_RANGES, "delete")]
    journal.clear()
    r.sync(state())
    assert [(name, op) for name, op, _ in journal if name in (SERVICES, SOURCE_RANGES)][:2] == [
        (SERVICES, "delete"), (SERVICES, "delete")]
    assert m[SOURCE_RANGES].data == {}, "an id handed out again must not inherit ranges"


def test_ranges_and_internal_scopes_nobody_reaches_are_removed_at_restart():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2))))
    sid = r.services[WEB].service_id
    m[SOURCE_RANGES].data[shared.source_range_key(sid, "10.0.0.0/8")] = b"\x01"      # no flag checks it
    m[SOURCE_RANGES].data[shared.source_range_key(77, "10.0.0.0/8")] = b"\x01"       # no such service
    m[SERVICES].data[shared.service_key("10.96.0.10", 80, 6, 0, INTERNAL)] = shared.service_value(count=1, service_id=sid)
    m[SERVICES].data[shared.service_key("10.96.0.10", 80, 6, 1, INTERNAL)] = shared.service_value(backend_id=1)
    assert Reconciler(m, 100, 100).resync(state(entry("w", WEB, be(2)))).errors == []
    assert m[SOURCE_RANGES].data == {}
    assert scoped_contents(m) == {("10.96.0.10", 80, 0): (1, F_CLUSTERIP, ["10.244.0.2"])}


# --- failures other than OSError (item 7) --------------------------------------------------------


def test_any_exception_makes_the_next_sync_reread_the_maps():
    """A ValueError from a batch update (a bad value) used to leave the mirror claiming entries
    the maps lack, and every later sync reported "no change"."""
    m = maps()
    r = Reconciler(m, 100, 100)
    desired = state(entry("w", WEB, be(2), be(3)))
    m[SERVICES].raise_on[("update", shared.service_key("10.96.0.10", 80, 6, 0))] = ValueError("bad value")
    result = r.sync(desired)
    assert result.errors and "ValueError" in result.errors[0] and r.dirty
    assert WEB not in r.services, "the mirror holds only what the maps hold"
    m[SERVICES].raise_on.clear()
    assert not r.sync(desired).errors
    assert contents(m) == {("10.96.0.10", 80): (2, ["10.244.0.2", "10.244.0.3"])}


def test_a_failing_restore_is_reported_and_retried():
    m = maps()
    r = Reconciler(m, 100, 100)
    r.sync(state(entry("w", WEB, be(2))))
    r.dirty = True
    items = m[BACKENDS].items
    m[BACKENDS].items = lambda: (_ for _ in ()).throw(OSError(5, "cannot read"))
    result = r.sync(state(entry("w", WEB, be(2))))
    assert result.errors and r.dirty
    m[BACKENDS].items = items
    assert not r.sync(state(entry("w", WEB, be(2)))).errors and not r.dirty


# --- resync: the maps read back and repaired (item 6) ---------------------------------------------


def test_resync_repairs_what_was_changed_behind_our_back():
    m = maps()
    r = Reconciler(m, 100, 100)
    other = Frontend("10.96.0.99", 80, TCP)
    desired = state(entry("w", WEB, be(2), be(3)), entry("d", DNS, be(5, 53, UDP)),
                    entry("o", other, be(6)))
    r.sync(desired)
    want = contents(m)
    # a frontend with count 2 and no slots (clients would time out, no RST)
    m[SERVICES].data.pop(shared.service_key("10.96.0.10", 80, 6, 1))
    m[SERVICES].data.pop(shared.service_key("10.96.0.10", 80, 6, 2))
    # a backend gone, a frontend gone (its slot left behind), a foreign entry of another protocol
    m[BACKENDS].data.pop(shared.u32(r.backend_ids[be(5, 53, UDP)]))
    m[SERVICES].data.pop(shared.service_key("10.96.0.99", 80, 6, 0))
    junk = shared.service_key("10.96.0.77", 80, 1, 0)
    m[SERVICES].data[junk] = shared.service_value(count=0, service_id=50)
    assert not r.sync(desired).changed, "a plain sync trusts its mirror: nothing seen"
    result = r.resync(desired)
    assert result.changed and not result.errors
    assert contents(m) == want and junk not in m[SERVICES].data
    reachable_slots_name_backends(m)
    assert not r.resync(desired).changed, "nothing left to repair"


def test_resync_restores_a_changed_frontend_and_backend():
    m = maps()
    r = Reconciler(m, 100, 100)
    desired = state(entry("w", WEB, be(2), be(3)))
    r.sync(desired)
    want = contents(m)
    key = shared.service_key("10.96.0.10", 80, 6, 0)
    sid = r.services[WEB].service_id
    m[SERVICES].data[key] = shared.service_value(count=5, service_id=sid, flags=F_CLUSTERIP)
    bid = r.backend_ids[be(3)]
    m[BACKENDS].data[shared.u32(bid)] = shared.backend_value("10.244.9.9", 1, 6)
    assert r.resync(desired).changed
    assert contents(m) == want
    reachable_slots_name_backends(m)
