"""The few bpf(2) calls lbctl needs, through libbpf (the one libbcc links against).

Everything here works on file descriptors of maps and programs, so the same code serves the
agent (maps it created through bcc), `lbctl dump maps` in another process (maps opened from
their pins) and the BPF_PROG_TEST_RUN harness. libbpf >= 1.0 returns -errno.
"""
from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

_libbpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_HASH_OF_MAPS = 13
BPF_F_INNER_MAP = 1 << 12   # an inner map template whose tables may differ in max_entries
PERCPU_TYPES = {MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH}


BATCH_ENTRIES = 4096         # entries per BPF_MAP_LOOKUP_BATCH call
ENOTSUPP = 524               # the kernel's internal "not supported" (no batch op for this map type)
_NO_BATCH = (-errno.EINVAL, -ENOTSUPP, -errno.EOPNOTSUPP)   # EINVAL: a kernel before batch ops


class BpfError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return ret


for _name, _args in {
    "bpf_obj_get": [ctypes.c_char_p],
    "bpf_obj_pin": [ctypes.c_int, ctypes.c_char_p],
    "bpf_map_lookup_elem": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p],
    "bpf_map_update_elem": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64],
    "bpf_map_delete_elem": [ctypes.c_int, ctypes.c_void_p],
    "bpf_map_get_next_key": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p],
    "bpf_obj_get_info_by_fd": [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)],
    "bpf_prog_test_run_opts": [ctypes.c_int, ctypes.c_void_p],
    "bpf_map_update_batch": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p],
    "bpf_map_lookup_batch": [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p],
    "bpf_map_delete_batch": [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                             ctypes.c_void_p],
    "bpf_map_create": [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_uint32, ctypes.c_void_p],
}.items():
    getattr(_libbpf, _name).argtypes = _args
    getattr(_libbpf, _name).restype = ctypes.c_int


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 128)]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def possible_cpus() -> int:
    """Number of possible CPUs, the stride of per-CPU map values (not os.cpu_count())."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def obj_get(path: str) -> int:
    return _check(_libbpf.bpf_obj_get(path.encode()), f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_libbpf.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map (not pinned); returns its file descriptor. For tests and measurements: the
    datapath's maps are created by bcc from the program's definitions."""
    return _check(_libbpf.bpf_map_create(map_type, name.encode()[:15], key_size, value_size,
                                         max_entries, None), f"create map {name}")


class _MapCreateOpts(ctypes.Structure):
    """libbpf's struct bpf_map_create_opts (1.0)."""
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


def map_create_flags(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
                     map_flags: int) -> int:
    """map_create with map flags (BPF_F_INNER_MAP for the Maglev tables: an inner map must carry
    the flags of the template it replaces)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=map_flags)
    return _check(_libbpf.bpf_map_create(map_type, name.encode()[:15], key_size, value_size,
                                         max_entries, ctypes.byref(opts)), f"create map {name}")


_libbpf.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
_libbpf.bpf_map_get_fd_by_id.restype = ctypes.c_int


def map_fd_by_id(map_id: int) -> int:
    """A file descriptor of the map with this id (what a map-in-map lookup returns)."""
    return _check(_libbpf.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(errors="replace"))


class BpfMap:
    """A map by file descriptor: bytes in, bytes out. Per-CPU values come back as a list."""

    def __init__(self, fd: int, name: str = "", owned: bool = True):
        self.fd = fd
        self.info = map_info(fd)
        self.name = name or self.info.name
        self._owned = owned
        self.percpu = self.info.type in PERCPU_TYPES
        self._stride = (self.info.value_size + 7) // 8 * 8
        self._ncpu = possible_cpus() if self.percpu else 1
        self._value_len = self._stride * self._ncpu if self.percpu else self.info.value_size
        self._batch_lookup = self._batch_delete = True   # until the kernel says otherwise

    @classmethod
    def open_pinned(cls, path: str) -> BpfMap:
        return cls(obj_get(path), os.path.basename(path))

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _key(self, key: bytes):
        if len(key) != self.info.key_size:
            raise ValueError(f"{self.name}: key of {len(key)} bytes, map wants {self.info.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        buf = ctypes.create_string_buffer(self._value_len)
        ret = _libbpf.bpf_map_lookup_elem(self.fd, self._key(key), buf)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"lookup in {self.name}")
        return self._value(buf.raw)

    def update(self, key: bytes, value: bytes | list[bytes], flags: int = BPF_ANY) -> None:
        if isinstance(value, list) or self.percpu:
            values = value if isinstance(value, list) else [value] * self._ncpu
            raw = b"".join(v.ljust(self._stride, b"\0") for v in values)
        else:
            raw = value
        if len(raw) != self._value_len:
            raise ValueError(f"{self.name}: value of {len(raw)} bytes, map wants {self._value_len}")
        _check(_libbpf.bpf_map_update_elem(self.fd, self._key(key),
                                           ctypes.create_string_buffer(raw, len(raw)), flags),
               f"update {self.name}")

    def update_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        """Many updates in one syscall; per-CPU values are given once and set on every CPU.
        Falls back to one by one where the kernel has no batch operation for the map."""
        if not items:
            return
        if self.percpu:
            items = [(k, b"".join(v.ljust(self._stride, b"\0") for v in [v] * self._ncpu))
                     for k, v in items]
        keys = b"".join(k for k, _ in items)
        values = b"".join(v for _, v in items)
        count = ctypes.c_uint32(len(items))
        ret = _libbpf.bpf_map_update_batch(self.fd, ctypes.create_string_buffer(keys, len(keys)),
                                           ctypes.create_string_buffer(values, len(values)),
                                           ctypes.byref(count), None)
        if ret in _NO_BATCH:
            for k, v in items:
                self.update(k, [v[i * self._stride:(i + 1) * self._stride] for i in range(self._ncpu)]
                            if self.percpu else v)
            return
        _check(ret, f"batch update {self.name}")

    def write_array(self, values: bytes) -> None:
        """Sets every entry of an array map, index 0 upwards, from packed values: one
        BPF_MAP_UPDATE_BATCH (a Maglev table of 16,382 entries in one call)."""
        count = len(values) // self.info.value_size
        keys = array.array("I", range(count)).tobytes()
        n = ctypes.c_uint32(count)
        _check(_libbpf.bpf_map_update_batch(self.fd, ctypes.create_string_buffer(keys, len(keys)),
                                            ctypes.create_string_buffer(values, len(values)),
                                            ctypes.byref(n), None), f"batch update {self.name}")

    def read_array(self) -> bytes:
        """Every value of an array map, packed, index 0 upwards: one BPF_MAP_LOOKUP_BATCH."""
        count, size = self.info.max_entries, self.info.value_size
        keys = ctypes.create_string_buffer(4 * count)
        values = ctypes.create_string_buffer(size * count)
        token = ctypes.create_string_buffer(4)
        n = ctypes.c_uint32(count)
        ret = _libbpf.bpf_map_lookup_batch(self.fd, None, token, keys, values, ctypes.byref(n), None)
        if ret != -errno.ENOENT:   # ENOENT: the whole map fitted in this batch
            _check(ret, f"batch lookup in {self.name}")
        return ctypes.string_at(values, size * n.value)

    def delete(self, key: bytes) -> bool:
        ret = _libbpf.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno.ENOENT:
            return False
        _check(ret, f"delete from {self.name}")
        return True

    def delete_batch(self, keys: list[bytes]) -> int:
        """Deletes many keys in few syscalls (BPF_MAP_DELETE_BATCH); keys already gone (an LRU
        eviction meanwhile) are skipped. Returns how many were deleted."""
        for key in keys:
            self._key(key)
        deleted = done = 0
        while done < len(keys) and self._batch_delete:
            rest = b"".join(keys[done:])
            count = ctypes.c_uint32(len(keys) - done)
            ret = _libbpf.bpf_map_delete_batch(self.fd, ctypes.create_string_buffer(rest, len(rest)),
                                               ctypes.byref(count), None)
            deleted += count.value
            done += count.value
            if ret == 0:
                return deleted
            if ret == -errno.ENOENT:    # this key was gone already: go on after it
                done += 1
                continue
            if ret in _NO_BATCH and deleted == 0 and done == 0:
                self._batch_delete = False
                break
            _check(ret, f"batch delete from {self.name}")
        return deleted + sum(self.delete(key) for key in keys[done:])

    # --- whole-map walks -------------------------------------------------------------------------

    def batches(self, chunk: int = BATCH_ENTRIES):
        """The map's entries as lists of (key, value), up to `chunk` per bpf(2) call
        (BPF_MAP_LOOKUP_BATCH); one key at a time (get_next_key + lookup) where the kernel has no
        batch lookup for this map type. Per-CPU values come back as lists, as from lookup()."""
        if not self._batch_lookup:
            yield from self._batches_by_key(chunk)
            return
        key_size, value_len = self.info.key_size, self._value_len
        # The position token: a bucket index (u32) for hash maps, a key for arrays.
        token_in, token_out = None, ctypes.create_string_buffer(max(key_size, 8))
        keys = ctypes.create_string_buffer(key_size * chunk)
        values = ctypes.create_string_buffer(value_len * chunk)
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = _libbpf.bpf_map_lookup_batch(self.fd, token_in, token_out, keys, values,
                                               ctypes.byref(count), None)
            if first and ret in _NO_BATCH:
                self._batch_lookup = False
                yield from self._batches_by_key(chunk)
                return
            if ret == -errno.ENOSPC:    # one hash bucket holds more than `chunk` entries
                chunk *= 2
                keys = ctypes.create_string_buffer(key_size * chunk)
                values = ctypes.create_string_buffer(value_len * chunk)
                continue
            if ret != -errno.ENOENT:    # ENOENT: this was the last batch (maybe empty)
                _check(ret, f"batch lookup in {self.name}")
            n = count.value
            if n:
                k = ctypes.string_at(keys, key_size * n)
                v = ctypes.string_at(values, value_len * n)
                yield [(k[i * key_size:(i + 1) * key_size], self._value(v[i * value_len:(i + 1) * value_len]))
                       for i in range(n)]
            if ret == -errno.ENOENT:
                return
            first = False
            token_in = ctypes.create_string_buffer(token_out.raw, len(token_out.raw))

    def _batches_by_key(self, chunk: int):
        batch = []
        for key in list(self._keys_one_by_one()):
            value = self.lookup(key)
            if value is not None:
                batch.append((key, value))
                if len(batch) == chunk:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _keys_one_by_one(self):
        size = self.info.key_size
        prev = None
        nxt = ctypes.create_string_buffer(size)
        while True:
            ret = _libbpf.bpf_map_get_next_key(self.fd, prev, nxt)
            if ret == -errno.ENOENT:
                return
            _check(ret, f"iterate {self.name}")
            key = nxt.raw
            yield key
            prev = ctypes.create_string_buffer(key, size)

    def _value(self, raw: bytes) -> bytes | list[bytes]:
        if self.percpu:
            return [raw[i * self._stride:i * self._stride + self.info.value_size]
                    for i in range(self._ncpu)]
        return raw

    def items(self):
        for batch in self.batches():
            yield from batch

    def keys(self):
        for batch in self.batches():
            for key, _ in batch:
                yield key

    def count(self) -> int:
        """Number of entries (a batch walk: there is no bpf(2) call that counts)."""
        return sum(len(batch) for batch in self.batches())


@dataclass
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    ctx: bytes | None = None     # the context after the run (__sk_buff, xdp_md), when one was given


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, ctx: bytes | None = None) -> TestRunResult:
    """Runs a program once (or `repeat` times) on a packet through BPF_PROG_TEST_RUN.

    `duration_ns` is the kernel's average per run, measured around the program alone."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(data_in),
                        data_out=ctypes.addressof(data_out), data_size_in=len(packet),
                        data_size_out=len(data_out), repeat=repeat)
    ctx_buf = ctx_out = None
    if ctx is not None:
        ctx_buf = ctypes.create_string_buffer(ctx, len(ctx))
        ctx_out = ctypes.create_string_buffer(len(ctx))
        opts.ctx_in = ctypes.addressof(ctx_buf)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.addressof(ctx_out)
        opts.ctx_size_out = len(ctx)
    _check(_libbpf.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRunResult(opts.retval, data_out.raw[:opts.data_size_out], opts.duration,
                         ctx_out.raw[:opts.ctx_size_out] if ctx_out is not None else None)


# --- XDP attachment (bpf_xdp_attach/query/detach, libbpf >= 0.8) -------------------------------

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2        # generic XDP (xdpgeneric): any device, after the skb is built
XDP_FLAGS_DRV_MODE = 4        # native XDP (xdpdrv): in the driver, before any skb
XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB, XDP_ATTACHED_HW, XDP_ATTACHED_MULTI = range(5)


class _XdpQueryOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", ctypes.c_uint32), ("drv_prog_id", ctypes.c_uint32),
                ("hw_prog_id", ctypes.c_uint32), ("skb_prog_id", ctypes.c_uint32),
                ("attach_mode", ctypes.c_uint8)]


for _name, _args in {
    "bpf_xdp_attach": [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p],
    "bpf_xdp_detach": [ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p],
    "bpf_xdp_query": [ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
    "bpf_prog_get_fd_by_id": [ctypes.c_uint32],
}.items():
    getattr(_libbpf, _name).argtypes = _args
    getattr(_libbpf, _name).restype = ctypes.c_int


@dataclass(frozen=True)
class XdpState:
    """What XDP holds on a link: the mode (XDP_ATTACHED_*) and the program ids per mode."""
    mode: int
    drv_prog_id: int
    skb_prog_id: int


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    """Attaches (or replaces) an XDP program; flags XDP_FLAGS_DRV_MODE or XDP_FLAGS_SKB_MODE."""
    _check(_libbpf.bpf_xdp_attach(ifindex, prog_fd, flags, None), f"attach XDP to ifindex {ifindex}")


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(_libbpf.bpf_xdp_detach(ifindex, flags, None), f"detach XDP from ifindex {ifindex}")


def xdp_query(ifindex: int) -> XdpState:
    opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    _check(_libbpf.bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"query XDP of ifindex {ifindex}")
    return XdpState(opts.attach_mode, opts.drv_prog_id, opts.skb_prog_id)


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 256)]


def prog_name(prog_id: int) -> str:
    """The name of a loaded program by id ("" if it is gone)."""
    fd = _libbpf.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = _ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(_libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_XDP = 6


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str                   # the kernel's name: the function's, cut to 15 characters
    map_ids: tuple[int, ...]    # every map the program uses


def prog_info(fd: int) -> ProgInfo:
    """What the kernel says of a loaded program: two calls, the second with room for its map ids."""
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    ids = (ctypes.c_uint32 * max(1, info.nr_map_ids))()
    again = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
    size = ctypes.c_uint32(ctypes.sizeof(again))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(again), ctypes.byref(size)), "prog info")
    count = min(info.nr_map_ids, again.nr_map_ids)
    return ProgInfo(again.type, again.id, again.name.decode(errors="replace"), tuple(ids[:count]))
