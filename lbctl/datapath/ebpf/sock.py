"""Socket-level load balancing of host-originated traffic: bpf/prog/lbctl_sock.c in cgroup v2.

kube-proxy balances the node's own processes and hostNetwork pods in its OUTPUT chains; packets
they send never cross a pod link, so lbctl's tc programs never see them. The cgroup programs
(connect4, sendmsg4, recvmsg4, getpeername4) see the socket calls of every process in the
configured cgroup and below it (``--cgroup-root``; on a node, the root of the cgroup2 hierarchy,
as Cilium's /run/cilium/cgroupv2): a connection's destination becomes a backend once, at
connect(), and no packet is ever rewritten.

Kernel objects, all pinned under the datapath's pin dir next to its maps:
  - one bpf link per hook (``LINKS``), attaching the program to the cgroup. A link outlives the
    agent (the pin holds it), so traffic stays balanced while the agent restarts; the restarted
    agent swaps its new programs into the same links (BPF_LINK_UPDATE: atomic, no moment
    without a program). A link never displaces another tool's cgroup programs (links are
    multi-attach). ``cleanup`` detaches the links, whoever holds them;
  - the map ``lb4_reverse_sk``, which only these programs use.

UDP sockets connected to a backend that is removed would keep sending to it forever (a
connected socket's destination is fixed; nothing is translated per packet). After a sync that
removed backends, such sockets are destroyed with sock_diag's SOCK_DESTROY
(CONFIG_INET_DIAG_DESTROY), as Cilium does: the application's next recv() fails with
ECONNABORTED and its socket is left unconnected (send() then fails with EDESTADDRREQ); a
connect() to the service again picks a live backend. Only sockets this load balancer connected
are touched (their cookie and backend are in lb4_reverse_sk), and only in the agent's network
namespace, where sock_diag looks. TCP connections are left to end as they would under
kube-proxy.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from lbctl.datapath.base import DatapathError
from lbctl.datapath.ebpf import shared, source
from lbctl.datapath.ebpf.bpfsys import (
    MAP_TYPE_LRU_HASH,
    BpfError,
    BpfMap,
    map_info,
    obj_get,
    obj_pin,
)

log = logging.getLogger(__name__)

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup/unified"    # the cgroup2 mount of Debian's hybrid layout
PROGRAM = "lbctl_sock.c"
REVERSE_MAP = "lb4_reverse_sk"


@dataclass(frozen=True)
class Hook:
    name: str            # the cgroup hook, as bpftool names it
    function: str        # the program in lbctl_sock.c
    attach_type: int     # enum bpf_attach_type

    @property
    def pin(self) -> str:
        """The link's pin, in the datapath's pin dir."""
        return f"lb4_sock_{self.name}"


HOOKS = (
    Hook("connect4", "lb4_connect", 10),        # BPF_CGROUP_INET4_CONNECT
    Hook("sendmsg4", "lb4_sendmsg", 14),        # BPF_CGROUP_UDP4_SENDMSG
    Hook("recvmsg4", "lb4_recvmsg", 19),        # BPF_CGROUP_UDP4_RECVMSG
    Hook("getpeername4", "lb4_getpeername", 29),  # BPF_CGROUP_INET4_GETPEERNAME
)
PINS = tuple(h.pin for h in HOOKS) + (REVERSE_MAP,)
PROG_TYPE_CGROUP_SOCK_ADDR = 18
LINK_TYPE_CGROUP = 3
CGROUP2_FSTYPE = "cgroup2"


# --- bpf links (libbpf, as bpfsys) ----------------------------------------------------------------

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
for _name, _args in {
    "bpf_link_create": [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
    "bpf_link_update": [ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
    "bpf_link_detach": [ctypes.c_int],
    "bpf_obj_get_info_by_fd": [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)],
    "bpf_prog_query": [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32),
                       ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)],
}.items():
    getattr(_libbpf, _name).argtypes = _args
    getattr(_libbpf, _name).restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return ret


@dataclass(frozen=True)
class LinkInfo:
    id: int
    prog_id: int
    cgroup_id: int       # 0: the cgroup is gone (the link is defunct, attached to nothing)
    attach_type: int


def link_info(fd: int) -> LinkInfo:
    """struct bpf_link_info of a cgroup link: type, id, prog_id, then (8-aligned) the union's
    cgroup member {cgroup_id, attach_type}."""
    buf = ctypes.create_string_buffer(64)
    size = ctypes.c_uint32(len(buf))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "link info")
    link_type, link_id, prog_id, _, cgroup_id, attach_type = struct.unpack_from("=IIIIQI", buf.raw)
    if link_type != LINK_TYPE_CGROUP:
        raise BpfError(errno.EINVAL, f"bpf link {link_id} is of type {link_type}, not a cgroup link")
    return LinkInfo(link_id, prog_id, cgroup_id, attach_type)


def prog_id(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(len(buf))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "program info")
    return struct.unpack_from("=I", buf.raw, 4)[0]


def attached_programs(cgroup: str, attach_type: int) -> list[int]:
    """Ids of every program attached to `cgroup` at one hook (any tool's, ours included)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 64)()
        count = ctypes.c_uint32(len(ids))
        flags = ctypes.c_uint32(0)
        _check(_libbpf.bpf_prog_query(fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)),
               f"query programs of {cgroup}")
        return list(ids[:count.value])
    finally:
        os.close(fd)


# --- cgroups --------------------------------------------------------------------------------------

def cgroup2_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if line.split(" - ", 1)[1].split()[0] == CGROUP2_FSTYPE]


def check_cgroup(path: str) -> None:
    """A directory of a cgroup2 hierarchy, or a DatapathError saying what to give instead."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise DatapathError(f"--cgroup-root {path}: no such directory (give a cgroup v2 directory, "
                            f"e.g. {DEFAULT_CGROUP_ROOT})")
    mounts = cgroup2_mounts()
    if not any(real == m or real.startswith(m.rstrip("/") + "/") for m in mounts):
        raise DatapathError(f"--cgroup-root {path}: not in a cgroup v2 hierarchy (cgroup2 is mounted "
                            f"at {', '.join(mounts) or 'no path: mount -t cgroup2 none /sys/fs/cgroup/unified'})")


def cgroup_id(path: str) -> int:
    """The kernel's id of a cgroup: its directory's inode number in cgroup2."""
    return os.stat(path).st_ino


def cgroup_path(cg_id: int, hint: str | None = None) -> str | None:
    """The directory of cgroup `cg_id` (walks the cgroup2 mounts; `hint` is tried first)."""
    if hint and os.path.isdir(hint) and cgroup_id(hint) == cg_id:
        return hint
    for mount in cgroup2_mounts():
        for directory, _, _ in os.walk(mount):
            try:
                if cgroup_id(directory) == cg_id:
                    return directory
            except OSError:
                continue
    return None


# --- loading and attaching --------------------------------------------------------------------------

def check_reverse_pin(pin_dir: str) -> None:
    """Refuses a pinned lb4_reverse_sk of another layout (an older lbctl)."""
    path = os.path.join(pin_dir, REVERSE_MAP)
    if not os.path.exists(path):
        return
    fd = obj_get(path)
    try:
        info = map_info(fd)
    finally:
        os.close(fd)
    want = (MAP_TYPE_LRU_HASH, shared.sizeof("lb4_reverse_sk_key"),
            shared.sizeof("lb4_reverse_sk_value"), shared.const("LB_REVERSE_SK_MAP_SIZE"))
    have = (info.type, info.key_size, info.value_size, info.max_entries)
    if have != want:
        raise DatapathError(f"pinned map {path} has type/key/value/entries {'/'.join(map(str, have))}, "
                            f"this lbctl wants {'/'.join(map(str, want))}: run `lbctl cleanup`")


class SockLb:
    """The socket programs, loaded, and their links to one cgroup. `load()` then `attach()`;
    `close()` releases file descriptors (links and maps stay pinned; see `cleanup`)."""

    def __init__(self, cfg: Any):
        """`cfg`: the datapath's DatapathConfig (same map sizes and pin dir as the tc programs:
        the maps are shared), with `cgroup_root` set."""
        self.cfg = cfg
        self.cgroup: str = cfg.cgroup_root
        self.bpf: Any = None
        self.prog_fds: dict[str, int] = {}
        self.reverse: BpfMap | None = None

    def load(self) -> SockLb:
        check_cgroup(self.cgroup)
        check_reverse_pin(self.cfg.pin_dir)
        from bcc import BPF  # as the loader: unit tests need no bcc

        src = shared.BPF_DIR / "prog" / PROGRAM
        try:
            self.bpf = BPF(text=source.program_text(src), cflags=self.cfg.cflags())
            for hook in HOOKS:
                fn = self.bpf.load_func(hook.function.encode(), PROG_TYPE_CGROUP_SOCK_ADDR,
                                        attach_type=hook.attach_type)
                self.prog_fds[hook.name] = fn.fd
        except Exception as exc:
            self.close()
            raise DatapathError(f"compiling/loading {src} failed: {exc}") from exc
        self.reverse = BpfMap.open_pinned(os.path.join(self.cfg.pin_dir, REVERSE_MAP))
        return self

    def close(self) -> None:
        if self.reverse is not None:
            self.reverse.close()
            self.reverse = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        self.prog_fds.clear()

    def attach(self) -> list[str]:
        """Attaches every program to the cgroup, or swaps it into the link already there (a
        restart: no moment without a program). Links found on another cgroup (a restart with
        another --cgroup-root) are moved: the new one first, then the old one detached.
        Idempotent; returns one line per change, for the log."""
        target = cgroup_id(self.cgroup)
        changes = []
        cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in HOOKS:
                change = self._attach_one(hook, cg_fd, target)
                if change:
                    changes.append(change)
        finally:
            os.close(cg_fd)
        return changes

    def _attach_one(self, hook: Hook, cg_fd: int, target: int) -> str | None:
        pin = os.path.join(self.cfg.pin_dir, hook.pin)
        prog_fd = self.prog_fds[hook.name]
        old = obj_get(pin) if os.path.exists(pin) else -1
        try:
            if old >= 0:
                info = link_info(old)
                if info.cgroup_id == target:
                    if info.prog_id == prog_id(prog_fd):
                        return None
                    if _libbpf.bpf_link_update(old, prog_fd, None) == 0:
                        return f"{hook.name}: program replaced in link {info.id} on {self.cgroup}"
                    # the link went defunct meanwhile (its cgroup removed): a new one below
            new = _check(_libbpf.bpf_link_create(prog_fd, cg_fd, hook.attach_type, None),
                         f"attach {hook.function} to {self.cgroup} ({hook.name})")
            try:
                tmp = pin + "_new"     # bpffs refuses names with a dot
                if os.path.exists(tmp):
                    os.unlink(tmp)
                obj_pin(new, tmp)
                os.rename(tmp, pin)        # the old link's pin is replaced in one step
            except OSError:
                _libbpf.bpf_link_detach(new)
                raise
            finally:
                os.close(new)
            if old >= 0:
                _libbpf.bpf_link_detach(old)   # attached elsewhere, or defunct (cgroup removed)
                return f"{hook.name}: attached to {self.cgroup} (moved from cgroup id {info.cgroup_id})"
            return f"{hook.name}: attached to {self.cgroup}"
        finally:
            if old >= 0:
                os.close(old)

    def verify(self) -> None:
        """At each resync: links removed behind the agent's back are made again."""
        for change in self.attach():
            log.warning("socket load balancer: %s", change)

    # --- UDP sockets of removed backends ------------------------------------------------------

    def after_sync(self, maps: dict[str, BpfMap], result: Any) -> None:
        """After a sync that removed backends or changed slots: UDP sockets connected to a
        backend their service no longer has are destroyed (failures are logged: the sync
        itself stands)."""
        if not (result.backends_removed or result.updated or result.removed):
            return
        try:
            moved = self.move_stale_udp(maps["lb4_services"], maps["lb4_backends"])
        except OSError as exc:
            log.warning("socket load balancer: could not destroy UDP sockets of removed backends: %s", exc)
            return
        if moved:
            log.info("socket load balancer: destroyed %d UDP socket(s) connected to removed backends", moved)

    def move_stale_udp(self, services: BpfMap, backends: BpfMap) -> int:
        """Destroys this namespace's UDP sockets that this load balancer connected to a backend
        their service no longer has (removed, or gone from every slot of the frontend without
        draining). Returns how many were destroyed."""
        if self.reverse is None:
            return 0
        stale = stale_reverse_entries(self.reverse.items(), services.items(), backends.items())
        if not stale:
            return 0
        destroyed = 0
        with SockDiag() as diag:
            for sock in diag.udp_connected():
                if (sock.cookie, sock.dst, sock.dport) in stale:
                    destroyed += diag.destroy(sock)
        for raw in stale.values():
            self.reverse.delete(raw)
        return destroyed


def start(cfg: Any) -> SockLb | None:
    """The socket load balancer of an eBPF datapath: loaded and attached when a cgroup is
    configured, else None."""
    if not getattr(cfg, "cgroup_root", None):
        return None
    sock_lb = SockLb(cfg).load()
    try:
        for change in sock_lb.attach():
            log.info("socket load balancer: %s", change)
    except Exception:
        sock_lb.close()
        raise
    return sock_lb


# --- which entries are stale (pure: map contents in, keys out) --------------------------------------

_reverse_key = struct.Struct("=Q4sH")       # cookie, backend address (network order), port (raw)
_backend = struct.Struct("=4sHBB")
_svc_key = struct.Struct("=4sHHBB")
_svc_value = struct.Struct("=IHHI")


def _layout_ok() -> bool:
    return (shared.offsetof("lb4_reverse_sk_key", "address") == 8
            and shared.offsetof("lb4_reverse_sk_value", "proto") == 6
            and shared.offsetof("lb4_service_key", "scope") == 9)


def stale_reverse_entries(reverse, services, backends) -> dict[tuple[int, bytes, int], bytes]:
    """(cookie, backend address, backend port) -> raw key, for every UDP entry of
    lb4_reverse_sk whose backend its frontend no longer offers: the backend is gone from
    lb4_backends, or it is in no slot of the frontend (any scope) and not draining. Ports are
    host order; addresses the 4 network-order bytes."""
    assert _layout_ok(), "lbctl_shared.h changed: update sock.py's decoders"
    udp = socket.IPPROTO_UDP
    by_endpoint: dict[tuple[bytes, int], list[tuple[int, bool]]] = {}
    for key, value in backends:
        address, port, proto, flags = _backend.unpack_from(value)
        if proto == udp:
            draining = bool(flags & shared.const("LB_BACKEND_F_DRAINING"))
            by_endpoint.setdefault((address, port), []).append((shared.parse_u32(key), draining))
    counts: dict[tuple[bytes, int, int, int], int] = {}
    slots: list[tuple[tuple[bytes, int, int, int], int, int]] = []
    for key, value in services:
        address, dport, slot, proto, scope = _svc_key.unpack_from(key)
        if proto != udp:
            continue
        backend_id, count, _, _ = _svc_value.unpack_from(value)
        if slot == 0:
            counts[(address, dport, proto, scope)] = count
        else:
            slots.append(((address, dport, proto, scope), slot, backend_id))
    offered: dict[tuple[bytes, int], set[int]] = {}
    for frontend, slot, backend_id in slots:
        if slot <= counts.get(frontend, 0):
            offered.setdefault(frontend[:2], set()).add(backend_id)
    stale = {}
    for key, value in reverse:
        cookie, address, port = _reverse_key.unpack_from(key)
        vip, vport, proto = struct.unpack_from("=4sHB", value)
        if proto != udp:
            continue
        ids = by_endpoint.get((address, port), [])
        live = offered.get((vip, vport), set())
        if not any(draining or backend_id in live for backend_id, draining in ids):
            stale[(cookie, address, socket.ntohs(port))] = key
    return stale


# --- sock_diag --------------------------------------------------------------------------------------

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED = 1     # a connected UDP socket's state
_nlmsghdr = struct.Struct("=IHHII")
_req = struct.Struct("=BBBBI")           # family, protocol, ext, pad, states; then the sockid
_sockid = struct.Struct("=HH16s16sIII")  # sport, dport (network order), src, dst, if, cookie lo/hi
_msg_head = struct.Struct("=BBBB")       # family, state, timer, retrans; then the sockid


@dataclass(frozen=True)
class DiagSocket:
    sockid: bytes        # the raw inet_diag_sockid, given back to SOCK_DESTROY as is
    cookie: int
    dst: bytes           # 4 network-order bytes
    dport: int           # host order


class SockDiag:
    """sock_diag over NETLINK_SOCK_DIAG, in the calling thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self.seq = 0

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def _send(self, msg_type: int, flags: int, sockid: bytes, states: int) -> int:
        self.seq += 1
        body = _req.pack(socket.AF_INET, socket.IPPROTO_UDP, 0, 0, states) + sockid
        self.sock.send(_nlmsghdr.pack(_nlmsghdr.size + len(body), msg_type, flags, self.seq, 0) + body)
        return self.seq

    def _replies(self):
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _nlmsghdr.size <= len(data):
                length, msg_type, _, _, _ = _nlmsghdr.unpack_from(data, offset)
                if length < _nlmsghdr.size:
                    return
                yield msg_type, data[offset + _nlmsghdr.size:offset + length]
                offset += (length + 3) & ~3

    def udp_connected(self) -> list[DiagSocket]:
        """Every connected IPv4 UDP socket of the namespace."""
        self._send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, bytes(_sockid.size),
                   1 << TCP_ESTABLISHED)
        found = []
        for msg_type, payload in self._replies():
            if msg_type == NLMSG_DONE:
                break
            if msg_type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
            raw = payload[_msg_head.size:_msg_head.size + _sockid.size]
            _, dport, _, dst, _, lo, hi = _sockid.unpack(raw)
            found.append(DiagSocket(raw, lo | hi << 32, dst[:4], socket.ntohs(dport)))
        return found

    def destroy(self, sock: DiagSocket) -> int:
        """SOCK_DESTROY: the socket's owner sees ECONNABORTED. 1 if destroyed, 0 if it had gone
        meanwhile."""
        self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, sock.sockid, 1 << TCP_ESTABLISHED)
        for msg_type, payload in self._replies():
            if msg_type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code == 0:
                    return 1
                if code == errno.ENOENT:
                    return 0
                if code == errno.EOPNOTSUPP:
                    raise DatapathError("sock_diag cannot destroy sockets on this kernel "
                                        "(CONFIG_INET_DIAG_DESTROY is not set)")
                raise OSError(code, f"sock_diag destroy: {os.strerror(code)}")
        return 0


# --- dump and cleanup ---------------------------------------------------------------------------------

def attachments(pin_dir: str, hint: str | None = None) -> list[dict]:
    """One row per pinned link: hook, cgroup (path, or the id of a removed one), link and
    program ids. Empty without socket load balancing."""
    rows = []
    for hook in HOOKS:
        pin = os.path.join(pin_dir, hook.pin)
        if not os.path.exists(pin):
            continue
        fd = obj_get(pin)
        try:
            info = link_info(fd)
        finally:
            os.close(fd)
        path = cgroup_path(info.cgroup_id, hint) if info.cgroup_id else None
        rows.append({"hook": hook.name, "program": hook.function,
                     "cgroup": path or (f"cgroup id {info.cgroup_id}" if info.cgroup_id else "(removed)"),
                     "link_id": info.id, "prog_id": info.prog_id})
    return rows


def cleanup(pin_dir: str) -> list[str]:
    """Detaches our links (even while some process still holds one) and unpins them and
    lb4_reverse_sk. Returns what was removed."""
    removed = []
    for hook in HOOKS:
        pin = os.path.join(pin_dir, hook.pin)
        if not os.path.exists(pin):
            continue
        fd = obj_get(pin)
        try:
            _libbpf.bpf_link_detach(fd)
        finally:
            os.close(fd)
        os.unlink(pin)
        removed.append(f"cgroup {hook.name} link")
    path = os.path.join(pin_dir, REVERSE_MAP)
    if os.path.exists(path):
        os.unlink(path)
        removed.append(f"pinned map {REVERSE_MAP}")
    return removed
