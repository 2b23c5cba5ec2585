"""Test helpers: sockets inside a network namespace, waiting for conditions."""
from __future__ import annotations

import ctypes
import os
import socket
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
