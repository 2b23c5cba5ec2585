"""Minimal Ethernet/IPv4/TCP/UDP frames for BPF_PROG_TEST_RUN (bench, `lbctl trace`).

Tests check these and the program's output with scapy, independently of this module."""
from __future__ import annotations

import ipaddress
import struct

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
CLIENT_MAC = bytes.fromhex("020000000001")
NODE_MAC = bytes.fromhex("020000000002")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def frame(src: str, dst: str, sport: int, dport: int, proto: str = "tcp", flags: int = TCP_SYN,
          payload: bytes = b"", seq: int = 1000, ack: int = 0, ttl: int = 64,
          udp_checksum: bool = True) -> bytes:
    """An Ethernet frame carrying one IPv4 TCP or UDP packet with correct checksums."""
    number = 6 if proto == "tcp" else 17
    if proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
        csum_off = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        csum_off = 6
    pseudo = _ip(src) + _ip(dst) + struct.pack("!BBH", 0, number, len(l4))
    if proto == "tcp" or udp_checksum:
        c = checksum(pseudo + l4) or 0xFFFF
        l4 = l4[:csum_off] + struct.pack("!H", c) + l4[csum_off + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, ttl, number, 0, _ip(src), _ip(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return NODE_MAC + CLIENT_MAC + b"\x08\x00" + ip + l4
