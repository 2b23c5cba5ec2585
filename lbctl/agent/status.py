"""What the agent tells the world after each sync: the status file `lbctl status` reads, the
health servers, the metrics. One object, ``Operations``, that the agent's loop calls twice:

    queued(trigger_times)    a change arrived and waits for a sync (kube-proxy's Sync()); the
                             first is queued from the start
    synced(kind, result, seconds, ok, ports, problems)
                             a sync ended: kind "change" (a new desired state, ``ports``),
                             "retry" (a failed one again) or "resync" (the kernel read back)

The status file, /run/lbctl/status-<tag>.json (the tag of the pin dir, as the lock's), is
written atomically (a temporary file renamed) and readable by root only, for every mode. It
holds the source, the last sync (time, kind, duration, result, errors), the counts (services,
service ports, frontends, backends) and the problems of the last sync. `lbctl status` prints
it, and says so plainly when no agent holds the lock (the file then tells the last run).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence

from lbctl import log as logs
from lbctl.agent.health import ProxyHealth
from lbctl.datapath.base import SyncResult
from lbctl.datapath.ebpf import dump
from lbctl.datapath.kubeproxy import common
from lbctl.log import V
from lbctl.model.objects import ServicePortInfo

log = logging.getLogger("lbctl.agent.status")

STATUS_PREFIX = "status-"


def status_file(pin_dir: str) -> str:
    return os.path.join(dump.state_dir(), f"{STATUS_PREFIX}{dump.pin_tag(pin_dir)}.json")


def write_private(path: str, text: str) -> None:
    """Writes ``path`` atomically, mode 0600, its directory 0700 (root's business only)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def restrict_files(pin_dir: str) -> list[str]:
    """Makes what the agent keeps readable by root only: the state directory and the pin dir
    0700, the files in them (lock, names, last good manifests, status; the pins) 0600. The
    agent runs with umask 077, so what it creates later is born that way; this fixes what an
    earlier run left. Returns the paths changed."""
    changed = []
    for directory in (dump.state_dir(), pin_dir):
        if not os.path.isdir(directory):
            continue
        for path, mode in [(directory, 0o700)] + [
                (os.path.join(directory, n), 0o600) for n in sorted(os.listdir(directory))]:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if os.path.islink(path) or (path != directory and os.path.isdir(path)):
                continue       # a trace's temporary pin dir, a link: not ours to change
            if st.st_mode & 0o777 != mode:
                os.chmod(path, mode)
                changed.append(path)
    if changed:
        log.info("made %d file(s) readable by root only: %s", len(changed), ", ".join(changed))
    return changed


# --- counts and changes, mode-independent ------------------------------------------------------------


def counts(ports: Sequence[ServicePortInfo]) -> dict[str, int]:
    """What a node proxies, the same for every mode: services and service ports kube-proxy
    would program (IPv4), their frontends (cluster IP, NodePort, external and load-balancer IPs)
    and distinct backends (address:port/protocol)."""
    services, service_ports, frontends, backends = set(), 0, 0, set()
    for info in ports:
        view = common.service_port_view(info, 4)
        if view is None:
            continue
        services.add(view.service_key)
        service_ports += 1
        frontends += 1 + (1 if view.node_port else 0) + len(view.external_ips) + len(view.load_balancer_vips)
        for endpoint in info.endpoints:
            backends.add((endpoint.address, endpoint.port, info.port.protocol.value))
    return {"services": len(services), "service_ports": service_ports, "frontends": frontends,
            "backends": len(backends)}


def changes(previous: Sequence[ServicePortInfo] | None, current: Sequence[ServicePortInfo]) -> tuple[int, int]:
    """(services, endpoint sets) that differ between two desired states, as kube-proxy's change
    trackers count them: a service added, removed or changed; a service whose endpoints changed."""
    def by_service(ports):
        services, endpoints = {}, {}
        for info in ports or ():
            services[info.service.key] = info.service
            endpoints.setdefault(info.service.key, []).append((info.port.name, info.endpoints))
        return services, endpoints

    old_services, old_endpoints = by_service(previous)
    new_services, new_endpoints = by_service(current)
    keys = old_services.keys() | new_services.keys()
    return (sum(old_services.get(k) != new_services.get(k) for k in keys),
            sum(old_endpoints.get(k) != new_endpoints.get(k) for k in keys))


def no_local_endpoints(ports: Sequence[ServicePortInfo], node_name: str) -> tuple[int, int]:
    """Service ports with a Local traffic policy, endpoints, and none on this node: (internal,
    external), as kubeproxy_sync_proxy_rules_no_local_endpoints_total counts them."""
    internal = external = 0
    for proxied in common.proxied_ports(ports, 4, node_name):
        view, found = proxied.view, proxied.categories
        if not found.has_any or found.local:
            continue
        internal += view.internal_policy_local
        external += view.external_policy_local
    return internal, external


class _PortFacts:
    """What one service port adds to the counts, the no-local count and the change count."""

    __slots__ = ("info", "key", "proxied", "frontends", "backends", "internal", "external")

    def __init__(self, info: ServicePortInfo, node_name: str) -> None:
        self.info = info                    # kept: the observer knows it by id()
        self.key = info.service.key
        view = common.service_port_view(info, 4)
        self.proxied = view is not None
        self.frontends = 0
        self.backends: tuple[tuple[str, int, str], ...] = ()
        self.internal = self.external = 0
        if view is None:
            return
        self.frontends = 1 + (1 if view.node_port else 0) + len(view.external_ips) + len(view.load_balancer_vips)
        self.backends = tuple((e.address, e.port, info.port.protocol.value) for e in info.endpoints)
        found = common.categorize_endpoints(view, common.endpoint_views(info, 4, node_name))
        if found.has_any and not found.local:
            self.internal = int(view.internal_policy_local)
            self.external = int(view.external_policy_local)


class StatusObserver:
    """``counts``, ``changes`` and ``no_local_endpoints`` of each new desired state, at the cost of
    what changed. The desired-state caches hand back the same ServicePortInfo objects for what
    did not change, so each port's facts are kept by the object's identity and only new objects
    are looked at; each service's ports are kept as a tuple of identities, and a service whose
    tuple is the same (the same objects, in the same order) changed nothing. The results are
    exactly those of the functions above on the same sequences."""

    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name
        self._facts: dict[int, _PortFacts] = {}
        self._groups: dict[str, tuple[int, ...]] | None = None     # None: no state seen yet
        self._services: dict[str, int] = {}     # service -> its proxied ports (> 0)
        self._backends: dict[tuple[str, int, str], int] = {}     # backend -> how many ports list it
        self._service_ports = self._frontends = self._internal = self._external = 0

    def update(self, ports: Sequence[ServicePortInfo]) -> tuple[dict[str, int], tuple[int, int], tuple[int, int]]:
        """(counts, (service changes, endpoint changes) since the last update, (internal,
        external) service ports without local endpoints) of ``ports``."""
        facts = self._facts
        # Facts hold their object, so no object the last state had can be freed and its id
        # taken by a new one while it is here: an id found here is the same object.
        new_groups: dict[str, list[int]] = {}
        for info in ports:
            pid = id(info)
            fact = facts.get(pid)
            if fact is None:
                fact = facts[pid] = _PortFacts(info, self.node_name)
            new_groups.setdefault(fact.key, []).append(pid)
        first = self._groups is None
        old_groups = self._groups or {}
        groups = {k: tuple(v) for k, v in new_groups.items()}
        service_changes = endpoint_changes = 0
        dead: set[int] = set()
        for key in old_groups.keys() | groups.keys():
            before, after = old_groups.get(key, ()), groups.get(key, ())
            if before == after and not first:
                continue
            old_infos = [facts[pid].info for pid in before]
            new_infos = [facts[pid].info for pid in after]
            service_changes += (old_infos[-1].service if old_infos else None) != \
                (new_infos[-1].service if new_infos else None)
            endpoint_changes += ([(i.port.name, i.endpoints) for i in old_infos] or None) != \
                ([(i.port.name, i.endpoints) for i in new_infos] or None)
            for pid in before:
                self._account(facts[pid], -1)
            for pid in after:
                self._account(facts[pid], +1)
            dead.update(set(before) - set(after))    # an object lives in its service's group only
        for pid in dead:
            del facts[pid]
        self._groups = groups
        counts = {"services": len(self._services), "service_ports": self._service_ports,
                  "frontends": self._frontends, "backends": len(self._backends)}
        return counts, (service_changes, endpoint_changes), (self._internal, self._external)

    def _account(self, fact: _PortFacts, sign: int) -> None:
        if not fact.proxied:
            return
        services = self._services
        services[fact.key] = services.get(fact.key, 0) + sign
        if not services[fact.key]:
            del services[fact.key]
        self._service_ports += sign
        self._frontends += sign * fact.frontends
        self._internal += sign * fact.internal
        self._external += sign * fact.external
        backends = self._backends
        for backend in fact.backends:
            backends[backend] = backends.get(backend, 0) + sign
            if not backends[backend]:
                del backends[backend]


# --- the agent's side ------------------------------------------------------------------------------


class Operations:
    """The agent's health, metrics, health check ports and status file, updated at each sync.
    Each part is optional (None), so tests and tools use only what they need."""

    def __init__(self, *, mode: str, source: str, pin_dir: str, node_name: str = "",
                 health: ProxyHealth | None = None, metrics=None, service_health=None,
                 write_status: bool = True, listeners: dict[str, str] | None = None):
        self.mode = mode
        self.source = source
        self.pin_dir = pin_dir
        self.node_name = node_name
        self.health = health
        self.metrics = metrics
        self.service_health = service_health
        self.write_status = write_status
        self.listeners = listeners or {}
        self.started = time.time()
        self.syncs = {"change": 0, "retry": 0, "resync": 0}
        self.last_sync: dict | None = None
        self.last_success: float | None = None
        self.counts = {"services": 0, "service_ports": 0, "frontends": 0, "backends": 0}
        self.problems: list[str] = []
        self.servers: list = []              # the HTTP listeners (health.ListenerWithRetry), stopped with us
        self._ports: Sequence[ServicePortInfo] | None = None
        self._observer = StatusObserver(node_name)     # counts, changes, no-local: at the cost of what changed
        self._triggers: list[float] = []
        if health is not None:
            # kube-proxy at start: Updated (in case no sync ever succeeds) and, as its informers
            # deliver the first objects, a queued change: a first sync that never ends is late too
            health.queued()
        if write_status:
            self._write()

    def queued(self, trigger_times: Iterable[float] = ()) -> None:
        self._triggers.extend(trigger_times)
        if self.health is not None:
            self.health.queued()
        if self.metrics is not None:
            self.metrics.queued()

    def synced(self, kind: str, result: SyncResult, seconds: float, ok: bool,
               ports: Sequence[ServicePortInfo] | None = None, problems: Iterable[str] = ()) -> None:
        now = time.time()
        self.syncs[kind] = self.syncs.get(kind, 0) + 1
        self.problems = sorted(set(problems))
        if ports is not None:
            self.counts, (service_changes, endpoint_changes), no_local = self._observer.update(ports)
            self._ports = ports
            if self.metrics is not None:
                self.metrics.changes(service_changes, endpoint_changes)
                self.metrics.no_local(*no_local)
        if self.service_health is not None and self._ports is not None:
            self.service_health.sync(self._ports)
        if ok:
            self.last_success = now
            if self.health is not None:
                self.health.updated()
            if self.metrics is not None:
                self.metrics.programmed(self._triggers)
            self._triggers = []
        if self.metrics is not None:
            self.metrics.synced(kind, seconds, ok, len(self.problems))
        self.last_sync = {"time": now, "kind": kind, "duration_seconds": round(seconds, 6),
                          "result": "ok" if ok else "failed", "summary": str(result),
                          "errors": list(result.errors)}
        log.log(V(2), "sync (%s, %s): %s in %.1f ms; %d service(s), %d frontend(s), %d backend(s)",
                self.mode, kind, result, seconds * 1000, self.counts["services"], self.counts["frontends"],
                self.counts["backends"])
        if self.write_status:
            self._write()
        logs.flush(everything=False)

    def node_changed(self, node) -> None:
        """This node's Node object (the API's JSON), from a source that watches it."""
        if self.health is not None:
            self.health.sync_node(node)

    def as_dict(self) -> dict:
        return {
            "pid": os.getpid(), "mode": self.mode, "source": self.source, "node": self.node_name,
            "pin_dir": self.pin_dir, "started": self.started, "listeners": self.listeners,
            "last_sync": self.last_sync, "last_successful_sync": self.last_success,
            "healthy": self.health.is_healthy() if self.health is not None else None,
            "node_eligible": self.health.node_eligible if self.health is not None else None,
            "syncs": self.syncs, "counts": self.counts, "problems": self.problems,
        }

    def _write(self) -> None:
        try:
            write_private(status_file(self.pin_dir), json.dumps(self.as_dict(), indent=1))
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", status_file(self.pin_dir), exc.strerror or exc)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.service_health is not None:
            self.service_health.stop()


# --- `lbctl status` --------------------------------------------------------------------------------


def read_statuses(pin_dir: str | None = None) -> list[tuple[dict, bool]]:
    """(status, an agent holds its lock now) for the pin dir, or for every status file."""
    from lbctl.agent.lock import lock_path, running_agents

    directory = dump.state_dir()
    if pin_dir is not None:
        paths = [status_file(pin_dir)]
    else:
        try:
            paths = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                           if n.startswith(STATUS_PREFIX) and n.endswith(".json"))
        except FileNotFoundError:
            paths = []
    held = {h.path: h for h in running_agents()}
    found = []
    for path in paths:
        try:
            with open(path) as f:
                status = json.load(f)
        except FileNotFoundError:
            continue
        holder = held.get(lock_path(status.get("pin_dir", "")))
        found.append((status, holder is not None and holder.pid == status.get("pid")))
    return found


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"{stamp} ({max(0.0, now - when):.0f}s ago)"


def format_status(status: dict, running: bool, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = []
    state = f"running (pid {status['pid']})" if running else \
        f"NOT RUNNING: no agent holds the lock; this is what pid {status['pid']} last wrote"
    lines.append(f"agent:      {state}")
    lines.append(f"mode:       {status['mode']}   node: {status.get('node') or '?'}   maps: {status['pin_dir']}")
    lines.append(f"source:     {status['source']}")
    if status.get("listeners"):
        lines.append("listening:  " + ", ".join(f"{k} {v}" for k, v in sorted(status["listeners"].items())))
    last = status.get("last_sync")
    if last:
        lines.append(f"last sync:  {_ago(last['time'], now)}, {last['kind']}, "
                     f"{last['duration_seconds'] * 1000:.1f} ms, {last['result']}: {last['summary']}")
    else:
        lines.append("last sync:  none yet")
    lines.append(f"last ok:    {_ago(status.get('last_successful_sync'), now)}")
    if status.get("healthy") is not None:
        lines.append(f"healthz:    {'healthy' if status['healthy'] else 'UNHEALTHY'}"
                     f"{'' if status.get('node_eligible', True) else ' (node being deleted)'}")
    c = status["counts"]
    lines.append(f"counts:     {c['services']} service(s), {c['service_ports']} service port(s), "
                 f"{c['frontends']} frontend(s), {c['backends']} backend(s)")
    syncs = status.get("syncs", {})
    lines.append("syncs:      " + ", ".join(f"{k} {v}" for k, v in syncs.items()))
    errors = (last or {}).get("errors", [])
    problems = status.get("problems", [])
    lines.append(f"errors:     {len(errors)} in the last sync, {len(problems)} object(s) not programmed")
    lines += [f"  sync error: {e}" for e in errors]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


def cmd_status(args) -> int:
    """`lbctl status`: 0 when an agent runs, 1 when none does (or the file cannot be read)."""
    import sys

    try:
        found = read_statuses(args.pin_dir)
    except PermissionError as exc:
        print(f"lbctl status: {exc.strerror}: {exc.filename} (run as root)", file=sys.stderr)
        return 1
    if not found:
        where = status_file(args.pin_dir) if args.pin_dir else dump.state_dir()
        print(f"lbctl status: no lbctl agent runs on this node (no status file in {where}); start "
              f"one with `lbctl run`", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dict(s, running=r) for s, r in found], indent=2))
    else:
        print("\n\n".join(format_status(s, r) for s, r in found))
    return 0 if any(r for _, r in found) else 1
