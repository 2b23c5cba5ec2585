"""A lab client: many short requests to one address, and which pods answered them.

    python -m lbctl.lab.client --proto tcp --target 10.96.0.10:80 --count 3000

Each request is a new connection (TCP: connect, read the backend's line) or a new UDP socket (so a
new source port: a new flow for the load balancer) that sends one datagram and waits for the reply.
Requests run on --concurrency threads, at most --count of them and for at most --max-seconds.
Prints one JSON object:

    {"answers": {"web-0": 1003, ...},        # pod name -> replies
     "errors": {"timeout": 0, "refused": 0, "unreachable": 0, "other": 0},
     "other_detail": {"ECONNRESET": 0, ...},  # what the "other" errors were
     "peers": {"10.244.0.2": 3000},          # client address as the backend saw it -> replies
     "sent": 3000, "elapsed": 1.42}

Errors: "refused" is a TCP reset (ECONNREFUSED with no ICMP error behind it); "unreachable" is an
ICMP destination unreachable of any code, port unreachable included (read from the socket's error
queue, IP_RECVERR), or no route at all; "timeout" is no answer within --timeout.
"""
from __future__ import annotations

import argparse
import errno
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from lbctl.lab import netns

IP_RECVERR = 11                # <linux/in.h>; socket.IP_RECVERR is missing before Python 3.12
SO_EE_ORIGIN_ICMP = 2          # <linux/errqueue.h>: the error came from an ICMP message
# struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
ICMP_DEST_UNREACH = 3
UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
UDP_PAYLOAD = b"lbctl-lab\n"
ERROR_KINDS = ("timeout", "refused", "unreachable", "other")


@dataclass(frozen=True)
class Outcome:
    """One request: either the answering pod and the peer address it saw, or an error kind."""

    pod: str | None = None
    peer: str | None = None
    error: str | None = None        # one of ERROR_KINDS
    detail: str | None = None       # for "other": errno name or what was wrong


def parse_reply(data: bytes) -> Outcome:
    """'<pod> <ip>:<port>\\n' -> Outcome(pod, ip)."""
    try:
        pod, peer = data.decode().strip().split(" ")
        return Outcome(pod=pod, peer=peer.rsplit(":", 1)[0])
    except ValueError:
        return Outcome(error="other", detail="bad reply")


def icmp_error(sock: socket.socket) -> tuple[int, int] | None:
    """(type, code) of an ICMP error queued on sock (needs IP_RECVERR), or None."""
    sock.setblocking(False)
    try:
        _, ancdata, _, _ = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
    except OSError:
        return None
    for level, kind, data in ancdata:
        if (level, kind) == (socket.IPPROTO_IP, IP_RECVERR) and len(data) >= SOCK_EXTENDED_ERR.size:
            _, origin, icmp_type, icmp_code, *_ = SOCK_EXTENDED_ERR.unpack_from(data)
            if origin == SO_EE_ORIGIN_ICMP:
                return icmp_type, icmp_code
    return None


def classify(sock: socket.socket, exc: OSError) -> Outcome:
    """Name the error a request ran into (see the module docstring)."""
    if isinstance(exc, TimeoutError):
        return Outcome(error="timeout")
    icmp = icmp_error(sock)
    if icmp is not None and icmp[0] == ICMP_DEST_UNREACH:
        return Outcome(error="unreachable")
    if exc.errno == errno.ECONNREFUSED:
        return Outcome(error="refused")
    if exc.errno in UNREACHABLE_ERRNOS:
        return Outcome(error="unreachable")
    return Outcome(error="other", detail=errno.errorcode.get(exc.errno or 0, str(exc)))


def new_socket(kind: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    sock.settimeout(timeout)
    return sock


def tcp_request(target: tuple[str, int], timeout: float) -> Outcome:
    """Connect, read the backend's line until it closes, report who answered."""
    with new_socket(socket.SOCK_STREAM, timeout) as sock:
        try:
            sock.connect(target)
            data = b""
            while not data.endswith(b"\n") and (chunk := sock.recv(512)):
                data += chunk
        except OSError as exc:
            return classify(sock, exc)
    return parse_reply(data) if data else Outcome(error="other", detail="closed without reply")


def udp_request(target: tuple[str, int], timeout: float) -> Outcome:
    """Send one datagram from a fresh socket (a new source port), wait for one back."""
    with new_socket(socket.SOCK_DGRAM, timeout) as sock:
        try:
            sock.connect(target)          # only replies from target are accepted, as in real apps
            sock.send(UDP_PAYLOAD)
            data = sock.recv(2048)
        except OSError as exc:
            return classify(sock, exc)
    return parse_reply(data)


REQUESTS = {"tcp": tcp_request, "udp": udp_request}


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=lambda: Counter({k: 0 for k in ERROR_KINDS}))
    other_detail: Counter[str] = field(default_factory=Counter)
    peers: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    def add(self, outcome: Outcome) -> None:
        self.sent += 1
        if outcome.error:
            self.errors[outcome.error] += 1
            if outcome.detail:
                self.other_detail[outcome.detail] += 1
        else:
            self.answers[outcome.pod or "?"] += 1   # an answer always names its pod and peer
            self.peers[outcome.peer or "?"] += 1

    def report(self, elapsed: float) -> dict:
        return {"answers": dict(sorted(self.answers.items())), "errors": dict(self.errors),
                "other_detail": dict(self.other_detail), "peers": dict(sorted(self.peers.items())),
                "sent": self.sent, "elapsed": round(elapsed, 3)}


def spread(proto: str, target: tuple[str, int], count: int, *, timeout: float = 1.0,
           concurrency: int = 16, max_seconds: float = 30.0) -> dict:
    """Make `count` requests on `concurrency` threads, stopping at `max_seconds`; the report."""
    request = REQUESTS[proto]
    start = time.monotonic()
    deadline = start + max_seconds
    tally, lock = Tally(), threading.Lock()
    tickets = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                if next(tickets, None) is None:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            outcome = request(target, min(timeout, remaining))
            with lock:
                tally.add(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout + 1.0)
    with lock:
        return tally.report(time.monotonic() - start)


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"target {text!r}: expected IP:PORT, port 1-65535")
    return host, int(port)


def request_spread(ns: str, proto: str, target: str | tuple[str, int], count: int, *,
                   timeout: float = 1.0, concurrency: int = 16, max_seconds: float = 30.0) -> dict:
    """Run the lab client inside network namespace `ns` and return its parsed JSON report."""
    return request_spread_via(["ip", "netns", "exec", ns], proto, target, count, timeout=timeout,
                              concurrency=concurrency, max_seconds=max_seconds)


def request_spread_via(enter: list[str], proto: str, target: str | tuple[str, int], count: int, *,
                       timeout: float = 1.0, concurrency: int = 16, max_seconds: float = 30.0) -> dict:
    """Run the lab client under the argv prefix `enter` (a pod's namespace; a node's namespace
    and cgroup, as a host process: lbctl.lab.cluster.Node.host_argv) and return its report."""
    if not isinstance(target, str):
        target = f"{target[0]}:{target[1]}"
    argv = netns.python_argv("lbctl.lab.client", "--proto", proto, "--target", target,
                             "--count", str(count), "--timeout", str(timeout),
                             "--concurrency", str(concurrency), "--max-seconds", str(max_seconds))
    proc = netns.run([*enter, *argv], timeout=max_seconds + timeout + 15, env=netns.python_env())
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbctl.lab.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proto", choices=sorted(REQUESTS), required=True)
    parser.add_argument("--target", type=parse_target, required=True, help="IP:PORT")
    parser.add_argument("--count", type=int, required=True, help="number of requests")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop after this long")
    args = parser.parse_args(argv)
    if args.count < 0 or args.concurrency < 1:
        parser.error("--count must be >= 0 and --concurrency >= 1")
    report = spread(args.proto, args.target, args.count, timeout=args.timeout,
                    concurrency=args.concurrency, max_seconds=args.max_seconds)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
