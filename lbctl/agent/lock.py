"""One agent per node: an exclusive lock next to the pinned maps' state.

Two agents on one node fight: each programs its own view and removes the other's services, and
neither notices. So `lbctl run` (every mode: a node has one kube-proxy), `lbctl demo` and
`lbctl cleanup` take a lock before anything touches the kernel. bpffs holds no regular files,
so the lock is ``/run/lbctl/agent-<tag>.lock``, the tag derived from the pin dir as the agent's
state file is (``dump.state_file``; ``$LBCTL_RUN_DIR`` moves both): another pin dir is another
datapath (tests, the demo).

The lock is ``flock(LOCK_EX | LOCK_NB)`` on that file, which holds the holder's pid, pin dir
and command, so that the refusal names it. The kernel drops the lock when the holder dies, so
a crashed agent never blocks the next one; the holder removes the file when it lets go (first
checking that the path is still its file: a waiter that opened the file just before then sees
it gone and tries again on a fresh one).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lbctl.datapath.ebpf import dump

log = logging.getLogger(__name__)

LOCK_PREFIX, LOCK_SUFFIX = "agent-", ".lock"


def lock_path(pin_dir: str, run_dir: str | None = None) -> str:
    return os.path.join(run_dir or dump.state_dir(), f"{LOCK_PREFIX}{dump.pin_tag(pin_dir)}{LOCK_SUFFIX}")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in its file (pid None: unreadable, or being written)."""

    path: str
    pid: int | None
    pin_dir: str = ""
    command: str = ""

    def __str__(self) -> str:
        who = f"pid {self.pid}" if self.pid else "pid unknown"
        what = f"`{self.command}`, " if self.command else ""
        return f"{what}{who}, maps under {self.pin_dir or '?'}, lock {self.path}"


class AgentRunning(RuntimeError):
    """Another lbctl process holds the lock; the message names it and the way out."""

    def __init__(self, holder: Holder, wanted: str):
        self.holder = holder
        super().__init__(
            f"{wanted}: refused, another lbctl agent runs on this node ({holder}); one agent "
            f"per node: stop that one first (kill {holder.pid or '<pid>'})")


def read_holder(path: str) -> Holder:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    pid = int(lines[0]) if lines and lines[0].isdigit() else None
    return Holder(path, pid, *(lines[1:3] + ["", ""])[:2])


class AgentLock:
    """The lock of one pin dir. `acquire()` raises AgentRunning naming the holder."""

    def __init__(self, pin_dir: str, command: str = "lbctl run", run_dir: str | None = None):
        self.pin_dir = pin_dir
        self.command = command
        self.path = lock_path(pin_dir, run_dir)
        self.fd = -1

    def acquire(self) -> AgentLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AgentRunning(read_holder(self.path), self.command) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)   # its holder removed it between our open and our flock: again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.pin_dir}\n{self.command}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd < 0:
            return
        if _same_file(self.fd, self.path):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> AgentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def running_agents(run_dir: str | None = None, exclude: str | None = None) -> list[Holder]:
    """Every lbctl agent (or demo, or cleanup) holding a lock on this node, whatever its pin dir.
    Lock files nobody holds (their holder was killed) are removed on the way."""
    found = []
    directory = Path(run_dir or dump.state_dir())
    for path in sorted(directory.glob(f"{LOCK_PREFIX}*{LOCK_SUFFIX}")):
        if exclude is not None and str(path) == exclude:
            continue
        with contextlib.suppress(FileNotFoundError):
            holder = _probe(str(path))
            if holder is not None:
                found.append(holder)
    return found


def _probe(path: str) -> Holder | None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(path)
        if _same_file(fd, path):   # stale: its holder died without removing it
            os.unlink(path)
        return None
    finally:
        os.close(fd)
