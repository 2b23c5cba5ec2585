"""The tc program as a program: crafted packets through BPF_PROG_TEST_RUN.

Output bytes are parsed and checksums verified with scapy, independently of the program and of
lbctl.datapath.ebpf.packets."""
from __future__ import annotations

import collections
import dataclasses

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from lbctl.datapath.ebpf import bpfsys, shared
from lbctl.datapath.ebpf.packets import TCP_ACK, TCP_FIN, TCP_SYN, frame
from lbctl.datapath.ebpf.reconcile import entry
from lbctl.model.objects import Backend, DesiredState, Frontend, Protocol

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
CLIENT, VIP = "10.244.0.2", "10.96.0.10"
B1, B2, B3 = "10.244.0.11", "10.244.0.12", "10.244.0.13"


def program(dp, services: dict[str, tuple], affinity: int = 0) -> None:
    """services: name -> ("vip:port/proto", [backend "ip:port", ...])."""
    entries = {}
    for name, (frontend, backends) in services.items():
        addr, rest = frontend.split(":")
        port, proto = rest.split("/")
        fe = Frontend(addr, int(port), Protocol(proto))
        bes = [Backend(b.split(":")[0], int(b.split(":")[1]), fe.protocol) for b in backends]
        entries[fe] = dataclasses.replace(entry(name, fe, *bes), affinity_timeout=affinity)
    result = dp.reconciler.sync(DesiredState(entries))
    assert not result.errors


def run(dp, pkt: bytes):
    res = bpfsys.prog_test_run(dp.prog_fd, bytes(pkt))
    return res.retval, res.data


def assert_checksums_valid(data: bytes) -> Ether:
    """Recomputes IP and L4 checksums with scapy and compares them with the packet's."""
    pkt = Ether(data)
    ip = pkt[IP]
    fresh = IP(bytes(ip))
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == ip.chksum, "IP header checksum"
    for layer in (TCP, UDP, ICMP):
        if layer in ip:
            if layer is UDP and ip[UDP].chksum == 0:
                return pkt
            copy = IP(bytes(ip))
            del copy[layer].chksum
            assert IP(bytes(copy))[layer].chksum == ip[layer].chksum, f"{layer.__name__} checksum"
    return pkt


def stats(dp, name: str, index: int) -> tuple[int, int, int]:
    values = dp.maps[name].lookup(shared.u32(index))
    total = [0, 0, 0]
    for raw in values:
        s = shared.view("lb_stats", raw)
        total[0] += s.packets
        total[1] += s.bytes
        total[2] += s.flows
    return tuple(total)


def global_stat(dp, name: str) -> int:
    index = shared.stat_names().index(name)
    return sum(int.from_bytes(v, "little") for v in dp.maps["lb_global_stats"].lookup(shared.u32(index)))


WEB = {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080"])}
DNS = {"kube-system/dns:dns": (f"{VIP}:53/UDP", [f"{B1}:5353"])}


@pytest.mark.parametrize("proto,port,backend_port,services", [
    ("tcp", 80, 8080, WEB),
    ("udp", 53, 5353, DNS),
])
def test_dnat_rewrites_destination_and_keeps_checksums(datapath, proto, port, backend_port, services):
    program(datapath, services)
    pkt = frame(CLIENT, VIP, 40000, port, proto, payload=b"hello")
    verdict, out = run(datapath, pkt)
    assert verdict == TC_ACT_OK
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[IP].dst) == (CLIENT, B1)
    l4 = p[TCP] if proto == "tcp" else p[UDP]
    assert (l4.sport, l4.dport) == (40000, backend_port)
    assert bytes(l4.payload) == b"hello"
    # Nothing but the address, port and checksums changed.
    changed = [i for i, (a, b) in enumerate(zip(pkt, out)) if a != b]
    l4_off = 14 + 20
    csum = l4_off + (16 if proto == "tcp" else 6)
    allowed = {24, 25} | set(range(30, 34)) | {l4_off + 2, l4_off + 3, csum, csum + 1}
    assert set(changed) <= allowed


def test_udp_without_checksum_stays_without(datapath):
    program(datapath, DNS)
    verdict, out = run(datapath, frame(CLIENT, VIP, 40001, 53, "udp", payload=b"q", udp_checksum=False))
    assert verdict == TC_ACT_OK
    p = assert_checksums_valid(out)
    assert p[IP].dst == B1 and p[UDP].chksum == 0


def test_reply_is_reverse_nated_to_the_service_address(datapath):
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40002, 80, "tcp"))
    reply = frame(B1, CLIENT, 8080, 40002, "tcp", flags=TCP_SYN | TCP_ACK, payload=b"x")
    verdict, out = run(datapath, reply)
    assert verdict == TC_ACT_OK
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (VIP, 80, CLIENT, 40002)
    assert global_stat(datapath, "revnat") == 1


def test_ip_options_are_skipped_to_find_the_ports(datapath):
    program(datapath, WEB)
    pkt = Ether() / IP(src=CLIENT, dst=VIP, options=[IPOption_RR(routers=["1.2.3.4"])]) / TCP(sport=40003, dport=80, flags="S")
    verdict, out = run(datapath, bytes(pkt))
    assert verdict == TC_ACT_OK
    p = assert_checksums_valid(out)
    assert p[IP].ihl > 5 and p[IP].dst == B1 and p[TCP].dport == 8080


PASSTHROUGH = [
    ("not for a service", bytes(Ether() / IP(src=CLIENT, dst="10.244.0.99") / TCP(sport=1, dport=80)), "pass_no_service"),
    ("service address, other port", bytes(Ether() / IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=81)), "pass_no_service"),
    ("service port, other protocol", bytes(Ether() / IP(src=CLIENT, dst=VIP) / UDP(sport=1, dport=80)), "pass_no_service"),
    ("ICMP to the service address", bytes(Ether() / IP(src=CLIENT, dst=VIP) / ICMP()), "pass_no_service"),
    ("ARP", bytes(Ether() / ARP(pdst=VIP)), "pass_not_ip"),
    ("IPv6", bytes(Ether() / IPv6() / TCP(dport=80)), "pass_not_ip"),
    # Frames shorter than an Ethernet header, or IPv4 frames shorter than an IP header, are
    # refused by BPF_PROG_TEST_RUN itself; the parser checks them anyway (lb_parse).
    ("IP options running past the end", bytes(Ether() / IP(src=CLIENT, dst=VIP, ihl=15, proto=6)), "pass_malformed"),
    ("IP header only, TCP announced", bytes(Ether() / IP(src=CLIENT, dst=VIP, proto=6)), "pass_malformed"),
    ("truncated TCP header", bytes(Ether() / IP(src=CLIENT, dst=VIP) / TCP(dport=80))[:14 + 20 + 10], "pass_malformed"),
    ("truncated UDP header", bytes(Ether() / IP(src=CLIENT, dst=VIP) / UDP(dport=80))[:14 + 20 + 4], "pass_malformed"),
    ("ihl below 5", bytes(Ether() / IP(src=CLIENT, dst=VIP, ihl=4) / TCP(dport=80)), "pass_malformed"),
    ("IP version 6 in an IPv4 frame", bytes(Ether() / IP(src=CLIENT, dst=VIP, version=6) / TCP(dport=80)), "pass_malformed"),
    ("total length shorter than header", bytes(Ether() / IP(src=CLIENT, dst=VIP, len=10) / TCP(dport=80)), "pass_malformed"),
    ("TCP data offset below 5", bytes(Ether() / IP(src=CLIENT, dst=VIP) / TCP(dport=80, dataofs=2)), "pass_malformed"),
    ("first fragment", bytes(Ether() / IP(src=CLIENT, dst=VIP, flags="MF") / TCP(dport=80)), "pass_fragment"),
    ("later fragment", bytes(Ether() / IP(src=CLIENT, dst=VIP, frag=100) / Raw(b"x" * 16)), "pass_fragment"),
]


@pytest.mark.parametrize("description,pkt,counter", PASSTHROUGH, ids=[p[0] for p in PASSTHROUGH])
def test_other_packets_pass_untouched(datapath, description, pkt, counter):
    program(datapath, {**WEB, "default/web:80udp": (f"{VIP}:53/UDP", [f"{B1}:5353"])})
    verdict, out = run(datapath, pkt)
    assert verdict == TC_ACT_OK
    assert out == pkt, description
    assert global_stat(datapath, counter) == 1


def test_a_flow_keeps_its_backend(datapath):
    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080", f"{B2}:8080", f"{B3}:8080"])})
    for sport in range(41000, 41020):
        first = Ether(run(datapath, frame(CLIENT, VIP, sport, 80, "tcp"))[1])[IP].dst
        for _ in range(10):
            data = Ether(run(datapath, frame(CLIENT, VIP, sport, 80, "tcp", flags=TCP_ACK))[1])
            assert data[IP].dst == first
    assert global_stat(datapath, "svc_new_flow") == 20
    assert global_stat(datapath, "svc_ct_hit") == 200


def test_backend_choice_is_uniform(datapath):
    from scipy.stats import chisquare

    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080", f"{B2}:8080", f"{B3}:8080"])})
    seen = collections.Counter(
        Ether(run(datapath, frame(CLIENT, VIP, 20000 + i, 80, "tcp"))[1])[IP].dst for i in range(3000))
    assert set(seen) == {B1, B2, B3}
    assert chisquare(list(seen.values())).pvalue > 0.001, seen


def test_counters_per_service_and_backend(datapath):
    program(datapath, WEB)
    pkt = frame(CLIENT, VIP, 40010, 80, "tcp")
    for _ in range(3):
        run(datapath, pkt)
    fe = datapath.reconciler.services[Frontend(VIP, 80, Protocol.TCP)]
    assert stats(datapath, "lb_service_stats", fe.service_id) == (3, 3 * len(pkt), 1)
    assert stats(datapath, "lb_backend_stats", fe.backend_ids[0]) == (3, 3 * len(pkt), 1)


def test_removed_backend_makes_its_flows_choose_again(datapath):
    """No stale conntrack: a UDP flow to a deleted endpoint moves to a live one."""
    program(datapath, {"ns/dns:dns": (f"{VIP}:53/UDP", [f"{B1}:5353"])})
    pkt = frame(CLIENT, VIP, 40020, 53, "udp")
    assert Ether(run(datapath, pkt)[1])[IP].dst == B1
    program(datapath, {"ns/dns:dns": (f"{VIP}:53/UDP", [f"{B2}:5353"])})
    assert Ether(run(datapath, pkt)[1])[IP].dst == B2
    assert global_stat(datapath, "svc_reselect") == 1


def ct_entry(dp, src, dst, sport, dport, proto=6, direction="LB_CT_FORWARD"):
    key = shared.new("lb4_ct_key", saddr=shared.be32(src), daddr=shared.be32(dst), sport=shared.be16(sport),
                     dport=shared.be16(dport), proto=proto, dir=shared.const(direction))
    raw = dp.maps["lb4_ct"].lookup(key)
    return key, (shared.view("lb4_ct_value", raw) if raw is not None else None)


def lifetime_left(dp, entry) -> float:
    import time
    return (entry.expires - time.clock_gettime_ns(time.CLOCK_MONOTONIC)) / 1e9


def test_new_syn_after_close_chooses_again(datapath):
    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080", f"{B2}:8080"])})
    backend = Ether(run(datapath, frame(CLIENT, VIP, 40030, 80, "tcp"))[1])[IP].dst
    run(datapath, frame(CLIENT, VIP, 40030, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    run(datapath, frame(backend, CLIENT, 8080, 40030, "tcp", flags=TCP_FIN | TCP_ACK))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40030, 80)
    assert fwd.flags & shared.const("LB_CT_F_CLOSING")
    run(datapath, frame(CLIENT, VIP, 40030, 80, "tcp", flags=TCP_SYN))
    assert global_stat(datapath, "svc_reselect") == 1
    assert global_stat(datapath, "svc_new_flow") == 2


def test_half_closed_flow_stays_established(datapath):
    """A client FIN alone (shutdown(SHUT_WR)) does not shorten the flow: the backend may send
    for long after it."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40031, 80, "tcp"))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40031, 80)
    assert lifetime_left(datapath, fwd) <= 60, "no reply yet: a short lifetime"
    run(datapath, frame(B1, CLIENT, 8080, 40031, "tcp", flags=TCP_SYN | TCP_ACK))
    run(datapath, frame(CLIENT, VIP, 40031, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40031, 80)
    assert fwd.flags & shared.const("LB_CT_F_SEEN_REPLY") and fwd.flags & shared.const("LB_CT_F_FIN_CLIENT")
    assert not fwd.flags & shared.const("LB_CT_F_CLOSING")
    assert lifetime_left(datapath, fwd) > 3600
    verdict, out = run(datapath, frame(B1, CLIENT, 8080, 40031, "tcp", flags=TCP_ACK, payload=b"more"))
    assert Ether(out)[IP].src == VIP


def test_leftover_reply_entry_does_not_hijack_a_direct_connection(datapath):
    """After a flow ended, the same client port talking to the pod directly is left alone."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40032, 80, "tcp"))
    key, fwd = ct_entry(datapath, CLIENT, VIP, 40032, 80)
    expired = shared.new("lb4_ct_value", **{f: getattr(fwd, f) for f in shared.fields("lb4_ct_value") if f != "pad"})
    expired = bytearray(expired)
    expired[shared.offsetof("lb4_ct_value", "expires"):shared.offsetof("lb4_ct_value", "expires") + 8] = (1).to_bytes(8, "little")
    datapath.maps["lb4_ct"].update(key, bytes(expired))
    direct = frame(B1, CLIENT, 8080, 40032, "tcp", flags=TCP_SYN | TCP_ACK)
    verdict, out = run(datapath, direct)
    assert verdict == TC_ACT_OK and out == direct
    assert global_stat(datapath, "stale_reply") == 1
    assert ct_entry(datapath, B1, CLIENT, 8080, 40032, direction="LB_CT_REPLY")[1] is None, "leftover removed"


def test_reply_without_its_forward_entry_passes_untouched(datapath):
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40033, 80, "tcp"))
    key, _ = ct_entry(datapath, CLIENT, VIP, 40033, 80)
    datapath.maps["lb4_ct"].delete(key)
    reply = frame(B1, CLIENT, 8080, 40033, "tcp", flags=TCP_SYN | TCP_ACK)
    assert run(datapath, reply) == (TC_ACT_OK, reply)


def test_no_endpoints_tcp_gets_a_reset(datapath):
    program(datapath, {"default/empty:http": (f"{VIP}:80/TCP", [])})
    verdict, out = run(datapath, frame(CLIENT, VIP, 40040, 80, "tcp", flags=TCP_SYN, seq=5000))
    assert verdict == TC_ACT_REDIRECT
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (VIP, CLIENT, 80, 40040)
    assert p[TCP].flags == "RA" and p[TCP].ack == 5001 and p[TCP].seq == 0
    assert len(out) == 14 + 20 + 20
    assert p[Ether].dst == Ether(frame(CLIENT, VIP, 1, 1))[Ether].src


def test_no_endpoints_tcp_ack_gets_reset_with_its_sequence(datapath):
    program(datapath, {"default/empty:http": (f"{VIP}:80/TCP", [])})
    verdict, out = run(datapath, frame(CLIENT, VIP, 40041, 80, "tcp", flags=TCP_ACK, ack=777, payload=b"abc"))
    assert verdict == TC_ACT_REDIRECT
    p = assert_checksums_valid(out)
    assert p[TCP].flags == "R" and p[TCP].seq == 777


def test_no_endpoints_udp_gets_port_unreachable(datapath):
    program(datapath, {"default/empty:dns": (f"{VIP}:53/UDP", [])})
    pkt = frame(CLIENT, VIP, 40050, 53, "udp", payload=b"query-payload")
    verdict, out = run(datapath, pkt)
    assert verdict == TC_ACT_REDIRECT
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].code) == (VIP, CLIENT, 3, 3)
    quoted = bytes(p[ICMP].payload)
    assert quoted == pkt[14:14 + 28]   # offending IP header + 8 bytes
    assert global_stat(datapath, "no_backend") == 1


THREE = {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080", f"{B2}:8080", f"{B3}:8080"])}


def test_session_affinity_sends_a_client_back_to_its_backend(datapath):
    program(datapath, THREE, affinity=10800)
    first = Ether(run(datapath, frame(CLIENT, VIP, 30000, 80, "tcp"))[1])[IP].dst
    for sport in range(30001, 30050):   # new connections from the same client
        assert Ether(run(datapath, frame(CLIENT, VIP, sport, 80, "tcp"))[1])[IP].dst == first
    others = {Ether(run(datapath, frame(f"10.244.1.{i}", VIP, 30000, 80, "tcp"))[1])[IP].dst
              for i in range(2, 60)}
    assert others == {B1, B2, B3}, "other clients still spread"


def test_session_affinity_gives_up_a_backend_that_left(datapath):
    program(datapath, THREE, affinity=10800)
    first = Ether(run(datapath, frame(CLIENT, VIP, 30100, 80, "tcp"))[1])[IP].dst
    remaining = [b for b in (B1, B2, B3) if b != first]
    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{b}:8080" for b in remaining])},
            affinity=10800)
    chosen = Ether(run(datapath, frame(CLIENT, VIP, 30101, 80, "tcp"))[1])[IP].dst
    assert chosen in remaining
    assert all(Ether(run(datapath, frame(CLIENT, VIP, p, 80, "tcp"))[1])[IP].dst == chosen
               for p in range(30102, 30120))


def test_without_affinity_one_client_spreads(datapath):
    program(datapath, THREE)
    seen = {Ether(run(datapath, frame(CLIENT, VIP, p, 80, "tcp"))[1])[IP].dst for p in range(30200, 30260)}
    assert seen == {B1, B2, B3}


def test_hairpin_is_rewritten_to_the_hairpin_address_and_back(datapath):
    """A pod reaching itself through its service: Linux would drop a packet from its own
    address, so the source becomes LB_HAIRPIN_ADDR; the reply is translated back."""
    import ipaddress
    hairpin = str(ipaddress.IPv4Address(shared.const("LB_HAIRPIN_ADDR")))
    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080"])})
    verdict, out = run(datapath, frame(B1, VIP, 40060, 80, "tcp"))
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (hairpin, 40060, B1, 8080)
    verdict, out = run(datapath, frame(B1, hairpin, 8080, 40060, "tcp", flags=TCP_SYN | TCP_ACK))
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (VIP, 80, B1, 40060)
    # a second packet of the flow is hairpinned the same way
    p = assert_checksums_valid(run(datapath, frame(B1, VIP, 40060, 80, "tcp", flags=TCP_ACK))[1])
    assert (p[IP].src, p[IP].dst) == (hairpin, B1)


def test_no_local_endpoints_drops_instead_of_rejecting(datapath):
    fe = Frontend(VIP, 80, Protocol.TCP)
    e = dataclasses.replace(entry("default/web:http", fe), drop_without_backends=True)
    assert not datapath.reconciler.sync(DesiredState({fe: e})).errors
    pkt = frame(CLIENT, VIP, 40070, 80, "tcp")
    verdict, out = run(datapath, pkt)
    assert verdict == TC_ACT_SHOT and out == pkt
    assert global_stat(datapath, "no_backend") == 1


def test_egress_program_translates_replies_and_nothing_else(datapath):
    """At egress of a pod link only replies can need translating (a backend on another node);
    a packet to a service address is not balanced there."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40080, 80, "tcp"))        # ingress: opens the flow
    reply = frame(B1, CLIENT, 8080, 40080, "tcp", flags=TCP_SYN | TCP_ACK)
    res = bpfsys.prog_test_run(datapath.egress_fd, reply)
    p = assert_checksums_valid(res.data)
    assert res.retval == TC_ACT_OK and (p[IP].src, p[TCP].sport) == (VIP, 80)
    to_service = frame(CLIENT, VIP, 40081, 80, "tcp")
    res = bpfsys.prog_test_run(datapath.egress_fd, to_service)
    assert (res.retval, res.data) == (TC_ACT_OK, to_service)
    assert global_stat(datapath, "svc_new_flow") == 1
