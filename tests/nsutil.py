"""Test helpers: sockets inside a network namespace, waiting for conditions, a strict node."""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(ns: str, family=socket.AF_INET, kind=socket.SOCK_DGRAM) -> socket.socket:
    """A socket created inside network namespace `ns`. setns() changes only the calling
    thread, so a short-lived thread enters the namespace, makes the socket and exits; the
    socket stays in that namespace wherever it is used from."""
    made: list = []

    def enter():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                made.append(OSError(ctypes.get_errno(), f"setns {ns}"))
                return
            made.append(socket.socket(family, kind))
        finally:
            os.close(fd)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    if isinstance(made[0], Exception):
        raise made[0]
    return made[0]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


TCP_BE_LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"


def _sysctl(path: str, value: str | None = None) -> str | None:
    """Reads (and with `value` writes) a /proc/sys file; None if it does not exist."""
    try:
        with open(path) as f:
            previous = f.read().strip()
        if value is not None:
            with open(path, "w") as f:
                f.write(value + "\n")
        return previous
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def strict_node(prefix: str, links: list[str]):
    """The lab node as kind and hardened hosts run it, for as long as the block lasts:

    * strict reverse-path filtering (rp_filter=1, kind's setting) on the lab's pod links: a
      packet whose source would not be routed back out of the link it came in by is dropped;
    * conntrack-INVALID packets from the lab's pods dropped in FORWARD, as kube-proxy's own
      KUBE-FORWARD rule does (and Calico, ufw, firewalld hardening): a datapath that shows
      netfilter one tuple on the way in and another on the way back breaks TCP here;
    * net.netfilter.nf_conntrack_tcp_be_liberal=0 (kube-proxy's default), so that conntrack
      judges TCP windows and states strictly.

    Everything is put back afterwards (links that are gone take their sysctls with them)."""
    rule = ["FORWARD", "-i", f"veth{prefix}+", "-m", "conntrack", "--ctstate", "INVALID",
            "-m", "comment", "--comment", f"lbctl-test-invalid-drop:{prefix}", "-j", "DROP"]
    rp_filter = {link: _sysctl(f"/proc/sys/net/ipv4/conf/{link}/rp_filter", "1") for link in links}
    liberal = None
    subprocess.run(["iptables", "-w", "-I", *rule], check=True)
    try:
        liberal = _sysctl(TCP_BE_LIBERAL, "0")   # exists once conntrack is loaded (by the rule)
        yield
    finally:
        subprocess.run(["iptables", "-w", "-D", *rule], check=False)
        if liberal is not None:
            _sysctl(TCP_BE_LIBERAL, liberal)
        for link, value in rp_filter.items():
            if value is not None:
                _sysctl(f"/proc/sys/net/ipv4/conf/{link}/rp_filter", value)
