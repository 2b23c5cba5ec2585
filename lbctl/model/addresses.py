"""Addresses as kube-proxy reads them: k8s.io/utils/net's ParseIPSloppy and ParseCIDRSloppy.

Before Kubernetes 1.24 the API server accepted IPv4 octets with leading zeros ("010.0.0.1"),
and kube-proxy still reads the objects stored then, the Go 1.16 way: the zeros are decimal
("010" is 10). Python's ``ipaddress`` refuses them, hence these. One definition, used by the
sources' validation (which stores the canonical form), the kube-proxy renderers and the CLI.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DIGITS = re.compile(r"[0-9]+")


def parse_ip_sloppy(text: Any) -> IPAddress | None:
    """The address netutils.ParseIPSloppy (Go 1.16's net.ParseIP) reads, or None.

    A zone ("fe80::1%eth0") is not an address; neither is anything with spaces around it."""
    if not isinstance(text, str):
        return None
    for char in text:                    # as net.ParseIP: the first '.' or ':' decides
        if char == ".":
            return _ipv4_sloppy(text)
        if char == ":":
            return _ipv6_sloppy(text)
    return None


def parse_cidr_sloppy(text: Any) -> IPNetwork | None:
    """The network netutils.ParseCIDRSloppy reads (ADDRESS/BITS, leading zeros allowed in both,
    host bits masked off), or None. Netmasks ("/255.0.0.0") and bare addresses are not CIDRs."""
    if not isinstance(text, str):
        return None
    address, sep, bits = text.partition("/")
    if not sep or _DIGITS.fullmatch(bits) is None:
        return None
    ip: IPAddress | None = _ipv4_sloppy(address)
    if ip is None:
        ip = _ipv6_sloppy(address)
    digits = bits.lstrip("0") or "0"
    if ip is None or len(digits) > 3 or int(digits) > ip.max_prefixlen:
        return None
    return ipaddress.ip_network((ip, int(digits)), strict=False)


@functools.lru_cache(maxsize=1 << 17)    # a sync at 10,000 services reads ~100,000 addresses, again
def _ipv4_sloppy(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    octets = []
    for part in parts:
        if _DIGITS.fullmatch(part) is None:
            return None
        digits = part.lstrip("0") or "0"
        if len(digits) > 3 or int(digits) > 255:
            return None
        octets.append(int(digits))
    return ipaddress.IPv4Address(bytes(octets))


def _ipv6_sloppy(text: str) -> ipaddress.IPv6Address | None:
    if "%" in text:                      # Python takes scope ids; net.ParseIP does not
        return None
    head, sep, tail = text.rpartition(":")
    if sep and "." in tail:              # an embedded IPv4 tail is read sloppily too
        v4 = _ipv4_sloppy(tail)
        if v4 is None:
            return None
        text = f"{head}:{v4}"
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None
