"""`lbctl dump maps` without a kernel: ``dump.summarize`` over in-memory maps the reconciler
filled from a desired state with every frontend type, and ``dump.format_table`` / the --json
output of a hand-built ``collect()`` result (attachments per link and cgroup, the netfilter
rules' counters).

What is proved: frontends are grouped by type in the order ClusterIP, NodePort, ExternalIP,
LoadBalancer, each with its flags (eTP Local and its two scopes, drop, source ranges); the
per-service and per-backend counters and the datapath's drop and masquerade counters are read
back; the text shows one header per type with its count, one line per link (role, XDP/tc mode,
tc programs) and per cgroup, and the drop and masquerade counters; --json prints collect()'s
dict unchanged.
"""
from __future__ import annotations

import copy
import json

import pytest

from lbctl.cli import main as cli
from lbctl.datapath.ebpf import dump, shared
from lbctl.datapath.ebpf.reconcile import Reconciler
from lbctl.model.desired import NodeAddresses, desired_state
from lbctl.model.objects import EndpointInfo, Protocol, Service, ServicePort, ServicePortInfo
from lbctl.testing.fakemap import FakeMap

NODE, NODE_IP = "node-a", "192.0.2.2"
MAPS = ("lb4_services", "lb4_backends", "lb_service_stats", "lb_backend_stats", "lb_global_stats",
        "lb4_ct", "lb4_source_ranges", "lb4_affinity")


def endpoints(*addresses: str, node: str = NODE) -> tuple[EndpointInfo, ...]:
    return tuple(EndpointInfo(a, 8080, node_name=node) for a in addresses)


def port(node_port: int | None = None) -> ServicePort:
    return ServicePort("http", 80, Protocol.TCP, 8080, node_port=node_port)


def services() -> list[ServicePortInfo]:
    """One service of each type: web (ClusterIP), np (NodePort, eTP Local, one local and one
    remote endpoint), ext (ClusterIP with an external IP), lb (LoadBalancer with source ranges),
    gone (ClusterIP without endpoints)."""
    lb_port = port(30081)
    return [
        ServicePortInfo(Service("default", "web", cluster_ips=("10.96.0.10",), ports=(port(),)), port(),
                        endpoints("10.244.0.4", "10.244.0.5")),
        ServicePortInfo(Service("default", "np", type="NodePort", cluster_ips=("10.96.0.11",),
                                ports=(port(30080),), external_traffic_policy="Local"), port(30080),
                        endpoints("10.244.0.6") + endpoints("10.244.1.6", node="node-b")),
        ServicePortInfo(Service("default", "ext", cluster_ips=("10.96.0.12",), ports=(port(),),
                                external_ips=("192.0.2.50",)), port(), endpoints("10.244.0.7")),
        ServicePortInfo(Service("default", "lb", type="LoadBalancer", cluster_ips=("10.96.0.13",),
                                ports=(lb_port,), load_balancer_ips=("192.0.2.60",),
                                load_balancer_source_ranges=("198.51.100.0/24",)), lb_port,
                        endpoints("10.244.0.8")),
        ServicePortInfo(Service("default", "gone", cluster_ips=("10.96.0.14",), ports=(port(),)), port(), ()),
    ]


@pytest.fixture
def programmed():
    """(maps, names): the reconciler's writes of services() into in-memory maps."""
    maps = {name: FakeMap(name, percpu=name.startswith("lb_")) for name in MAPS}
    desired, problems = desired_state(services(), NODE, node=NodeAddresses(nodeport_ips=(NODE_IP,), node_ip=NODE_IP))
    assert problems == ()
    reconciler = Reconciler(maps, 64, 256)
    assert not reconciler.sync(desired).errors
    return maps, reconciler.service_names(desired)


def rows(state: dict, kind: str | None = None) -> dict[str, dict]:
    return {s["frontend"]: s for s in state["services"] if kind in (None, s["type"])}


def global_stat(maps: dict, name: str, value: int) -> None:
    maps["lb_global_stats"].update(shared.u32(shared.stat_names().index(name)), [value.to_bytes(8, "little")])


# --- summarize ------------------------------------------------------------------------------------


def test_frontends_are_grouped_by_type_in_kube_proxys_order(programmed):
    state = dump.summarize(*programmed, "/sys/fs/bpf/nowhere")
    kinds = [s["type"] for s in state["services"]]
    assert kinds == sorted(kinds, key=dump.TYPES.index), "one group per type, in TYPES order"
    assert {kind: sorted(rows(state, kind)) for kind in dump.TYPES} == {
        "ClusterIP": ["10.96.0.10:80/TCP", "10.96.0.11:80/TCP", "10.96.0.12:80/TCP", "10.96.0.13:80/TCP",
                      "10.96.0.14:80/TCP"],
        "NodePort": [f"{NODE_IP}:30080/TCP", f"{NODE_IP}:30081/TCP"],
        "ExternalIP": ["192.0.2.50:80/TCP"],
        "LoadBalancer": ["192.0.2.60:80/TCP"],
    }
    assert [s["name"] for s in state["services"] if s["type"] == "ClusterIP"] == [
        "default/ext:http", "default/gone:http", "default/lb:http", "default/np:http", "default/web:http"]
    assert state["pin_dir"] == "/sys/fs/bpf/nowhere" and state["socket_lb"] == []
    assert state["backends"] == 6 and state["conntrack_entries"] == 0


def test_each_frontend_carries_its_backends_and_flags(programmed):
    state = dump.summarize(*programmed, "/sys/fs/bpf/nowhere")
    by = rows(state)
    web = by["10.96.0.10:80/TCP"]
    assert web["count"] == 2 and [b["address"] for b in web["backends"]] == ["10.244.0.4:8080/TCP",
                                                                             "10.244.0.5:8080/TCP"]
    assert web["internal"] is None and not web["etp_local"] and not web["drop"]
    node_port = by[f"{NODE_IP}:30080/TCP"]
    assert node_port["etp_local"] and node_port["drop"], "eTP Local: drop without a local endpoint"
    assert [b["address"] for b in node_port["backends"]] == ["10.244.0.6:8080/TCP"], "this node's only"
    assert [b["address"] for b in node_port["internal"]] == ["10.244.0.6:8080/TCP", "10.244.1.6:8080/TCP"]
    assert not by["10.96.0.11:80/TCP"]["etp_local"], "the ClusterIP of an eTP Local service is not"
    assert "198.51.100.0/24" in by["192.0.2.60:80/TCP"]["source_ranges"]
    assert by[f"{NODE_IP}:30081/TCP"]["source_ranges"] == [], "NodePorts ignore source ranges"
    gone = by["10.96.0.14:80/TCP"]
    assert gone["count"] == 0 and gone["backends"] == [] and not gone["drop"], "no endpoints: reject"


def test_counters_of_services_backends_drops_and_masquerade(programmed):
    maps, names = programmed
    state = dump.summarize(maps, names, "/x")
    web = rows(state)["10.96.0.10:80/TCP"]
    first = web["backends"][0]
    maps["lb_service_stats"].update(shared.u32(web["id"]), [shared.new("lb_stats", packets=10, bytes=600, flows=2)])
    maps["lb_backend_stats"].update(shared.u32(first["id"]), [shared.new("lb_stats", packets=7, bytes=420, flows=1)])
    for name, value in (("drop_etp_local", 3), ("drop_source_range", 2), ("masquerade", 11), ("svc_new_flow", 5)):
        global_stat(maps, name, value)
    state = dump.summarize(maps, names, "/x")
    web = rows(state)["10.96.0.10:80/TCP"]
    assert (web["packets"], web["bytes"], web["flows"]) == (10, 600, 2)
    assert (web["backends"][0]["packets"], web["backends"][0]["flows"]) == (7, 1)
    assert web["backends"][1]["packets"] == 0
    assert state["drops"] == {"etp_local": 3, "source_range": 2, "itp_local": 0}
    assert state["masquerade"] == {"marked": 11}
    assert state["counters"]["svc_new_flow"] == 5
    assert set(state["counters"]) == set(shared.stat_names())


# --- the text and the JSON of a collect() result ---------------------------------------------------


def collected(programmed, *, installed: bool = True) -> dict:
    """What collect() returns: summarize's part, then attachments and netfilter (hand-built)."""
    maps, names = programmed
    global_stat(maps, "drop_itp_local", 4)
    global_stat(maps, "masquerade", 9)
    state = dump.summarize(maps, names, "/sys/fs/bpf/lbctl")
    state["attachments"] = {
        "links": [
            {"link": "vethlbctl0", "ifindex": 7, "role": "pod", "mode": "tc",
             "tc": {"ingress": "lb_tc_ingress", "egress": "lb_tc_egress"}},
            {"link": "eth0", "ifindex": 2, "role": "uplink", "mode": "xdp-native",
             "tc": {"ingress": "lb_tc_uplink_in", "egress": "lb_tc_uplink_eg"}},
        ],
        "cgroups": [{"cgroup": "/sys/fs/cgroup/unified/lbctl-lab-x/lab-node",
                     "programs": ["connect4", "sendmsg4", "recvmsg4", "getpeername4"]}],
    }
    state["netfilter"] = ({"table": "ip lbctl", "installed": True, "masquerade": {"packets": 12, "bytes": 720},
                           "drop": {"packets": 5, "bytes": 300}} if installed else
                          {"table": "ip lbctl", "installed": False, "masquerade": None, "drop": None})
    return state


def test_table_has_one_header_per_type_with_its_count(programmed):
    lines = dump.format_table(collected(programmed)).splitlines()
    headers = [line for line in lines if line.split(" (")[0] in dump.TYPES]
    assert headers == ["ClusterIP (5)", "NodePort (2)", "ExternalIP (1)", "LoadBalancer (1)"]
    lb = lines.index("LoadBalancer (1)")
    assert lines[lb + 1].startswith("default/lb:http") and "192.0.2.60:80/TCP" in lines[lb + 1]
    assert "(from 198.51.100.0/24" in lines[lb + 1]
    np_line = next(line for line in lines if f"{NODE_IP}:30080/TCP" in line)
    assert "(eTP Local: this node's endpoints)" in np_line
    assert any("internal (pods, the node): 2 endpoint(s)" in line for line in lines)
    assert "(no endpoints: reject)" in next(line for line in lines if "10.96.0.14:80/TCP" in line)
    assert "9 frontend(s), 6 backend(s), 0 conntrack entries (2 per flow) in /sys/fs/bpf/lbctl" in lines


def test_table_shows_attachments_per_link_and_cgroup_and_the_counters(programmed):
    lines = dump.format_table(collected(programmed)).splitlines()
    assert "link eth0 (uplink): xdp-native; tc egress lb_tc_uplink_eg, ingress lb_tc_uplink_in" in lines
    assert "link vethlbctl0 (pod): tc; tc egress lb_tc_egress, ingress lb_tc_ingress" in lines
    assert ("cgroup /sys/fs/cgroup/unified/lbctl-lab-x/lab-node: connect4, sendmsg4, recvmsg4, "
            "getpeername4") in lines
    assert "dropped (drop mark): etp_local=0  source_range=0  itp_local=4   masquerade-marked: 9" in lines
    assert "netfilter (nft table ip lbctl): masquerade rule 12 packets, drop rule 5 packets" in lines
    counters = next(line for line in lines if line.startswith("datapath counters: "))
    assert counters == "datapath counters: drop_itp_local=4  masquerade=9", "only the non-zero ones"


def test_table_says_what_is_missing(programmed):
    state = collected(programmed, installed=False)
    state["attachments"] = {"links": [], "cgroups": []}
    lines = dump.format_table(state).splitlines()
    assert "netfilter: nft table ip lbctl not installed (or not readable)" in lines
    assert "links: none attached" in lines and "cgroups: none attached" in lines
    state["attachments"]["links"] = [{"error": "Operation not permitted"}]
    assert "links: Operation not permitted" in dump.format_table(state).splitlines()
    state["netfilter"] = {"table": "ip lbctl", "installed": True, "masquerade": {"packets": 1, "bytes": 60},
                          "drop": None}
    assert "netfilter (nft table ip lbctl): masquerade rule 1 packets, drop rule missing" in \
        dump.format_table(state).splitlines()


@pytest.mark.parametrize("as_json", [True, False])
def test_dump_maps_prints_collect_as_json_or_as_the_table(programmed, monkeypatch, capsys, as_json):
    state = collected(programmed)
    seen = []
    monkeypatch.setattr(dump, "collect", lambda pin_dir, *a: seen.append(pin_dir) or copy.deepcopy(state))
    assert cli.main(["dump", "maps", "--pin-dir", "/sys/fs/bpf/lbctl-x", *(["--json"] if as_json else [])]) == 0
    out = capsys.readouterr().out
    assert seen == ["/sys/fs/bpf/lbctl-x"]
    if as_json:
        printed = json.loads(out)
        assert printed == state
        assert [s["type"] for s in printed["services"]].count("NodePort") == 2
        assert printed["attachments"]["links"][1]["mode"] == "xdp-native"
        assert printed["drops"]["itp_local"] == 4 and printed["netfilter"]["drop"]["packets"] == 5
    else:
        assert out.rstrip("\n") == dump.format_table(state)


def test_socket_lb_links_are_grouped_per_cgroup():
    """sock.attachments() gives one row per pinned link; dump shows one line per cgroup with
    every hook attached there (it printed one empty line per link before)."""
    from lbctl.datapath.ebpf import dump as dump_mod

    rows = [{"hook": hook, "program": f"lb_{hook}", "cgroup": "/sys/fs/cgroup/unified/n0", "link_id": i,
             "prog_id": 10 + i} for i, hook in enumerate(("connect4", "sendmsg4", "recvmsg4"))]
    rows.append({"hook": "connect4", "program": "lb_connect4", "cgroup": "(removed)", "link_id": 9, "prog_id": 19})
    assert dump_mod.group_by_cgroup(rows) == [
        {"cgroup": "/sys/fs/cgroup/unified/n0",
         "programs": ["connect4 lb_connect4", "sendmsg4 lb_sendmsg4", "recvmsg4 lb_recvmsg4"]},
        {"cgroup": "(removed)", "programs": ["connect4 lb_connect4"]}]
