"""The Maglev datapath as a program: BPF_PROG_TEST_RUN packets of many 5-tuples go to the
backend the Python model of the table predicts (so every node running this program with the
same backends agrees), with or without conntrack; the tables live in lb4_maglev as the
reconciler wrote them and leave with the service."""
from __future__ import annotations

import dataclasses
import random

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from lbctl.datapath.ebpf import bpfsys, maglev
from lbctl.datapath.ebpf.packets import frame
from lbctl.datapath.ebpf.reconcile import entry
from lbctl.model.objects import Backend, DesiredState, Frontend, Protocol

pytestmark = pytest.mark.root

VIP, SIZE = "10.96.0.10", 1021
WEB = Frontend(VIP, 80, Protocol.TCP)
BACKENDS = [Backend(f"10.244.1.{i}", 8080, Protocol.TCP) for i in range(11, 16)]


def program(dp, backends, size=SIZE):
    e = dataclasses.replace(entry("default/web:http", WEB, *backends), maglev_table_size=size)
    assert not dp.reconciler.sync(DesiredState({WEB: e})).errors


def chosen(dp, client: str, sport: int) -> str:
    res = bpfsys.prog_test_run(dp.prog_fd, frame(client, VIP, sport, 80, "tcp"))
    return Ether(res.data)[IP].dst


@pytest.fixture
def maglev_datapath(datapath):
    try:
        yield datapath
    finally:
        datapath.reconciler.sync(DesiredState())   # frontends, then their tables, removed
        assert not list(datapath.maps[maglev.MAGLEV].keys())


def test_flows_go_where_the_model_says(maglev_datapath):
    dp = maglev_datapath
    program(dp, BACKENDS)
    table = maglev.lookup_table(BACKENDS, SIZE)
    rng = random.Random(11)
    flows = [(f"10.244.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536))
             for _ in range(400)]
    seen = {}
    for client, sport in flows:
        want = table[maglev.flow_slot(client, sport, 80, 6, SIZE)].address
        assert chosen(dp, client, sport) == want, (client, sport)
        seen[want] = seen.get(want, 0) + 1
    assert set(seen) == {b.address for b in BACKENDS}


def test_the_choice_needs_no_conntrack(maglev_datapath):
    """A flow whose conntrack entry is gone (another node, a restart) is sent to the same backend."""
    dp = maglev_datapath
    program(dp, BACKENDS)
    first = [chosen(dp, "10.244.7.7", 30000 + i) for i in range(50)]
    ct = dp.maps["lb4_ct"]
    for key in list(ct.keys()):
        ct.delete(key)
    assert [chosen(dp, "10.244.7.7", 30000 + i) for i in range(50)] == first


def test_a_removed_backend_moves_only_its_flows(maglev_datapath):
    dp = maglev_datapath
    program(dp, BACKENDS)
    flows = [("10.244.9.9", 20000 + i) for i in range(300)]
    before = {f: chosen(dp, *f) for f in flows}
    ct = dp.maps["lb4_ct"]
    for key in list(ct.keys()):
        ct.delete(key)
    program(dp, BACKENDS[1:])
    after = {f: chosen(dp, *f) for f in flows}
    gone = BACKENDS[0].address
    moved = [f for f in flows if before[f] != after[f]]
    assert {f for f in flows if before[f] == gone} <= set(moved)
    table_moved = sum(a != b for a, b in zip(maglev.lookup_table(BACKENDS, SIZE),
                                             maglev.lookup_table(BACKENDS[1:], SIZE)))
    # the flows that moved are exactly those on slots that changed
    assert all(maglev.lookup_table(BACKENDS, SIZE)[maglev.flow_slot(*f, 80, 6, SIZE)]
               != maglev.lookup_table(BACKENDS[1:], SIZE)[maglev.flow_slot(*f, 80, 6, SIZE)] for f in moved)
    assert table_moved < SIZE // 2


def test_the_table_in_the_map_is_the_models(maglev_datapath):
    dp = maglev_datapath
    program(dp, BACKENDS)
    tables = maglev.TableMap(dp.maps[maglev.MAGLEV])
    (key, raw), = list(tables.items())
    ids = dp.reconciler.backend_ids
    assert raw == maglev.table_value(BACKENDS, ids, SIZE)
    program(dp, BACKENDS, size=251)     # a new size: a new inner map swapped in
    (_, raw), = list(tables.items())
    assert raw == maglev.table_value(BACKENDS, ids, 251)
