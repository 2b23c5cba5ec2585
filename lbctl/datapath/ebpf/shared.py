"""The Python view of bpf/lbctl_shared.h, read with cffi from the very same file.

cffi's ``cdef`` takes plain structs and integer ``#define``s; the header is written to that
subset, so the only preparation is dropping include guards and comments and naming the kernel's
fixed-width types. Key and value converters live here, one per type, so byte order is decided
in exactly one place (``__be*`` fields hold network order).
"""
from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

import cffi


def _bpf_dir() -> Path:
    """The BPF sources: shipped inside the package (a wheel) or the checkout's bpf/."""
    packaged = Path(__file__).resolve().parents[2] / "bpf"
    if (packaged / "include" / "lbctl_shared.h").is_file():
        return packaged
    return Path(__file__).resolve().parents[3] / "bpf"


BPF_DIR = _bpf_dir()
SHARED_HEADER = BPF_DIR / "include" / "lbctl_shared.h"

_PRELUDE = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef uint16_t __be16;
typedef uint32_t __be32;
"""

STRUCTS = ("lb4_service_key", "lb4_service_value", "lb4_backend", "lb4_ct_key", "lb4_ct_value",
           "lb4_affinity_key", "lb4_affinity_value", "lb_stats", "lb4_trace_result", "lb4_config",
           "lb4_source_range_key", "lb_xdp_meta")


def _cdef_source(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            match = re.match(r"#define\s+(\w+)\s+(\S+)$", stripped)
            if match and re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)(ULL|UL|U)?", match.group(2)):
                value = re.sub(r"(ULL|UL|U)$", "", match.group(2))
                lines.append(f"#define {match.group(1)} {value}")
            continue
        lines.append(line)
    return _PRELUDE + "\n".join(lines)


ffi = cffi.FFI()
ffi.cdef(_cdef_source(SHARED_HEADER.read_text()))
lib = ffi.dlopen(None)


def const(name: str) -> int:
    """An integer #define from the shared header."""
    return getattr(lib, name)


def sizeof(struct: str) -> int:
    return ffi.sizeof(f"struct {struct}")


def offsetof(struct: str, field: str) -> int:
    return ffi.offsetof(f"struct {struct}", field)


def fields(struct: str) -> list[str]:
    return [name for name, _ in ffi.typeof(f"struct {struct}").fields]


# --- byte order ---------------------------------------------------------------------------------

def be32(address: str) -> int:
    """IPv4 text -> the u32 whose in-memory bytes are network order (strict dotted quad)."""
    return int.from_bytes(socket.inet_pton(socket.AF_INET, address), "little")


def from_be32(value: int) -> str:
    return str(ipaddress.IPv4Address(int(value).to_bytes(4, "little")))


def be16(port: int) -> int:
    return socket.htons(port)


def from_be16(value: int) -> int:
    return socket.ntohs(value)


# --- structs <-> bytes --------------------------------------------------------------------------

_pointer_types: dict[str, object] = {}


def new(struct: str, **values) -> bytes:
    """Builds a zeroed struct, sets fields, returns its bytes (padding stays zero)."""
    ctype = _pointer_types.get(struct)
    if ctype is None:
        ctype = _pointer_types[struct] = ffi.typeof(f"struct {struct} *")
    obj = ffi.new(ctype)
    for name, value in values.items():
        setattr(obj, name, value)
    return bytes(ffi.buffer(obj))


def view(struct: str, data: bytes):
    """A cdata view of bytes read from a map (kept alive by the returned object)."""
    buf = ffi.new(f"struct {struct} *")
    ffi.memmove(buf, data, min(len(data), ffi.sizeof(buf[0])))
    return buf


def service_key(address: str, port: int, proto: int, slot: int = 0, scope: int = 0) -> bytes:
    return new("lb4_service_key", address=be32(address), dport=be16(port), backend_slot=slot,
               proto=proto, scope=scope)


def service_value(backend_id: int = 0, count: int = 0, flags: int = 0, service_id: int = 0,
                  affinity_timeout: int = 0) -> bytes:
    """A slot (backend_id) or a frontend (count, flags, affinity_timeout): they share a union."""
    if affinity_timeout:
        return new("lb4_service_value", affinity_timeout=affinity_timeout, count=count,
                   flags=flags, service_id=service_id)
    return new("lb4_service_value", backend_id=backend_id, count=count, flags=flags,
               service_id=service_id)


def backend_value(address: str, port: int, proto: int, flags: int = 0) -> bytes:
    return new("lb4_backend", address=be32(address), port=be16(port), proto=proto, flags=flags)


def config_value(cluster_cidr: str | None = None, masquerade_all: bool = False,
                 masq_mark: int = 0, drop_mark: int = 0, drop_rule: bool = False) -> bytes:
    """lb4_config: --cluster-cidr (IPv4 network, or None), --masquerade-all, the mark bits
    (0: the defaults, LB_MARK_*_DEFAULT), and whether the filter rule dropping the drop mark is
    in place (else the datapath drops those packets itself)."""
    flags = (const("LB_CFG_F_MASQUERADE_ALL") if masquerade_all else 0) | \
        (const("LB_CFG_F_DROP_RULE") if drop_rule else 0)
    values = {"flags": flags, "masq_mark": masq_mark, "drop_mark": drop_mark}
    if cluster_cidr is not None:
        net = ipaddress.IPv4Network(cluster_cidr, strict=False)
        values.update(cluster_cidr=be32(str(net.network_address)), cluster_prefix_len=net.prefixlen,
                      flags=flags | const("LB_CFG_F_CLUSTER_CIDR"))
    return new("lb4_config", **values)


def source_range_key(service_id: int, cidr: str) -> bytes:
    """lb4_source_ranges key of one loadBalancerSourceRanges prefix of a service (value: 1)."""
    net = ipaddress.IPv4Network(cidr, strict=False)
    return new("lb4_source_range_key", prefixlen=32 + net.prefixlen, service_id=service_id,
               address=be32(str(net.network_address)))


def u32(value: int) -> bytes:
    return int(value).to_bytes(4, "little")


def parse_u32(data: bytes) -> int:
    return int.from_bytes(data[:4], "little")


def stat_names() -> list[str]:
    """The LB_STAT_* counter names, by index: "pass_not_ip", "svc_new_flow", ..."""
    stats = {getattr(lib, n): n[len("LB_STAT_"):].lower() for n in dir(lib)
             if n.startswith("LB_STAT_") and n != "LB_STAT_MAX"}
    return [stats[i] for i in range(const("LB_STAT_MAX"))]
