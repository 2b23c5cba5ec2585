"""The process the socket load balancer tests watch: it joins a cgroup before it opens any socket
(a socket belongs to the cgroup of the process that created it), then runs socket calls it is
sent on stdin, one JSON object a line, and answers each with one JSON line on stdout.

    python tests/test_sock_lb_probe.py --cgroup /sys/fs/cgroup/unified/lbctl-test-1
    nsenter --net=/run/netns/NAME python tests/test_sock_lb_probe.py --cgroup ...

Not a test module (pytest finds nothing to run here): tests/test_sock_lb.py starts it.

    {"op": "tcp", "addr": A, "port": P}        connect, read the backend's line: who answered,
                                               getpeername(), the client address it saw, the
                                               seconds connect() took
    {"op": "tcp_many", ..., "count": N}        N of those: the answering pods, the seconds each
                                               connect()+reply took, and their sum
    {"op": "udp_connect", "id": S, ...}        a connected UDP socket kept as S: getpeername()
    {"op": "udp_ask", "id": S}                 send on S, recvfrom(): who answered, from where
    {"op": "udp_recv", "id": S}                recvfrom() on S only
    {"op": "udp_sendto", ...}                  a fresh unconnected socket: sendto(), recvfrom()
    {"op": "close", "id": S}
A failing call answers {"errno": N, "error": "ECONNREFUSED"} (or "timeout").
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time

TIMEOUT = 2.0
PAYLOAD = b"lbctl-sock\n"


def failure(exc: OSError) -> dict:
    if isinstance(exc, TimeoutError):
        return {"errno": 0, "error": "timeout"}
    return {"errno": exc.errno, "error": errno.errorcode.get(exc.errno or 0, str(exc))}


def reply_of(data: bytes) -> dict:
    pod, seen = data.decode().strip().split(" ")
    return {"pod": pod, "seen": seen.rsplit(":", 1)[0]}


def tcp(addr: str, port: int) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        start = time.perf_counter()
        try:
            s.connect((addr, port))
        except OSError as exc:
            return {**failure(exc), "stage": "connect"}
        connect_s = time.perf_counter() - start
        try:
            peer = list(s.getpeername())
            data = b""
            while not data.endswith(b"\n") and (chunk := s.recv(512)):
                data += chunk
        except OSError as exc:
            return {**failure(exc), "stage": "reply", "sport": s.getsockname()[1]}
    return {**reply_of(data), "peer": peer, "connect_s": connect_s}


class Probe:
    def __init__(self) -> None:
        self.udp: dict[str, socket.socket] = {}

    def run(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "tcp":
            return tcp(cmd["addr"], cmd["port"])
        if op == "tcp_many":
            answers, times = [], []
            for _ in range(cmd["count"]):
                start = time.perf_counter()
                answers.append(tcp(cmd["addr"], cmd["port"]))
                times.append(time.perf_counter() - start)
            return {"answers": answers, "seconds": sum(times), "times": times}
        if op == "udp_connect":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(TIMEOUT)
            try:
                s.connect((cmd["addr"], cmd["port"]))
            except OSError as exc:
                s.close()
                return failure(exc)
            self.udp[cmd["id"]] = s
            return {"peer": list(s.getpeername())}
        if op == "udp_ask":
            s = self.udp[cmd["id"]]
            try:
                s.send(PAYLOAD)
                data, source = s.recvfrom(2048)
            except OSError as exc:
                return failure(exc)
            return {**reply_of(data), "from": list(source)}
        if op == "udp_recv":
            s = self.udp[cmd["id"]]
            try:
                data, source = s.recvfrom(2048)
            except OSError as exc:
                return failure(exc)
            return {**reply_of(data), "from": list(source)}
        if op == "udp_sendto":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT)
                try:
                    s.sendto(PAYLOAD, (cmd["addr"], cmd["port"]))
                    data, source = s.recvfrom(2048)
                except OSError as exc:
                    return failure(exc)
            return {**reply_of(data), "from": list(source)}
        if op == "close":
            self.udp.pop(cmd["id"]).close()
            return {}
        raise ValueError(f"unknown op {op!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cgroup", help="cgroup v2 directory to join first (default: stay)")
    args = parser.parse_args()
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    probe = Probe()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        try:
            answer = probe.run(json.loads(line))
        except Exception as exc:   # a bad command: said, and the probe goes on
            answer = {"bug": repr(exc)}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
