"""Test doubles for the Kubernetes source: faults the real API server cannot be made to show at
a chosen moment, and a TCP proxy that can cut the agent off the real one.

``FakeCollection`` is one collection's list and watch, called the way the ``kubernetes``
client's ``list_*`` methods are (``watch=``, ``resource_version=``, ``_preload_content=False``):
a list answers with a response whose ``.data`` is the JSON list, a watch with one whose
``.stream()`` yields JSON event lines as they happen. A test can expire resourceVersions (the
next watch from an older one gets ``410 Gone`` as an ERROR event, as etcd compaction makes the
API server answer), drop every open watch in the middle of its stream, or make calls fail.

``TcpProxy`` forwards a local port to the API server; ``cut()`` closes every connection and
refuses new ones until ``restore()``.
"""
from __future__ import annotations

import copy
import json
import selectors
import socket
import threading
from collections.abc import Iterator


class FakeHTTPError(Exception):
    """What the client raises for a non-2xx answer (it has ``status``, as ApiException)."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"({status}) {reason}")
        self.status = status
        self.reason = reason


class _ListResponse:
    def __init__(self, body: dict) -> None:
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass


class _WatchResponse:
    """A watch's body: the events after ``rv``, then new ones as they come, until it ends."""

    def __init__(self, collection: FakeCollection, rv: int, bookmarks: bool) -> None:
        self.collection = collection
        self.rv = rv
        self.bookmarks = bookmarks
        self.closed = False

    def stream(self, amt=None, decode_content=False) -> Iterator[bytes]:
        c = self.collection
        with c.cond:
            if self.rv < c.compacted:
                yield _line("ERROR", {"kind": "Status", "code": 410, "reason": "Expired",
                                      "message": f"too old resource version: {self.rv} ({c.compacted})"})
                return
            position = self.rv
            generation = c.drops
            while not self.closed:
                pending = [e for e in c.history if e[0] > position]
                for rv, kind, obj in pending:
                    position = rv
                    yield _line(kind, obj)
                if self.bookmarks and c.bookmark_at is not None and c.bookmark_at > position:
                    position = c.bookmark_at
                    yield _line("BOOKMARK", {"kind": c.kind, "metadata": {"resourceVersion": str(position)}})
                if c.drops != generation:
                    return                       # dropped mid-stream
                if not pending:
                    c.cond.wait(0.05)

    def shutdown(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


def _line(kind: str, obj: dict) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


class FakeCollection:
    """One collection (Services, say) with the API server's list and watch semantics.

    Every change takes the next resourceVersion of a counter shared by the collections of one
    ``FakeCluster`` (as etcd's revision is). ``calls`` records every call's keyword arguments.
    """

    def __init__(self, kind: str, cluster: FakeCluster) -> None:
        self.kind = kind
        self.cluster = cluster
        self.cond = cluster.cond
        self.objects: dict[str, dict] = {}
        self.history: list[tuple[int, str, dict]] = []   # (rv, event type, object)
        self.compacted = 0                   # a watch from an older rv gets 410
        self.drops = 0                       # bumped to drop every open watch
        self.bookmark_at: int | None = None
        self.fail_next: list[Exception] = []  # raised by the next calls, one each
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail_next:
            raise self.fail_next.pop(0)
        with self.cond:
            if kwargs.get("watch"):
                return _WatchResponse(self, int(kwargs.get("resource_version") or 0),
                                      bool(kwargs.get("allow_watch_bookmarks")))
            items = [copy.deepcopy(o) for _, o in sorted(self.objects.items())]
            for item in items:              # list items come without kind and apiVersion
                item.pop("kind", None)
                item.pop("apiVersion", None)
            return _ListResponse({"kind": f"{self.kind}List",
                                  "metadata": {"resourceVersion": str(self.cluster.rv)}, "items": items})

    # --- changes, as the API server makes them ---

    def put(self, obj: dict) -> int:
        """Creates or replaces an object (by namespace/name); returns its resourceVersion."""
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            key = f"{meta.get('namespace', '')}/{meta['name']}"
            rv = self.cluster.next_rv()
            meta["resourceVersion"] = str(rv)
            event = "MODIFIED" if key in self.objects else "ADDED"
            self.objects[key] = obj
            self.history.append((rv, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return rv

    def delete(self, namespace: str, name: str) -> int:
        with self.cond:
            obj = self.objects.pop(f"{namespace}/{name}")
            rv = self.cluster.next_rv()
            obj["metadata"]["resourceVersion"] = str(rv)
            self.history.append((rv, "DELETED", obj))
            self.cond.notify_all()
            return rv

    def compact(self) -> None:
        """Forgets the history: a watch from any older resourceVersion now gets 410."""
        with self.cond:
            self.compacted = self.cluster.rv
            self.history.clear()

    def drop_watches(self) -> None:
        with self.cond:
            self.drops += 1
            self.cond.notify_all()

    def bookmark(self) -> None:
        """Tells open watches (that asked for bookmarks) the current resourceVersion."""
        with self.cond:
            self.bookmark_at = self.cluster.rv
            self.cond.notify_all()


class FakeCluster:
    """The collections the source watches, sharing one resourceVersion counter."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.services = FakeCollection("Service", self)
        self.slices = FakeCollection("EndpointSlice", self)
        self.nodes = FakeCollection("Node", self)

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def kinds(self):
        from lbctl.sources.kubernetes import PROXY_LABEL_SELECTOR, Kind

        return (Kind("Service", "v1", self.services, PROXY_LABEL_SELECTOR),
                Kind("EndpointSlice", "discovery.k8s.io/v1", self.slices, PROXY_LABEL_SELECTOR),
                Kind("Node", "v1", self.nodes, field_selector="metadata.name=node-a"))


class TcpProxy:
    """127.0.0.1:<port> -> target, one thread; ``cut()`` drops every connection and refuses new
    ones (the listener closes) until ``restore()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cut = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._listen()
        self._thread.start()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener

    def cut(self) -> None:
        with self._lock:
            self._cut.set()

    def restore(self) -> None:
        with self._lock:
            self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            while not self._stop.is_set():
                if self._cut.is_set():
                    self._drop_all(sel)
                    while self._cut.is_set() and not self._stop.is_set():
                        self._stop.wait(0.02)
                    if self._stop.is_set():
                        break
                    self._listen()
                listener = self._listener
                assert listener is not None
                if listener.fileno() not in sel.get_map():
                    sel.register(listener, selectors.EVENT_READ, None)
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        self._accept(sel, listener)
                    else:
                        self._pump(sel, key.fileobj, key.data)
        finally:
            self._drop_all(sel)
            sel.close()

    def _accept(self, sel, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        self._pairs.append((client, upstream))

    def _pump(self, sel, source, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                sink.setblocking(True)
                sink.sendall(data)
                sink.setblocking(False)
                return
            except OSError:
                pass
        self._close_pair(sel, source, sink)

    def _close_pair(self, sel, a, b) -> None:
        for sock in (a, b):
            try:
                sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._pairs = [p for p in self._pairs if a not in p]

    def _drop_all(self, sel) -> None:
        for a, b in list(self._pairs):
            for sock in (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._close_pair(sel, a, b)
        if self._listener is not None:
            try:
                sel.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
            self._listener = None
