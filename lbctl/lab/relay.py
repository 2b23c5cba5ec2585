"""A TCP relay that makes the lab's API server reachable from inside a lab node's namespace.

The lab's control plane (lbctl.lab.kube) listens on 127.0.0.1:PORT in the root network namespace;
a process in a node's namespace (``<prefix>-node<i>``: a real kube-proxy, an agent with
``--source kubernetes``) has a loopback of its own and cannot reach it. The relay listens on
127.0.0.1:PORT *inside* the node's namespace and forwards each connection it accepts to
127.0.0.1:PORT in the root namespace, byte for byte (TLS passes through untouched). So the
admin kubeconfig (server https://127.0.0.1:PORT, the serving certificate's SAN 127.0.0.1) works
unchanged inside the node, as on a kind node whose kubeconfig names the API server's address.

How: the process opens /run/netns/NAME, setns(2)s into it (through libc: Python 3.11 has no
os.setns), creates and binds the listening socket, and setns(2)s back into the namespace it
started in (saved from /proc/self/ns/net). A socket stays in the namespace it was created in,
so from then on the one process accepts in the node and connects in the root namespace. One
selectors loop moves the bytes, with a bounded buffer per direction (a slow reader stops the
relay reading from the writer: back-pressure, never unbounded memory); an end-of-file is passed
on as a half-close (shutdown SHUT_WR), and a connection is closed on both sides once both
directions have ended or either side fails.

    with Relay("lbkp-node0", port).start():
        ...   # nsenter --net=/run/netns/lbkp-node0 kubectl --kubeconfig admin.kubeconfig get nodes

or as a process of its own: ``python -m lbctl.lab.relay --netns NAME --port PORT``.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lbctl.lab import kube, netns

BUFFER = 256 * 1024             # bytes held per direction of a connection at most
START_TIMEOUT = 10.0            # seconds for the relay to listen
CLONE_NEWNET = 0x40000000


class RelayError(RuntimeError):
    """The relay could not start or listen; the message names the namespace and its log."""


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def listen_in(ns: str, host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port inside network namespace ns; the calling thread is
    back in its own namespace when this returns (or raises)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netns.NETNS_DIR / ns, os.O_RDONLY)
    try:
        _setns(target, f"netns {ns}")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
        finally:
            _setns(own, "the relay's own netns")
    finally:
        os.close(target)
        os.close(own)
    sock.setblocking(False)
    return sock


# --- the forwarding loop -------------------------------------------------------------------------


@dataclass
class _Half:
    """One direction of a relayed connection: bytes read from `src`, not yet written to `dst`."""

    src: socket.socket
    dst: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False           # src said end-of-file (or failed)
    done: bool = False          # eof and everything passed on, dst shut for writing


@dataclass
class _Pair:
    """A relayed connection: the accepted client and the upstream connection it is forwarded to."""

    client: socket.socket
    upstream: socket.socket
    connected: bool = False     # the non-blocking connect to upstream has completed
    up: _Half = field(init=False)      # client -> upstream
    down: _Half = field(init=False)    # upstream -> client

    def __post_init__(self) -> None:
        self.up = _Half(self.client, self.upstream)
        self.down = _Half(self.upstream, self.client)


class Forwarder:
    """Accepts on `listener`, forwards each connection to `target` (connected from the namespace
    the process is in), until stop() is called from a signal handler."""

    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self.listener = listener
        self.target = target
        self.sel = selectors.DefaultSelector()
        self.pairs: dict[socket.socket, _Pair] = {}
        self.running = True
        self.sel.register(listener, selectors.EVENT_READ)

    def stop(self, *_: object) -> None:
        self.running = False

    def run(self) -> None:
        try:
            while self.running:
                for key, mask in self.sel.select(timeout=0.5):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        pair = self.pairs.get(sock)
                        if pair is not None:
                            self._service(pair, sock, mask)
        finally:
            for pair in list({id(p): p for p in self.pairs.values()}.values()):
                self._close(pair)
            self.sel.unregister(self.listener)
            self.listener.close()
            self.sel.close()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:               # EMFILE and friends: drop this one, keep serving
            print(f"relay: accept failed: {exc}", file=sys.stderr, flush=True)
            return
        client.setblocking(False)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        pair = _Pair(client, upstream)
        code = upstream.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS):
            self._connect_failed(code)
            client.close()
            upstream.close()
            return
        pair.connected = code == 0
        self.pairs[client] = self.pairs[upstream] = pair
        # Until the connect completes only upstream is watched (writable: connected); the
        # client's bytes wait in its socket buffer meanwhile.
        self._update(pair)

    def _connect_failed(self, code: int) -> None:
        print(f"relay: connect to {self.target[0]}:{self.target[1]} failed: {os.strerror(code)}; "
              f"client closed", file=sys.stderr, flush=True)

    def _service(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        try:
            if sock is pair.upstream and not pair.connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._connect_failed(code)
                    raise OSError(code, os.strerror(code))
                pair.connected = True     # _update below starts watching the client
            else:
                if mask & selectors.EVENT_READ:
                    self._read(pair.up if sock is pair.client else pair.down)
                if mask & selectors.EVENT_WRITE:
                    self._write(pair.down if sock is pair.client else pair.up)
        except OSError:
            self._close(pair)
            return
        if pair.up.done and pair.down.done:
            self._close(pair)
        else:
            self._update(pair)

    @staticmethod
    def _read(half: _Half) -> None:
        try:
            data = half.src.recv(BUFFER - len(half.buf))
        except (BlockingIOError, InterruptedError):
            return
        if data:
            half.buf += data
        else:
            half.eof = True
        Forwarder._write(half)

    @staticmethod
    def _write(half: _Half) -> None:
        if half.buf:
            try:
                sent = half.dst.send(half.buf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            del half.buf[:sent]
        if half.eof and not half.buf and not half.done:
            half.done = True
            half.dst.shutdown(socket.SHUT_WR)

    def _update(self, pair: _Pair) -> None:
        """Each socket waits for what it can do next: read while its buffer has room and it has
        not ended, write while the other direction holds bytes for it."""
        for sock, inbound, outbound in ((pair.client, pair.up, pair.down),
                                        (pair.upstream, pair.down, pair.up)):
            events = 0
            if not pair.connected:
                events = selectors.EVENT_WRITE if sock is pair.upstream else 0
            else:
                if not inbound.eof and len(inbound.buf) < BUFFER:
                    events |= selectors.EVENT_READ
                if outbound.buf:
                    events |= selectors.EVENT_WRITE
            registered = sock in self.sel.get_map()
            if events and registered:
                self.sel.modify(sock, events)
            elif events:
                self.sel.register(sock, events)
            elif registered:
                self.sel.unregister(sock)

    def _close(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.upstream):
            self.pairs.pop(sock, None)
            if sock in self.sel.get_map():
                self.sel.unregister(sock)
            sock.close()


# --- the process and its handle ------------------------------------------------------------------


@dataclass
class Relay:
    """The relay for one node namespace, as a process of its own (``python -m lbctl.lab.relay``).

    tie_to_parent: the relay dies with the process (strictly: the thread) that started it, as
    the lab's tests want; `lbctl lab up` leaves it off, as for the control plane, so that the
    relay outlives the command and `lbctl lab down` stops it by its pid."""

    ns: str
    port: int
    log: Path | None = None
    tie_to_parent: bool = True
    target_port: int | None = None      # root namespace's port (default: the same as `port`)
    pid: int | None = None

    def argv(self) -> list[str]:
        argv = netns.python_argv("lbctl.lab.relay", "--netns", self.ns, "--port", str(self.port))
        if self.target_port is not None and self.target_port != self.port:
            argv += ["--target-port", str(self.target_port)]
        return argv

    def start(self, timeout: float = START_TIMEOUT) -> Relay:
        """Start the process and return once it accepts connections in the namespace."""
        log = self.log or Path(f"/tmp/lbctl-relay-{self.ns}-{self.port}.log")
        self.log = log
        self.pid = kube.spawn(self.argv(), log, self.tie_to_parent, env=netns.python_env())
        deadline = time.monotonic() + timeout
        while not netns.in_netns(self.ns, _accepts, self.port):
            if not netns.pid_alive(self.pid):
                netns.reap(self.pid)
                raise RelayError(f"relay for netns {self.ns} port {self.port} exited: "
                                 f"{kube.log_tail(log)} (log {log})")
            if time.monotonic() > deadline:
                self.stop()
                raise RelayError(f"relay for netns {self.ns} port {self.port} did not listen "
                                 f"within {timeout:.0f}s; log {log}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM (the loop closes every connection and the listener), SIGKILL after a grace.
        Idempotent; a pid that now belongs to another program is left alone."""
        if self.pid is None:
            return
        if any("lbctl.lab.relay" in arg for arg in netns.process_cmdline(self.pid)):
            netns.stop_process(self.pid)
        netns.reap(self.pid)
        self.pid = None

    def __enter__(self) -> Relay:
        return self if self.pid is not None else self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    """A connection to 127.0.0.1:port (here) is accepted: something listens."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbctl.lab.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--netns", required=True, help="the namespace to listen in (/run/netns/NAME)")
    parser.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT there")
    parser.add_argument("--target-port", type=int, default=None,
                        help="forward to 127.0.0.1:TARGET_PORT here (default: --port)")
    args = parser.parse_args(argv)
    try:
        listener = listen_in(args.netns, "127.0.0.1", args.port)
    except OSError as exc:
        print(f"relay: cannot listen on 127.0.0.1:{args.port} in netns {args.netns}: {exc}",
              file=sys.stderr)
        return 1
    forwarder = Forwarder(listener, ("127.0.0.1", args.target_port or args.port))
    signal.signal(signal.SIGTERM, forwarder.stop)
    signal.signal(signal.SIGINT, forwarder.stop)
    print(f"relay: 127.0.0.1:{args.port} in netns {args.netns} -> 127.0.0.1:"
          f"{args.target_port or args.port} (pid {os.getpid()})", flush=True)
    forwarder.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
