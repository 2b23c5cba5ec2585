"""kube-proxy's IPVS mode behind lbctl's Mode interface: ``lbctl run --mode ipvs``.

Every sync diffs the desired state (``desired.py``, ``rules.py``) against what the kernel
reports through ``IpvsKernel`` (``kernel.py``) and writes the difference; ``cleanup`` removes
what kube-proxy's IPVS mode makes, ``collect`` reads it back.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from lbctl.datapath.base import DatapathError, SyncResult, cleanup_other_modes
from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.ipvs.desired import (
    DesiredVirtualServer,
    IpsetSpec,
    IpvsConfig,
    IpvsDesired,
    RealServer,
    VirtualServer,
    desired_ipvs,
    graceful_termination_needed,
    ipset_specs,
    virtual_server_state,
)
from lbctl.datapath.kubeproxy.ipvs.kernel import IpvsKernel, LinuxKernel
from lbctl.datapath.kubeproxy.ipvs.rules import IPTABLES_CHAINS, JUMP_RULES, ipvs_sysctls, render_ipvs_iptables
from lbctl.model.objects import Problem, ServicePortInfo

log = logging.getLogger("lbctl.ipvs")


class IpvsMode:
    """kube-proxy's IPVS mode behind lbctl's Mode interface (see lbctl.datapath.base).

    Every sync reads the kernel and makes it match the desired state, in an order in which no
    packet meets a half-made service:

      1. the dummy device and all ipsets exist; new ipset members are added (so a virtual
         server's masquerade and filter entries exist before it goes live);
      2. the constant iptables rules are restored and the jumps to them ensured;
      3. per virtual server: created or updated, real servers added, weights restored, stale real
         servers drained (TCP with connections: weight 0) or deleted; only then is its address
         bound to kube-ipvs0 (IPVS sees a VIP's packets only once the VIP is local);
      4. stale addresses are unbound first (no new packets reach IPVS), then stale virtual servers
         deleted, then stale ipset members.

    A failed write is reported in SyncResult.errors and leaves the rest going; the next sync
    reads the kernel again and converges (``needs_retry``). SyncResult counts virtual servers in
    added/updated/removed and real servers in backends_added/backends_removed (a real server
    starting to drain counts as removed); a sync that changes nothing but ipset members (say,
    loadBalancerSourceRanges) reports each changed set as an update, so it is not silent.
    """

    name = "ipvs"

    def __init__(self, cfg: IpvsConfig = IpvsConfig(), kernel: IpvsKernel | None = None,
                 clock: Callable[[], float] = time.monotonic, ebpf_pin_dir: str | None = None):
        self.cfg = cfg
        self.kernel = kernel
        # Switching modes: with a pin dir (what `lbctl run` passes), start() removes the other
        # modes' objects once it knows IPVS mode can run. Tests on a fake kernel pass none.
        self.ebpf_pin_dir = ebpf_pin_dir
        self.clock = clock
        self.ports: tuple[ServicePortInfo, ...] = ()
        self.desired: IpvsDesired | None = None
        self.problems: tuple[Problem, ...] = ()
        self.dirty = False
        self.draining: set[tuple[str, str]] = set()     # (virtual server, real server) at weight 0
        self._last_sync = 0.0

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Checks the kernel can do IPVS mode at all (DatapathError saying what is missing) and
        sets kube-proxy's sysctls. State left by a previous run is not restored into memory: every
        sync diffs against what the kernel holds, so a restart moves no real server."""
        if self.kernel is None:
            self.kernel = LinuxKernel.open(require=True)
        kernel = self.kernel
        try:
            created = kernel.ensure_dummy(self.cfg.dummy_device)
        except OSError as exc:
            raise DatapathError(
                f"cannot create the dummy device {self.cfg.dummy_device} that IPVS mode binds service "
                f"addresses to ({exc.strerror or exc}): use a kernel with CONFIG_DUMMY, or --mode "
                f"ebpf|iptables|nftables") from exc
        for name, value in ipvs_sysctls(self.cfg):
            try:
                kernel.set_sysctl(name, value)
            except OSError as exc:
                log.warning("%s", exc.strerror or exc)
        if self.ebpf_pin_dir is not None:
            cleanup_other_modes(self.name, self.ebpf_pin_dir)
        log.info("IPVS mode started (%s %s)", self.cfg.dummy_device, "created" if created else "found")

    def stop(self, detach: bool) -> None:
        if self.kernel is None:
            return
        if detach:
            removed = self.cleanup(kernel=self.kernel, cfg=self.cfg)
            log.info("removed %d IPVS-mode object(s)", len(removed))
        else:
            log.info("exiting; virtual servers, %s, ipsets and iptables rules stay (`lbctl cleanup` "
                     "removes them)", self.cfg.dummy_device)
        self.kernel.close()

    @property
    def needs_retry(self) -> bool:
        """A failed sync, or real servers draining (checked every graceful_check_interval)."""
        if self.dirty:
            return True
        return bool(self.draining) and self.clock() - self._last_sync >= self.cfg.graceful_check_interval

    @property
    def _kernel(self) -> IpvsKernel:
        """The kernel start() opened (or the one given); syncing before start() is a bug."""
        if self.kernel is None:
            raise RuntimeError("IpvsMode.sync() called before start()")
        return self.kernel

    # --- the sync ------------------------------------------------------------------------------------

    def sync(self, ports: Sequence[ServicePortInfo] | None = None) -> SyncResult:
        """Programs ``ports``; with None, syncs the last ones again (retry, draining check)."""
        if ports is not None:
            self.ports = tuple(ports)
        result = SyncResult()
        self._last_sync = self.clock()
        kernel, cfg, family = self._kernel, self.cfg, self.cfg.family
        try:
            node_addresses = kernel.node_addresses(cfg.dummy_device, family)
        except OSError as exc:
            node_addresses = list(cfg.node_ips)
            self._error(result, f"reading node addresses (using {node_addresses}): {exc.strerror or exc}")
        desired = desired_ipvs(self.ports, cfg, node_addresses)
        self.desired, self.problems = desired, desired.problems
        specs = {spec.name: spec for spec in ipset_specs(family)}

        try:
            kernel.ensure_dummy(cfg.dummy_device)
            actual_sets = {name: kernel.list_entries(name) for name in self._ensure_ipsets(specs)}
        except OSError as exc:
            # Without the device or the sets nothing below can be right: retry from scratch.
            self._error(result, str(exc.strerror or exc))
            self.dirty = True
            return result
        sets_changed = self._add_entries(desired, specs, actual_sets, result)
        self._restore_iptables(desired, result)
        bound = self._bound_addresses(result)
        live = self._sync_virtual_servers(desired, bound, result)
        self._remove_stale(desired, bound, live, result)
        sets_changed |= self._remove_entries(desired, specs, actual_sets, result)
        if sets_changed and not result.changed:
            result.updated = len(sets_changed)
        self.dirty = bool(result.errors)
        return result

    def _error(self, result: SyncResult, message: str) -> None:
        result.errors.append(message)
        log.error("%s", message)

    def _ensure_ipsets(self, specs: Mapping[str, IpsetSpec]) -> list[str]:
        existing = self._kernel.list_ipsets()
        for name, spec in specs.items():
            if name not in existing:
                self._kernel.create_ipset(spec)
        return list(specs)

    def _add_entries(self, desired: IpvsDesired, specs: Mapping[str, IpsetSpec], actual_sets: dict[str, set[str]],
                     result: SyncResult) -> set[str]:
        """Adds missing members; returns the names of the sets it changed."""
        changed = set()
        for name, members in desired.ipsets.items():
            for entry in sorted(members - actual_sets[name]):
                try:
                    self._kernel.add_entry(specs[name], entry)
                    actual_sets[name].add(entry)
                    changed.add(name)
                except OSError as exc:
                    self._error(result, f"ipset {name}: {exc.strerror or exc}")
        return changed

    def _remove_entries(self, desired: IpvsDesired, specs: Mapping[str, IpsetSpec],
                        actual_sets: dict[str, set[str]], result: SyncResult) -> set[str]:
        changed = set()
        for name, members in desired.ipsets.items():
            for entry in sorted(actual_sets[name] - members):
                try:
                    self._kernel.del_entry(specs[name], entry)
                    changed.add(name)
                except OSError as exc:
                    self._error(result, f"ipset {name}: {exc.strerror or exc}")
        return changed

    def _restore_iptables(self, desired: IpvsDesired, result: SyncResult) -> None:
        family = desired.family
        try:
            self._kernel.restore_iptables(render_ipvs_iptables(desired, self.cfg), family)
            for jump in JUMP_RULES:
                self._kernel.ensure_rule(family, jump.table, jump.chain, jump.args)
        except OSError as exc:
            self._error(result, f"iptables: {exc.strerror or exc}")

    def _bound_addresses(self, result: SyncResult) -> set[str]:
        """The dummy's addresses of our family (the other family's proxier owns the rest), IPv6
        link-local ones aside. Loopback ones count: an external IP may be 127.0.0.1."""
        try:
            found = (common.parse_ip_sloppy(a) for a in self._kernel.list_addresses(self.cfg.dummy_device))
            return {str(ip) for ip in found if ip is not None and ip.version == self.cfg.family
                    and not (ip.version == 6 and ip.is_link_local)}
        except OSError as exc:
            self._error(result, str(exc.strerror or exc))
            return set()

    def _sync_virtual_servers(self, desired: IpvsDesired, bound: set[str], result: SyncResult) -> set:
        """Step 3. Returns the keys of the kernel's virtual servers of this family, after the sync."""
        try:
            actual = {vs.key: vs for vs in self._kernel.list_services() if vs.family == desired.family}
        except OSError as exc:
            self._error(result, f"IPVS: {exc.strerror or exc}")
            return set()
        draining: set[tuple[str, str]] = set()
        for key, want in desired.virtual_servers.items():
            try:
                self._sync_virtual_server(want, actual.get(key), draining, result)
            except OSError as exc:
                self._error(result, f"{want.name}: {exc.strerror or exc}")
                continue
            actual[key] = want.virtual_server
            address = want.virtual_server.address
            if want.bind and address not in bound:
                try:
                    self._kernel.add_address(self.cfg.dummy_device, address)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:     # EnsureAddressBind: already there is fine
                        self._error(result, f"{want.name}: {exc.strerror or exc}")
                        continue
                bound.add(address)
        self.draining = draining
        return set(actual)

    def _sync_virtual_server(self, want: DesiredVirtualServer, have: VirtualServer | None,
                             draining: set, result: SyncResult) -> None:
        vs, kernel = want.virtual_server, self._kernel
        changed = False
        if have is None:
            kernel.add_service(vs)
            result.added += 1
            current: dict[tuple, RealServer] = {}
        else:
            if have != vs:                      # scheduler, persistence or timeout changed
                kernel.update_service(vs)
                changed = True
            current = {rs.key: rs for rs in kernel.list_dests(vs)}
        wanted = {rs.key: rs for rs in want.real_servers}
        for key in sorted(wanted.keys() - current.keys()):
            kernel.add_dest(vs, wanted[key])
            result.backends_added += 1
        for key in sorted(wanted.keys() & current.keys()):
            if current[key].weight != wanted[key].weight:
                # Draining before, or left at weight 0 by a previous run: in rotation again.
                # Deviation: kube-proxy deletes and re-adds a draining one, cutting its connections.
                kernel.update_dest(vs, wanted[key])
                changed = True
        for key in sorted(current.keys() - wanted.keys()):
            if self._retire(vs, current[key], result):
                draining.add((str(vs), str(current[key])))
        if changed:
            result.updated += 1

    def _retire(self, vs: VirtualServer, rs: RealServer, result: SyncResult) -> bool:
        """GracefulDeleteRS: a TCP real server with connections is set to weight 0 and kept until
        they are gone; anything else is deleted now. True while it drains."""
        if graceful_termination_needed(vs.protocol) and rs.active_conns + rs.inactive_conns > 0:
            if rs.weight != 0:
                self._kernel.update_dest(vs, replace(rs, weight=0))
                result.backends_removed += 1
                log.info("%s: draining real server %s (%d active, %d inactive connections)",
                         vs, rs, rs.active_conns, rs.inactive_conns)
            return True
        self._kernel.del_dest(vs, rs)
        if rs.weight != 0:
            result.backends_removed += 1
        return False

    def _remove_stale(self, desired: IpvsDesired, bound: set[str], live: set, result: SyncResult) -> None:
        """Step 4: stale addresses, then stale virtual servers of our family (cleanLegacyService),
        leaving --ipvs-exclude-cidrs alone."""
        for address in sorted(bound - desired.addresses):
            try:
                self._kernel.del_address(self.cfg.dummy_device, address)
            except OSError as exc:
                self._error(result, f"{self.cfg.dummy_device}: {exc.strerror or exc}")
        excluded = [c for c in (common.parse_cidr_sloppy(x) for x in self.cfg.exclude_cidrs) if c is not None]
        for key in sorted(live - desired.virtual_servers.keys()):
            vs = VirtualServer(*key)
            ip = ipaddress.ip_address(vs.address)
            if any(ip.version == c.version and ip in c for c in excluded):
                continue
            try:
                self._kernel.del_service(vs)
                result.removed += 1
            except OSError as exc:
                self._error(result, f"{vs}: {exc.strerror or exc}")

    # --- reading the kernel back ---------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """What the kernel holds for IPVS mode, as plain data (``ipvsadm -Ln`` + ``ipset list``)."""
        if self.kernel is None:
            self.kernel = LinuxKernel.open(require=True)
        return collect(self.kernel, self.cfg)

    # --- the end ---------------------------------------------------------------------------------------

    @classmethod
    def cleanup(cls, kernel: IpvsKernel | None = None, cfg: IpvsConfig = IpvsConfig()) -> list[str]:
        """kube-proxy's cleanupLeftovers: all IPVS virtual servers (kube-proxy flushes IPVS
        whole), the dummy device, the jump rules, the chains, then the ipsets (which cannot go
        while rules reference them). Works on kernels without IPVS (nothing to flush there)."""
        removed: list[str] = []
        if kernel is not None:
            _cleanup(kernel, cfg, removed)
            return removed
        own = LinuxKernel.open(require=False)
        try:
            _cleanup(own, cfg, removed)
        finally:
            own.close()
        return removed


T = TypeVar("T")


def _cleanup(kernel: IpvsKernel, cfg: IpvsConfig, removed: list[str]) -> None:
    def attempt(what: str, fn: Callable[..., T], *args: object) -> tuple[bool, T | None]:
        """(succeeded, value): cleanup goes on past failures, logging each."""
        try:
            return True, fn(*args)
        except OSError as exc:
            log.warning("cleanup: %s: %s", what, exc.strerror or exc)
            return False, None

    if kernel.has_ipvs:
        for vs in attempt("listing IPVS services", kernel.list_services)[1] or []:
            if attempt(str(vs), kernel.del_service, vs)[0]:
                removed.append(f"IPVS virtual server {vs}")
    if attempt(cfg.dummy_device, kernel.delete_dummy, cfg.dummy_device)[1]:
        removed.append(f"dummy device {cfg.dummy_device}")
    for family in (4, 6):
        binary = "ip6tables" if family == 6 else "iptables"
        for jump in JUMP_RULES:
            if attempt("jump rule", kernel.delete_rule, family, jump.table, jump.chain, jump.args)[1]:
                removed.append(f"{binary} -t {jump.table} {jump.chain} rule -j {jump.target}")
        for table in ("nat", "filter"):
            present = attempt(f"{table} chains", kernel.list_chains, family, table)[1] or set()
            ours = [c for t, c in IPTABLES_CHAINS if t == table and c in present]
            if ours and attempt(f"{table} chains", kernel.delete_chains, family, table, ours)[0]:
                removed += [f"{binary} -t {table} chain {c}" for c in ours]
    present = attempt("listing ipsets", kernel.list_ipsets)[1] or set()
    for family in (4, 6):
        for spec in ipset_specs(family):
            if spec.name in present and attempt(spec.name, kernel.destroy_ipset, spec.name)[0]:
                removed.append(f"ipset {spec.name}")


def collect(kernel: IpvsKernel, cfg: IpvsConfig) -> dict[str, Any]:
    """The kernel's IPVS-mode state as JSON-able data."""
    virtual_servers = [virtual_server_state(vs, kernel.list_dests(vs))
                       for vs in (kernel.list_services() if kernel.has_ipvs else [])]
    try:
        addresses = sorted(kernel.list_addresses(cfg.dummy_device))
    except OSError:
        addresses = []
    present = kernel.list_ipsets()
    ipsets = {spec.name: sorted(kernel.list_entries(spec.name))
              for spec in ipset_specs(cfg.family) if spec.name in present}
    return {"mode": "ipvs", "device": cfg.dummy_device, "addresses": addresses,
            "virtual_servers": virtual_servers, "ipsets": ipsets}
