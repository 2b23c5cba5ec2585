"""Desired state -> map contents: diff against what the maps hold, write in a safe order.

The reconciler keeps a mirror of what it believes the maps hold, restored from the maps
themselves at start (so a restarted agent keeps the same service and backend ids and moves no
flow) and after any failed write (a full resync, as kube-proxy falls back to). Writes follow
Cilium's order, in which a packet never sees a half-made service:

  1. removed services: the frontend first (no new packet selects it), then its slots, then
     its internal scope and its source ranges; first, so that what they free (map room, ids)
     serves the additions;
  2. new backends (lb4_backends), so every id a slot will name exists;
  3. per changed service: source ranges it gains (before the frontend's flag makes them
     checked: a range arriving late would drop its clients), then the internal scope
     (LB_SCOPE_INTERNAL: slots, then its slot 0), then backend slots 1..n, then the frontend
     (slot 0, holding the count and the flags that make the internal scope and the ranges
     reachable) last, then slots beyond the new counts, an internal scope no longer flagged,
     and the ranges it lost (while they change, a source in the old or the new ranges is let
     in: never one in both refused). Maglev tables (lb4_maglev, maglev.py) are written
     before any of that, after the backends they name; those no Maglev frontend names any
     more are removed after the frontends;
  4. backends no longer named by any slot.

A service that cannot be programmed (no free id, too many endpoints) is reported in the result
and skipped; the others are programmed. The mirror changes only after the writes it describes
succeeded, and any exception (a refused write, a bad value, a bug) aborts the sync and makes the
next one re-read the maps first. ``resync()`` (the agent's ``--sync-period``, kube-proxy's
syncPeriod) re-reads the maps on purpose and repairs whatever differs from the desired state:
entries deleted or changed behind the agent's back.

(Before all that, slots left beyond a frontend's count by an interrupted sync are dropped.)

A sync told which frontends changed (``sync(desired, changed)``, from
``lbctl.model.desired.DesiredCache``) visits only those and the ones an earlier sync could not
program, and only the backends they name or named (reference counts of slots and draining
entries per backend): one endpoint change at 10,000 services is a handful of writes and no
pass over the rest. The first sync after a restore (a start, a failure, ``resync()``) compares
everything and builds those counts.

Maps are anything with ``lookup/update/delete/items/update_batch/delete_batch`` on bytes (``bpfsys.BpfMap`` or
``lbctl.testing.fakemap.FakeMap``), so this whole module is tested without root.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

from lbctl.datapath.base import SyncResult
from lbctl.datapath.ebpf import decode, maglev, shared
from lbctl.model.objects import Backend, DesiredState, Frontend, FrontendKind, ServiceEntry

log = logging.getLogger(__name__)

SERVICES, BACKENDS = "lb4_services", "lb4_backends"
SERVICE_STATS, BACKEND_STATS = "lb_service_stats", "lb_backend_stats"
AFFINITY = "lb4_affinity"
SOURCE_RANGES = "lb4_source_ranges"
F_CLUSTERIP = shared.const("LB_SVC_F_CLUSTERIP")
F_AFFINITY = shared.const("LB_SVC_F_AFFINITY")
F_DROP = shared.const("LB_SVC_F_DROP")
F_ETP_LOCAL = shared.const("LB_SVC_F_ETP_LOCAL")
F_TWO_SCOPES = shared.const("LB_SVC_F_TWO_SCOPES")
F_SOURCE_RANGES = shared.const("LB_SVC_F_SOURCE_RANGES")
F_DRAINING = shared.const("LB_BACKEND_F_DRAINING")
KIND_FLAGS = {
    FrontendKind.CLUSTER_IP: F_CLUSTERIP,
    FrontendKind.NODE_PORT: shared.const("LB_SVC_F_NODEPORT"),
    FrontendKind.EXTERNAL_IP: shared.const("LB_SVC_F_EXTERNAL_IP"),
    FrontendKind.LOAD_BALANCER: shared.const("LB_SVC_F_LOADBALANCER"),
}
EXTERNAL, INTERNAL = shared.const("LB_SCOPE_EXTERNAL"), shared.const("LB_SCOPE_INTERNAL")
F_MAGLEV = shared.const("LB_SVC_F_MAGLEV")
MAX_SLOTS = 0xFFFF   # lb4_service_value.count and lb4_service_key.backend_slot are u16
RANGE_PRESENT = b"\x01"


@dataclass(frozen=True)
class ProgrammedService:
    frontend: Frontend
    service_id: int
    backend_ids: tuple[int, ...]   # slot i+1 holds backend_ids[i]
    affinity_timeout: int = 0
    flags: int = F_CLUSTERIP
    internal_ids: tuple[int, ...] | None = None    # the internal scope's slots (LB_SVC_F_TWO_SCOPES)
    source_ranges: frozenset[str] = frozenset()    # lb4_source_ranges entries of service_id


def service_flags(entry: ServiceEntry) -> int:
    """lb4_service_value.flags of a desired frontend (both scopes' slot 0 carry them)."""
    flags = KIND_FLAGS[entry.kind]
    if entry.affinity_timeout:
        flags |= F_AFFINITY
    if entry.drop_without_backends:
        flags |= F_DROP
    if entry.internal_backends is not None:
        flags |= F_ETP_LOCAL | F_TWO_SCOPES
    if entry.source_ranges:
        flags |= F_SOURCE_RANGES
    if entry.maglev_table_size:
        flags |= F_MAGLEV
    return flags


class IdAllocator:
    """Smallest free id in 1..limit-1 (0 means "none" in the maps)."""

    def __init__(self, limit: int, name: str):
        self.limit = limit
        self.name = name
        self.used: set[int] = set()
        self._next = 1

    def take(self, value: int) -> None:
        self.used.add(value)

    def allocate(self) -> int:
        for _ in range(self.limit):
            candidate = self._next
            self._next = self._next + 1 if self._next + 1 < self.limit else 1
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate
        raise OSError(28, f"no free {self.name} id: all {self.limit - 1} in use (raise the map size)")

    def release(self, value: int) -> None:
        self.used.discard(value)


def _frontend(address: bytes, dport: int, proto: int) -> Frontend:
    return Frontend(decode.address(address), decode.port(dport), decode.PROTOCOLS[proto])


def _order(f: Frontend | Backend) -> tuple:
    return f.address, f.port, f.protocol.value


def _frontend_key(f: Frontend, slot: int = 0, scope: int = EXTERNAL) -> bytes:
    return shared.service_key(f.address, f.port, f.protocol.number, slot, scope)


class Reconciler:
    def __init__(self, maps: dict, max_services: int, max_backends: int):
        self.maps = maps
        self.max_services = max_services
        self.max_backends = max_backends
        # service id -> "ns/name:port" of what is programmed (`lbctl dump maps`), kept by each
        # sync; names_version moves whenever it changes
        self.names: dict[int, str] = {}
        self.names_version = 0
        self.restore()

    # --- state recovered from the maps ----------------------------------------------------------

    def restore(self) -> None:
        """Rebuilds the mirror from the maps: what a restarted agent finds is what it keeps.

        Entries lbctl cannot have written (a protocol it does not program) are remembered as
        junk, deleted by the next sync once nothing reachable names them."""
        self.backend_ids: dict[Backend, int] = {}
        self.backend_of: dict[int, Backend] = {}     # the reverse of backend_ids
        self.backend_flags: dict[int, int] = {}
        self.service_ids = IdAllocator(self.max_services, "service")
        self.backend_alloc = IdAllocator(self.max_backends, "backend")
        self.services: dict[Frontend, ProgrammedService] = {}
        self._junk_backends: list[int] = []
        self._junk_keys: list[bytes] = []
        for key, value in self.maps[BACKENDS].items():
            backend_id = decode.u32(key)[0]
            address, port, proto, flags = decode.backend(value)
            self.backend_alloc.take(backend_id)
            if proto not in decode.PROTOCOLS:
                self._junk_backends.append(backend_id)
                continue
            backend = Backend(decode.address(address), decode.port(port), decode.PROTOCOLS[proto])
            self.backend_ids[backend] = backend_id
            self.backend_of[backend_id] = backend
            self.backend_flags[backend_id] = flags
        frontends, slots, junk = decode.services(self.maps[SERVICES].items(), F_AFFINITY)
        self._junk_keys.extend(junk)
        ranges: dict[int, set[str]] = {}
        self._junk_ranges: list[bytes] = []
        if SOURCE_RANGES in self.maps:
            for key, _ in self.maps[SOURCE_RANGES].items():
                service_id, cidr = decode.source_range(key)
                ranges.setdefault(service_id, set()).add(cidr)
        no_slots: dict[int, int] = {}
        internal_kept: set[tuple] = set()
        for raw, (service_id, count, affinity, flags) in frontends.items():
            if raw[3] != EXTERNAL:
                continue
            fe = _frontend(*raw[:3])
            have = slots.get(raw, no_slots)
            ids = tuple(have.get(i, 0) for i in range(1, count + 1))
            internal_ids = None
            inner = (*raw[:3], INTERNAL)
            if flags & F_TWO_SCOPES and inner in frontends:
                internal_kept.add(inner)
                inner_have = slots.get(inner, no_slots)
                internal_ids = tuple(inner_have.get(i, 0) for i in range(1, frontends[inner][1] + 1))
            own_ranges = frozenset(ranges.pop(service_id, ())) if flags & F_SOURCE_RANGES else frozenset()
            self.services[fe] = ProgrammedService(fe, service_id, ids, affinity, flags, internal_ids, own_ranges)
            self.service_ids.take(service_id)
        # Ranges no flagged frontend checks: unreachable, deleted by the next sync.
        for service_id, cidrs in ranges.items():
            self._junk_ranges += [shared.source_range_key(service_id, c) for c in sorted(cidrs)]
        # Slots beyond a frontend's count, or without a frontend, and internal scopes no frontend
        # flags, are leftovers of an interrupted sync: remember them so the next sync deletes them.
        self._stale_slots = []
        for raw in frontends.keys() - internal_kept:
            if raw[3] == INTERNAL:
                self._stale_slots.append((_frontend(*raw[:3]), 0, INTERNAL))
        for raw, have in slots.items():
            count = frontends[raw][1] if raw in frontends and (raw[3] == EXTERNAL or raw in internal_kept) else 0
            if max(have) > count:
                fe = _frontend(*raw[:3])
                self._stale_slots += [(fe, slot, raw[3]) for slot in have if slot > count]
        if AFFINITY in self.maps:   # left by a sync that failed before it could drop them
            in_use = {p.service_id for p in self.services.values()}
            self._forget_affinity(lambda service_id: service_id not in in_use)
        self.maglev = maglev.Tables(self.maps.get(maglev.MAGLEV))
        self.dirty = False
        self._indexed = False     # the next sync is a full pass, which builds the indexes below
        self._slot_refs: Counter[int] = Counter()         # backend id -> slots naming it
        self._draining_of: dict[Frontend, tuple[Backend, ...]] = {}   # desired, per frontend
        self._drain_refs: Counter[Backend] = Counter()    # backend -> frontends draining it
        self._retry: set[Frontend] = set()                # desired but not programmed (errors)
        self.visited: int | None = None                   # frontends the last sync looked at

    # --- the sync ----------------------------------------------------------------------------------

    def sync(self, desired: DesiredState, changed: Collection[Frontend] | None = None) -> SyncResult:
        """Makes the maps hold `desired`. Any failure leaves the maps valid (never a
        half-made service) and makes the next sync start from a fresh read of the maps.

        ``changed``: the frontends whose desired entry differs from the `desired` of the last
        sync (``DesiredCache.update`` says which); only those are compared and written, with
        the ones a previous sync could not program. None: every frontend is compared (a full
        pass, also the first after a restore, a resync or a failure, whatever ``changed``)."""
        result = SyncResult()
        try:
            if self.dirty:
                log.warning("previous sync failed: re-reading the maps for a full resync")
                self.restore()
            if changed is not None and self._indexed:
                self._sync(desired, result, set(changed) | self._retry)
            else:
                self._sync(desired, result)
        except Exception as exc:
            self._failed(result, exc)
        return result

    def resync(self, desired: DesiredState) -> SyncResult:
        """Re-reads the maps and repairs whatever differs from `desired` (entries deleted or
        changed by someone else, a write lost in a crash): the periodic full resync."""
        try:
            self.restore()
        except Exception as exc:
            result = SyncResult()
            self._failed(result, exc)
            return result
        return self.sync(desired)

    def _failed(self, result: SyncResult, exc: Exception) -> None:
        self.dirty = True
        if isinstance(exc, OSError):
            result.errors.append(str(exc))
            log.error("sync failed, will resync from the maps: %s", exc)
        else:   # not the kernel refusing: a bug, logged with its traceback
            result.errors.append(f"{type(exc).__name__}: {exc}")
            log.exception("sync failed (%s), will resync from the maps", type(exc).__name__)

    def _sync(self, desired: DesiredState, result: SyncResult, visit: set[Frontend] | None = None) -> None:
        """The writes, in their order. ``visit``: the only frontends that may differ (an
        incremental sync); None: all of them."""
        services, backends = self.maps[SERVICES], self.maps[BACKENDS]
        wanted_services = desired.services
        removed: Collection[Frontend]
        looked_at: Collection[Frontend]
        if visit is None:
            removed = self.services.keys() - wanted_services.keys()
            looked_at = wanted_services.keys()
        else:
            removed = {fe for fe in visit if fe in self.services and fe not in wanted_services}
            looked_at = {fe for fe in visit if fe in wanted_services}
        self.visited = len(looked_at) + len(removed)
        # backend ids whose slot or draining references may change: step 4 looks at them only
        touched_ids: set[int] = set()

        # 0. slots no frontend counts (an interrupted sync), entries of protocols lbctl does not
        #    program (not lbctl's): unreachable, so safe to drop first
        for fe, slot, scope in sorted(self._stale_slots, key=lambda s: s[1]):   # slot 0 first
            services.delete(_frontend_key(fe, slot, scope))
        self._stale_slots = []
        for key in self._junk_keys:
            services.delete(key)
        self._junk_keys = []
        if self._junk_ranges:
            self.maps[SOURCE_RANGES].delete_batch(self._junk_ranges)
            self._junk_ranges = []

        # 1. services no longer wanted, first, so that what they free (map room, ids) serves
        #    the additions below: frontend first (no new packet selects it), then its slots
        released = []
        for fe in sorted(removed, key=_order):
            gone = self.services[fe]
            services.delete(_frontend_key(fe, 0))
            for slot in range(1, len(gone.backend_ids) + 1):
                services.delete(_frontend_key(fe, slot))
            self._delete_internal(fe, gone)
            if gone.source_ranges:
                self.maps[SOURCE_RANGES].delete_batch(
                    [shared.source_range_key(gone.service_id, c) for c in sorted(gone.source_ranges)])
            del self.services[fe]
            self._count_slots(gone, -1, touched_ids)
            self.service_ids.release(gone.service_id)
            released.append(gone.service_id)
            result.removed += 1
        if released:
            self._forget_affinity(set(released).__contains__)

        # 2. backends the desired services need; a service whose backends cannot all get an id
        #    (the backend map is full) is left as it is, and said so
        new_backends = []
        needed = desired.backends if visit is None else frozenset(
            b for fe in looked_at for e in (wanted_services[fe],) for b in (*e.backends, *(e.internal_backends or ())))
        for backend in sorted((b for b in needed if b not in self.backend_ids), key=_order):
            try:
                new_backends.append((backend, self.backend_alloc.allocate()))
            except OSError as exc:
                result.errors.append(str(exc))
                break
        self._zero(BACKEND_STATS, [i for _, i in new_backends])
        backends.update_batch([(shared.u32(i), shared.backend_value(b.address, b.port, b.protocol.number))
                               for b, i in new_backends])
        for backend, backend_id in new_backends:
            self.backend_ids[backend] = backend_id
            self.backend_of[backend_id] = backend
            self.backend_flags[backend_id] = 0
            touched_ids.add(backend_id)
        result.backends_added += len(new_backends)

        # 3. new and changed services: ranges they gain, internal scopes (slots, then slot 0),
        #    all their slots, then their frontends, then surplus slots, internal scopes no
        #    longer flagged and ranges no longer wanted (batched per step, so each frontend is
        #    still written after what it makes reachable)
        range_writes: list[tuple[bytes, bytes]] = []
        inner_slot_writes: list[tuple[bytes, bytes]] = []
        inner_frontend_writes: list[tuple[bytes, bytes]] = []
        slot_writes: list[tuple[bytes, bytes]] = []
        frontend_writes: list[tuple[bytes, bytes]] = []
        surplus: list[bytes] = []
        range_deletes: list[bytes] = []
        new_ids: list[int] = []
        programmed: list[ProgrammedService] = []
        maglev_writes: list[tuple[int, ServiceEntry]] = []
        retry: set[Frontend] = set()    # every frontend of the last retry set is visited
        for fe in sorted(looked_at, key=_order):
            entry = wanted_services[fe]
            flags = service_flags(entry)
            old = self.services.get(fe)
            wanted = (*entry.backends, *(entry.internal_backends or ()))
            missing = [b for b in wanted if b not in self.backend_ids]
            largest = max(len(entry.backends), len(entry.internal_backends or ()))
            if missing or largest > MAX_SLOTS:
                why = (f"{len(missing)} backend(s) got no id" if missing
                       else f"{largest} endpoints, the datapath takes {MAX_SLOTS}")
                result.errors.append(f"{entry.name} ({fe}): {why}; "
                                     f"{'left as it was' if old else 'not programmed'}")
                retry.add(fe)
                continue
            ids = tuple(self.backend_ids[b] for b in entry.backends)
            internal_ids = (None if entry.internal_backends is None
                            else tuple(self.backend_ids[b] for b in entry.internal_backends))
            ranges = frozenset(entry.source_ranges)
            if old is not None and (old.backend_ids, old.internal_ids, old.affinity_timeout, old.flags,
                                    old.source_ranges) == (ids, internal_ids, entry.affinity_timeout,
                                                           flags, ranges) and not self.maglev.stale(
                                                               old.service_id, entry, self.backend_ids):
                continue
            if old is None:
                try:
                    service_id = self.service_ids.allocate()
                except OSError as exc:
                    result.errors.append(f"{entry.name} ({fe}): {exc}; not programmed")
                    retry.add(fe)
                    continue
                new_ids.append(service_id)
                result.added += 1
            else:
                service_id = old.service_id
                result.updated += 1
            old_ranges = old.source_ranges if old else frozenset()
            range_writes += [(shared.source_range_key(service_id, c), RANGE_PRESENT)
                             for c in sorted(ranges - old_ranges)]
            range_deletes += [shared.source_range_key(service_id, c) for c in sorted(old_ranges - ranges)]
            head = dict(service_id=service_id, flags=flags, affinity_timeout=entry.affinity_timeout)
            old_inner = old.internal_ids if old and old.internal_ids is not None else ()
            if internal_ids is not None:
                inner_slot_writes += self._slot_writes(fe, internal_ids, old_inner, service_id, INTERNAL)
                inner_frontend_writes.append((_frontend_key(fe, 0, INTERNAL),
                                              shared.service_value(count=len(internal_ids), **head)))
                surplus += [_frontend_key(fe, slot, INTERNAL)
                            for slot in range(len(internal_ids) + 1, len(old_inner) + 1)]
            old_ids = old.backend_ids if old else ()
            slot_writes += self._slot_writes(fe, ids, old_ids, service_id, EXTERNAL)
            frontend_writes.append((_frontend_key(fe, 0), shared.service_value(count=len(ids), **head)))
            surplus += [_frontend_key(fe, slot) for slot in range(len(ids) + 1, len(old_ids) + 1)]
            if internal_ids is None and old is not None and old.internal_ids is not None:
                surplus += [_frontend_key(fe, slot, INTERNAL) for slot in range(len(old.internal_ids) + 1)]
            maglev_writes.append((service_id, entry))
            programmed.append(ProgrammedService(fe, service_id, ids, entry.affinity_timeout, flags,
                                                internal_ids, ranges))
        self._zero(SERVICE_STATS, new_ids)
        for service_id, entry in maglev_writes:   # tables before the frontends that name them
            self.maglev.write(service_id, entry, self.backend_ids)
        if range_writes or range_deletes:
            if SOURCE_RANGES not in self.maps:
                raise OSError(2, f"no {SOURCE_RANGES} map to hold loadBalancerSourceRanges")
            self.maps[SOURCE_RANGES].update_batch(range_writes)
        services.update_batch(inner_slot_writes)
        services.update_batch(inner_frontend_writes)
        services.update_batch(slot_writes)
        services.update_batch(frontend_writes)
        for key in surplus:
            services.delete(key)
        if range_deletes:
            self.maps[SOURCE_RANGES].delete_batch(range_deletes)
        for p in programmed:   # the mirror follows the maps, once they hold it
            old = self.services.get(p.frontend)
            if old is not None:
                self._count_slots(old, -1, touched_ids)
            self.services[p.frontend] = p
            self._count_slots(p, +1, touched_ids)
        # tables no Maglev frontend names any more
        if visit is None:
            self.maglev.prune(self.services.values())
        elif self.maglev.have:
            self.maglev.prune([self.services[fe] for fe in looked_at if fe in self.services],
                              {*released, *(p.service_id for p in programmed)})

        # 4. backends: those in no slot but still draining established flows are flagged (no
        #    new flow, no affinity); the rest no slot names any more are deleted (their flows
        #    choose again)
        if visit is None:
            self._draining_of = {fe: e.draining for fe, e in wanted_services.items() if e.draining}
            self._drain_refs = Counter(b for d in self._draining_of.values() for b in d)
            self._slot_refs = Counter(i for s in self.services.values()
                                      for i in (*s.backend_ids, *(s.internal_ids or ())))
            candidates = sorted(self.backend_ids.items(), key=lambda kv: kv[1])
        else:
            drained: set[Backend] = set()
            for fe in visit:
                before = self._draining_of.pop(fe, ())
                now_wanted = wanted_services.get(fe)
                after = now_wanted.draining if now_wanted is not None else ()
                if after:
                    self._draining_of[fe] = after
                if before != after:
                    self._drain_refs.subtract(before)
                    self._drain_refs.update(after)
                    drained.update(before, after)
            for backend in drained:
                if self._drain_refs[backend] <= 0:
                    del self._drain_refs[backend]
            touched_ids.update(self.backend_ids[b] for b in drained if b in self.backend_ids)
            candidates = [(self.backend_of[i], i) for i in sorted(touched_ids) if i in self.backend_of]
        in_slots, draining = self._slot_refs, self._drain_refs
        for backend, backend_id in candidates:
            if not in_slots.get(backend_id) and not draining.get(backend):
                backends.delete(shared.u32(backend_id))
                del self.backend_ids[backend]
                del self.backend_of[backend_id]
                self.backend_flags.pop(backend_id, None)
                self.backend_alloc.release(backend_id)
                result.backends_removed += 1
                continue
            flags = F_DRAINING if draining.get(backend) and not in_slots.get(backend_id) else 0
            if self.backend_flags.get(backend_id) != flags:
                backends.update(shared.u32(backend_id), shared.backend_value(
                    backend.address, backend.port, backend.protocol.number, flags))
                self.backend_flags[backend_id] = flags
        for backend_id in [i for i in self._junk_backends if not in_slots.get(i)]:
            backends.delete(shared.u32(backend_id))
            self._junk_backends.remove(backend_id)
            self.backend_alloc.release(backend_id)
        self._retry = retry
        self._indexed = True
        if visit is None:
            names = self.service_names(desired)
            if names != self.names:
                self.names, self.names_version = names, self.names_version + 1
        else:
            renamed = bool(released)
            for service_id in released:
                self.names.pop(service_id, None)
            for fe in looked_at:
                now = self.services.get(fe)
                if now is not None and self.names.get(now.service_id) != wanted_services[fe].name:
                    self.names[now.service_id] = wanted_services[fe].name
                    renamed = True
            if renamed:
                self.names_version += 1

    def _count_slots(self, p: ProgrammedService, delta: int, touched: set[int]) -> None:
        """The slot references of one programmed frontend, added (+1) or taken away (-1)."""
        for backend_id in (*p.backend_ids, *(p.internal_ids or ())):
            count = self._slot_refs[backend_id] + delta
            if count > 0:
                self._slot_refs[backend_id] = count
            else:
                del self._slot_refs[backend_id]
            touched.add(backend_id)

    @staticmethod
    def _slot_writes(fe: Frontend, ids: tuple[int, ...], old_ids: tuple[int, ...], service_id: int,
                     scope: int) -> list[tuple[bytes, bytes]]:
        """The slots of one scope that differ from what it held."""
        return [(_frontend_key(fe, slot, scope), shared.service_value(backend_id=backend_id, service_id=service_id))
                for slot, backend_id in enumerate(ids, start=1)
                if slot > len(old_ids) or old_ids[slot - 1] != backend_id]

    def _delete_internal(self, fe: Frontend, gone: ProgrammedService) -> None:
        """A removed frontend's internal scope: its slot 0, then its slots (unreachable already)."""
        if gone.internal_ids is None:
            return
        for slot in range(len(gone.internal_ids) + 1):
            self.maps[SERVICES].delete(_frontend_key(fe, slot, INTERNAL))

    def _forget_affinity(self, released: Callable[[int], bool]) -> None:
        """Drops affinity entries of service ids no frontend uses (`released(id)` is true):
        the id may serve another service next, whose clients must not inherit them. One
        batched walk of the map."""
        if AFFINITY not in self.maps:
            return
        affinity = self.maps[AFFINITY]
        stale = [key for key, _ in affinity.items() if released(decode.u32(key, decode.AFFINITY_SERVICE_ID)[0])]
        if stale:
            affinity.delete_batch(stale)

    def _zero(self, stats_map: str, indexes: list[int]) -> None:
        """Counters of a newly allocated id start at zero (the id may have served before)."""
        if stats_map in self.maps and indexes:
            zero = shared.new("lb_stats")
            self.maps[stats_map].update_batch([(shared.u32(i), zero) for i in indexes])

    # --- for dumps ----------------------------------------------------------------------------------

    def service_names(self, desired: DesiredState) -> dict[int, str]:
        """service id -> "ns/name:port", for `lbctl dump maps`."""
        return {self.services[fe].service_id: entry.name
                for fe, entry in desired.services.items() if fe in self.services}


def entry(name: str, frontend: Frontend, *backends: Backend) -> ServiceEntry:
    """Shorthand used by tests and the bench."""
    return ServiceEntry(frontend, name, tuple(sorted(backends)))
