"""What the agent does in the kernel: attaching next to another tool's tc filter, batched
whole-map walks, pins and map entries repaired by the resync. Needs root."""
from __future__ import annotations

import collections
import logging
import os
import subprocess

import pytest
from conftest import config_for_tests

from lbctl.datapath.ebpf import bpfsys, shared
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.bpfsys import BpfMap
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.datapath.ebpf.reconcile import Reconciler, entry
from lbctl.model.objects import Backend, DesiredState, Frontend, Protocol
from lbctl.testing.fakemap import FakeMap

pytestmark = pytest.mark.root


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture
def veth_in_netns():
    """A namespace with a veth pair in it (vethlbt<pid>a/b); deleted with everything in it."""
    ns = f"lbtc{os.getpid() % 100000}"
    ip("netns", "add", ns)
    try:
        name = f"vethlbt{os.getpid() % 10000}a"
        ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", name[:-1] + "b")
        ip("-n", ns, "link", "set", name, "up")
        yield ns, name
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def tc(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", *argv], check=True, capture_output=True,
                          text=True).stdout


# --- item 8: another tool's filter at lbctl's pref --------------------------------------------------


def test_attach_beside_a_foreign_filter_at_our_pref(loaded_datapath, veth_in_netns, caplog):
    from pyroute2 import IPRoute

    ns, name = veth_in_netns
    tc(ns, "qdisc", "add", "dev", name, "clsact")
    # another tool's match-all filter (this kernel has u32 but neither cls_matchall nor act_gact)
    tc(ns, "filter", "add", "dev", name, "ingress", "pref", str(ebpf.TC_PRIO), "protocol", "all",
       "u32", "match", "u32", "0", "0")
    tc_name = loaded_datapath.cfg.tc_name
    caplog.set_level(logging.INFO, logger="lbctl.mode")
    with IPRoute(netns=ns) as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        mode = EbpfMode(config_for_tests(devices=(name,)))
        mode.datapath = loaded_datapath
        mode.reconciler = Reconciler({"lb4_services": FakeMap(), "lb4_backends": FakeMap()}, 2, 2)
        mode.attach_links(ipr, verify=True)
        assert mode.attached == {index: name} and not mode.pending_links
        assert ebpf.is_attached(ipr, index, tc_name)
        ingress = tc(ns, "filter", "show", "dev", name, "ingress")
        assert f"pref {ebpf.TC_PRIO} u32" in ingress and "match 00000000/00000000" in ingress, "theirs untouched"
        assert f"pref {ebpf.TC_PRIO - 1} bpf" in ingress and tc_name in ingress, "ours just before it"
        egress = tc(ns, "filter", "show", "dev", name, "egress")
        assert f"pref {ebpf.TC_PRIO} bpf" in egress, "a free hook keeps the usual pref"
        notes = [r.getMessage() for r in caplog.records if "another tool's u32 filter" in r.getMessage()]
        assert len(notes) == 1 and f"pref {ebpf.TC_PRIO - 1}" in notes[0]
        # attached again (a restart, the periodic check): the same pref, no second filter
        ebpf.attach(ipr, index, loaded_datapath.prog_fd, loaded_datapath.egress_fd, tc_name)
        assert tc(ns, "filter", "show", "dev", name, "ingress").count(tc_name) == 1
        assert ebpf.detach(ipr, index, tc_name)
        left = tc(ns, "filter", "show", "dev", name, "ingress")
        assert f"pref {ebpf.TC_PRIO} u32" in left and tc_name not in left
        assert "clsact" in tc(ns, "qdisc", "show", "dev", name), "their filter still needs clsact"


def test_every_pref_is_chosen_free():
    """choose_pref on listings alone: ours where it is, else TC_PRIO, else the nearest free below."""
    class F(dict):
        def __init__(self, pref, handle=1, kind="matchall", name=None):
            super().__init__(info=pref << 16, handle=handle)
            self.kind, self.name = kind, name

        def get_attr(self, attr):
            if attr == "TCA_KIND":
                return self.kind
            if attr == "TCA_OPTIONS" and self.name:
                name = self.name
                return type("Opts", (), {"get_attr": lambda self, a: name if a == "TCA_BPF_NAME" else None})()
            return None

    p = ebpf.TC_PRIO
    assert ebpf.choose_pref([], "x") == (p, [])
    assert ebpf.choose_pref([F(p - 1)], "x") == (p, [])
    pref, blockers = ebpf.choose_pref([F(p, 0), F(p), F(p - 1)], "x")
    assert pref == p - 2 and len(blockers) == 1
    assert ebpf.choose_pref([F(p), F(40, 0x1BC, "bpf", "x")], "x") == (40, [])


# --- item 15: whole-map walks in batches --------------------------------------------------------------


class CountingLibbpf:
    """bpfsys._libbpf, counting calls by function."""

    def __init__(self, real):
        self.real = real
        self.calls: collections.Counter = collections.Counter()

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def counted(*args):
            self.calls[name] += 1
            return fn(*args)
        return counted


@pytest.fixture
def counting(monkeypatch):
    lib = CountingLibbpf(bpfsys._libbpf)
    monkeypatch.setattr(bpfsys, "_libbpf", lib)
    return lib.calls


def new_map(map_type: int, key_size: int, value_size: int, entries: int) -> BpfMap:
    return BpfMap(bpfsys.map_create(map_type, "lbctl_test", key_size, value_size, entries))


@pytest.mark.parametrize("map_type,count", [(bpfsys.MAP_TYPE_HASH, 10_000), (bpfsys.MAP_TYPE_LRU_HASH, 5_000),
                                            (bpfsys.MAP_TYPE_PERCPU_ARRAY, 10_000), (bpfsys.MAP_TYPE_ARRAY, 9_000)])
def test_walks_are_batched_and_see_every_entry(map_type, count, counting):
    with new_map(map_type, 4, 12, 10_000 if map_type != bpfsys.MAP_TYPE_ARRAY else 9_000) as m:
        want = {shared.u32(i): shared.u32(i * 7) + bytes(8) for i in range(count)}
        m.update_batch(list(want.items()))
        counting.clear()
        got = dict(m.items())
        if m.percpu:
            assert all(v == [want[k]] * len(v) for k, v in got.items())
        else:
            assert got == want
        assert counting["bpf_map_lookup_batch"] <= count // bpfsys.BATCH_ENTRIES + 2
        assert counting["bpf_map_get_next_key"] == counting["bpf_map_lookup_elem"] == 0
        assert m.count() == count and sorted(m.keys()) == sorted(want)


def test_a_map_without_batch_lookups_is_walked_key_by_key(counting):
    devmap = 14   # BPF_MAP_TYPE_DEVMAP: the kernel has no batch lookup for it
    with new_map(devmap, 4, 4, 8) as m:
        lo = shared.u32(1)   # ifindex of lo
        for i in range(3):
            m.update(shared.u32(i), lo)
        assert dict(m.items()) == {shared.u32(i): lo for i in range(3)}
        assert not m._batch_lookup and counting["bpf_map_get_next_key"] > 0


def test_batch_delete_skips_keys_already_gone():
    with new_map(bpfsys.MAP_TYPE_HASH, 4, 4, 100) as m:
        m.update_batch([(shared.u32(i), shared.u32(i)) for i in range(10)])
        keys = [shared.u32(i) for i in (1, 2, 50, 3, 60, 4)]
        assert m.delete_batch(keys) == 4
        assert sorted(shared.parse_u32(k) for k in m.keys()) == [0, 5, 6, 7, 8, 9]
        assert m.delete_batch([]) == 0


def test_a_walk_of_an_empty_map_is_empty():
    with new_map(bpfsys.MAP_TYPE_LRU_HASH, 16, 40, 1000) as m:
        assert list(m.items()) == [] and m.count() == 0


# --- item 6: the resync on real maps -------------------------------------------------------------------


def test_resync_repairs_a_frontend_left_without_slots(datapath):
    """A frontend with count 2 and no slots (clients time out, no RST), a backend deleted with
    bpftool: the resync reads the maps back and repairs both."""
    web = Frontend("10.96.0.10", 80, Protocol.TCP)
    desired = DesiredState({web: entry("w", web, Backend("10.244.0.2", 80, Protocol.TCP),
                                       Backend("10.244.0.3", 80, Protocol.TCP))})
    r = datapath.reconciler
    assert not r.sync(desired).errors
    services, backends = datapath.maps["lb4_services"], datapath.maps["lb4_backends"]
    before = dict(services.items()), dict(backends.items())
    for slot in (1, 2):
        assert services.delete(shared.service_key("10.96.0.10", 80, 6, slot))
    backends.delete(next(iter(backends.keys())))
    assert not r.sync(desired).changed
    assert r.resync(desired).changed
    assert (dict(services.items()), dict(backends.items())) == before


def test_resync_pins_maps_removed_behind_our_back():
    """`lbctl cleanup --force` under a running agent unpins the maps its program still uses."""
    cfg = config_for_tests(pin_dir=config_for_tests().pin_dir + "-repin")
    dp = ebpf.EbpfDatapath(cfg).load()
    try:
        path = os.path.join(cfg.pin_dir, "lb4_services")
        old_id = dp.maps["lb4_services"].info.id
        ebpf.remove_pins(cfg.pin_dir)
        assert not os.path.exists(path)
        assert sorted(ebpf.repin(dp)) == sorted(ebpf.MAPS)
        with BpfMap.open_pinned(path) as again:
            assert again.info.id == old_id, "the very map the program uses"
        assert ebpf.repin(dp) == []
    finally:
        dp.close()
        ebpf.remove_pins(cfg.pin_dir)
    assert not os.path.exists(cfg.pin_dir)



def test_a_failed_load_leaves_no_pin_dir():
    """A first load that fails (here: a map of 0 entries) leaves no pin dir, nor the maps pinned
    before the failure."""
    cfg = config_for_tests(pin_dir=config_for_tests().pin_dir + "-noload", ct_size=0)
    with pytest.raises(ebpf.DatapathError, match="compiling/loading"):
        ebpf.EbpfDatapath(cfg).load()
    assert not os.path.exists(cfg.pin_dir)


def test_a_restarted_agent_keeps_a_live_vip_with_its_service():
    """Service z holds 10.96.0.1:80; after a restart a Service a (which sorts first) claims the
    same VIP: z keeps it, read from the names file of the pinned maps."""
    from test_desired import info, svc

    from lbctl.model.objects import EndpointInfo, ServicePort

    cfg = config_for_tests(pin_dir=config_for_tests().pin_dir + "-holder")
    port = ServicePort("", 80, Protocol.TCP, 80)
    z = info(svc("z", port, ips=("10.96.0.1",)), port, EndpointInfo("10.0.0.26", 80))
    a = info(svc("a", port, ips=("10.96.0.1",)), port, EndpointInfo("10.0.0.1", 80))
    try:
        first = EbpfMode(cfg, switch_modes=False)   # leave any other mode alone
        first.start()
        assert not first.sync([z]).errors
        first.stop(detach=False)
        again = EbpfMode(cfg, switch_modes=False)
        again.start()
        assert not again.sync([a, z]).errors
        (entry_,) = again.desired.services.values()
        assert entry_.name == "default/z" and entry_.backends[0].address == "10.0.0.26"
        assert [p.obj for p in again.problems] == ["Service default/a"]
        again.stop(detach=False)
    finally:
        EbpfMode.cleanup(cfg)
    assert not os.path.exists(cfg.pin_dir)


def test_dump_tells_a_dropping_service_from_a_rejecting_one(datapath):
    """internalTrafficPolicy Local without a local endpoint drops; no endpoints at all rejects."""
    from lbctl.datapath.ebpf import dump
    from lbctl.model.objects import ServiceEntry

    local = Frontend("10.96.0.11", 80, Protocol.TCP)
    empty = Frontend("10.96.0.12", 80, Protocol.TCP)
    desired = DesiredState({local: ServiceEntry(local, "default/local", (), drop_without_backends=True),
                            empty: ServiceEntry(empty, "default/empty", ())})
    assert not datapath.reconciler.sync(desired).errors
    table = dump.format_table(dump.collect(datapath.cfg.pin_dir))
    rows = {line.split()[2]: line for line in table.splitlines() if line.startswith("-")}
    assert rows["10.96.0.11:80/TCP"].endswith("(no endpoints: drop)")
    assert rows["10.96.0.12:80/TCP"].endswith("(no endpoints: reject)")
