"""bpf/lib as a library: pieces of the datapath compiled into small programs of their own.

* the parser, the rewrites and the rejects behind ctx/xdp.h: an XDP program built from them
  runs through BPF_PROG_TEST_RUN, its output checked with scapy (so the NodePort/XDP datapath
  reuses the tc code instead of copying it);
* conntrack creation as two CPUs race it: the first packets of one flow, both finding no
  entry, both choosing a backend."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.l2 import Ether
from test_bpf_prog import assert_checksums_valid

from lbctl.datapath.ebpf import bpfsys, shared, source
from lbctl.datapath.ebpf.packets import TCP_SYN, frame

pytestmark = pytest.mark.root

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
CLIENT, VIP, B1, B2 = "10.244.0.2", "10.96.0.10", "10.244.0.11", "10.244.0.12"

HEADERS = """
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <linux/stddef.h>
#include "lbctl_shared.h"
"""

XDP_PROGRAM = HEADERS + """
#include "lib/ctx/xdp.h"
#include "lib/csum.h"
#include "lib/parse.h"
#include "lib/nat.h"
#include "lib/reject.h"

/* Every TCP/UDP packet is DNATed to 10.244.0.11:8080, except those to port 9, rejected. */
int xdp_lb(struct xdp_md *ctx)
{
	struct lb4_packet pkt = {};

	if (lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt) != LB_PARSE_OK)
		return CTX_ACT_OK;
	if (pkt.dport == bpf_htons(9))
		return lb4_reject(ctx, &pkt);
	if (lb4_nat_rewrite(ctx, &pkt, LB_NAT_DEST, bpf_htonl(0x0af4000b), bpf_htons(8080)) < 0)
		return XDP_ABORTED;
	return CTX_ACT_OK;
}
"""


def compile_program(tmp_path, text: str, function: str, kind: str, cflags: list[str]):
    from bcc import BPF

    path = tmp_path / "prog.c"
    path.write_text(text)
    b = BPF(text=source.program_text(path), cflags=cflags)
    return b, b.load_func(function.encode(), getattr(BPF, kind)).fd


@pytest.fixture(scope="module")
def xdp(tmp_path_factory):
    b, fd = compile_program(tmp_path_factory.mktemp("xdp"), XDP_PROGRAM, "xdp_lb", "XDP",
                            [f"-I{shared.BPF_DIR}", f"-I{shared.BPF_DIR / 'include'}"])
    try:
        yield fd
    finally:
        b.cleanup()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_rewrites_through_the_shared_library(xdp, proto):
    res = bpfsys.prog_test_run(xdp, frame(CLIENT, VIP, 40000, 80, proto, payload=b"hello"))
    assert res.retval == XDP_PASS
    p = assert_checksums_valid(res.data)
    l4 = p[TCP] if proto == "tcp" else p[UDP]
    assert (p[IP].src, p[IP].dst, l4.sport, l4.dport) == (CLIENT, B1, 40000, 8080)
    assert bytes(l4.payload) == b"hello"


def test_xdp_keeps_a_zero_udp_checksum_and_reads_ip_options(xdp):
    res = bpfsys.prog_test_run(xdp, frame(CLIENT, VIP, 40001, 53, "udp", udp_checksum=False))
    p = assert_checksums_valid(res.data)
    assert p[IP].dst == B1 and p[UDP].chksum == 0
    with_options = Ether() / IP(src=CLIENT, dst=VIP, options=[IPOption_RR(routers=["1.2.3.4"])]) / TCP(sport=1, dport=80)
    p = assert_checksums_valid(bpfsys.prog_test_run(xdp, bytes(with_options)).data)
    assert p[IP].ihl > 5 and (p[IP].dst, p[TCP].dport) == (B1, 8080)


def test_xdp_rejects_through_the_shared_library(xdp):
    syn = frame(CLIENT, VIP, 40002, 9, "tcp", flags=TCP_SYN, seq=5000)
    res = bpfsys.prog_test_run(xdp, syn)
    p = assert_checksums_valid(res.data)
    assert res.retval == XDP_TX
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (VIP, CLIENT, 9, 40002)
    assert p[TCP].flags == "RA" and p[TCP].ack == 5001 and len(res.data) == 14 + 20 + 20
    datagram = frame(CLIENT, VIP, 40003, 9, "udp", payload=b"query")
    res = bpfsys.prog_test_run(xdp, datagram)
    p = assert_checksums_valid(res.data)
    assert res.retval == XDP_TX and (p[ICMP].type, p[ICMP].code) == (3, 3)
    assert (p[IP].src, p[IP].dst) == (VIP, CLIENT) and bytes(p[ICMP].payload) == datagram[14:14 + 28]


def test_xdp_passes_what_the_parser_refuses(xdp):
    for pkt in (bytes(Ether() / IP(src=CLIENT, dst=VIP) / TCP(dport=80, dataofs=2)),
                bytes(Ether() / IP(src=CLIENT, dst=VIP, frag=100) / UDP(dport=80)),
                bytes(Ether() / IP(src=CLIENT, dst=VIP) / ICMP())):
        res = bpfsys.prog_test_run(xdp, pkt)
        assert (res.retval, res.data) == (XDP_PASS, pkt)


RACE_PROGRAM = HEADERS + """
#include "lbctl_maps.h"
#include "lib/ctx/skb.h"
#include "lib/csum.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/conntrack.h"

BPF_ARRAY(race, struct lb4_nat_target, 2);  /* what each CPU sends its packet to */
BPF_ARRAY(race_ret, int, 2);                /* what lb4_ct_create told each */

/* Two CPUs' first packets of one flow: both looked the flow up and found nothing, both chose a
 * backend (CPU 0 backend 1, CPU 1 backend 2); CPU 0's create lands first. */
int two_cpus(struct __sk_buff *ctx)
{
	struct lb4_packet pkt = {};
	struct lb4_nat_target cpu0 = { .address = bpf_htonl(0x0af4000b), .port = bpf_htons(8080), .backend_id = 1 };
	struct lb4_nat_target cpu1 = { .address = bpf_htonl(0x0af4000c), .port = bpf_htons(8080), .backend_id = 2 };
	__u32 zero = 0, one = 1;
	int ret0, ret1;

	if (lb4_parse(ctx_data(ctx), ctx_data_end(ctx), &pkt) != LB_PARSE_OK)
		return 1;
	ret0 = lb4_ct_create(&pkt, &cpu0, 7, bpf_ktime_get_ns(), 0);
	ret1 = lb4_ct_create(&pkt, &cpu1, 7, bpf_ktime_get_ns(), 0);
	race.update(&zero, &cpu0);
	race.update(&one, &cpu1);
	race_ret.update(&zero, &ret0);
	race_ret.update(&one, &ret1);
	return 0;
}
"""


def test_first_packets_of_one_flow_on_two_cpus_agree_on_a_backend(datapath, tmp_path):
    """The loser of the race to create a flow's forward entry (BPF_NOEXIST) sends its packet
    to the winner's backend and takes back its own reply entry: one backend for the flow, and
    replies translatable from the moment the forward entry exists. With both entries written
    unconditionally, the last writer won: the first packet went to backend 1, the flow to 2."""
    b, fd = compile_program(tmp_path, RACE_PROGRAM, "two_cpus", "SCHED_CLS", datapath.cfg.cflags())
    try:
        assert bpfsys.prog_test_run(fd, frame(CLIENT, VIP, 40100, 80, "tcp")).retval == 0
        targets = b[b"race"]
        rets = b[b"race_ret"]
        assert [rets[rets.Key(i)].value for i in (0, 1)] == [0, 1], "created, lost the race"
        cpu1 = targets[targets.Key(1)]
        assert (cpu1.backend_id, shared.from_be32(cpu1.address)) == (1, B1), "CPU 1 follows the winner"
    finally:
        b.cleanup()
    ct = datapath.maps["lb4_ct"]

    def entry(src, dst, sport, dport, direction):
        raw = ct.lookup(shared.new("lb4_ct_key", saddr=shared.be32(src), daddr=shared.be32(dst),
                                   sport=shared.be16(sport), dport=shared.be16(dport), proto=6,
                                   dir=shared.const(direction)))
        return shared.view("lb4_ct_value", raw) if raw is not None else None

    forward = entry(CLIENT, VIP, 40100, 80, "LB_CT_FORWARD")
    assert forward.backend_id == 1 and shared.from_be32(forward.nat_address) == B1
    assert entry(B1, CLIENT, 8080, 40100, "LB_CT_REPLY") is not None
    assert entry(B2, CLIENT, 8080, 40100, "LB_CT_REPLY") is None, "the loser's reply entry is gone"
