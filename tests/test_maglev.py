"""Maglev consistent hashing without root: the table against the paper's algorithm, balance,
disruption against the theory, two nodes agreeing, the annotations, and the reconciler's
writes (tables before the frontends naming them, pruned after, kept across a restart)."""
from __future__ import annotations

import dataclasses
import random

import pytest

from lbctl.datapath.ebpf import maglev, shared
from lbctl.datapath.ebpf.reconcile import BACKENDS, F_MAGLEV, SERVICES, Reconciler, entry
from lbctl.model.desired import desired_state, service_ports
from lbctl.model.objects import (
    MAGLEV_DEFAULT_TABLE_SIZE,
    Backend,
    ClusterSnapshot,
    DesiredState,
    Frontend,
    Protocol,
    is_prime,
)
from lbctl.sources.validate import parse_documents
from lbctl.testing.fakemap import FakeMap

TCP = Protocol.TCP
WEB = Frontend("10.96.0.10", 80, TCP)
M = MAGLEV_DEFAULT_TABLE_SIZE


def backends(n: int, seed: int = 1) -> list[Backend]:
    rng = random.Random(seed)
    return [Backend(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", 8080, TCP)
            for _ in range(n)]


def paper_populate(names: list[str], m: int) -> list[int]:
    """Algorithm 1 of the paper, literally: the reference the fast version must equal."""
    perms = [maglev.offset_skip(name, m) for name in names]
    nexts, entry_, filled = [0] * len(names), [-1] * m, 0
    while True:
        for i, (offset, skip) in enumerate(perms):
            c = (offset + nexts[i] * skip) % m
            while entry_[c] >= 0:
                nexts[i] += 1
                c = (offset + nexts[i] * skip) % m
            entry_[c] = i
            nexts[i] += 1
            filled += 1
            if filled == m:
                return entry_


def moved(a: list[Backend], b: list[Backend]) -> int:
    return sum(x != y for x, y in zip(a, b))


# --- the table -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 251), (2, 251), (3, 1021), (10, 4093), (40, 1021), (300, 251), (10, M)])
def test_table_is_the_papers_algorithm(n, m):
    names = sorted(maglev.backend_name(b) for b in backends(n, seed=n))
    assert list(maglev.populate(tuple(names), m)) == paper_populate(names, m)


def test_every_slot_names_a_backend_and_shares_are_equal():
    """Equal weights: every backend takes one slot per turn, so shares are floor or ceil of M/N
    (the paper's balance; the floor/ceil is exact, not "within 1%")."""
    bs = backends(10)
    table = maglev.lookup_table(bs, M)
    assert len(table) == M and set(table) == set(bs)
    shares = {b: table.count(b) for b in bs}
    assert set(shares.values()) <= {M // 10, M // 10 + 1}
    assert sum(shares.values()) == M


def test_table_does_not_depend_on_the_order_backends_come_in():
    bs = backends(12)
    shuffled = bs[:]
    random.Random(5).shuffle(shuffled)
    assert maglev.lookup_table(bs, 1021) == maglev.lookup_table(shuffled, 1021)
    assert maglev.lookup_table(bs + bs[:3], 1021) == maglev.lookup_table(bs, 1021)


@pytest.mark.parametrize("n", [3, 10, 50])
def test_disruption_against_theory(n):
    """Removing (adding) one backend of N must move every slot of the removed (to the added)
    backend: exactly its share, about 1/N (1/(N+1)), the minimum any scheme moves. Maglev trades
    a little more for its perfect balance; the paper gives no closed bound, so the extra is held
    to at most the minimum itself (moved <= 2 x minimum) at M >= 100 N, the paper's regime.
    Measured at M = 16381 (mean of 4 backend sets): N=3: 0.334 vs 1/3; N=10: 0.105 vs 0.100;
    N=50: 0.030 vs 0.020 (removal); adding: 0.252 vs 0.250, 0.096 vs 0.091, 0.030 vs 0.0196."""
    assert M >= 100 * n
    for seed in range(2):
        bs = backends(n + 1, seed=100 * n + seed)
        base, fewer, more = (maglev.lookup_table(x, M) for x in (bs[:n], bs[:n - 1], bs))
        gone, new = bs[n - 1], bs[n]
        # the minimum, exactly: the removed backend's slots all move, the added one's all moved
        assert all(f != gone for f in fewer)
        removed_share, added_share = base.count(gone), more.count(new)
        assert removed_share in (M // n, M // n + 1) and added_share in (M // (n + 1), M // (n + 1) + 1)
        assert removed_share <= moved(base, fewer) <= 2 * removed_share
        assert added_share <= moved(base, more) <= 2 * added_share


def test_two_nodes_pick_the_same_backend_for_a_flow():
    """Two agents that saw the backends in other orders and gave them other ids still send each
    5-tuple to the same backend: the table is computed from names, the hash has a fixed seed."""
    bs = backends(7)
    node_a = dict(zip(bs, range(1, 8)))
    node_b = dict(zip(reversed(bs), range(40, 47)))
    tables = []
    for ids in (node_a, node_b):
        raw = maglev.table_value(list(ids), ids, 1021)
        by_id = {v: k for k, v in ids.items()}
        slots = [by_id[shared.parse_u32(raw[4 * i:4 * i + 4])] for i in range(1, 1022)]
        tables.append(slots)
    assert tables[0] == tables[1]
    rng = random.Random(3)
    for _ in range(500):
        client, sport = f"10.244.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(1024, 65536)
        slot = maglev.flow_slot(client, sport, 80, 6, 1021)
        assert tables[0][slot] == tables[1][slot]


def test_sizes_must_be_prime():
    assert [p for p in range(2, 30) if is_prime(p)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(M) and is_prime(131071) and not is_prime(16383)
    with pytest.raises(ValueError, match="prime"):
        maglev.lookup_table(backends(3), 1000)
    assert shared.const("LB_MAGLEV_DEFAULT_TABLE_SIZE") == M


# --- the annotations -------------------------------------------------------------------------

def service_doc(annotations: dict | None) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "annotations": annotations},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


@pytest.mark.parametrize("annotations,algorithm,size,problem", [
    (None, "random", 0, None),
    ({"lbctl.io/lb-algorithm": "maglev"}, "maglev", 0, None),
    ({"lbctl.io/lb-algorithm": "maglev", "lbctl.io/maglev-table-size": "1021"}, "maglev", 1021, None),
    ({"lbctl.io/lb-algorithm": "maglev", "lbctl.io/maglev-table-size": "1000"}, "maglev", 0,
     "not prime (the nearest primes are 997 and 1009)"),
    ({"lbctl.io/lb-algorithm": "maglev", "lbctl.io/maglev-table-size": "262139"}, "maglev", 0,
     "not a prime from 3 to 131071"),
    ({"lbctl.io/lb-algorithm": "maglev", "lbctl.io/maglev-table-size": "big"}, "maglev", 0, "not a prime"),
    ({"lbctl.io/lb-algorithm": "Maglev!"}, "random", 0, "is not one of random, maglev; using random"),
    ({"lbctl.io/maglev-table-size": "1021"}, "random", 0, "is not maglev; ignored"),
])
def test_annotations(annotations, algorithm, size, problem):
    services, _, problems = parse_documents([service_doc(annotations)], "web.yaml")
    assert len(services) == 1, "a bad annotation never takes the service down"
    assert (services[0].load_balancing, services[0].maglev_table_size) == (algorithm, size)
    if problem is None:
        assert not problems
    else:
        assert len(problems) == 1 and problems[0].obj == "Service default/web" and problem in problems[0].message


def test_desired_state_takes_the_nodes_default_size():
    plain = service_doc(None)
    plain["metadata"] = {"name": "plain"}
    plain["spec"] = {**plain["spec"], "clusterIP": "10.96.0.11"}
    services, _, _ = parse_documents([service_doc({"lbctl.io/lb-algorithm": "maglev"}), plain], "x.yaml")
    snapshot = ClusterSnapshot(services={s.key: s for s in services})
    desired, _ = desired_state(service_ports(snapshot), maglev_table_size=251)
    sizes = {e.name: e.maglev_table_size for e in desired.services.values()}
    assert sizes == {"default/web:http": 251, "default/plain:http": 0}


# --- the reconciler --------------------------------------------------------------------------

def fake_maps(journal: list | None = None) -> dict:
    names = (SERVICES, BACKENDS, maglev.MAGLEV)
    m = {n: FakeMap(n, journal=journal) for n in names}
    m["lb_service_stats"] = FakeMap("s", percpu=True)
    m["lb_backend_stats"] = FakeMap("b", percpu=True)
    return m


def maglev_entry(bs, size=251, fe=WEB):
    return dataclasses.replace(entry("default/web:http", fe, *bs), maglev_table_size=size)


def state(*entries) -> DesiredState:
    return DesiredState({e.frontend: e for e in entries})


def frontend_flags(m, fe=WEB) -> int:
    value = m[SERVICES].data[shared.service_key(fe.address, fe.port, fe.protocol.number)]
    return shared.view("lb4_service_value", value).flags


def kernel_table(m, service_id: int = 1) -> list[Backend]:
    """The table as the maps hold it, as backends."""
    by_id = {shared.parse_u32(k): v for k, v in m[BACKENDS].data.items()}
    raw = m[maglev.MAGLEV].data[maglev.table_key(service_id)]
    size = shared.parse_u32(raw)
    out = []
    for i in range(1, size + 1):
        b = shared.view("lb4_backend", by_id[shared.parse_u32(raw[4 * i:4 * i + 4])])
        out.append(Backend(shared.from_be32(b.address), shared.from_be16(b.port), TCP))
    return out


def test_reconciler_writes_the_table_before_the_frontend_that_names_it():
    journal: list = []
    m = fake_maps(journal)
    bs = backends(4)
    result = Reconciler(m, 100, 100).sync(state(maglev_entry(bs)))
    assert not result.errors
    assert frontend_flags(m) & F_MAGLEV
    assert kernel_table(m) == maglev.lookup_table(bs, 251)
    order = [(name, op) for name, op, key in journal if name != BACKENDS]
    frontend_key = shared.service_key(WEB.address, WEB.port, 6)
    table_at = journal.index((maglev.MAGLEV, "update", maglev.table_key(1)))
    frontend_at = journal.index((SERVICES, "update", frontend_key))
    assert table_at < frontend_at, order
    assert max(i for i, (n, op, _) in enumerate(journal) if n == BACKENDS) < table_at


def test_default_stays_uniform_random():
    """Without the annotation: no flag, no table (the program's random choice, unchanged)."""
    m = fake_maps()
    Reconciler(m, 100, 100).sync(state(entry("default/web:http", WEB, *backends(3))))
    assert not frontend_flags(m) & F_MAGLEV and not m[maglev.MAGLEV].data


def test_table_is_rewritten_only_when_backends_or_size_change():
    m = fake_maps()
    r = Reconciler(m, 100, 100)
    bs = backends(5)
    r.sync(state(maglev_entry(bs)))
    writes = lambda: [op for op, _ in m[maglev.MAGLEV].log]
    r.sync(state(maglev_entry(list(reversed(bs)))))
    assert writes() == ["update"]
    r.sync(state(maglev_entry(bs[:4])))
    assert writes() == ["update", "update"] and kernel_table(m) == maglev.lookup_table(bs[:4], 251)
    r.sync(state(maglev_entry(bs[:4], size=257)))
    assert writes() == ["update"] * 3 and len(kernel_table(m)) == 257


def test_restart_keeps_tables_and_drift_is_repaired():
    m = fake_maps()
    bs = backends(5)
    Reconciler(m, 100, 100).sync(state(maglev_entry(bs)))
    before = dict(m[maglev.MAGLEV].data)
    restarted = Reconciler(m, 100, 100)
    restarted.sync(state(maglev_entry(bs)))
    assert m[maglev.MAGLEV].data == before and len(m[maglev.MAGLEV].log) == 1, "a restart moves no flow"
    del m[maglev.MAGLEV].data[maglev.table_key(1)]           # removed behind the agent's back
    restarted.resync(state(maglev_entry(bs)))
    assert m[maglev.MAGLEV].data == before


def test_tables_are_pruned_after_the_frontend_stops_naming_them():
    journal: list = []
    m = fake_maps(journal)
    r = Reconciler(m, 100, 100)
    r.sync(state(maglev_entry(backends(3))))
    journal.clear()
    r.sync(state(entry("default/web:http", WEB, *backends(3))))     # annotation removed
    assert not frontend_flags(m) & F_MAGLEV and not m[maglev.MAGLEV].data
    names = [(n, op) for n, op, _ in journal]
    assert names.index((SERVICES, "update")) < names.index((maglev.MAGLEV, "delete"))
    r.sync(state(maglev_entry(backends(3))))
    journal.clear()
    r.sync(state())                                                   # service deleted
    names = [(n, op) for n, op, _ in journal]
    assert names.index((SERVICES, "delete")) < names.index((maglev.MAGLEV, "delete"))
    assert not m[maglev.MAGLEV].data


def test_two_scopes_get_a_table_each():
    m = fake_maps()
    local, everyone = backends(2), backends(6)
    e = dataclasses.replace(maglev_entry(local), internal_backends=tuple(sorted(everyone)))
    Reconciler(m, 100, 100).sync(state(e))
    assert set(m[maglev.MAGLEV].data) == {maglev.table_key(1, 0), maglev.table_key(1, 1)}
    assert set(kernel_table(m)) == set(local)


def test_each_backend_set_is_computed_once():
    """Frontends sharing a backend set (a ClusterIP and its NodePorts) share one computation."""
    maglev.populate.cache_clear()
    bs = backends(10)
    for _ in range(3):
        maglev.lookup_table(bs, 1021)
    assert maglev.populate.cache_info().misses == 1
