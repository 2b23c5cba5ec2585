"""The kernel behind the narrow interface IPVS mode writes through.

``IpvsKernel`` is every IPVS, address, ipset, iptables and sysctl operation the mode needs;
failures are OSError (errno, a message naming the object). ``LinuxKernel`` implements it over
netlink (pyroute2's IPVS, IPRoute and IPSet) and iptables-restore, in the network namespace of
the thread that opens it. The in-memory double is ``lbctl.testing.ipvs_kernel.FakeKernel``.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lbctl.datapath.base import DatapathError
from lbctl.datapath.kubeproxy.ipvs.desired import (
    BITMAP_PORT,
    FLAG_HASHED,
    HASH_IP,
    HASH_IP_PORT,
    HASH_IP_PORT_IP,
    HASH_IP_PORT_NET,
    IpsetSpec,
    RealServer,
    VirtualServer,
    hash_ip_port,
    local_addresses,
)

if TYPE_CHECKING:   # pyroute2 has no type information: these are Any to mypy, names to a reader
    from pyroute2 import IPVS, IPRoute, IPSet, IPVSDest, IPVSService

T = TypeVar("T")

# Real server forwarding method: kube-proxy uses masquerading (IP_VS_CONN_F_MASQ = 0).
# pyroute2's IPVSDest defaults to 3 (direct routing), so it is always given explicitly.
FWD_MASQ = 0

PROTOCOL_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}


class IpvsKernel(Protocol):
    """Everything IPVS mode does to the kernel. Failures raise OSError (errno, message)."""

    @property
    def has_ipvs(self) -> bool: ...

    def list_services(self) -> list[VirtualServer]: ...
    def add_service(self, vs: VirtualServer) -> None: ...
    def update_service(self, vs: VirtualServer) -> None: ...
    def del_service(self, vs: VirtualServer) -> None: ...
    def list_dests(self, vs: VirtualServer) -> list[RealServer]: ...
    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None: ...

    def ensure_dummy(self, device: str) -> bool: ...
    def delete_dummy(self, device: str) -> bool: ...
    def list_addresses(self, device: str) -> set[str]: ...
    def add_address(self, device: str, address: str) -> None: ...
    def del_address(self, device: str, address: str) -> None: ...
    def node_addresses(self, exclude_device: str, family: int) -> list[str]: ...

    def list_ipsets(self) -> set[str]: ...
    def create_ipset(self, spec: IpsetSpec) -> None: ...
    def destroy_ipset(self, name: str) -> None: ...
    def list_entries(self, name: str) -> set[str]: ...
    def add_entry(self, spec: IpsetSpec, entry: str) -> None: ...
    def del_entry(self, spec: IpsetSpec, entry: str) -> None: ...

    def restore_iptables(self, text: str, family: int) -> None: ...
    def ensure_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool: ...
    def delete_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool: ...
    def list_chains(self, family: int, table: str) -> set[str]: ...
    def delete_chains(self, family: int, table: str, chains: Sequence[str]) -> None: ...

    def set_sysctl(self, name: str, value: int) -> None: ...
    def close(self) -> None: ...


IPVS_MISSING = ("IPVS is not available in this kernel (no ip_vs module / IPVS netlink family): "
                "use --mode ebpf|iptables|nftables, or a kernel with CONFIG_IP_VS")


def _os_error(exc: BaseException, what: str) -> OSError:
    """pyroute2's NetlinkError is not an OSError; turn it into one that names the object."""
    code = getattr(exc, "code", None) or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code) if isinstance(code, int) else exc}")


class LinuxKernel:
    """IpvsKernel over netlink (pyroute2's IPVS, IPRoute, IPSet) and iptables-restore.

    Works in the network namespace of the thread that opens it.
    """

    def __init__(self, ipvs: IPVS | None, ipr: IPRoute, ipset: IPSet | None):
        self.ipvs = ipvs          # None where the kernel has no IPVS
        self.ipr = ipr
        self.ipset = ipset        # None where the kernel has no ipset

    @property
    def has_ipvs(self) -> bool:
        return self.ipvs is not None

    @classmethod
    def open(cls, require: bool = True) -> LinuxKernel:
        """Opens the netlink sockets. With ``require`` (``IpvsMode.start``) a kernel without IPVS,
        ipset or iptables-restore is a DatapathError saying what is missing; without (cleanup)
        whatever is missing is simply not cleaned."""
        from pyroute2 import IPVS, IPRoute, IPSet

        ipvs = ipset = None
        try:
            ipvs = IPVS()      # resolving the "IPVS" genl family also makes the kernel load ip_vs
        except Exception as exc:  # NetlinkError (ENOENT: no such family) or OSError
            if require:
                detail = ('no generic netlink family "IPVS"' if getattr(exc, "code", None) == errno.ENOENT
                          else str(exc))
                if not os.path.exists("/proc/net/ip_vs"):
                    detail += "; /proc/net/ip_vs is absent"
                raise DatapathError(f"{IPVS_MISSING} ({detail})") from exc
        try:
            ipset = IPSet()
        except Exception as exc:
            if require:
                if ipvs is not None:
                    ipvs.close()
                raise DatapathError(f"ipset is not available in this kernel ({exc}): IPVS mode keeps its "
                                    f"masquerade and filter sets there; use a kernel with CONFIG_IP_SET") from exc
        if require and shutil.which("iptables-restore") is None:
            for sock in (ipvs, ipset):
                if sock is not None:
                    sock.close()
            raise DatapathError("iptables-restore is not installed: IPVS mode needs it for its masquerade "
                                "rules (install iptables)")
        return cls(ipvs, IPRoute(), ipset)

    def close(self) -> None:
        for sock in (self.ipvs, self.ipr, self.ipset):
            if sock is not None:
                sock.close()

    # --- IPVS --------------------------------------------------------------------------------------

    @staticmethod
    def _service(vs: VirtualServer) -> IPVSService:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = dict(addr=vs.address, port=vs.port, protocol=PROTOCOL_NUMBERS[vs.protocol],
                                      sched_name=vs.scheduler, timeout=vs.timeout,
                                      flags={"flags": vs.flags, "mask": 0xFFFFFFFF})
        if vs.family == 6:
            # The kernel reads an IPv6 service's netmask as a prefix length in a host-order u32
            # (ipvsadm and moby/ipvs send 128); pyroute2 types the attribute as an IPv4 address.
            fields["netmask"] = socket.inet_ntoa(struct.pack("=I", 128))
        return IPVSService(**fields)

    @staticmethod
    def _dest(rs: RealServer) -> IPVSDest:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=rs.address, port=rs.port, weight=rs.weight, fwd_method=FWD_MASQ)

    def _ipvs_call(self, what: str, fn: Callable[[IPVS], T]) -> T:
        """``fn(ipvs socket)``; a kernel without IPVS, or a failure, as an OSError naming ``what``."""
        ipvs = self.ipvs
        if ipvs is None:
            raise OSError(errno.EPROTONOSUPPORT, f"{what}: {IPVS_MISSING}")
        return self._netlink(what, lambda: fn(ipvs))

    def _service_call(self, what: str, command: str, vs: VirtualServer) -> None:
        service = self._service(vs)
        self._ipvs_call(what, lambda ipvs: ipvs.service(command, service=service))

    def _dest_call(self, what: str, command: str, vs: VirtualServer, rs: RealServer) -> None:
        service, dest = self._service(vs), self._dest(rs)
        self._ipvs_call(what, lambda ipvs: ipvs.dest(command, service=service, dest=dest))

    def list_services(self) -> list[VirtualServer]:
        found = []
        for msg in self._ipvs_call("listing IPVS services", lambda ipvs: list(ipvs.service("dump"))):
            attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            if attrs.get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue   # firewall-mark services have no address and are never kube-proxy's
            protocol = PROTOCOL_NAMES.get(attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
            if protocol is None:
                continue
            flags = (attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {}).get("flags", 0)
            found.append(VirtualServer(
                address=str(ipaddress.ip_address(attrs.get_attr("IPVS_SVC_ATTR_ADDR"))),
                port=attrs.get_attr("IPVS_SVC_ATTR_PORT"), protocol=protocol,
                scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "",
                flags=flags & ~FLAG_HASHED, timeout=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0))
        return sorted(found)

    def add_service(self, vs: VirtualServer) -> None:
        self._service_call(f"adding virtual server {vs}", "add", vs)

    def update_service(self, vs: VirtualServer) -> None:
        self._service_call(f"updating virtual server {vs}", "set", vs)

    def del_service(self, vs: VirtualServer) -> None:
        self._service_call(f"deleting virtual server {vs}", "del", vs)

    def list_dests(self, vs: VirtualServer) -> list[RealServer]:
        found = []
        service = self._service(vs)
        msgs = self._ipvs_call(f"listing real servers of {vs}", lambda ipvs: list(ipvs.dest("dump", service=service)))
        for msg in msgs:
            d = msg.get_attr("IPVS_CMD_ATTR_DEST")
            found.append(RealServer(
                str(ipaddress.ip_address(d.get_attr("IPVS_DEST_ATTR_ADDR"))), d.get_attr("IPVS_DEST_ATTR_PORT"),
                d.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0, d.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
                d.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0))
        return sorted(found)

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._dest_call(f"adding real server {rs} to {vs}", "add", vs, rs)

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._dest_call(f"setting weight {rs.weight} on real server {rs} of {vs}", "set", vs, rs)

    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._dest_call(f"deleting real server {rs} from {vs}", "del", vs, rs)

    # --- the dummy device and addresses -----------------------------------------------------------

    def _netlink(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, a failure as an OSError naming ``what``."""
        try:
            return fn(*args, **kwargs)
        except OSError:
            raise
        except Exception as exc:  # NetlinkError
            raise _os_error(exc, what) from exc

    def _index(self, device: str) -> int | None:
        found = self.ipr.link_lookup(ifname=device)
        return found[0] if found else None

    def ensure_dummy(self, device: str) -> bool:
        """Creates the dummy device if missing (left down, as kube-proxy does: addresses on a down
        device are still local). True when it was created."""
        if self._index(device) is not None:
            return False
        self._netlink(f"creating dummy device {device}", self.ipr.link, "add", ifname=device, kind="dummy")
        return True

    def delete_dummy(self, device: str) -> bool:
        index = self._index(device)
        if index is None:
            return False
        link = self.ipr.get_links(index)[0]
        kind = link.get(("linkinfo", "kind"))
        if kind != "dummy":
            raise OSError(errno.EINVAL, f"{device} is a {kind or 'non-dummy'} device, not lbctl's dummy; left alone")
        self._netlink(f"deleting {device}", self.ipr.link, "del", index=index)
        return True

    def list_addresses(self, device: str) -> set[str]:
        index = self._index(device)
        if index is None:
            raise OSError(errno.ENODEV, f"listing addresses of {device}: no such device")
        return {str(ipaddress.ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")))
                for m in self.ipr.get_addr(index=index)}

    def _addr(self, verb: str, device: str, address: str) -> None:
        index = self._index(device)
        if index is None:
            raise OSError(errno.ENODEV, f"{verb} {address} on {device}: no such device")
        prefix = 128 if ":" in address else 32
        self._netlink(f"{verb} {address}/{prefix} on {device}", self.ipr.addr, verb, index=index,
                      address=address, prefixlen=prefix)

    def add_address(self, device: str, address: str) -> None:
        self._addr("add", device, address)

    def del_address(self, device: str, address: str) -> None:
        self._addr("del", device, address)

    def node_addresses(self, exclude_device: str, family: int) -> list[str]:
        """GetAllLocalAddressesExcept: every interface's addresses but the dummy's. (An address can
        sit on two interfaces, so this is not all addresses minus the dummy's.)"""
        skip = self._index(exclude_device)
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        found = {str(ipaddress.ip_address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")))
                 for m in self.ipr.get_addr(family=af) if m["index"] != skip}
        return local_addresses(found, family)

    # --- ipsets ---------------------------------------------------------------------------------------

    def _ipset_call(self, what: str, fn: Callable[[IPSet], T]) -> T:
        """``fn(ipset socket)``; a kernel without ipset, or a failure, as an OSError naming ``what``."""
        ipset = self.ipset
        if ipset is None:
            raise OSError(errno.EPROTONOSUPPORT, f"{what}: ipset is not available in this kernel")
        return self._netlink(what, lambda: fn(ipset))

    def list_ipsets(self) -> set[str]:
        if self.ipset is None:
            return set()
        return {m.get_attr("IPSET_ATTR_SETNAME")
                for m in self._ipset_call("listing ipsets", lambda ipset: list(ipset.list()))}

    def create_ipset(self, spec: IpsetSpec) -> None:
        if spec.set_type == BITMAP_PORT:
            begin, end = (int(x) for x in spec.port_range.split("-"))
            options: dict[str, Any] = dict(bitmap_ports_range=(begin, end))
        else:
            options = dict(family=_ipset_family(spec), hashsize=spec.hash_size, maxelem=spec.max_elem)
        self._ipset_call(f"creating ipset {spec.name}",
                         lambda ipset: ipset.create(spec.name, stype=spec.set_type, exclusive=False, **options))

    def destroy_ipset(self, name: str) -> None:
        self._ipset_call(f"destroying ipset {name}", lambda ipset: ipset.destroy(name))

    def list_entries(self, name: str) -> set[str]:
        """Members in kube-proxy's Entry.String() form ("10.0.0.1,tcp:80"), whatever the type.
        A big set comes back in several messages; a missing set as none."""
        entries: set[str] = set()
        for msg in self._ipset_call(f"listing ipset {name}", lambda ipset: list(ipset.list(name))):
            set_type = msg.get_attr("IPSET_ATTR_TYPENAME")
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if adt is None:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                entries.add(_entry_string(set_type, data))
        return entries

    def add_entry(self, spec: IpsetSpec, entry: str) -> None:
        parts, etype = _entry_parts(spec.set_type, entry)
        self._ipset_call(f"adding {entry} to ipset {spec.name}", lambda ipset: ipset.add(
            spec.name, parts, family=_ipset_family(spec), etype=etype, exclusive=False))

    def del_entry(self, spec: IpsetSpec, entry: str) -> None:
        parts, etype = _entry_parts(spec.set_type, entry)
        self._ipset_call(f"deleting {entry} from ipset {spec.name}", lambda ipset: ipset.delete(
            spec.name, parts, family=_ipset_family(spec), etype=etype))

    # --- iptables --------------------------------------------------------------------------------------

    @staticmethod
    def _run(argv: list[str], what: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise OSError(errno.EIO, f"{what}: {' '.join(argv[:2])} failed: {done.stderr.strip()}")
        return done

    def restore_iptables(self, text: str, family: int) -> None:
        binary = "ip6tables-restore" if family == 6 else "iptables-restore"
        self._run([binary, "-w", "5", "--noflush", "--counters"], "restoring kube-proxy's IPVS-mode rules",
                  input=text)

    def _iptables(self, family: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        binary = "ip6tables" if family == 6 else "iptables"
        return self._run([binary, "-w", "5", *args], f"{binary} {' '.join(args[:4])}", check=check)

    def ensure_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        if self._iptables(family, "-t", table, "-C", chain, *args, check=False).returncode == 0:
            return False
        self._iptables(family, "-t", table, "-I", chain, *args)
        return True

    def delete_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        deleted = False
        while self._iptables(family, "-t", table, "-C", chain, *args, check=False).returncode == 0:
            self._iptables(family, "-t", table, "-D", chain, *args)
            deleted = True
        return deleted

    def list_chains(self, family: int, table: str) -> set[str]:
        binary = "ip6tables-save" if family == 6 else "iptables-save"
        done = self._run([binary, "-t", table], f"listing {table} chains", check=False)
        return {line[1:].split()[0] for line in done.stdout.splitlines() if line.startswith(":")}

    def delete_chains(self, family: int, table: str, chains: Sequence[str]) -> None:
        """Flushes then deletes, in one restore: declaring a chain flushes it (and creates it if
        missing, so this is idempotent); flushing all first removes jumps between them."""
        if not chains:
            return
        lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains), "COMMIT"]
        self.restore_iptables("\n".join(lines) + "\n", family)

    def set_sysctl(self, name: str, value: int) -> None:
        path = f"/proc/sys/{name}"
        try:
            with open(path) as f:
                if f.read().strip() == str(value):
                    return
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise OSError(exc.errno, f"setting sysctl {name.replace('/', '.')}={value}: {exc.strerror}") from exc


def _ipset_family(spec: IpsetSpec) -> int:
    return socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET


def _entry_parts(set_type: str, entry: str) -> tuple[Any, str]:
    """kube-proxy's entry string -> pyroute2's entry tuple and etype."""
    from pyroute2.ipset import PortEntry

    def port_entry(text: str) -> PortEntry:
        proto, _, port = text.partition(":")
        return PortEntry(int(port), protocol=PROTOCOL_NUMBERS[proto.upper()])

    if set_type == BITMAP_PORT:
        return int(entry), "port"
    if set_type == HASH_IP:
        return entry, "ip"
    fields = entry.split(",")
    if set_type == HASH_IP_PORT:
        return (fields[0], port_entry(fields[1])), "ip,port"
    if set_type == HASH_IP_PORT_IP:
        return (fields[0], port_entry(fields[1]), fields[2]), "ip,port,ip"
    if set_type == HASH_IP_PORT_NET:
        return (fields[0], port_entry(fields[1]), fields[2]), "ip,port,net"
    raise ValueError(f"unsupported ipset type {set_type}")


def _entry_string(set_type: str, data: Any) -> str:
    """One listed member (an IPSET_ATTR_DATA nla) in kube-proxy's Entry.String() form."""
    def ip(attr: str) -> str:
        nested = data.get_attr(attr)
        value = nested.get_attr("IPSET_ATTR_IPADDR_IPV4") or nested.get_attr("IPSET_ATTR_IPADDR_IPV6")
        return str(ipaddress.ip_address(value))

    port = data.get_attr("IPSET_ATTR_PORT_FROM") or data.get_attr("IPSET_ATTR_PORT")
    if set_type == BITMAP_PORT:
        return str(port)
    if set_type == HASH_IP:
        return ip("IPSET_ATTR_IP_FROM")
    proto = PROTOCOL_NAMES.get(data.get_attr("IPSET_ATTR_PROTO"), str(data.get_attr("IPSET_ATTR_PROTO"))).lower()
    head = hash_ip_port(ip("IPSET_ATTR_IP_FROM"), proto, port)
    if set_type == HASH_IP_PORT:
        return head
    if set_type == HASH_IP_PORT_IP:
        return f"{head},{ip('IPSET_ATTR_IP2')}"
    if set_type == HASH_IP_PORT_NET:
        return f"{head},{ipaddress.ip_network((ip('IPSET_ATTR_IP2'), data.get_attr('IPSET_ATTR_CIDR2')))}"
    raise ValueError(f"unsupported ipset type {set_type}")


