"""lbctl.lab.relay: 127.0.0.1:PORT inside a namespace forwards to 127.0.0.1:PORT in the root one.

A namespace of this test's own (no lab needed) and a server on the root namespace's loopback: bytes
pass both ways unchanged and in order past the relay's bounded buffers, a half-close is passed on,
connections run side by side, a refused upstream closes the client, and stop() leaves no
process and no listener behind.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from lbctl.lab import kube, netns
from lbctl.lab.relay import BUFFER, Relay

pytestmark = [pytest.mark.root, pytest.mark.netns]


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"lbkp-relay{os.getpid() % 100000}"
    netns.add_netns(name)
    try:
        yield name
    finally:
        for pid in netns.netns_pids(name):
            netns.stop_process(pid)
        netns.del_netns(name)


class DigestServer:
    """On 127.0.0.1 (root namespace): per connection, read to end-of-file, then answer the
    SHA-256 of what came and as many bytes again (a pattern), then close."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn:
            digest, size = hashlib.sha256(), 0
            while data := conn.recv(65536):
                digest.update(data)
                size += len(data)
            conn.sendall(digest.hexdigest().encode() + b"\n" + pattern(size))

    def close(self) -> None:
        self.sock.close()


def pattern(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def exchange(ns: str, port: int, payload: bytes) -> bytes:
    """From inside ns: connect to 127.0.0.1:port, send payload, half-close, read to the end."""
    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
            return b"".join(chunks)
    return netns.in_netns(ns, run)


def test_the_relay_carries_both_directions_and_half_closes_then_stops_clean(ns, tmp_path):
    server = DigestServer()
    try:
        relay = Relay(ns, server.port, log=tmp_path / "relay.log").start()
        assert relay.pid is not None
        pid = relay.pid
        with relay:
            payload = os.urandom(4 * BUFFER + 12345)     # several times what the relay holds
            answer = exchange(ns, server.port, payload)
            head, _, body = answer.partition(b"\n")
            assert head.decode() == hashlib.sha256(payload).hexdigest()
            assert body == pattern(len(payload))

            results: dict[int, bytes] = {}

            def one(i: int) -> None:
                results[i] = exchange(ns, server.port, bytes([i]) * (100_000 + i))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, got in results.items():
                assert got.split(b"\n", 1)[0].decode() == hashlib.sha256(bytes([i]) * (100_000 + i)).hexdigest()
            assert len(results) == 8
            assert exchange(ns, server.port, b"") == hashlib.sha256(b"").hexdigest().encode() + b"\n"
        assert not netns.pid_alive(pid), "stop() ended the relay"
        assert not netns.in_netns(ns, _listening, server.port), "and its listener"
    finally:
        server.close()


def test_a_refused_upstream_closes_the_client(ns, tmp_path):
    port = kube.free_port()                  # nothing listens there in the root namespace
    with Relay(ns, port, log=tmp_path / "relay.log") as relay:
        def attempt() -> bytes | str:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                try:
                    return s.recv(10)
                except ConnectionResetError as exc:
                    return str(exc)
        assert netns.in_netns(ns, attempt) in (b"", "[Errno 104] Connection reset by peer")
        assert relay.pid is not None and netns.pid_alive(relay.pid), "the relay keeps serving"
        assert relay.log is not None and f"connect to 127.0.0.1:{port} failed" in relay.log.read_text()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
