"""Fast decoders of map entries, at the offsets cffi reads from the shared header.

A whole-map walk (the reconciler's restore, `lbctl dump maps`) parses every entry: a million at
100,000 services. One ``struct.unpack_from`` per entry costs far less than a cffi cdata per
entry (``shared.view``), and the layout still has one definition: the header.
"""
from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from lbctl.datapath.ebpf import shared
from lbctl.model.objects import Protocol


def reader(struct_name: str, **fields: str) -> Callable[..., tuple]:
    """An unpacker of some fields of a shared-header struct. `fields` in offset order, as struct
    codes: "4s" a network-order address (socket.inet_ntoa), "H" a u16 read in host order
    (socket.ntohs makes a __be16 of it), "I" a u32, "B" a u8, "Q" a u64."""
    fmt, position = "=", 0
    for name, code in fields.items():
        offset = shared.offsetof(struct_name, name)
        if offset < position:
            raise ValueError(f"{struct_name}.{name}: give the fields in offset order")
        fmt += "x" * (offset - position) + code
        position = offset + struct.calcsize("=" + code)
    return struct.Struct(fmt).unpack_from


u32 = struct.Struct("=I").unpack_from
backend = reader("lb4_backend", address="4s", port="H", proto="B", flags="B")
service_key = reader("lb4_service_key", address="4s", dport="H", backend_slot="H", proto="B", scope="B")
service_value = reader("lb4_service_value", backend_id="I", count="H", flags="H", service_id="I")
stats = reader("lb_stats", packets="Q", bytes="Q", flows="Q")
source_range_key = reader("lb4_source_range_key", prefixlen="I", service_id="I", address="4s")
SCOPES = (shared.const("LB_SCOPE_EXTERNAL"), shared.const("LB_SCOPE_INTERNAL"))
AFFINITY_SERVICE_ID = shared.offsetof("lb4_affinity_key", "service_id")   # u32(key, offset)
PROTOCOLS = {p.number: p for p in (Protocol.TCP, Protocol.UDP)}            # what lbctl programs


def address(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def port(raw: int) -> int:
    return socket.ntohs(raw)


def services(items, affinity_flag: int) -> tuple[dict[tuple, tuple[int, int, int, int]],
                                                 dict[tuple, dict[int, int]], list[bytes]]:
    """One walk of lb4_services, for the reconciler's restore and `lbctl dump maps` alike.

    Returns frontends ``{(address, dport, proto, scope): (service_id, count, affinity_timeout,
    flags)}``, their slots ``{(address, dport, proto, scope): {slot: backend_id}}`` (keyed by
    the raw key fields: cheaper to hash than a Frontend) and the keys of a protocol or scope
    lbctl never programs."""
    frontends: dict[tuple, tuple[int, int, int, int]] = {}
    slots: dict[tuple, dict[int, int]] = {}
    junk: list[bytes] = []
    for key, value in items:
        addr, dport, slot, proto, scope = service_key(key)
        if proto not in PROTOCOLS or scope not in SCOPES:
            junk.append(key)
            continue
        backend_id, count, flags, service_id = service_value(value)
        raw = (addr, dport, proto, scope)
        if slot == 0:
            # the union's first word: the affinity timeout in a frontend
            frontends[raw] = (service_id, count, backend_id if flags & affinity_flag else 0, flags)
        elif raw in slots:
            slots[raw][slot] = backend_id
        else:
            slots[raw] = {slot: backend_id}
    return frontends, slots, junk


def source_range(key: bytes) -> tuple[int, str]:
    """An lb4_source_ranges key: (service id, "address/len")."""
    prefixlen, service_id, addr = source_range_key(key)
    return service_id, f"{address(addr)}/{max(prefixlen - 32, 0)}"
