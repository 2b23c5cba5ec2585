"""Network namespaces, pod veths and processes for the lab and the datapath tests.

Everything here shells out to iproute2 (``ip``), the tool an operator would type, so each step can
be replayed by hand. Each setup function has a cleanup partner that is idempotent and tolerates
half-made state:

    add_netns            <-> del_netns
    add_pod              <-> del_pod          (veth pair, addresses, routes)
    add_route            <-> del_route
    set_ip_forward       <-> set_ip_forward(previous)
    set_sysctls          <-> set_sysctls(previous)
    spawn_in             <-> stop_process     (detached process inside a namespace)

Pods are wired like the ptp CNI plugin (kind's kindnet): the pod gets ``IP/32`` on ``eth0`` and a
default route via the gateway, which is reachable "scope link" on ``eth0``; the host end of the veth
carries the gateway address as ``/32`` (the same address on every host veth) and a route
``IP/32 dev <host veth>``. No bridge, so every pod packet crosses the host end of its veth, where
tc programs can see it. The host end lives in the pod's node: the root namespace, or the node's
own namespace (``Pod.node_ns``).

Commands that configure one namespace go to iproute2 as one batch (``ip [-n NS] -batch -``) and
sysctls are written from a thread that entered the namespace (``in_netns``): a lab of many pods
costs a few processes per pod, not a dozen.

Processes that need bpffs or the cgroup2 mount (an agent, ``bpftool``) must enter a namespace with
``nsenter --net=/run/netns/NS`` (``enter_argv``): ``ip netns exec`` mounts a fresh /sys, in which
neither exists.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

IFNAMSIZ = 15                       # longest interface name Linux accepts (16 with the NUL)
NETNS_DIR = Path("/run/netns")      # where `ip netns add` pins named namespaces
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]   # the directory holding lbctl/


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class NetnsError(RuntimeError):
    """An iproute2 command failed; the message names the command and what it printed."""


# --- running commands ------------------------------------------------------------------------


def run(argv: list[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv in the node's namespace, capturing text output; raise NetnsError on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                          env=env)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n ns] args...`."""
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def ip_batch(lines: Iterable[str], ns: str | None = None) -> None:
    """Several ip commands (``link add ...``, one a line) in one ``ip [-n ns] -batch -``. iproute2
    stops at the first failing line and says which; NetnsError then names the batch."""
    text = "".join(line + "\n" for line in lines)
    if text:
        run(["ip", *(["-n", ns] if ns else []), "-batch", "-"], input=text)


def enter_argv(ns: str | None) -> list[str]:
    """The argv prefix that runs a command in namespace ns (nothing for the root namespace), with
    this mount namespace's /sys (bpffs and cgroup2 stay visible)."""
    return ["nsenter", f"--net={NETNS_DIR / ns}", "--"] if ns else []


def in_netns(ns: str | None, fn: Callable[..., T], *args) -> T:
    """fn(*args) in network namespace ns (None: here), its result or its exception.

    setns() moves only the calling thread, so a thread enters ns, calls fn and ends: sockets it
    makes, processes it starts and /proc/sys/net it reads or writes are ns's; the caller's own
    thread never moves."""
    if ns is None:
        return fn(*args)
    out: list = []

    def enter() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into netns {ns}")
            finally:
                os.close(fd)
            out.append((True, fn(*args)))
        except BaseException as exc:       # handed to the caller's thread
            out.append((False, exc))

    thread = threading.Thread(target=enter, name=f"netns-{ns}")
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def run_in(ns: str, argv: list[str], *, check: bool = True, timeout: float = 30.0,
           input: str | None = None, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run argv inside network namespace ns (`ip netns exec`), capturing text output."""
    return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout, input=input,
               env=env)


def python_argv(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def python_env() -> dict[str, str]:
    """Environment in which `python -m lbctl.xxx` imports this source tree, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


# --- namespaces ------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    """Create a named network namespace with `lo` up. Cleanup: del_netns."""
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", ns=name)
    except BaseException:
        del_netns(name)
        raise


def del_netns(name: str) -> None:
    """Delete a named namespace if present. The kernel frees it (and veth ends in it) once the
    last process inside has gone: stop those first (netns_pids), and delete veths explicitly
    (del_link) when they must be gone at once, since namespace teardown is asynchronous."""
    if netns_exists(name):
        ip("netns", "del", name)


def netns_pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is ns `name`."""
    if not netns_exists(name):
        return []
    return [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]


def list_netns() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


# --- links and routes ------------------------------------------------------------------------


def link_exists(name: str, ns: str | None = None) -> bool:
    """Whether link `name` exists in ns (None: the root namespace). Read through /proc/sys/net,
    which follows the reader's namespace, unlike /sys/class/net (the mounting process's)."""
    if ns is not None and not netns_exists(ns):
        return False
    return in_netns(ns, os.path.exists, f"/proc/sys/net/ipv4/conf/{name}") or \
        (ns is None and Path("/sys/class/net", name).exists())


def del_link(name: str, ns: str | None = None) -> None:
    """Delete a link in namespace ns (None: the root namespace) if present (a veth takes its
    peer with it)."""
    if link_exists(name, ns):
        ip("link", "del", name, ns=ns, check=False)
        if link_exists(name, ns):
            where = f"-n {ns} " if ns else ""
            raise NetnsError(f"could not delete link {name}; try `ip {where}link del {name}`")


def add_route(route: str) -> None:
    """`ip route replace <route>` in the node, e.g. "unreachable 10.96.0.0/16".
    Cleanup: del_route."""
    ip("route", "replace", *route.split())


def del_route(route: str) -> None:
    """`ip route del <route>`; a route that is already gone is fine."""
    proc = ip("route", "del", *route.split(), check=False)
    if proc.returncode != 0 and "No such process" not in proc.stderr:
        raise NetnsError(f"`ip route del {route}` failed: {proc.stderr.strip()}")


def add_rule(rule: str) -> None:
    """`ip rule add <rule>` in the root namespace, unless that exact rule is there.
    Cleanup: del_rule."""
    if not rule_exists(rule):
        ip("rule", "add", *rule.split())


def rule_exists(rule: str) -> bool:
    return ip("rule", "list", *rule.split(), check=False).stdout.strip() != ""


def del_rule(rule: str) -> None:
    """`ip rule del <rule>` while it exists."""
    while rule_exists(rule):
        ip("rule", "del", *rule.split())


def set_sysctls(ns: str | None, values: dict[str, str]) -> dict[str, str]:
    """Write sysctls ("net.ipv4.ip_forward": "1") in namespace ns (None: the root namespace);
    returns the values they had, which set_sysctls(ns, previous) puts back."""
    def write() -> dict[str, str]:
        previous = {}
        for name, value in values.items():
            path = Path("/proc/sys", *name.split("."))
            previous[name] = path.read_text().strip()
            path.write_text(value + "\n")
        return previous
    return in_netns(ns, write)


def set_sysctl(path: Path, value: str) -> str:
    """Write value to a /proc/sys file and return the value it had."""
    previous = path.read_text().strip()
    path.write_text(value + "\n")
    return previous


def set_ip_forward(value: str) -> str:
    """Set net.ipv4.ip_forward in the node; returns the previous value, to restore on teardown."""
    return set_sysctl(IP_FORWARD, value)


# --- pods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod: namespace `ns` joined to its node by veth `host_link` <-> `eth0` (inside ns); the
    host end is in namespace `node_ns` (None: the root namespace is the node)."""

    name: str
    ns: str
    ip: str
    host_link: str
    gateway: str = "10.244.0.1"
    node: str = "lab-node"
    node_ns: str | None = None


def check_link_name(name: str) -> None:
    if not name.startswith("veth") or len(name) > IFNAMSIZ:
        raise ValueError(f"host veth name {name!r} must start with 'veth' and have at most "
                         f"{IFNAMSIZ} characters; use a shorter lab prefix")


def add_pod(pod: Pod) -> None:
    """Create pod's namespace, veth pair, addresses and routes (ptp CNI style).

    If a step fails, what this call made is removed before the error propagates.
    Cleanup: del_pod.
    """
    check_link_name(pod.host_link)
    ip("netns", "add", pod.ns)     # lo comes up with the pod's other settings
    try:
        _wire_pod(pod)
    except BaseException:
        del_pod(pod)
        raise


IPV6_OFF = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


def _wire_pod(pod: Pod) -> None:
    # IPv6 off inside the pod (set before eth0 exists, so eth0 inherits it) and on the host end:
    # no link-local addresses, router solicitations or MLD reports in the datapath under test.
    # (A node namespace has IPv6 off by default for its new links: see the lab's node setup.)
    set_sysctls(pod.ns, IPV6_OFF)
    ip("link", "add", pod.host_link, "type", "veth", "peer", "name", "eth0", "netns", pod.ns,
       ns=pod.node_ns)
    if pod.node_ns is None:
        set_sysctl(Path("/proc/sys/net/ipv6/conf", pod.host_link, "disable_ipv6"), "1")
    ip_batch([f"addr add {pod.ip}/32 dev eth0",
              "link set lo up",
              "link set eth0 up",
              f"route add {pod.gateway} dev eth0 scope link",
              f"route add default via {pod.gateway} dev eth0"], ns=pod.ns)
    ip_batch([f"addr add {pod.gateway}/32 dev {pod.host_link}",
              f"link set {pod.host_link} up",
              f"route add {pod.ip}/32 dev {pod.host_link} scope link"], ns=pod.node_ns)


def del_pod(pod: Pod) -> None:
    """Remove pod's processes, veth pair (with its addresses and routes) and namespace.
    Idempotent; works on a pod that add_pod left half made."""
    for pid in netns_pids(pod.ns):
        stop_process(pid)
    del_link(pod.host_link, pod.node_ns)
    del_netns(pod.ns)


# --- processes -------------------------------------------------------------------------------


def spawn_in(ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start argv inside ns, detached (own session, stdin from /dev/null, stdout and stderr to
    `log`), and return its pid. `ip netns exec` execs argv, so the pid is argv's own.
    Cleanup: stop_process(pid).

    posix_spawn rather than subprocess.Popen: the caller keeps only a pid (it may be another
    process that stops it), and no Popen object warns that its child is still running.
    """
    full = ["/usr/bin/env", "ip", "netns", "exec", ns, *argv]
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    # posix_spawn, unlike Popen, keeps every inheritable descriptor the caller has: a server
    # living for an hour would hold whatever its starter inherited (a `flock FILE cmd` lock,
    # a pipe a test harness waits on to close) for that hour.
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 2]
    # Default dispositions and no blocked signals, whatever the caller had (a shell's background
    # job ignores SIGINT): stop_process relies on SIGTERM.
    return os.posix_spawn(full[0], full, env if env is not None else dict(os.environ),
                          file_actions=actions, setsid=True, setsigmask=(),
                          setsigdef=(signal.SIGINT, signal.SIGTERM))


def _inheritable_fds() -> list[int]:
    """This process's descriptors that a spawned child would inherit (no close-on-exec)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                fds.append(fd)
        except OSError:        # the descriptor listdir itself used, closed meanwhile
            continue
    return fds


def process_state(pid: int) -> str | None:
    """The one-letter state of pid (R, S, Z, ...) or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped) counts as gone."""
    return process_state(pid) not in (None, "Z", "X")


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def reap(pid: int) -> None:
    """Collect pid's exit status if it is our child (so it leaves no zombie); else do nothing."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_process(pid: int, grace: float = 2.0) -> None:
    """SIGTERM pid, SIGKILL it after `grace` seconds, reap it if it is our child. Idempotent."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap(pid)
            if not pid_alive(pid):
                break
            time.sleep(0.01)
        if not pid_alive(pid):
            break
    reap(pid)
    if pid_alive(pid):
        raise NetnsError(f"process {pid} survived SIGKILL (state {process_state(pid)})")
