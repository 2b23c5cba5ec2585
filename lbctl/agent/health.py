"""`/healthz` and `/livez` as kube-proxy serves them (pkg/proxy/healthcheck/proxy_health.go).

Cloud load balancers probe `:10256/healthz` on every node (ports.ProxyHealthzPort) and take a
node out of rotation when it answers 503; liveness probes use `/livez`. The semantics are
kube-proxy's, so that the probes, alerts and runbooks written for it work unchanged:

- ``updated()`` after every successful sync, ``queued()`` when a change waits for one (only
  the oldest pending change counts). Healthy while nothing is pending, or while the oldest
  pending change is younger than ``timeout`` (kube-proxy: 2 x syncPeriod). A sync that keeps
  failing, or hangs, leaves the change pending: 503 once it is late.
- The agent starts healthy (kube-proxy calls Updated when its sync loop starts, in case no sync
  ever succeeds): a probe during the first sync is not a failure.
- `/healthz` also says whether the node is eligible: a Node object being deleted, or tainted
  ``ToBeDeletedByClusterAutoscaler``, makes it 503 so that load balancers drain the node
  first (``sync_node``, or the source's Node read at each answer; a source without Node objects
  leaves the node eligible).
- The body is kube-proxy's, byte for byte in shape: ``{"lastUpdated": "<go time>","currentTime":
  "<go time>", "nodeEligible": true}`` (times as Go's time.Time.String() prints them; when
  healthy, lastUpdated is the current time, as kube-proxy has done for compatibility).
"""
from __future__ import annotations

import datetime
import http.server
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping

from lbctl.log import V

log = logging.getLogger("lbctl.agent.health")

TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_HEALTHZ_BIND_ADDRESS = "0.0.0.0:10256"


def go_time(wall: float | None, since_start: float | None = None) -> str:
    """A time as Go's time.Time.String() writes it in UTC: "2026-12-02 06:49:33.123456789 +0000
    UTC m=+12.000000001" (fraction without trailing zeros; "m=", the monotonic reading, seconds
    since the process started, only for a time read from the clock). None is Go's zero time."""
    if wall is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    seconds = int(wall)
    nanos = int(round((wall - seconds) * 1e9))
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    text = f"{stamp}{'.' + fraction if fraction else ''} +0000 UTC"
    if since_start is not None:
        text += f" m=+{max(0.0, since_start):.9f}"
    return text


def node_eligible(node: Mapping | None) -> bool:
    """kube-proxy's SyncNode: a Node (the API's JSON object) is eligible unless it is being
    deleted or carries the cluster autoscaler's to-be-deleted taint."""
    if not node:
        return True
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return False
    taints = (node.get("spec") or {}).get("taints") or ()
    return not any(t.get("key") == TO_BE_DELETED_TAINT for t in taints)


class ProxyHealth:
    """The proxier's health (kube-proxy's ProxyHealthServer state), for one IP family: lbctl
    programs IPv4. Thread-safe: the agent's loop writes, the HTTP threads read."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, node: Callable[[], Mapping | None] | None = None):
        """``node``: this node's Node object (the API's JSON, or None) as a source holds it now,
        read at each answer; without it, ``sync_node`` is called with each new version."""
        self.timeout = timeout
        self._node = node
        self._node_seen = False
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._last_updated: tuple[float, float] | None = None     # (monotonic, wall)
        self._oldest_queued: float | None = None                  # monotonic
        self._node_eligible = True
        self._start = clock()                                      # Go's m=+ counts from here
        self._counts: dict[tuple[str, int], int] = {}              # (path, code) -> requests
        self.updated()

    def updated(self) -> None:
        """A sync succeeded: the datapath matches everything received so far."""
        with self._lock:
            self._oldest_queued = None
            self._last_updated = (self.clock(), self.wall())

    def queued(self) -> None:
        """A change waits for a sync (only the oldest pending one is remembered)."""
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = self.clock()

    def sync_node(self, node: Mapping | None) -> None:
        eligible = node_eligible(node)
        with self._lock:
            changed, self._node_eligible = eligible != self._node_eligible, eligible
        if changed:
            name = ((node or {}).get("metadata") or {}).get("name", "this node")
            log.info("Node %s is %s: /healthz answers %s", name,
                     "eligible again" if eligible else "being deleted (or tainted for deletion)",
                     200 if eligible else 503)

    @property
    def node_eligible(self) -> bool:
        if self._node is not None:
            node = self._node()
            if node is None and self._node_seen:     # deleted (kube-proxy's OnNodeDelete)
                node = {"metadata": {"name": "this node", "deletionTimestamp": "deleted"}}
            self._node_seen = self._node_seen or node is not None
            self.sync_node(node)
        with self._lock:
            return self._node_eligible

    def is_healthy(self) -> bool:
        return self._state()[0]

    def _state(self) -> tuple[bool, tuple[float, float] | None]:
        with self._lock:
            if self._oldest_queued is not None and self.clock() - self._oldest_queued >= self.timeout:
                return False, self._last_updated
            return True, self._last_updated

    def answer(self, path: str) -> tuple[int, bytes]:
        """The status code and body of `/healthz` or `/livez`, as kube-proxy's handlers write them."""
        healthy, last = self._state()
        now = (self.clock(), self.wall())
        eligible = self.node_eligible
        if path == "/healthz":
            healthy = healthy and eligible
        if healthy:
            last = now      # kube-proxy: "lastUpdated" is recent whenever the server is healthy
        last_text = go_time(last[1], last[0] - self._start) if last else go_time(None)
        current = go_time(now[1], now[0] - self._start)
        if path == "/healthz":
            body = (f'{{"lastUpdated": "{last_text}","currentTime": "{current}", '
                    f'"nodeEligible": {"true" if eligible else "false"}}}')
        else:
            body = f'{{"lastUpdated": "{last_text}","currentTime": "{current}"}}'
        code = 200 if healthy else 503
        with self._lock:
            self._counts[(path, code)] = self._counts.get((path, code), 0) + 1
        return code, body.encode()

    @property
    def counts(self) -> dict[tuple[str, int], int]:
        """Answers given so far: (path, status code) -> count (kubeproxy_proxy_healthz_total)."""
        with self._lock:
            return dict(self._counts)


# --- HTTP ------------------------------------------------------------------------------------------


def split_host_port(address: str) -> tuple[str, int]:
    """ "0.0.0.0:10256", "[::]:10256", ":10256" -> (host, port); ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not an address with a port (e.g. 0.0.0.0:10256)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # http.server's server_bind asks the resolver for the address's name (getfqdn): with a
        # node IP and no DNS answering that held the agent's start for the resolver's timeout
        # (10 s in a lab node). The name is only for CGI's SERVER_NAME: the address will do.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """Answers every method as Go's net/http handlers do (no method check), JSON with nosniff."""

    server_version = "lbctl"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def answer(self) -> tuple[int, bytes, str] | None:   # (code, body, content type); None: 404
        """What to answer for self.path; the servers' handlers say it for their paths."""
        return None

    def _serve(self) -> None:
        try:
            found = self.answer()
        except Exception:
            log.exception("%s: error answering %s", self.server.server_address, self.path)
            found = (500, b"internal error\n", "text/plain; charset=utf-8")
        code, body, kind = found or (404, b"404 page not found\n", "text/plain; charset=utf-8")
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args):   # BaseHTTPRequestHandler's signature
        log.log(V(5), "%s %s", self.address_string(), format % args)


class HttpServer:
    """One listener served by a thread; `start()` raises OSError when the address cannot be bound."""

    def __init__(self, address: tuple[str, int], handler, name: str):
        self.address = address
        self.handler = handler
        self.name = name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HttpServer:
        self._server = _Server(self.address, self.handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.name, daemon=True,
                                        kwargs={"poll_interval": 0.2})
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class ListenerWithRetry:
    """A server that keeps trying to bind every ``retry`` seconds when its address is taken, as
    kube-proxy's serveHealthz and serveMetrics do (wait.Until every 5 s); with ``hard_fail``
    (bindAddressHardFail) the first failure is raised instead. The failure is logged once."""

    def __init__(self, what: str, address: str, handler, retry: float = 5.0, hard_fail: bool = False):
        self.what = what
        self.host, self.port = split_host_port(address)
        self.handler = handler
        self.retry = retry
        self.hard_fail = hard_fail
        self.server: HttpServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ListenerWithRetry:
        try:
            self.server = HttpServer((self.host, self.port), self.handler, self.what).start()
            log.log(V(2), "%s serving on %s:%d", self.what, self.host, self.server.port)
            return self
        except OSError as exc:
            if self.hard_fail:
                raise OSError(exc.errno, f"{self.what}: cannot listen on {self.host}:{self.port}: "
                                         f"{exc.strerror or exc}") from exc
            log.error("%s: cannot listen on %s:%d: %s; trying again every %gs", self.what, self.host,
                      self.port, exc.strerror or exc, self.retry)
        self._thread = threading.Thread(target=self._keep_trying, name=f"{self.what}-bind", daemon=True)
        self._thread.start()
        return self

    def _keep_trying(self) -> None:
        while not self._stop.wait(self.retry):
            try:
                self.server = HttpServer((self.host, self.port), self.handler, self.what).start()
            except OSError:
                continue
            log.info("%s serving on %s:%d", self.what, self.host, self.port)
            return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.server is not None:
            self.server.stop()
            self.server = None


def health_handler(health: ProxyHealth):
    class Handler(JsonHandler):
        def answer(self):
            path = self.path.split("?", 1)[0]
            if path not in ("/healthz", "/livez"):
                return None
            code, body = health.answer(path)
            return code, body, "application/json"
    return Handler


def serve_health(health: ProxyHealth, address: str = DEFAULT_HEALTHZ_BIND_ADDRESS,
                 hard_fail: bool = False) -> ListenerWithRetry:
    """`/healthz` and `/livez` on ``address`` (host:port)."""
    return ListenerWithRetry("healthz server", address, health_handler(health), hard_fail=hard_fail).start()
