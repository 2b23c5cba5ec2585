"""The uplink's programs as programs: the XDP program (bpf/prog/lbctl_xdp.c) and the uplink's tc
programs (lb_tc_uplink_ingress/egress) on crafted packets through BPF_PROG_TEST_RUN, for every
frontend type and traffic source; then both attached to a real link between namespaces.

Output bytes are parsed and checksums verified with scapy (test_bpf_prog.assert_checksums_valid),
independently of the program. Each table runs through both paths a packet from outside can take:
"xdp" (the XDP program, then, for a packet it left to tc, the tc program on its output) and "tc"
(tc mode: the uplink's tc ingress program alone); both must give the same packet and mark. The
frontends are written straight into the maps, as the header defines them, so that these tests
depend on the C side only."""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from test_bpf_prog import assert_checksums_valid, global_stat, run_with_mark

from lbctl.datapath.ebpf import bpfsys, shared
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.packets import TCP_ACK, TCP_SYN, frame

pytestmark = pytest.mark.root

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VERDICT = {("xdp", XDP_PASS): "pass", ("xdp", XDP_DROP): "drop", ("xdp", XDP_TX): "tx",
           ("tc", TC_ACT_OK): "pass", ("tc", TC_ACT_SHOT): "drop", ("tc", TC_ACT_REDIRECT): "redirect"}

NODE = "172.18.0.2"          # this node's address: NodePorts
OUTSIDE = "172.18.0.100"     # a client outside the cluster, on the node's network
FAR = "192.0.2.7"            # a client outside every source range
OTHER_POD = "10.244.1.5"     # a pod on another node: arrives by the uplink, inside the cluster CIDR
POD = "10.244.0.5"           # a pod on this node (pod link)
LOCAL_B, REMOTE_B = "10.244.0.11", "10.244.1.11"
CLUSTER_IP, EXT_IP, LB_IP = "10.96.0.10", "203.0.113.10", "198.51.100.10"
CLUSTER_CIDR = "10.244.0.0/16"
MASQ, DROP = shared.const("LB_MARK_MASQ_DEFAULT"), shared.const("LB_MARK_DROP_DEFAULT")
F = {name: shared.const(f"LB_SVC_F_{name}") for name in (
    "CLUSTERIP", "DROP", "NODEPORT", "EXTERNAL_IP", "LOADBALANCER", "ETP_LOCAL", "TWO_SCOPES",
    "SOURCE_RANGES")}
TYPES = {"ClusterIP": (CLUSTER_IP, 80, F["CLUSTERIP"]), "NodePort": (NODE, 30080, F["NODEPORT"]),
         "ExternalIP": (EXT_IP, 80, F["EXTERNAL_IP"]), "LoadBalancer": (LB_IP, 80, F["LOADBALANCER"])}
PROTO = {"tcp": 6, "udp": 17}


def put(dp, address: str, port: int, proto: str, flags: int, service_id: int,
        backends: list[tuple[int, str]], scope: int = 0) -> None:
    """One scope of a frontend: slot 0 and slots 1..n, and the backends they name."""
    number = PROTO[proto]
    for backend_id, endpoint in backends:
        ip, bport = endpoint.split(":")
        dp.maps["lb4_backends"].update(shared.u32(backend_id), shared.backend_value(ip, int(bport), number))
    services = dp.maps["lb4_services"]
    services.update(shared.service_key(address, port, number, 0, scope),
                    shared.service_value(count=len(backends), flags=flags, service_id=service_id))
    for slot, (backend_id, _) in enumerate(backends, 1):
        services.update(shared.service_key(address, port, number, slot, scope),
                        shared.service_value(backend_id=backend_id, service_id=service_id))


@dataclass
class Out:
    verdict: str
    data: bytes
    mark: int
    xdp_decided: bool = False      # XDP left its metadata magic: tc only applies the mark


def xdp_ctx(length: int) -> bytes:
    """struct xdp_md for the test run: no metadata in, the frame whole."""
    return struct.pack("<6I", 0, length, 0, 0, 0, 0)


def run_xdp(dp, pkt: bytes) -> tuple[int, bytes, bytes]:
    """The XDP program alone: (verdict, frame, metadata in front of it)."""
    res = bpfsys.prog_test_run(dp.xdp_fd, bytes(pkt), ctx=xdp_ctx(len(pkt)))
    assert res.ctx is not None
    meta_len = struct.unpack_from("<I", res.ctx, 0)[0]
    return res.retval, res.data[meta_len:], res.data[:meta_len]


def through(dp, path: str, pkt: bytes) -> Out:
    """A packet from outside entering by the uplink, along `path` ("xdp" or "tc")."""
    if path == "xdp":
        verdict, data, meta = run_xdp(dp, pkt)
        assert len(meta) == shared.sizeof("lb_xdp_meta"), "XDP always reserves its metadata"
        magic, mark = struct.unpack("<II", meta)
        if magic == shared.const("LB_XDP_META_MAGIC") or verdict != XDP_PASS:
            return Out(VERDICT["xdp", verdict], data, mark, xdp_decided=True)
        assert (verdict, data, mark) == (XDP_PASS, bytes(pkt), 0), "left to tc: untouched, no mark"
        pkt = data
    verdict, data, mark = run_with_mark(dp.uplink_ingress_fd, pkt)
    return Out(VERDICT["tc", verdict], data, mark)


def ct(dp, src: str, dst: str, sport: int, dport: int, proto: str = "tcp", reply: bool = False):
    raw = dp.maps["lb4_ct"].lookup(shared.new(
        "lb4_ct_key", saddr=shared.be32(src), daddr=shared.be32(dst), sport=shared.be16(sport),
        dport=shared.be16(dport), proto=PROTO[proto], dir=shared.const("LB_CT_REPLY" if reply else "LB_CT_FORWARD")))
    return shared.view("lb4_ct_value", raw) if raw is not None else None


def addresses(data: bytes) -> tuple[str, int, str, int]:
    p = assert_checksums_valid(data)
    l4 = p[TCP] if TCP in p else p[UDP]
    return p[IP].src, l4.sport, p[IP].dst, l4.dport


paths = pytest.mark.parametrize("path", ["xdp", "tc"])


@pytest.fixture(autouse=True)
def drop_rule(datapath):
    """The control plane has installed the constant drop rule: drops leave as marks."""
    datapath.write_config(drop_rule=True)


# --- drops before the drop rule is in place -----------------------------------------------------

@paths
def test_without_the_drop_rule_the_datapath_drops_itself(datapath, path):
    """Never configured (or the rule could not be installed): every drop reason drops here,
    counted as with the rule, so nothing kube-proxy drops gets through meanwhile."""
    datapath.write_config()
    put(datapath, NODE, 30080, "tcp", F["NODEPORT"] | F["ETP_LOCAL"] | F["DROP"], 1, [])
    put(datapath, CLUSTER_IP, 80, "tcp", F["CLUSTERIP"] | F["DROP"], 2, [])
    put(datapath, LB_IP, 80, "tcp", F["LOADBALANCER"] | F["SOURCE_RANGES"], 3, [(1, f"{LOCAL_B}:8080")])
    for dst, port in ((NODE, 30080), (CLUSTER_IP, 80), (LB_IP, 80)):
        out = through(datapath, path, frame(OUTSIDE, dst, 40090, port))
        assert (out.verdict, out.mark) == ("drop", 0), dst
    assert [global_stat(datapath, f"drop_{r}") for r in ("etp_local", "itp_local", "source_range")] == [1, 1, 1]


# --- NodePort from outside ---------------------------------------------------------------------

@paths
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("backend", [LOCAL_B, REMOTE_B])
def test_nodeport_from_outside_is_dnated_and_masquerade_marked(datapath, path, proto, backend):
    """eTP Cluster: to a backend here or on another node, the client's packet leaves DNATed with
    the masquerade mark (kube-proxy masquerades all external traffic of eTP Cluster services);
    the flow is tracked both ways, its later packets keep the backend and the mark."""
    put(datapath, NODE, 30080, proto, F["NODEPORT"], 1, [(1, f"{backend}:8080")])
    out = through(datapath, path, frame(OUTSIDE, NODE, 40000, 30080, proto, payload=b"hello"))
    assert (out.verdict, out.mark, out.xdp_decided) == ("pass", MASQ, path == "xdp")
    assert addresses(out.data) == (OUTSIDE, 40000, backend, 8080)
    assert bytes(Ether(out.data)[IP].payload)[-5:] == b"hello"
    forward = ct(datapath, OUTSIDE, NODE, 40000, 30080, proto)
    assert forward.backend_id == 1 and forward.flags == shared.const("LB_CT_F_MASQUERADE")
    reply = ct(datapath, backend, OUTSIDE, 8080, 40000, proto, reply=True)
    assert (shared.from_be32(reply.nat_address), shared.from_be16(reply.nat_port)) == (NODE, 30080)
    flags = TCP_ACK if proto == "tcp" else 0
    again = through(datapath, path, frame(OUTSIDE, NODE, 40000, 30080, proto, flags=flags))
    assert (again.mark, addresses(again.data)[2]) == (MASQ, backend)
    assert global_stat(datapath, "svc_new_flow") == 1 and global_stat(datapath, "svc_ct_hit") == 1
    assert global_stat(datapath, "masquerade") == 2


@paths
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_the_reply_is_translated_at_uplink_egress(datapath, path, proto):
    """After netfilter undid the masquerade, the backend's reply leaves the uplink toward the
    outside client: the uplink's egress program gives it the NodePort as its source."""
    put(datapath, NODE, 30080, proto, F["NODEPORT"], 1, [(1, f"{REMOTE_B}:8080")])
    through(datapath, path, frame(OUTSIDE, NODE, 40001, 30080, proto))
    flags = TCP_SYN | TCP_ACK if proto == "tcp" else 0
    verdict, data, mark = run_with_mark(datapath.uplink_egress_fd,
                                        frame(REMOTE_B, OUTSIDE, 8080, 40001, proto, flags=flags))
    assert (verdict, mark) == (TC_ACT_OK, 0)
    assert addresses(data) == (NODE, 30080, OUTSIDE, 40001)
    assert global_stat(datapath, "revnat") == 1
    # what the node sends out on its own (the masqueraded request to the remote backend) passes
    request = frame(NODE, REMOTE_B, 61000, 8080, proto)
    assert run_with_mark(datapath.uplink_egress_fd, request)[:2] == (TC_ACT_OK, request)


# --- externalTrafficPolicy Local ----------------------------------------------------------------

@paths
def test_etp_local_with_a_local_endpoint_keeps_the_client_source(datapath, path):
    put(datapath, NODE, 30080, "tcp", F["NODEPORT"] | F["ETP_LOCAL"], 1, [(1, f"{LOCAL_B}:8080")])
    out = through(datapath, path, frame(OUTSIDE, NODE, 40010, 30080))
    assert (out.verdict, out.mark) == ("pass", 0)
    assert addresses(out.data) == (OUTSIDE, 40010, LOCAL_B, 8080)
    assert global_stat(datapath, "masquerade") == 0


@paths
def test_etp_local_without_a_local_endpoint_is_drop_marked(datapath, path):
    """The cluster has endpoints, this node none: the packet leaves untouched with the drop mark
    (kube-proxy's DROP), no flow is made, the eTP counter counts it."""
    flags = F["NODEPORT"] | F["ETP_LOCAL"] | F["DROP"]
    put(datapath, NODE, 30080, "tcp", flags, 1, [])
    pkt = frame(OUTSIDE, NODE, 40011, 30080)
    out = through(datapath, path, pkt)
    assert (out.verdict, out.data, out.mark) == ("pass", pkt, DROP)
    assert ct(datapath, OUTSIDE, NODE, 40011, 30080) is None
    assert global_stat(datapath, "drop_etp_local") == 1 and global_stat(datapath, "drop_itp_local") == 0


@paths
def test_etp_local_internal_traffic_uses_the_cluster_wide_scope(datapath, path):
    """With two scopes, a pod of another node (its source in the cluster CIDR) reaching the
    NodePort is internal: balanced over all endpoints (scope 1), not masqueraded (kube-proxy's
    "pod traffic for external destinations" short-circuit); without a cluster CIDR configured
    the same source is external, and this node has no endpoint: drop mark."""
    flags = F["NODEPORT"] | F["ETP_LOCAL"] | F["TWO_SCOPES"] | F["DROP"]
    put(datapath, NODE, 30080, "tcp", flags, 1, [])
    put(datapath, NODE, 30080, "tcp", F["NODEPORT"], 1, [(2, f"{REMOTE_B}:8080")],
        scope=shared.const("LB_SCOPE_INTERNAL"))
    pkt = frame(OTHER_POD, NODE, 40012, 30080)
    assert through(datapath, path, pkt).mark == DROP
    datapath.write_config(cluster_cidr=CLUSTER_CIDR, drop_rule=True)
    out = through(datapath, path, frame(OTHER_POD, NODE, 40013, 30080))
    assert (out.verdict, out.mark) == ("pass", 0)
    assert addresses(out.data) == (OTHER_POD, 40013, REMOTE_B, 8080)
    # an outside client still sees the local scope
    assert through(datapath, path, frame(OUTSIDE, NODE, 40014, 30080)).mark == DROP
    assert global_stat(datapath, "drop_etp_local") == 2


# --- loadBalancerSourceRanges -------------------------------------------------------------------

@paths
def test_source_ranges_allow_listed_sources_and_drop_mark_the_rest(datapath, path):
    put(datapath, LB_IP, 80, "tcp", F["LOADBALANCER"] | F["SOURCE_RANGES"], 3, [(1, f"{LOCAL_B}:8080")])
    datapath.maps["lb4_source_ranges"].update(shared.source_range_key(3, "172.18.0.0/24"), b"\x01")
    datapath.maps["lb4_source_ranges"].update(shared.source_range_key(4, "192.0.2.0/24"), b"\x01")
    allowed = through(datapath, path, frame(OUTSIDE, LB_IP, 40020, 80))
    assert (allowed.verdict, allowed.mark) == ("pass", MASQ)
    assert addresses(allowed.data) == (OUTSIDE, 40020, LOCAL_B, 8080)
    pkt = frame(FAR, LB_IP, 40021, 80)     # in service 4's range, not in this one's
    dropped = through(datapath, path, pkt)
    assert (dropped.verdict, dropped.data, dropped.mark) == ("pass", pkt, DROP)
    assert ct(datapath, FAR, LB_IP, 40021, 80) is None
    assert global_stat(datapath, "drop_source_range") == 1


def test_source_ranges_apply_to_pods_too(datapath):
    """kube-proxy's firewall chain exempts no source: a pod outside the ranges is dropped."""
    put(datapath, LB_IP, 80, "tcp", F["LOADBALANCER"] | F["SOURCE_RANGES"], 3, [(1, f"{LOCAL_B}:8080")])
    datapath.maps["lb4_source_ranges"].update(shared.source_range_key(3, "172.18.0.0/24"), b"\x01")
    pkt = frame(POD, LB_IP, 40022, 80)
    assert run_with_mark(datapath.prog_fd, pkt) == (TC_ACT_OK, pkt, DROP)
    datapath.maps["lb4_source_ranges"].update(shared.source_range_key(3, f"{POD}/32"), b"\x01")
    verdict, data, mark = run_with_mark(datapath.prog_fd, frame(POD, LB_IP, 40023, 80))
    assert (verdict, mark, addresses(data)[2]) == (TC_ACT_OK, MASQ, LOCAL_B)


# --- no endpoints: reject, for every frontend type ----------------------------------------------

@paths
@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_endpoints_rejects_for_every_frontend_type(datapath, path, kind, proto):
    """XDP leaves the reject to tc (which has the skb to send it back out of the uplink)."""
    address, port, flags = TYPES[kind]
    put(datapath, address, port, proto, flags, 1, [])
    pkt = frame(OUTSIDE, address, 40030, port, proto, seq=7000, payload=b"query" if proto == "udp" else b"")
    out = through(datapath, path, pkt)
    assert (out.verdict, out.mark, out.xdp_decided) == ("redirect", 0, False)
    p = assert_checksums_valid(out.data)
    assert (p[IP].src, p[IP].dst) == (address, OUTSIDE)
    if proto == "tcp":
        assert (p[TCP].sport, p[TCP].dport, p[TCP].flags, p[TCP].ack) == (port, 40030, "RA", 7001)
    else:
        assert (p[ICMP].type, p[ICMP].code) == (3, 3) and bytes(p[ICMP].payload) == pkt[14:14 + 28]
    assert global_stat(datapath, "no_backend") == 1


def test_a_pod_reaching_a_nodeport_without_endpoints_is_rejected(datapath):
    put(datapath, NODE, 30080, "tcp", F["NODEPORT"], 1, [])
    verdict, data, mark = run_with_mark(datapath.prog_fd, frame(POD, NODE, 40031, 30080))
    p = assert_checksums_valid(data)
    assert (verdict, mark, p[IP].src, p[TCP].flags) == (TC_ACT_REDIRECT, 0, NODE, "RA")


# --- masquerade and drop marks ------------------------------------------------------------------

MASQ_CASES = {
    # name: (config, program ("pod" link or "uplink"), source, frontend type, mark)
    "clusterip from outside, no cluster CIDR": ({}, "uplink", OUTSIDE, "ClusterIP", 0),
    "clusterip from outside the cluster CIDR": ({"cluster_cidr": CLUSTER_CIDR}, "uplink", OUTSIDE, "ClusterIP", MASQ),
    "clusterip from a pod of another node": ({"cluster_cidr": CLUSTER_CIDR}, "uplink", OTHER_POD, "ClusterIP", 0),
    "clusterip from a pod here": ({"cluster_cidr": CLUSTER_CIDR}, "pod", POD, "ClusterIP", 0),
    "clusterip from a pod, masquerade-all": ({"masquerade_all": True}, "pod", POD, "ClusterIP", MASQ),
    "externalip from a pod, eTP Cluster": ({}, "pod", POD, "ExternalIP", MASQ),
    "nodeport from a pod, eTP Cluster": ({}, "pod", POD, "NodePort", MASQ),
    "nodeport from outside, other mark bit": ({"masq_mark": 0x10}, "uplink", OUTSIDE, "NodePort", 0x10),
}


@pytest.mark.parametrize("case", list(MASQ_CASES))
def test_masquerade_mark_follows_kube_proxy(datapath, case):
    config, link, source, kind, want = MASQ_CASES[case]
    datapath.write_config(**config)
    address, port, flags = TYPES[kind]
    put(datapath, address, port, "tcp", flags, 1, [(1, f"{LOCAL_B}:8080")])
    fd = datapath.prog_fd if link == "pod" else datapath.uplink_ingress_fd
    verdict, data, mark = run_with_mark(fd, frame(source, address, 40040, port), mark=0x1)
    assert (verdict, mark, addresses(data)[2]) == (TC_ACT_OK, want | 0x1, LOCAL_B)
    if link == "uplink":
        assert through(datapath, "xdp", frame(source, address, 40041, port)).mark == want
    assert global_stat(datapath, "masquerade") == (2 if link == "uplink" else 1) * bool(want)


@paths
def test_a_client_that_is_its_own_backend_through_the_uplink_is_masqueraded(datapath, path):
    """A pod of another node reaching a NodePort that lands on itself: no hairpin rewrite (that
    is for pod links), the masquerade mark instead, as kube-proxy's KUBE-SEP rule; the packet
    goes on to the stack, not back out of the uplink."""
    datapath.write_config(cluster_cidr=CLUSTER_CIDR)
    put(datapath, NODE, 30080, "tcp", F["NODEPORT"] | F["ETP_LOCAL"], 1, [(1, f"{OTHER_POD}:8080")])
    out = through(datapath, path, frame(OTHER_POD, NODE, 40050, 30080))
    assert (out.verdict, out.mark) == ("pass", MASQ)
    assert addresses(out.data) == (OTHER_POD, 40050, OTHER_POD, 8080)
    assert ct(datapath, OTHER_POD, NODE, 40050, 30080).flags == shared.const("LB_CT_F_MASQUERADE")


@paths
def test_itp_local_without_a_local_endpoint_is_drop_marked_from_the_uplink(datapath, path):
    put(datapath, CLUSTER_IP, 80, "tcp", F["CLUSTERIP"] | F["DROP"], 1, [])
    pkt = frame(OTHER_POD, CLUSTER_IP, 40060, 80)
    assert through(datapath, path, pkt) == Out("pass", pkt, DROP, path == "xdp")
    assert global_stat(datapath, "drop_itp_local") == 1


# --- what is not a new flow ---------------------------------------------------------------------

@paths
def test_an_untracked_tcp_segment_to_a_nodeport_is_left_to_the_stack(datapath, path):
    """The SYN-ACK of a connection netfilter masqueraded to this very port, say: netfilter's
    conntrack translates it, lbctl must not balance it as a new flow."""
    put(datapath, NODE, 30080, "tcp", F["NODEPORT"], 1, [(1, f"{REMOTE_B}:8080")])
    pkt = frame(REMOTE_B, NODE, 8080, 30080, flags=TCP_SYN | TCP_ACK)
    assert through(datapath, path, pkt) == Out("pass", pkt, 0, path == "xdp")
    assert ct(datapath, REMOTE_B, NODE, 8080, 30080) is None
    assert global_stat(datapath, "pass_untracked") == 1 and global_stat(datapath, "svc_new_flow") == 0


@paths
def test_a_packet_for_no_frontend_passes_untouched(datapath, path):
    pkt = frame(OUTSIDE, NODE, 40070, 22)
    assert through(datapath, path, pkt) == Out("pass", pkt, 0, path == "xdp")
    assert global_stat(datapath, "pass_no_service") == 1, "counted once, by XDP or by tc"


# --- partial checksums (CHECKSUM_PARTIAL frames XDP sees on veths and after GRO) ----------------

def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded pseudo-header sum (not complemented): what a CHECKSUM_PARTIAL L4 field holds."""
    words = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)
    total = sum(struct.unpack("!6H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_updates_a_partial_checksum_as_the_kernel_would(datapath, proto):
    put(datapath, NODE, 30080, proto, F["NODEPORT"], 1, [(1, f"{REMOTE_B}:8080")])
    full = bytearray(frame(OUTSIDE, NODE, 40080, 30080, proto, payload=b"data" * 10))
    off = 14 + 20 + (16 if proto == "tcp" else 6)
    length = len(full) - 14 - 20
    partial = bytearray(full)
    partial[off:off + 2] = struct.pack("!H", pseudo_sum(OUTSIDE, NODE, PROTO[proto], length))
    verdict, data, _ = run_xdp(datapath, bytes(partial))
    assert verdict == XDP_PASS
    assert struct.unpack_from("!H", data, off)[0] == pseudo_sum(OUTSIDE, REMOTE_B, PROTO[proto], length)
    assert Ether(data)[IP].dst == REMOTE_B and Ether(data)[IP].chksum == IP(bytes(Ether(data)[IP])).chksum
    # the same packet with a full checksum leaves with a full checksum
    verdict, data, _ = run_xdp(datapath, bytes(full))
    assert verdict == XDP_PASS and addresses(data) == (OUTSIDE, 40080, REMOTE_B, 8080)


# --- attached: XDP's metadata becomes the skb's mark --------------------------------------------

NS = f"lbx{os.getpid() % 1000}"
NODE_NS, CLIENT_NS, POD_NS = f"{NS}-node", f"{NS}-client", f"{NS}-pod"
UPLINK, POD_LINK = f"{NS}up", f"{NS}pd"
N_ADDR, C_ADDR, N_POD_ADDR, P_ADDR = "10.251.0.1", "10.251.0.2", "10.251.1.1", "10.251.1.2"


def sh(*args: str, ns: str | None = None) -> str:
    cmd = (["nsenter", f"--net=/run/netns/{ns}"] if ns else []) + list(args)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def in_ns(ns: str, fn):
    """Runs fn() on a thread inside namespace `ns` (netlink sockets made there talk to it)."""
    from nsutil import CLONE_NEWNET, _libc
    result: list = []

    def enter():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError("setns")
            result.append(fn())
        except BaseException as exc:   # handed to the caller
            result.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.fixture(scope="module")
def three_namespaces():
    """client --(uplink)-- node --(pod link)-- pod, the node strict: rp_filter=1 on its links,
    conntrack-INVALID forwarded packets dropped, tcp_be_liberal off, and the constant
    masquerade rule of the mark (as KUBE-POSTROUTING)."""
    for ns in (NODE_NS, CLIENT_NS, POD_NS):
        sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", UPLINK, "netns", NODE_NS, "type", "veth", "peer", "name", "eth0", "netns", CLIENT_NS)
        sh("ip", "link", "add", POD_LINK, "netns", NODE_NS, "type", "veth", "peer", "name", "eth0", "netns", POD_NS)
        for ns, link, addr in ((NODE_NS, UPLINK, f"{N_ADDR}/24"), (CLIENT_NS, "eth0", f"{C_ADDR}/24"),
                               (NODE_NS, POD_LINK, f"{N_POD_ADDR}/24"), (POD_NS, "eth0", f"{P_ADDR}/24")):
            sh("ip", "addr", "add", addr, "dev", link, ns=ns)
            sh("ip", "link", "set", link, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "route", "add", "default", "via", N_POD_ADDR, ns=POD_NS)
        for setting in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=1",
                        f"net.ipv4.conf.{UPLINK}.rp_filter=1", f"net.ipv4.conf.{POD_LINK}.rp_filter=1"):
            sh("sysctl", "-qw", setting, ns=NODE_NS)
        sh("iptables", "-w", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP", ns=NODE_NS)
        sh("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-m", "mark", "--mark", f"{MASQ:#x}/{MASQ:#x}",
           "-j", "MASQUERADE", "--random-fully", ns=NODE_NS)
        for chain in ("INPUT", "FORWARD"):
            sh("iptables", "-w", "-A", chain, "-m", "mark", "--mark", f"{DROP:#x}/{DROP:#x}", "-j", "DROP", ns=NODE_NS)
        yield
    finally:
        for ns in (NODE_NS, CLIENT_NS, POD_NS):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def echo_peer_server(port: int):
    """A TCP server in the pod answering each connection with the address it came from."""
    server = socket_in_ns(POD_NS)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((P_ADDR, port))
    server.listen(8)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(peer[0].encode())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        t.join(5)


def socket_in_ns(ns: str) -> socket.socket:
    from nsutil import socket_in
    return socket_in(ns, kind=socket.SOCK_STREAM)


def dropped_by_the_mark_rule() -> int:
    """Packets the node's INPUT rule for the drop mark has dropped."""
    out = sh("iptables", "-w", "-L", "INPUT", "-v", "-x", "-n", ns=NODE_NS)
    return sum(int(line.split()[0]) for line in out.splitlines() if "mark match" in line)


def ask(port: int, timeout: float = 5) -> str:
    client = socket_in_ns(CLIENT_NS)
    client.settimeout(timeout)
    try:
        client.connect((N_ADDR, port))
        return client.recv(64).decode()
    finally:
        client.close()


@pytest.mark.netns
@pytest.mark.parametrize("xdp,mode", [("auto", ebpf.MODE_XDP_NATIVE), ("generic", ebpf.MODE_XDP_GENERIC),
                                      ("off", ebpf.MODE_TC)])
def test_attached_uplink_serves_nodeports_with_marks(datapath, three_namespaces, xdp, mode):
    """Real TCP from the client namespace to the node's NodePorts through the attached uplink
    (XDP native on a veth, generic, or tc alone): eTP Local keeps the client's address; eTP
    Cluster's mark (XDP's metadata, put on the skb by tc) makes the constant rule masquerade
    it, so the pod sees the node; the reply is translated at uplink egress after netfilter
    undid the masquerade; no endpoints: a RST; eTP Local without a local endpoint: the drop
    mark, dropped by the node's rule. The node drops conntrack-INVALID packets and runs
    rp_filter=1."""
    put(datapath, N_ADDR, 30080, "tcp", F["NODEPORT"] | F["ETP_LOCAL"], 1, [(1, f"{P_ADDR}:8080")])
    put(datapath, N_ADDR, 30081, "tcp", F["NODEPORT"], 2, [(1, f"{P_ADDR}:8080")])
    put(datapath, N_ADDR, 30082, "tcp", F["NODEPORT"], 3, [])
    put(datapath, N_ADDR, 30083, "tcp", F["NODEPORT"] | F["ETP_LOCAL"] | F["DROP"], 4, [])

    def attach():
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            up = ipr.link_lookup(ifname=UPLINK)[0]
            pod = ipr.link_lookup(ifname=POD_LINK)[0]
            ebpf.attach(ipr, pod, datapath.prog_fd, datapath.egress_fd, datapath.cfg.tc_name)
            result = ebpf.attach_uplink(ipr, up, datapath, datapath.cfg.tc_name, xdp=xdp)
            return result, ebpf.uplink_mode(ipr, up, datapath.cfg.tc_name)

    def detach():
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            for name in (UPLINK, POD_LINK):
                ebpf.detach(ipr, ipr.link_lookup(ifname=name)[0], datapath.cfg.tc_name)
            return bpfsys.xdp_query(ipr.link_lookup(ifname=UPLINK)[0]).mode

    result, seen = in_ns(NODE_NS, attach)
    try:
        assert (result.mode, seen) == (mode, mode), result.notes
        with echo_peer_server(8080):
            assert ask(30080) == C_ADDR, "eTP Local: the client's own address"
            assert ask(30081) == N_POD_ADDR, "eTP Cluster: masqueraded to the node"
        with pytest.raises(ConnectionRefusedError):
            ask(30082)                      # no endpoints: the RST tc sends back out of the uplink
        before = dropped_by_the_mark_rule()
        with pytest.raises(TimeoutError):
            ask(30083, timeout=0.3)         # eTP Local, none here: the mark, then the rule
        assert dropped_by_the_mark_rule() > before
        assert global_stat(datapath, "masquerade") >= 1 and global_stat(datapath, "revnat") >= 2
    finally:
        assert in_ns(NODE_NS, detach) == bpfsys.XDP_ATTACHED_NONE



@pytest.mark.netns
def test_attach_falls_back_from_native_to_generic_to_tc(datapath):
    """A device without native XDP (a bridge) gets generic XDP, and the refusal is a note; one
    that holds another tool's XDP program keeps it and is served by tc alone; detaching ours
    leaves theirs."""
    from bcc import BPF
    ns = f"{NS}-fb"
    sh("ip", "netns", "add", ns)
    other = BPF(text=b"int other_xdp(struct xdp_md *ctx) { return 2; }")
    try:
        other_fd = other.load_func(b"other_xdp", BPF.XDP).fd
        for name in ("br0", "br1"):
            sh("ip", "link", "add", name, "type", "bridge", ns=ns)
            sh("ip", "link", "set", name, "up", ns=ns)

        def scenario():
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                br0, br1 = (ipr.link_lookup(ifname=n)[0] for n in ("br0", "br1"))
                first = ebpf.attach_uplink(ipr, br0, datapath, datapath.cfg.tc_name)
                bpfsys.xdp_attach(br1, other_fd, bpfsys.XDP_FLAGS_SKB_MODE)
                second = ebpf.attach_uplink(ipr, br1, datapath, datapath.cfg.tc_name)
                modes = (ebpf.uplink_mode(ipr, br0, datapath.cfg.tc_name),
                         ebpf.uplink_mode(ipr, br1, datapath.cfg.tc_name))
                again = ebpf.attach_uplink(ipr, br0, datapath, datapath.cfg.tc_name)   # a restart
                off = ebpf.attach_uplink(ipr, br0, datapath, datapath.cfg.tc_name, xdp="off")
                for index in (br0, br1):
                    ebpf.detach(ipr, index, datapath.cfg.tc_name)
                left = (bpfsys.xdp_query(br0).mode, bpfsys.xdp_query(br1).skb_prog_id)
                bpfsys.xdp_detach(br1, bpfsys.XDP_FLAGS_SKB_MODE)
                return first, second, modes, again, off, left

        first, second, modes, again, off, left = in_ns(ns, scenario)
        assert first.mode == ebpf.MODE_XDP_GENERIC
        assert any(n.startswith(f"{ebpf.MODE_XDP_NATIVE} refused") for n in first.notes), first.notes
        assert second.mode == ebpf.MODE_TC and any("another XDP program" in n for n in second.notes)
        assert modes == (ebpf.MODE_XDP_GENERIC, ebpf.MODE_TC)
        assert again.mode == ebpf.MODE_XDP_GENERIC and off.mode == ebpf.MODE_TC
        assert left[0] == bpfsys.XDP_ATTACHED_NONE and left[1] != 0, "theirs stays, ours is gone"
    finally:
        other.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False)
