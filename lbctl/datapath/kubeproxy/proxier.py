"""What lbctl's iptables and nftables modes share, as kube-proxy's proxiers share ``pkg/proxy``.

* ``Proxier``: the Mode interface (see lbctl.datapath.base) around a mode's own rule writer: which
  syncs are full and which partial, what the kernel holds after the last successful sync, the
  SyncResult counters, the conntrack clean-up after each sync, and switching from other modes.
* ``Runner``: every command they run (``iptables-restore``, ``nft``, ``conntrack``) goes through
  one small interface, so that unit tests can record the commands against a fake, and kernel
  tests can run them inside a throwaway network namespace (``HostRunner(netns=...)``).
* ``node_name`` / ``primary_ipv4``: kube-proxy's defaults for --hostname-override and the node IP.
* ``stale_udp_conntrack``: the conntrack entries kube-proxy deletes after a sync, so that a UDP
  flow does not keep going to an endpoint that is gone (its best-known bug, fixed by exactly
  this), and a UDP service that gains endpoints is not blackholed by an entry made while it had
  none.
"""
from __future__ import annotations

import abc
import logging
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from lbctl.datapath.base import DEFAULT_PIN_DIR, DatapathError, SyncResult, cleanup_other_modes
from lbctl.datapath.kubeproxy import common
from lbctl.model.objects import Problem, ServicePortInfo

log = logging.getLogger("lbctl.datapath.kubeproxy")


# --- running commands --------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error(self, argv: Sequence[str]) -> str:
        """One line naming the command and what it said."""
        said = " | ".join(line for line in (self.stderr or self.stdout).strip().splitlines()
                          if "deprecated" not in line and not line.startswith("# Warning"))
        return f"`{' '.join(argv[:3])} ...` failed (exit {self.returncode}): {said or 'no output'}"


class Runner(Protocol):
    def run(self, argv: Sequence[str], input: str | None = None) -> Completed: ...


class HostRunner:
    """Runs commands on this host, or inside network namespace ``netns`` (for tests)."""

    # A full sync of 10,000 services takes iptables-restore --noflush ~45 s and nft -f ~100 s
    # on a 2-core machine (measured by `lbctl bench --modes`): the bound only catches a hung
    # command, it must not cut a slow one short (it would be retried as a full sync forever).
    def __init__(self, netns: str | None = None, timeout: float = 900.0):
        self.netns = netns
        self.timeout = timeout

    def run(self, argv: Sequence[str], input: str | None = None) -> Completed:
        full = (["ip", "netns", "exec", self.netns] if self.netns else []) + list(argv)
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True,
                                  timeout=self.timeout)
        except FileNotFoundError:
            return Completed(127, "", f"{argv[0]}: command not found (apt-get install "
                                      f"{'conntrack' if argv[0] == 'conntrack' else 'iptables nftables'})")
        except subprocess.TimeoutExpired:
            return Completed(124, "", f"{argv[0]}: no answer within {self.timeout:.0f}s")
        return Completed(proc.returncode, proc.stdout, proc.stderr)


# --- the node ----------------------------------------------------------------------------------


def node_name() -> str:
    """kube-proxy's default node name: the hostname, lower-cased."""
    return socket.gethostname().strip().lower()


def primary_ipv4() -> str | None:
    """The source address this host uses on its default route, or None without one.

    kube-proxy takes the node's InternalIP from its Node object; without an API server the
    address the kernel would pick for off-host traffic is the closest equivalent. Asking the
    routing table (``ip route get``) sends no packet.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst="1.1.1.1")
    except (OSError, NetlinkError):   # ENETUNREACH: no default route
        return None
    for route in routes:
        source = route.get_attr("RTA_PREFSRC")
        if source:
            return source
    return None


# --- stale UDP conntrack entries ----------------------------------------------------------------


def stale_udp_conntrack(previous: Sequence[ServicePortInfo], current: Sequence[ServicePortInfo],
                        node: str, family: int = 4) -> list[list[str]]:
    """The ``conntrack -D`` commands kube-proxy v1.32 runs after syncing ``previous`` -> ``current``.

    As ``pkg/proxy/conntrack`` (deleteStaleServiceConntrackEntries /
    deleteStaleEndpointConntrackEntries) does, for UDP service ports only:

    * an endpoint that was serving and is gone (or stopped serving): entries DNATed to it from
      the cluster IP, external IPs, load-balancer IPs and the node port;
    * a service port that was deleted: entries to its cluster IP;
    * a service port that had no endpoints and now has some: entries to its cluster IP, external
      and load-balancer IPs and node port, which may have been made while it had none.

    TCP entries are never touched: an established TCP connection to a removed endpoint carries on.
    """
    before = {_key(p): p for p in common.proxied_ports(previous, family, node)
              if p.view.protocol == "udp"}
    after = {_key(p): p for p in common.proxied_ports(current, family, node)
             if p.view.protocol == "udp"}
    commands: list[list[str]] = []
    ips: list[str] = []
    node_ports: list[int] = []

    for key, old in before.items():
        new = after.get(key)
        if new is None:
            ips.append(old.view.cluster_ip)
            continue
        still = {(ep.string, ep.serving) for ep in new.endpoints}
        for ep in old.endpoints:
            if ep.serving and (ep.string, True) not in still:
                view = new.view
                if view.node_port:
                    commands.append(_conntrack("--dport", str(view.node_port), "--dst-nat", ep.ip))
                for vip in (view.cluster_ip, *view.external_ips, *view.load_balancer_vips):
                    commands.append(_conntrack("--orig-dst", vip, "--dst-nat", ep.ip))

    for key, port in after.items():
        was = before.get(key)
        if port.categories.has_any and not (was is not None and was.categories.has_any):
            ips += [port.view.cluster_ip, *port.view.external_ips, *port.view.load_balancer_vips]
            if port.view.node_port:
                node_ports.append(port.view.node_port)

    commands += [_conntrack("--orig-dst", ip) for ip in dict.fromkeys(ips)]
    commands += [_conntrack("--dport", str(port)) for port in dict.fromkeys(node_ports)]
    return commands


def _key(port: common.ProxiedPort) -> tuple[str, str, str]:
    return port.view.service_key, port.view.port_name, port.view.protocol


def _conntrack(*match: str) -> list[str]:
    return ["conntrack", "-D", "-p", "udp", *match]


def delete_conntrack(runner: Runner, commands: Sequence[Sequence[str]]) -> list[str]:
    """Runs the ``conntrack -D`` commands; returns one warning per command that failed.

    conntrack exits 1 when nothing matched ("0 flow entries have been deleted"): not an error.
    """
    warnings = []
    for argv in commands:
        done = runner.run(argv)
        if not done.ok and "0 flow entries" not in done.stderr + done.stdout:
            warnings.append(done.error(argv))
    return warnings


# --- the Mode interface around a rule writer -----------------------------------------------------


class SyncFailed(Exception):
    """The kernel refused a transaction; the message names the command and what it said."""


@dataclass(frozen=True)
class ProxierOptions:
    """How lbctl runs a kube-proxy mode (not kube-proxy flags).

    ``full_sync_every``: every Nth sync is full (all chains rewritten, kube-proxy's periodic
    full resync); the others are partial. A sync after a failure is always full.
    ``ebpf_pin_dir``: where the eBPF datapath this mode replaces keeps its maps (removed at start).
    """

    full_sync_every: int = 10
    ebpf_pin_dir: str = DEFAULT_PIN_DIR


class ProxierConfig(Protocol):
    """What Proxier reads of a mode's configuration (IptablesConfig, NftablesConfig)."""

    @property
    def node_name(self) -> str: ...
    @property
    def node_ips(self) -> tuple[str, ...]: ...
    @property
    def cluster_cidr(self) -> str | None: ...


ConfigT = TypeVar("ConfigT", bound=ProxierConfig)


class Proxier(abc.ABC, Generic[ConfigT]):
    """The bookkeeping both kube-proxy modes share; subclasses write the rules.

    A subclass sets ``name`` and implements ``_check()`` (raise DatapathError if the host cannot
    run the mode), ``_apply(ports, full)`` (program the kernel in one transaction, raise
    SyncFailed on refusal), ``dump()`` and the class method ``cleanup(runner)``.
    """

    name = "kube-proxy"
    family = 4                      # lbctl runs kube-proxy's IPv4 proxier

    def __init__(self, cfg: ConfigT, options: ProxierOptions = ProxierOptions(), runner: Runner | None = None):
        self.cfg = cfg
        self.options = options
        self.runner = runner or HostRunner()
        self.desired: tuple[ServicePortInfo, ...] = ()
        self.applied: tuple[ServicePortInfo, ...] | None = None   # None: kernel state unknown
        self.problems: tuple[Problem, ...] = ()
        self.dirty = False                 # the last sync failed: retry (in full)
        self.partial_syncs = 0             # partial syncs since the last full one
        self.full_syncs = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Checks the host, then removes what the other datapath modes left on this node."""
        self._check()
        cleanup_other_modes(self.name, self.options.ebpf_pin_dir)
        log.info("%s mode started (node %s, node IPs %s, cluster CIDR %s)", self.name,
                 self.cfg.node_name, ",".join(self.cfg.node_ips) or "none",
                 self.cfg.cluster_cidr or "none: no masquerade of off-cluster traffic to cluster IPs")

    def stop(self, detach: bool) -> None:
        if detach:
            removed = self.cleanup(self.runner)
            log.info("removed %d %s-mode object(s)", len(removed), self.name)
        else:
            log.info("exiting; %s rules stay and keep serving (`lbctl cleanup` removes them)", self.name)

    @property
    def needs_retry(self) -> bool:
        return self.dirty

    def resync(self) -> SyncResult:
        """The agent's --sync-period (kube-proxy's syncPeriod): a full sync of the last desired
        state, which rewrites whatever changed in the kernel behind our back."""
        return self.sync(None, full=True)

    # --- sync --------------------------------------------------------------------------------------

    def sync(self, ports: Sequence[ServicePortInfo] | None = None, full: bool = False) -> SyncResult:
        """Programs ``ports``; with None, retries the last desired state (after a failed sync).

        Full when asked, when the kernel state is unknown (first sync, after a failure) and every
        ``full_sync_every``-th sync; partial otherwise.
        """
        if ports is not None:
            self.desired = tuple(ports)
            self.problems = unsupported(self.desired, self.name)
        full = (full or self.applied is None or self.dirty
                or self.partial_syncs + 1 >= self.options.full_sync_every)
        try:
            self._apply(self.desired, full)
        except SyncFailed as exc:
            self.dirty = True
            return SyncResult(errors=[f"{self.name} {'full' if full else 'partial'} sync: {exc}; "
                                      f"retrying with a full sync"])
        previous = self.applied or ()
        result = count_changes(previous, self.desired, self.cfg.node_name)
        self.applied, self.dirty = self.desired, False
        if full:
            self.full_syncs += 1
            self.partial_syncs = 0
        else:
            self.partial_syncs += 1
        for warning in delete_conntrack(self.runner, stale_udp_conntrack(
                previous, self.desired, self.cfg.node_name, self.family)):
            log.warning("stale UDP conntrack entries: %s", warning)
        return result

    # --- for subclasses ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _check(self) -> None:
        """Raises DatapathError when this host cannot run the mode (tools missing)."""

    @abc.abstractmethod
    def _apply(self, ports: Sequence[ServicePortInfo], full: bool) -> None:
        """Programs `ports` (a full or a partial sync); raises SyncFailed."""

    @abc.abstractmethod
    def dump(self) -> dict[str, Any]:
        """What the kernel holds for this mode, as plain data."""

    @classmethod
    @abc.abstractmethod
    def cleanup(cls, runner: Runner | None = None) -> list[str]:
        """Removes this mode's kernel objects, whoever made them; returns what it removed."""

    def _require(self, argv: Sequence[str], package: str) -> None:
        """For ``_check``: DatapathError naming the Debian package when ``argv`` (a harmless
        listing) fails."""
        done = self.runner.run(argv)
        if not done.ok:
            raise DatapathError(f"{self.name} mode: {done.error(argv)}; install {package} "
                                f"(apt-get install {package}) or use --mode ebpf")

    def _must(self, argv: Sequence[str], input: str | None = None) -> Completed:
        done = self.runner.run(argv, input)
        if not done.ok:
            raise SyncFailed(done.error(argv))
        return done


def count_changes(previous: Sequence[ServicePortInfo], current: Sequence[ServicePortInfo],
                  node: str, family: int = 4) -> SyncResult:
    """Service ports added / changed / removed, and endpoints (usable ones) added and removed."""
    def index(ports: Sequence[ServicePortInfo]) -> dict[tuple[str, str, str], common.ProxiedPort]:
        return {_key(p): p for p in common.proxied_ports(ports, family, node)}

    before, after = index(previous), index(current)
    result = SyncResult()
    for key in before.keys() - after.keys():
        result.removed += 1
        result.backends_removed += len(before[key].categories.all_reachable)
    for key, new in after.items():
        old = before.get(key)
        now = {ep.string for ep in new.categories.all_reachable}
        if old is None:
            result.added += 1
            result.backends_added += len(now)
            continue
        then = {ep.string for ep in old.categories.all_reachable}
        if (old.view, old.endpoints) != (new.view, new.endpoints):
            result.updated += 1
        result.backends_added += len(now - then)
        result.backends_removed += len(then - now)
    return result


def unsupported(ports: Sequence[ServicePortInfo], mode: str) -> tuple[Problem, ...]:
    """Services this IPv4 proxier passes over (kube-proxy would give them to its IPv6 proxier)."""
    problems = {}
    for info in ports:
        service = info.service
        if service.type == "ExternalName" or not service.cluster_ips:
            continue
        if not any(common.family_of(ip) == 4 for ip in service.cluster_ips):
            problems[service.key] = Problem(
                f"Service {service.key}",
                f"no IPv4 cluster IP ({', '.join(service.cluster_ips)}): the {mode} mode runs "
                f"kube-proxy's IPv4 proxier only; skipped, others programmed")
    return tuple(problems[k] for k in sorted(problems))
