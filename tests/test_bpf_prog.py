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
    """Through the ingress program (a pod's packet entering the node)."""
    res = bpfsys.prog_test_run(dp.prog_fd, bytes(pkt))
    return res.retval, res.data


def run_egress(dp, pkt: bytes):
    """Through the egress program (a packet on its way into a pod: where replies are translated)."""
    res = bpfsys.prog_test_run(dp.egress_fd, bytes(pkt))
    return res.retval, res.data


SKB_CTX_SIZE = 192      # struct __sk_buff: the context BPF_PROG_TEST_RUN takes and gives back
SKB_MARK_OFF = 8        # __sk_buff.mark


def run_with_mark(fd: int, pkt: bytes, mark: int = 0) -> tuple[int, bytes, int]:
    """Through a tc program with an skb context: (verdict, packet, skb->mark afterwards)."""
    ctx = bytearray(SKB_CTX_SIZE)
    ctx[SKB_MARK_OFF:SKB_MARK_OFF + 4] = mark.to_bytes(4, "little")
    res = bpfsys.prog_test_run(fd, bytes(pkt), ctx=bytes(ctx))
    assert res.ctx is not None
    return res.retval, res.data, int.from_bytes(res.ctx[SKB_MARK_OFF:SKB_MARK_OFF + 4], "little")


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
    verdict, out = run_egress(datapath, reply)
    assert verdict == TC_ACT_OK
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (VIP, 80, CLIENT, 40002)
    assert global_stat(datapath, "revnat") == 1


def test_a_local_backends_reply_enters_the_node_untouched(datapath):
    """At ingress of the backend's link the reply is left as it is: netfilter and routing see
    backend -> client, the reverse of the client -> backend they saw first (rewritten there to
    VIP -> client, nf_conntrack would call it INVALID and strict rp_filter would drop it). It is
    translated at egress of the client's link."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40004, 80, "tcp"))
    reply = frame(B1, CLIENT, 8080, 40004, "tcp", flags=TCP_SYN | TCP_ACK)
    assert run(datapath, reply) == (TC_ACT_OK, reply)
    assert global_stat(datapath, "revnat") == 0
    assert Ether(run_egress(datapath, reply)[1])[IP].src == VIP


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


SEEN_PKT, SEEN_FIN, SEEN_RST = (shared.const(f"LB_CT_SEEN_{n}") for n in ("PKT", "FIN", "RST"))


def closing(entry) -> bool:
    return bool((entry.tx_state | entry.rx_state) & SEEN_RST or entry.tx_state & entry.rx_state & SEEN_FIN)


def lifetime_left(entry, proto: int = 6) -> float:
    """Seconds until the entry expires, derived from both sides' state as the program does."""
    import time
    if proto != 6:
        seconds = shared.const("LB_CT_LIFETIME_NONTCP")
    elif closing(entry):
        seconds = shared.const("LB_CT_LIFETIME_CLOSING")
    elif entry.rx_state & SEEN_PKT:
        seconds = shared.const("LB_CT_LIFETIME_TCP")
    else:
        seconds = shared.const("LB_CT_LIFETIME_SYN")
    return (entry.last_seen - time.clock_gettime_ns(time.CLOCK_MONOTONIC)) / 1e9 + seconds


def set_fields(dp, key: bytes, **fields) -> None:
    """Rewrites fields of a conntrack entry in place (as time passing, or another CPU, would)."""
    raw = bytearray(dp.maps["lb4_ct"].lookup(key))
    view = shared.view("lb4_ct_value", bytes(raw))
    for name, value in fields.items():
        setattr(view, name, value)
    dp.maps["lb4_ct"].update(key, bytes(shared.ffi.buffer(view)))


def test_new_syn_after_close_chooses_again(datapath):
    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080", f"{B2}:8080"])})
    backend = Ether(run(datapath, frame(CLIENT, VIP, 40030, 80, "tcp"))[1])[IP].dst
    run(datapath, frame(CLIENT, VIP, 40030, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    run_egress(datapath, frame(backend, CLIENT, 8080, 40030, "tcp", flags=TCP_FIN | TCP_ACK))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40030, 80)
    assert closing(fwd) and lifetime_left(fwd) <= shared.const("LB_CT_LIFETIME_CLOSING")
    run(datapath, frame(CLIENT, VIP, 40030, 80, "tcp", flags=TCP_SYN))
    assert global_stat(datapath, "svc_reselect") == 1
    assert global_stat(datapath, "svc_new_flow") == 2


def test_half_closed_flow_stays_established(datapath):
    """A client FIN alone (shutdown(SHUT_WR)) does not shorten the flow: the backend may send
    for long after it."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40031, 80, "tcp"))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40031, 80)
    assert lifetime_left(fwd) <= 60, "no reply yet: a short lifetime"
    run_egress(datapath, frame(B1, CLIENT, 8080, 40031, "tcp", flags=TCP_SYN | TCP_ACK))
    run(datapath, frame(CLIENT, VIP, 40031, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40031, 80)
    assert fwd.rx_state & SEEN_PKT and fwd.tx_state & SEEN_FIN
    assert not closing(fwd)
    assert lifetime_left(fwd) > 3600
    verdict, out = run_egress(datapath, frame(B1, CLIENT, 8080, 40031, "tcp", flags=TCP_ACK, payload=b"more"))
    assert Ether(out)[IP].src == VIP


def test_fins_from_both_sides_on_two_cpus_close_the_flow(datapath):
    """The two directions of a flow are handled on two CPUs at once. Here both read the forward
    entry before either wrote: the client's FIN (CPU 0) lands first, then every field the
    backend's FIN (CPU 1) wrote, computed from what CPU 1 had read, lands on top, as plain
    stores do. Each direction writes only its own state byte, so the flow still closes; with one
    shared flags byte (read-modify-write from both sides) CPU 1 wrote back the byte without the
    client's FIN, and the closed flow stayed established for 6 hours."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40034, 80, "tcp"))
    run_egress(datapath, frame(B1, CLIENT, 8080, 40034, "tcp", flags=TCP_SYN | TCP_ACK))
    key, _ = ct_entry(datapath, CLIENT, VIP, 40034, 80)
    ct = datapath.maps["lb4_ct"]
    both_read = ct.lookup(key)                       # what CPU 0 and CPU 1 read
    run(datapath, frame(CLIENT, VIP, 40034, 80, "tcp", flags=TCP_FIN | TCP_ACK))   # CPU 0
    after_cpu0 = ct.lookup(key)
    ct.update(key, both_read)                        # CPU 1 starts from the same entry...
    run_egress(datapath, frame(B1, CLIENT, 8080, 40034, "tcp", flags=TCP_FIN | TCP_ACK))
    cpu1 = shared.view("lb4_ct_value", ct.lookup(key))
    read = shared.view("lb4_ct_value", both_read)
    merged = shared.view("lb4_ct_value", after_cpu0)
    written = [f for f in shared.fields("lb4_ct_value") if f not in ("pad", "pad2")
               and getattr(cpu1, f) != getattr(read, f)]
    assert written, "the backend's FIN changed the entry"
    for f in written:                                # ...and its stores land after CPU 0's
        setattr(merged, f, getattr(cpu1, f))
    ct.update(key, bytes(shared.ffi.buffer(merged)))
    _, fwd = ct_entry(datapath, CLIENT, VIP, 40034, 80)
    assert closing(fwd), f"CPU 1 wrote {written}: the client's FIN was lost"
    assert lifetime_left(fwd) <= shared.const("LB_CT_LIFETIME_CLOSING")


def test_leftover_reply_entry_does_not_hijack_a_direct_connection(datapath):
    """After a flow ended, the same client port talking to the pod directly is left alone."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40032, 80, "tcp"))
    key, _ = ct_entry(datapath, CLIENT, VIP, 40032, 80)
    set_fields(datapath, key, last_seen=1)                    # long expired
    direct = frame(B1, CLIENT, 8080, 40032, "tcp", flags=TCP_SYN | TCP_ACK)
    verdict, out = run_egress(datapath, direct)
    assert verdict == TC_ACT_OK and out == direct
    assert global_stat(datapath, "stale_reply") == 1 and global_stat(datapath, "ct_evicted") == 0
    assert ct_entry(datapath, B1, CLIENT, 8080, 40032, direction="LB_CT_REPLY")[1] is None, "leftover removed"
    # A late segment of the old flow puts the entry back: no eviction (the stale delete removed it).
    run(datapath, frame(CLIENT, VIP, 40032, 80, "tcp", flags=TCP_ACK))
    assert global_stat(datapath, "ct_evicted") == 0


def test_a_late_fin_of_a_closed_flow_is_still_translated(datapath):
    """FIN both ways, the closing lifetime passes, the backend retransmits its FIN: it is still
    the flow's (the forward path keeps an expired TCP flow's backend too), so it reaches the
    client from the VIP, not from the backend (which the client, in TIME_WAIT, would answer
    with a RST). The entry is kept, and the client's final ACK counts no eviction."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40036, 80, "tcp"))
    run_egress(datapath, frame(B1, CLIENT, 8080, 40036, "tcp", flags=TCP_SYN | TCP_ACK))
    run(datapath, frame(CLIENT, VIP, 40036, 80, "tcp", flags=TCP_FIN | TCP_ACK))
    run_egress(datapath, frame(B1, CLIENT, 8080, 40036, "tcp", flags=TCP_FIN | TCP_ACK))
    key, fwd = ct_entry(datapath, CLIENT, VIP, 40036, 80)
    assert closing(fwd)
    closing_ns = shared.const("LB_CT_LIFETIME_CLOSING") * 1_000_000_000
    set_fields(datapath, key, last_seen=fwd.last_seen - closing_ns - 1_000_000_000)
    verdict, out = run_egress(datapath, frame(B1, CLIENT, 8080, 40036, "tcp", flags=TCP_FIN | TCP_ACK))
    p = assert_checksums_valid(out)
    assert verdict == TC_ACT_OK and (p[IP].src, p[TCP].sport) == (VIP, 80)
    assert global_stat(datapath, "stale_reply") == 0 and global_stat(datapath, "revnat") == 3
    assert ct_entry(datapath, B1, CLIENT, 8080, 40036, direction="LB_CT_REPLY")[1] is not None
    run(datapath, frame(CLIENT, VIP, 40036, 80, "tcp", flags=TCP_ACK))
    assert global_stat(datapath, "ct_evicted") == 0


def test_a_late_udp_reply_of_an_expired_flow_passes_untouched(datapath):
    """UDP: the forward path takes an expired flow as over (it chooses again); so does the
    reply path."""
    program(datapath, DNS)
    run(datapath, frame(CLIENT, VIP, 40037, 53, "udp"))
    key, _ = ct_entry(datapath, CLIENT, VIP, 40037, 53, proto=17)
    set_fields(datapath, key, last_seen=1)
    reply = frame(B1, CLIENT, 5353, 40037, "udp")
    assert run_egress(datapath, reply) == (TC_ACT_OK, reply)
    assert global_stat(datapath, "stale_reply") == 1 and global_stat(datapath, "ct_evicted") == 0


def test_reply_without_its_forward_entry_passes_untouched(datapath):
    """The LRU evicted the flow's forward entry: its reply entry alone cannot say whether the
    flow lives, so the reply passes untouched and is counted as an eviction, not a finished flow."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40033, 80, "tcp"))
    key, _ = ct_entry(datapath, CLIENT, VIP, 40033, 80)
    datapath.maps["lb4_ct"].delete(key)
    reply = frame(B1, CLIENT, 8080, 40033, "tcp", flags=TCP_SYN | TCP_ACK)
    assert run_egress(datapath, reply) == (TC_ACT_OK, reply)
    assert global_stat(datapath, "ct_evicted") == 1 and global_stat(datapath, "stale_reply") == 0
    assert ct_entry(datapath, B1, CLIENT, 8080, 40033, direction="LB_CT_REPLY")[1] is None


def test_a_forward_entry_puts_back_its_evicted_reply_entry(datapath):
    """The LRU evicted the reply entry of a flow whose backend has been silent: the client's
    next packet (at its once-a-second refresh) puts it back, so the backend's next answer is
    translated."""
    program(datapath, WEB)
    run(datapath, frame(CLIENT, VIP, 40035, 80, "tcp"))
    run_egress(datapath, frame(B1, CLIENT, 8080, 40035, "tcp", flags=TCP_SYN | TCP_ACK))
    reply_key, _ = ct_entry(datapath, B1, CLIENT, 8080, 40035, direction="LB_CT_REPLY")
    datapath.maps["lb4_ct"].delete(reply_key)
    key, fwd = ct_entry(datapath, CLIENT, VIP, 40035, 80)
    set_fields(datapath, key, last_seen=fwd.last_seen - 2 * shared.const("LB_CT_REFRESH_NS"))
    run(datapath, frame(CLIENT, VIP, 40035, 80, "tcp", flags=TCP_ACK, payload=b"more?"))
    assert global_stat(datapath, "ct_evicted") == 1
    _, back = ct_entry(datapath, B1, CLIENT, 8080, 40035, direction="LB_CT_REPLY")
    assert back is not None and shared.from_be32(back.nat_address) == VIP
    p = assert_checksums_valid(run_egress(datapath, frame(B1, CLIENT, 8080, 40035, "tcp", flags=TCP_ACK))[1])
    assert (p[IP].src, p[TCP].sport) == (VIP, 80)


def test_a_mid_flow_segment_without_conntrack_is_counted(datapath):
    """A TCP segment other than a SYN whose flow has no forward entry (evicted, or older than
    the maps) is balanced as a new flow and counted on its own: unless the same backend is
    chosen, that backend answers with a RST."""
    program(datapath, WEB)
    p = Ether(run(datapath, frame(CLIENT, VIP, 40036, 80, "tcp", flags=TCP_ACK))[1])
    assert p[IP].dst == B1
    assert global_stat(datapath, "svc_midflow_miss") == 1 and global_stat(datapath, "svc_new_flow") == 1
    run(datapath, frame(CLIENT, VIP, 40037, 80, "tcp", flags=TCP_SYN))
    run(datapath, frame(CLIENT, VIP, 40038, 53, "udp"))
    assert global_stat(datapath, "svc_midflow_miss") == 1


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
    address, so the source becomes LB_HAIRPIN_ADDR, and the packet goes straight back out of
    the pod's link (redirect, MACs turned around): routing never sees LB_HAIRPIN_ADDR come in by
    a pod link (strict rp_filter would drop it) nor netfilter a flow between the pod and itself.
    The reply, to LB_HAIRPIN_ADDR, is translated and sent back the same way."""
    import ipaddress
    hairpin = str(ipaddress.IPv4Address(shared.const("LB_HAIRPIN_ADDR")))
    program(datapath, {"default/web:http": (f"{VIP}:80/TCP", [f"{B1}:8080"])})
    request = frame(B1, VIP, 40060, 80, "tcp")
    verdict, out = run(datapath, request)
    assert verdict == TC_ACT_REDIRECT
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (hairpin, 40060, B1, 8080)
    assert (p[Ether].src, p[Ether].dst) == (Ether(request).dst, Ether(request).src)
    reply = frame(B1, hairpin, 8080, 40060, "tcp", flags=TCP_SYN | TCP_ACK)
    verdict, out = run(datapath, reply)
    assert verdict == TC_ACT_REDIRECT
    p = assert_checksums_valid(out)
    assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (VIP, 80, B1, 40060)
    assert (p[Ether].src, p[Ether].dst) == (Ether(reply).dst, Ether(reply).src)
    # a second packet of the flow is hairpinned the same way
    verdict, out = run(datapath, frame(B1, VIP, 40060, 80, "tcp", flags=TCP_ACK))
    p = assert_checksums_valid(out)
    assert verdict == TC_ACT_REDIRECT and (p[IP].src, p[IP].dst) == (hairpin, B1)
    assert global_stat(datapath, "revnat") == 1


def test_no_local_endpoints_drops_instead_of_rejecting(datapath):
    """iTP Local without a local endpoint: dropped; once the control plane has its constant
    filter rule in place, by that rule (KUBE-MARK-DROP): the packet leaves untouched with the
    drop mark, other mark bits kept. Counted either way."""
    fe = Frontend(VIP, 80, Protocol.TCP)
    e = dataclasses.replace(entry("default/web:http", fe), drop_without_backends=True)
    assert not datapath.reconciler.sync(DesiredState({fe: e})).errors
    pkt = frame(CLIENT, VIP, 40070, 80, "tcp")
    assert run(datapath, pkt) == (TC_ACT_SHOT, pkt)
    datapath.write_config(drop_rule=True)
    verdict, out, mark = run_with_mark(datapath.prog_fd, pkt, mark=0x1)
    assert (verdict, out, mark) == (TC_ACT_OK, pkt, 0x8001)
    assert global_stat(datapath, "no_backend") == 2 and global_stat(datapath, "drop_itp_local") == 2


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


# --- under LRU pressure ------------------------------------------------------------------------

LRU_CT_SIZE = 256     # entries: 128 flows


@pytest.fixture(scope="module")
def small_ct_datapath():
    """The program with a conntrack table of LRU_CT_SIZE entries."""
    from conftest import TEST_PIN_DIR, config_for_tests

    from lbctl.datapath.ebpf import loader

    dp = loader.EbpfDatapath(config_for_tests(pin_dir=TEST_PIN_DIR + "-lru", ct_size=LRU_CT_SIZE)).load()
    try:
        yield dp
    finally:
        dp.close()
        loader.remove_pins(dp.cfg.pin_dir)


@pytest.fixture
def small_ct(small_ct_datapath):
    from conftest import clear_maps

    from lbctl.datapath.ebpf.reconcile import Reconciler

    clear_maps(small_ct_datapath)
    small_ct_datapath.reconciler = Reconciler(small_ct_datapath.maps, 1024, 4096)
    yield small_ct_datapath
    clear_maps(small_ct_datapath)


def answered_flows(dp, count: int, every=None) -> None:
    """`count` new flows from other clients, each answered by its backend (so that the LRU
    sees both its entries used, as it does for real traffic); `every(i)` between them."""
    for i in range(count):
        if every is not None:
            every(i)
        client = f"10.245.{i // 250}.{1 + i % 250}"
        run(dp, frame(client, VIP, 50000, 80, "tcp"))
        run_egress(dp, frame(B1, client, 8080, 50000, "tcp", flags=TCP_SYN | TCP_ACK))


def test_an_idle_established_flow_under_lru_pressure(small_ct):
    """What an established flow sees once new, answered flows (here 4 times what the table
    holds) have pushed its entries out: the backend's next segment reaches the client untranslated (from
    the backend's address: the client's stack answers it with a RST), and the client's next
    segment is balanced as a new flow, counted as svc_midflow_miss (a backend that never saw
    the connection answers it with a RST; here the service has one backend, so the flow goes
    on). Hence README's sizing: two entries per flow, and room to spare."""
    dp = small_ct
    program(dp, WEB)
    run(dp, frame(CLIENT, VIP, 40090, 80, "tcp"))
    run_egress(dp, frame(B1, CLIENT, 8080, 40090, "tcp", flags=TCP_SYN | TCP_ACK))
    run(dp, frame(CLIENT, VIP, 40090, 80, "tcp", flags=TCP_ACK))
    answered_flows(dp, 2 * LRU_CT_SIZE)              # 4 x LRU_CT_SIZE entries
    assert ct_entry(dp, CLIENT, VIP, 40090, 80)[1] is None, "the idle flow's forward entry was evicted"
    assert ct_entry(dp, B1, CLIENT, 8080, 40090, direction="LB_CT_REPLY")[1] is None, "and its reply entry"
    data = frame(B1, CLIENT, 8080, 40090, "tcp", flags=TCP_ACK | 0x08, payload=b"late data")
    assert run_egress(dp, data) == (TC_ACT_OK, data), "untranslated: the client sees the backend's address"
    p = Ether(run(dp, frame(CLIENT, VIP, 40090, 80, "tcp", flags=TCP_ACK))[1])
    assert p[IP].dst == B1
    assert global_stat(dp, "svc_midflow_miss") == 1
    assert global_stat(dp, "ct_full") == 0, "an LRU table never refuses a new flow"


def test_an_active_flow_keeps_its_entries_under_lru_pressure(small_ct):
    """A flow with traffic both ways keeps both entries while new flows push everything else
    out: replies look up both, so the LRU sees both used."""
    dp = small_ct
    program(dp, WEB)
    run(dp, frame(CLIENT, VIP, 40091, 80, "tcp"))

    def exchange(i):
        if i % 16 == 0:
            run(dp, frame(CLIENT, VIP, 40091, 80, "tcp", flags=TCP_ACK))
            p = Ether(run_egress(dp, frame(B1, CLIENT, 8080, 40091, "tcp", flags=TCP_ACK))[1])
            assert p[IP].src == VIP, f"after {i} new flows"
    answered_flows(dp, 2 * LRU_CT_SIZE, exchange)
    assert ct_entry(dp, CLIENT, VIP, 40091, 80)[1] is not None
    assert global_stat(dp, "ct_evicted") == 0 and global_stat(dp, "svc_midflow_miss") == 0
