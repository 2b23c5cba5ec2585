"""The Kubernetes source: Services, EndpointSlices and this node's Node from the API server.

``KubernetesSource`` lists and watches three collections with the official ``kubernetes``
client, one thread each, the way client-go's reflector does it:

* list (paginated, a consistent read), then watch from the list's resourceVersion with
  ``allowWatchBookmarks``; every event and bookmark moves the resourceVersion on, and a watch
  that ends (its timeout, a dropped connection, a restarted API server) is opened again from the
  last one, so no event is lost; an event that repeats what the store holds changes nothing, so
  none is applied twice;
* ``410 Gone`` (the resourceVersion was compacted away in etcd): list again and replace the
  store. Objects whose resourceVersion did not change keep their parsed copy (the same Python
  object), so a relist moves nothing that is programmed; only real differences are news;
* failures (connection refused, a cut connection, 5xx) are retried with exponential backoff and
  jitter (client-go's 800 ms doubling to 30 s, +0-100 % random), reset by a successful
  request.

What kube-proxy reads is what is read: Services and EndpointSlices with the label selector
``!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`` (kube-proxy's
server.go puts both requirements on its one informer factory, so on both kinds: a Service
another proxy implements and a headless Service's slices never reach the datapath), and the
Node named by ``node_name`` (a field selector on ``metadata.name``). The objects are taken as
raw JSON (``_preload_content=False``) and validated by ``lbctl.sources.validate``, the checks
the manifest source applies: an object lbctl cannot use becomes one Problem naming it, everything
else stays. ExternalName, selector-less and dual-stack Services are read as they are; the model
picks the IPv4 family (``lbctl.model.desired``). Slices are merged per service there too.

``poll()`` answers like every source (``lbctl.sources.base``): a snapshot when something
changed, ``None`` otherwise; ``SourceUnavailable`` until every collection has been listed once
(never "no services"). After that, an API server that cannot be reached keeps the last state
(it is logged by the watch thread, once per outage). ``fileno()`` becomes readable when news
arrives, so the agent wakes on events instead of waiting for its next poll.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from lbctl.model.objects import ClusterSnapshot, EndpointSlice, Problem, Service
from lbctl.sources.base import SourceUnavailable
from lbctl.sources.validate import DEFAULT_NODE_PORT_RANGE, Parsed, parse_document

log = logging.getLogger("lbctl.sources.kubernetes")

# kube-proxy's informers (cmd/kube-proxy/app/server.go): both requirements, on both kinds
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
LIST_PAGE = 500                   # items per list page (client-go's pager default)
WATCH_TIMEOUT = 300.0             # client-go: minWatchTimeout 5 min, times 1 + rand
INITIAL_BACKOFF, MAX_BACKOFF = 0.8, 30.0
READY_TIMEOUT = 30.0              # how long the first poll waits for the first lists
# set by the EndpointSlice controller: when the change it reflects happened (a pod's or the
# Service's), RFC 3339; kube-proxy measures network programming latency from it
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


class Gone(Exception):
    """410: the resourceVersion asked for is older than etcd keeps (compacted): relist."""


@dataclass(frozen=True)
class Kind:
    """One watched collection: what it is called, how it is listed, what it is parsed as."""

    name: str                                  # "Service", "EndpointSlice", "Node"
    api_version: str                           # set on list items, which come without it
    list_call: Callable[..., Any]              # the client's list_*_for_all_namespaces
    label_selector: str | None = None
    field_selector: str | None = None


@dataclass(frozen=True)
class _Object:
    """One object as the store holds it: its resourceVersion and what it parsed to."""

    rv: str
    services: tuple[Service, ...] = ()
    slices: tuple[EndpointSlice, ...] = ()
    problems: tuple[Problem, ...] = ()
    raw: dict | None = None                    # kept for the Node only
    trigger: float | None = None               # an EndpointSlice's last-change-trigger-time


def api_client(kubeconfig: str | None = None, master: str | None = None):
    """A ``kubernetes.client.ApiClient``: ``kubeconfig`` if given, else the in-cluster config
    (the ServiceAccount token; KUBERNETES_SERVICE_HOST/PORT), else only ``master``; ``master``
    overrides the server address in every case (kube-proxy's --master), so the agent can reach
    the API server without the ``kubernetes`` ClusterIP it provides itself. ValueError when
    none gives an address."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig:
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except Exception as exc:   # the client raises ConfigException, OSError, yaml errors
            raise ValueError(f"--kubeconfig {kubeconfig}: {exc}") from None
    elif os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
            "/var/run/secrets/kubernetes.io/serviceaccount/token"):
        config.load_incluster_config(client_configuration=cfg)
    elif not master:
        raise ValueError("no API server: give --kubeconfig or --master, or run in a pod "
                         "(KUBERNETES_SERVICE_HOST/PORT and a ServiceAccount token)")
    if master:
        cfg.host = master if "://" in master else f"https://{master}"
    return client.ApiClient(cfg)


def kinds(api, node_name: str | None) -> tuple[Kind, ...]:
    """The three collections kube-proxy watches, as calls of the client ``api``."""
    from kubernetes import client

    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    watched = [
        Kind("Service", "v1", core.list_service_for_all_namespaces, PROXY_LABEL_SELECTOR),
        Kind("EndpointSlice", "discovery.k8s.io/v1", discovery.list_endpoint_slice_for_all_namespaces,
             PROXY_LABEL_SELECTOR),
    ]
    if node_name:
        watched.append(Kind("Node", "v1", core.list_node, field_selector=f"metadata.name={node_name}"))
    return tuple(watched)


class KubernetesSource:
    """A ``Source`` fed by list+watch of the API server (see the module docstring).

    ``start()`` starts the watch threads (``poll()`` does it too, the first time); ``stop()``
    ends them. ``node`` is this node's Node object (a dict) once seen, else None.
    """

    def __init__(self, api, node_name: str | None = None, *,
                 node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
                 watch_timeout: float = WATCH_TIMEOUT, initial_backoff: float = INITIAL_BACKOFF,
                 max_backoff: float = MAX_BACKOFF, ready_timeout: float = READY_TIMEOUT,
                 watched: tuple[Kind, ...] | None = None, server: str | None = None) -> None:
        self.node_name = node_name
        self.node_port_range = node_port_range
        self.watch_timeout = watch_timeout
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self.ready_timeout = ready_timeout
        self.kinds = watched if watched is not None else kinds(api, node_name)
        self.server = server or getattr(getattr(api, "configuration", None), "host", "?")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, Any] = {}     # kind -> the open watch, to cut it at stop()
        self._store: dict[str, dict[str, _Object]] = {k.name: {} for k in self.kinds}
        self._listed: set[str] = set()
        self._ready = threading.Event()
        self._errors: dict[str, str] = {}        # kind -> the error of its last attempt
        self._generation = 0                     # bumped by every change of the store
        self._polled = -1                        # the generation the last snapshot showed
        self._waited = False                     # the first poll waited for the first lists
        # per service key: slice key -> its slice; and the merged tuple, rebuilt when touched
        self._slices: dict[str, dict[str, EndpointSlice]] = {}
        self._merged: dict[str, tuple[EndpointSlice, ...]] = {}
        self._services: dict[str, Service] = {}
        self._problems: dict[tuple[str, str], tuple[Problem, ...]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events = 0                          # watch events applied (changes only)
        # kube-proxy's trackerStartTime: trigger times before it are not this agent's to measure
        # (the first list after a restart holds every slice's old one). Whole seconds: a new
        # Service's trigger time is its creationTimestamp, which has no fraction
        self.started = float(int(time.time()))
        self._triggers: list[float] = []         # trigger times of changes since the last snapshot
        self.relists = 0                         # lists after the first (410, restarts)

    # --- the Source interface ---

    def poll(self) -> ClusterSnapshot | None:
        """A new snapshot if anything changed since the last one, else None; SourceUnavailable
        until every collection has been listed once (the first call waits up to
        ``ready_timeout`` for that)."""
        if not self._threads:
            self.start()
        if not self._ready.is_set():
            first, self._waited = not self._waited, True
            if not (first and self._ready.wait(self.ready_timeout)):
                errors = "; ".join(f"{k}: {e}" for k, e in sorted(self._errors.items()))
                raise SourceUnavailable(f"Kubernetes API server {self.server}",
                                        f"not listed yet ({errors or 'no answer'})")
        self._drain()
        with self._lock:
            if self._generation == self._polled:
                return None
            self._polled = self._generation
            return self._snapshot()

    def fileno(self) -> int:
        """Readable when the store changed since the last ``poll()`` (select() on it)."""
        return self._wake_r

    @property
    def node(self) -> dict | None:
        with self._lock:
            objs = self._store.get("Node", {})
            return next((o.raw for o in objs.values()), None)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        if self._threads:
            return
        for kind in self.kinds:
            thread = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind.name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Ends the watch threads (an open watch is cut, so this does not wait for its timeout)."""
        self._stop.set()
        for response in list(self._responses.values()):
            _cut(response)
        for thread in self._threads:
            thread.join(timeout=10)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- the snapshot ---

    def _snapshot(self) -> ClusterSnapshot:
        problems = tuple(p for key in sorted(self._problems) for p in self._problems[key])
        slices = {key: self._merged_slices(key) for key in self._slices}
        triggers, self._triggers = tuple(self._triggers), []
        return ClusterSnapshot(services=dict(sorted(self._services.items())),
                               slices=dict(sorted(slices.items())), problems=problems,
                               trigger_times=triggers)

    def _merged_slices(self, service_key: str) -> tuple[EndpointSlice, ...]:
        merged = self._merged.get(service_key)
        if merged is None:
            by_name = self._slices[service_key]
            merged = self._merged[service_key] = tuple(by_name[k] for k in sorted(by_name))
        return merged

    # --- the store (called with the lock held) ---

    def _parse(self, kind: Kind, doc: dict) -> _Object:
        meta = doc.get("metadata") or {}
        rv = str(meta.get("resourceVersion", ""))
        if kind.name == "Node":
            return _Object(rv, raw=doc)
        doc.setdefault("kind", kind.name)
        doc.setdefault("apiVersion", kind.api_version)
        parsed = Parsed()
        parse_document(parsed, doc, "", "object", self.node_port_range)
        trigger = None
        if kind.name == "EndpointSlice":
            annotations = meta.get("annotations")
            if isinstance(annotations, dict) and isinstance(annotations.get(TRIGGER_TIME_ANNOTATION), str):
                trigger = parse_rfc3339(annotations[TRIGGER_TIME_ANNOTATION])
        return _Object(rv, tuple(parsed.services), tuple(s for r in parsed.records for s in r.slices),
                       tuple(parsed.problems), trigger=trigger)

    def _put(self, kind: str, key: str, new: _Object | None) -> bool:
        """Stores (or with None deletes) one object; False when nothing changed."""
        store = self._store[kind]
        old = store.get(key)
        if new is not None and old is not None and old.rv == new.rv:
            return False                         # a repeated event, or unchanged in a relist
        if new is None and old is None:
            return False
        if new is None:
            del store[key]
        else:
            store[key] = new
        if kind == "Service":
            self._services.pop(key, None)
            if new is not None and new.services:
                self._services[key] = new.services[0]
        elif kind == "EndpointSlice":
            # a change the controller made since the agent started: measured once programmed
            # (kube-proxy's endpointsChangeTracker); the same trigger time again is the same
            # change, counted once
            if (new is not None and new.trigger is not None and new.trigger >= self.started
                    and (old is None or old.trigger != new.trigger)):
                self._triggers.append(new.trigger)
            for eps in old.slices if old else ():
                by_name = self._slices.get(eps.service_key, {})
                by_name.pop(eps.key, None)
                self._merged.pop(eps.service_key, None)
                if not by_name:
                    self._slices.pop(eps.service_key, None)
            for eps in new.slices if new else ():
                self._slices.setdefault(eps.service_key, {})[eps.key] = eps
                self._merged.pop(eps.service_key, None)
        self._problems.pop((kind, key), None)
        if new is not None and new.problems:
            self._problems[(kind, key)] = new.problems
        self._generation += 1
        return True

    def _replace(self, kind: Kind, items: list[dict]) -> int:
        """A list's result replaces the store: only what differs is changed. Returns how many
        objects changed."""
        seen: dict[str, dict] = {_key(doc): doc for doc in items}
        with self._lock:
            changed = 0
            for key in [k for k in self._store[kind.name] if k not in seen]:
                changed += self._put(kind.name, key, None)
            for key, doc in seen.items():
                old = self._store[kind.name].get(key)
                rv = str((doc.get("metadata") or {}).get("resourceVersion", ""))
                if old is not None and old.rv == rv:
                    continue
                changed += self._put(kind.name, key, self._parse(kind, doc))
        return changed

    def _apply(self, kind: Kind, event: str, doc: dict) -> bool:
        key = _key(doc)
        with self._lock:
            if event == "DELETED":
                changed = self._put(kind.name, key, None)
            else:
                old = self._store[kind.name].get(key)
                rv = str((doc.get("metadata") or {}).get("resourceVersion", ""))
                changed = False if old is not None and old.rv == rv else self._put(
                    kind.name, key, self._parse(kind, doc))
        return changed

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:                          # full (a wake-up is pending anyway) or closed
            pass

    def _drain(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    # --- list and watch, one thread per kind ---

    def _run(self, kind: Kind) -> None:
        backoff = 0.0
        rv: str | None = None
        failing: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list(kind)
                rv = self._watch(kind, rv)
                backoff = 0.0
            except Gone:
                log.info("%s: resourceVersion %s is gone (compacted): listing again", kind.name, rv)
                rv = None
                continue
            except Exception as exc:   # refused, cut, timed out, 5xx, a bad answer: all retried
                if self._stop.is_set():
                    return
                why = _describe(exc)
                self._errors[kind.name] = why
                backoff = next_backoff(backoff, self.initial_backoff, self.max_backoff)
                if why != failing:
                    log.warning("%s list/watch at %s failed: %s; retrying with backoff (up to %gs)%s",
                                kind.name, self.server, why, self.max_backoff,
                                "" if self._ready.is_set() else "; nothing programmed changes meanwhile")
                    failing = why
                self._stop.wait(jittered(backoff))
                continue
            if failing is not None:
                log.info("%s list/watch at %s works again", kind.name, self.server)
                failing = None
                self._errors.pop(kind.name, None)

    def _list(self, kind: Kind) -> str:
        """Lists every page (a consistent read), replaces the store, returns the list's
        resourceVersion. An expired continue token (410) starts the list over."""
        items: list[dict] = []
        token: str | None = None
        while True:
            try:
                page = _read_json(kind.list_call(
                    label_selector=kind.label_selector, field_selector=kind.field_selector,
                    limit=LIST_PAGE, _continue=token, _preload_content=False, _request_timeout=(10, 60)))
            except Exception as exc:
                if token is not None and _status(exc) == 410:
                    items, token = [], None      # the snapshot behind the token expired
                    continue
                raise
            items.extend(page.get("items") or ())
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                rv = str(meta.get("resourceVersion", ""))
                break
        changed = self._replace(kind, items)
        if kind.name in self._listed:
            self.relists += 1
            log.info("%s: relisted %d object(s), %d changed", kind.name, len(items), changed)
        else:
            log.info("%s: listed %d object(s) at resourceVersion %s", kind.name, len(items), rv)
        self._listed.add(kind.name)
        if changed:
            self._wake()
        if len(self._listed) == len(self.kinds):
            self._ready.set()
        return rv

    def _watch(self, kind: Kind, rv: str) -> str:
        """One watch from ``rv`` until it ends; returns the resourceVersion reached."""
        timeout = max(1, int(self.watch_timeout * (1 + random.random())))
        try:
            response = kind.list_call(
                label_selector=kind.label_selector, field_selector=kind.field_selector, watch=True,
                resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=timeout,
                _preload_content=False, _request_timeout=(10, timeout + 30))
        except Exception as exc:
            if _status(exc) == 410:
                raise Gone(str(exc)) from None
            raise
        self._responses[kind.name] = response
        try:
            if self._stop.is_set():              # stop() came while the watch was opened
                return rv
            for line in _lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind_of, obj = event.get("type"), event.get("object") or {}
                if kind_of == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", ""))
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message', obj)}")
                rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
                if kind_of == "BOOKMARK":
                    continue
                if kind_of in ("ADDED", "MODIFIED", "DELETED") and self._apply(kind, kind_of, obj):
                    self.events += 1
                    log.debug("%s %s %s (resourceVersion %s)", kind.name, _key(obj), kind_of.lower(), rv)
                    self._wake()
        finally:
            self._responses.pop(kind.name, None)
            _cut(response)
        return rv


# --- helpers ----------------------------------------------------------------------------------


def next_backoff(previous: float, initial: float = INITIAL_BACKOFF, maximum: float = MAX_BACKOFF) -> float:
    """client-go's reflector backoff: ``initial``, doubling, at most ``maximum``."""
    return min(max(initial, 2 * previous), maximum)


def jittered(delay: float, rnd: Callable[[], float] = random.random) -> float:
    """``delay`` plus up to 100 % (client-go's jitter 1.0), so that many agents restarted by
    one API server outage do not come back in step."""
    return delay * (1 + rnd())


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)


def parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time ("2026-12-02T14:10:40.123456789Z", Go's
    RFC3339Nano, any offset); None if it is not one."""
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    whole, fraction, offset = match.groups()
    if offset.upper() == "Z":
        zone = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    try:
        moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=zone)
    except ValueError:                           # 2026-13-45T...
        return None
    return moment.timestamp() + (float(fraction) if fraction else 0.0)


def _key(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


def _read_json(response) -> dict:
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _lines(response) -> Iterator[bytes]:
    """The lines of a watch's chunked body as they arrive."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end], buffer[end + 1:]
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _cut(response) -> None:
    """Closes an open watch, from any thread (a blocked read returns)."""
    try:
        response.shutdown()
    except Exception:
        pass
    try:
        response.close()
    except Exception:
        pass


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        reason = getattr(exc, "reason", "") or ""
        return f"HTTP {status} {reason}".strip()
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."
