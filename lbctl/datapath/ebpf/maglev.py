"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
Load Balancer", NSDI 2016), a per-service option (``lbctl.io/lb-algorithm: maglev``).

A service's table has M slots, M prime. Every backend has its own permutation of the slots,
``(offset + j * skip) % M``, from two independent hashes of its stable name ``address:port``;
backends take turns, each taking its next preferred slot still free, until the table is full
(the paper's Algorithm 1, as Cilium's pkg/maglev). Each backend ends with M/N slots (floor or
ceiling: equal weights), and removing or adding one of N backends moves about 1/N of the slots
(a little more than the minimum: the paper's Figure 11). The datapath sends a new flow to slot
``jhash(5-tuple) % M`` (bpf/lib/maglev.h): two nodes with the same backends, whatever order
their agents saw them in and whatever backend ids they gave them, pick the same backend for
the same flow.

The table depends only on M and the set of backend names, so it is computed when that set or
M changes, never for an unchanged service, and kept in a small cache (a ClusterIP and its
NodePort frontends share one computation). A restarted agent keeps the tables the maps hold.

Cilium hashes names with murmur3 under two seeds; lbctl takes the two halves of a keyed
BLAKE2b digest (the standard library's, in C): two independent 64-bit hashes just the same.
The tables need only agree between lbctl nodes.

In the maps (``lb4_maglev``, a hash of maps): per (service id, scope) an array of M + 1 __u32,
index 0 holding M and 1..M backend ids. A changed table is a new array, filled, then swapped in
with one update of the outer map, so a packet sees the old table or the new one, never a mix.
"""
from __future__ import annotations

import array
import functools
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from lbctl.datapath.ebpf import bpfsys, shared
from lbctl.model.objects import Backend, ServiceEntry, is_prime

MAGLEV = "lb4_maglev"
DEFAULT_TABLE_SIZE = shared.const("LB_MAGLEV_DEFAULT_TABLE_SIZE")
MAX_TABLE_SIZE = shared.const("LB_MAGLEV_MAX_TABLE_SIZE")
HASH_SEED = shared.const("LB_MAGLEV_HASH_SEED")
F_MAGLEV = shared.const("LB_SVC_F_MAGLEV")
EXTERNAL, INTERNAL = shared.const("LB_SCOPE_EXTERNAL"), shared.const("LB_SCOPE_INTERNAL")
NAME_KEY = b"lbctl maglev v1"   # the BLAKE2b key: changing it moves every flow of every table
_U32 = 0xFFFFFFFF


def backend_name(backend: Backend) -> str:
    """What a backend's permutation is derived from: the same on every node (ids are not)."""
    return f"{backend.address}:{backend.port}"


def offset_skip(name: str, size: int) -> tuple[int, int]:
    """The backend's permutation of M = ``size`` slots: it prefers slot offset, then
    offset + skip, ... (mod M). skip is in 1..M-1, so with M prime every slot comes once."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=NAME_KEY).digest()
    h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def check_size(size: int) -> None:
    if not (isinstance(size, int) and 2 < size <= MAX_TABLE_SIZE and is_prime(size)):
        raise ValueError(f"Maglev table size {size!r}: must be a prime from 3 to {MAX_TABLE_SIZE}")


def lookup_table(backends: Iterable[Backend], size: int) -> list[Backend]:
    """The table: slot -> backend, for M = ``size`` slots. The order of ``backends`` does not
    matter (they are taken in the order of their names); duplicates count once."""
    check_size(size)
    by_name = {backend_name(b): b for b in backends}
    if not by_name:
        return []
    names = tuple(sorted(by_name))
    return [by_name[names[i]] for i in populate(names, size)]


@functools.lru_cache(maxsize=256)
def populate(names: tuple[str, ...], size: int) -> tuple[int, ...]:
    """Algorithm 1 of the paper: slot -> index into ``names`` (backends take turns in this
    order). Cached: frontends of one service port share their backends, and a table is 64 KiB.

    Each backend's permutation is walked incrementally (no list of M candidates per backend):
    about 5 ms for 10 backends at M = 16381 on the development VM, most of it the M turns
    themselves (sorting the last free slots by each backend's ranking, to skip the long walks
    at the end, saved under 10%: not worth the code).
    """
    n = len(names)
    perms = [offset_skip(name, size) for name in names]
    entry = [-1] * size
    nexts = [offset for offset, _ in perms]
    skips = [skip for _, skip in perms]
    turn = 0
    for _ in range(size):
        c, skip = nexts[turn], skips[turn]
        while entry[c] >= 0:
            c += skip
            if c >= size:
                c -= size
        entry[c] = turn
        c += skip
        nexts[turn] = c - size if c >= size else c
        turn = turn + 1 if turn + 1 < n else 0
    return tuple(entry)


def table_value(backends: Sequence[Backend], ids: Mapping[Backend, int], size: int) -> bytes:
    """What ``lb4_maglev`` holds for a frontend scope: M, then the backend id of every slot."""
    slots = lookup_table(backends, size)
    return array.array("I", [size, *(ids[b] for b in slots)]).tobytes()


def table_key(service_id: int, scope: int = 0) -> bytes:
    return shared.new("lb4_maglev_key", service_id=service_id, scope=scope)


def parse_table(value: bytes) -> tuple[int, frozenset[int]]:
    """(M, the backend ids it names) of a table read from the maps."""
    ids = array.array("I")
    ids.frombytes(value[: len(value) // 4 * 4])
    return (ids[0] if ids else 0), frozenset(ids[1:])


# --- the 5-tuple hash the datapath uses (bpf/lib/maglev.h), for tests and `trace`-like tools ---

def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & _U32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """The kernel's jhash_3words (lookup3's final mix), as lb_jhash_3words computes it."""
    initval = (initval + 0xDEADBEEF + (3 << 2)) & _U32
    a, b, c = (a + initval) & _U32, (b + initval) & _U32, (c + initval) & _U32
    c ^= b; c = (c - _rol32(b, 14)) & _U32  # noqa: E702 (the C's layout, line by line)
    a ^= c; a = (a - _rol32(c, 11)) & _U32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 25)) & _U32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 16)) & _U32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 4)) & _U32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 14)) & _U32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 24)) & _U32  # noqa: E702
    return c


def flow_hash(saddr: str, sport: int, dport: int, proto: int) -> int:
    """lb4_maglev_hash: the source address, both ports (host order) and the protocol."""
    address = int.from_bytes(bytes(int(octet) for octet in saddr.split(".")), "big")
    return jhash_3words(address, (sport << 16) | dport, proto, HASH_SEED)


def flow_slot(saddr: str, sport: int, dport: int, proto: int, size: int) -> int:
    """The table slot (0-based, as in ``lookup_table``) a new flow takes."""
    return flow_hash(saddr, sport, dport, proto) % size


# --- the kernel's tables ---------------------------------------------------------------------

class TableMap:
    """``lb4_maglev`` seen as a map from key to a whole table (``table_value`` bytes), the
    interface the reconciler writes through (a FakeMap holding the bytes stands in for it in
    tests). ``update`` creates a new inner array, fills it in one batch, then points the outer
    entry at it: the swap is one atomic write, and the old table is freed once no program
    runs on it."""

    def __init__(self, outer: bpfsys.BpfMap):
        self.outer = outer
        self.name = MAGLEV

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        fd = bpfsys.map_create_flags(bpfsys.MAP_TYPE_ARRAY, "lb4_maglev_t", 4, 4, len(value) // 4,
                                     bpfsys.BPF_F_INNER_MAP)
        try:
            bpfsys.BpfMap(fd, owned=False).write_array(value)
            self.outer.update(key, shared.u32(fd))
        finally:
            os.close(fd)   # the outer map holds the table now

    def delete(self, key: bytes) -> bool:
        return self.outer.delete(key)

    def lookup(self, key: bytes) -> bytes | None:
        map_id = self.outer.lookup(key)
        return None if not isinstance(map_id, bytes) else self._read(shared.parse_u32(map_id))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key, map_id in list(self.outer.items()):
            try:
                yield key, self._read(shared.parse_u32(map_id))
            except OSError:   # replaced or removed since the walk listed it
                continue

    @staticmethod
    def _read(map_id: int) -> bytes:
        fd = bpfsys.map_fd_by_id(map_id)
        try:
            return bpfsys.BpfMap(fd, owned=False).read_array()
        finally:
            os.close(fd)

    def close(self) -> None:
        self.outer.close()


class Tables:
    """The reconciler's mirror of the Maglev tables: key -> (M, backend ids), restored from the
    maps (a restarted agent keeps every table, so no flow moves), changed only after a write
    succeeded. A table is rewritten only when M or its backend set changes: exactly when it
    must be computed again. Each scope of a frontend (eTP Local has two) has its own table."""

    def __init__(self, tables=None):
        if isinstance(tables, bpfsys.BpfMap):
            tables = TableMap(tables)
        self.map = tables
        self.have: dict[bytes, tuple[int, frozenset[int]]] = {}
        if tables is not None:
            for key, value in tables.items():
                self.have[key] = parse_table(value)

    @staticmethod
    def _wanted(service_id: int, entry: ServiceEntry) -> list[tuple[bytes, tuple[Backend, ...]]]:
        """(key, backends) of each scope that needs a table: a Maglev frontend's, with endpoints."""
        if not entry.maglev_table_size:
            return []
        scopes = [(EXTERNAL, entry.backends)]
        if entry.internal_backends is not None:
            scopes.append((INTERNAL, entry.internal_backends))
        return [(table_key(service_id, scope), backends) for scope, backends in scopes if backends]

    def stale(self, service_id: int, entry: ServiceEntry, ids: Mapping[Backend, int]) -> bool:
        """Some table this frontend needs is missing or was made for other backends or size."""
        return any(self.have.get(key) != (entry.maglev_table_size, frozenset(ids[b] for b in backends))
                   for key, backends in self._wanted(service_id, entry))

    def write(self, service_id: int, entry: ServiceEntry, ids: Mapping[Backend, int]) -> None:
        """Writes the tables of a frontend the maps do not hold yet: after the backends they
        name, before the frontend whose LB_SVC_F_MAGLEV makes the datapath read them."""
        if self.map is None:
            if entry.maglev_table_size:
                raise OSError(2, f"no {MAGLEV} map to hold Maglev tables")
            return
        size = entry.maglev_table_size
        for key, backends in self._wanted(service_id, entry):
            want = (size, frozenset(ids[b] for b in backends))
            if self.have.get(key) != want:
                self.map.update(key, table_value(backends, ids, size))
                self.have[key] = want

    def prune(self, programmed: Iterable, service_ids: Iterable[int] | None = None) -> None:
        """Removes the tables no Maglev frontend names (once the frontends are written):
        removed services, services no longer annotated, scopes gone or without endpoints.
        ``service_ids``: only the tables of these ids are looked at (an incremental sync;
        ``programmed`` then needs to hold the services of those ids only)."""
        keep = set()
        for p in programmed:
            if p.flags & F_MAGLEV:
                if p.backend_ids:
                    keep.add(table_key(p.service_id, EXTERNAL))
                if p.internal_ids:
                    keep.add(table_key(p.service_id, INTERNAL))
        looked_at = self.have if service_ids is None else [
            k for i in service_ids for k in (table_key(i, EXTERNAL), table_key(i, INTERNAL)) if k in self.have]
        for key in [k for k in looked_at if k not in keep]:
            if self.map is not None:
                self.map.delete(key)
            del self.have[key]
