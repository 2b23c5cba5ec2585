"""A lab backend: tells every client which pod answered and where the client came from.

    python -m lbctl.lab.server --name web-0 --tcp 8080 --udp 5353,5354

Every TCP connection gets one line, ``"<pod-name> <peer-ip>:<peer-port>\\n"``, and is closed;
every UDP datagram gets the same line back as one datagram. The peer is the source address as the
backend sees it, so a test can tell whether the load balancer kept the client's address (DNAT only)
or replaced it (masquerade). One thread, one selector; exits on SIGTERM or SIGINT, and by itself
after --max-seconds so that a forgotten server never lingers.
"""
from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
import time

LISTEN_BACKLOG = 4096     # a burst of connections must not overflow the accept queue (SYN drops
                          # would cost the client a 1 s retransmit)


def reply_line(pod: str, peer: tuple[str, int]) -> bytes:
    return f"{pod} {peer[0]}:{peer[1]}\n".encode()


def parse_ports(text: str) -> list[int]:
    ports = [int(p) for p in text.split(",") if p.strip()]
    for port in ports:
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} out of range (1-65535)")
    return ports


def open_sockets(tcp_ports: list[int], udp_ports: list[int]) -> list[socket.socket]:
    socks = []
    for port in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(LISTEN_BACKLOG)
        socks.append(s)
    for port in udp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        socks.append(s)
    for s in socks:
        s.setblocking(False)
    return socks


def answer_tcp(listener: socket.socket, pod: str) -> None:
    """Accept every pending connection, write the line, close (the server sends the FIN)."""
    while True:
        try:
            conn, peer = listener.accept()
        except BlockingIOError:
            return
        except OSError:          # e.g. ECONNABORTED: the client gave up before we accepted
            continue
        with conn:
            try:
                conn.sendall(reply_line(pod, peer))
            except OSError:
                pass


def answer_udp(sock: socket.socket, pod: str) -> None:
    """Answer every pending datagram with one datagram."""
    while True:
        try:
            _, peer = sock.recvfrom(2048)
        except BlockingIOError:
            return
        except OSError:          # e.g. ECONNREFUSED left by an ICMP error for an earlier reply
            continue
        try:
            sock.sendto(reply_line(pod, peer), peer)
        except OSError:
            pass


def serve(pod: str, tcp_ports: list[int], udp_ports: list[int], max_seconds: float) -> None:
    socks = open_sockets(tcp_ports, udp_ports)
    sel = selectors.DefaultSelector()
    for s in socks:
        handler = answer_tcp if s.type == socket.SOCK_STREAM else answer_udp
        sel.register(s, selectors.EVENT_READ, handler)
    print(f"{pod}: serving tcp {tcp_ports} udp {udp_ports} for at most {max_seconds:.0f}s",
          flush=True)
    deadline = time.monotonic() + max_seconds
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=min(remaining, 1.0)):
                key.data(key.fileobj, pod)
    finally:
        sel.close()
        for s in socks:
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbctl.lab.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="pod name to answer with")
    parser.add_argument("--tcp", type=parse_ports, default=[], help="TCP ports, comma separated")
    parser.add_argument("--udp", type=parse_ports, default=[], help="UDP ports, comma separated")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="exit after this long (default 3600)")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.name, args.tcp, args.udp, args.max_seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
