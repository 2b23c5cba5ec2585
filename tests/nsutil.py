"""Test helpers: sockets inside a network namespace, waiting for conditions, a strict node."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import subprocess
import threading
import time

from lbctl.lab import netns

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def thread_in(ns: str | None, target, *args, name: str | None = None) -> threading.Thread:
    """A daemon thread (not started) that runs target(*args) inside network namespace ns (None:
    where the caller is): an agent of a lab node, with its netlink sockets, subprocesses (tc,
    iptables, nft, conntrack) and /proc/sys/net in the node's namespace, bpffs as here."""
    return threading.Thread(target=netns.in_netns, args=(ns, target, *args), name=name, daemon=True)


def _on(ns: str | None, argv: list[str]) -> list[str]:
    return netns.enter_argv(ns) + argv


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


def _sysctl(path: str, value: str | None = None, ns: str | None = None) -> str | None:
    """Reads (and with `value` writes) a /proc/sys file in namespace ns; None if it does not
    exist."""
    def access() -> str | None:
        try:
            with open(path) as f:
                previous = f.read().strip()
            if value is not None:
                with open(path, "w") as f:
                    f.write(value + "\n")
            return previous
        except FileNotFoundError:
            return None
    return netns.in_netns(ns, access)


def forget_conntrack(cidr: str, ns: str | None = None) -> None:
    """Deletes the node's conntrack entries from and to `cidr` (a lab's pods). Left by an earlier
    lab or mode, a NATed entry in TIME_WAIT (kube-proxy's modes: client -> VIP, reply backend ->
    client) takes the reply tuple a new un-NATed flow of the eBPF datapath needs on the same
    client port (client -> backend), and netfilter drops that flow's packets as a clash for two
    minutes; kube-proxy's own NAT would pick another source port, the eBPF datapath's tc DNAT
    happens before netfilter and cannot."""
    for direction in ("--src", "--dst"):
        subprocess.run(_on(ns, ["conntrack", "-D", direction, cidr]), capture_output=True, check=False)


@contextlib.contextmanager
def strict_node(prefix: str, links: list[str], pod_cidr: str, ns: str | None = None):
    """The lab node as kind and hardened hosts run it, for as long as the block lasts:

    * strict reverse-path filtering (rp_filter=1, kind's setting) on the lab's pod links: a
      packet whose source would not be routed back out of the link it came in by is dropped;
    * conntrack-INVALID packets from the lab's pods dropped in FORWARD, as kube-proxy's own
      KUBE-FORWARD rule does (and Calico, ufw, firewalld hardening): a datapath that shows
      netfilter one tuple on the way in and another on the way back breaks TCP here;
    * net.netfilter.nf_conntrack_tcp_be_liberal=0 (kube-proxy's default), so that conntrack
      judges TCP windows and states strictly;
    * no conntrack entry of the lab's pods (`pod_cidr`) from before (see forget_conntrack).

    Everything is put back afterwards (links that are gone take their sysctls with them),
    including the table and built-in chains iptables-nft creates on first use.

    ``ns``: a lab node's own namespace (None: the root namespace is the node). There the rule
    drops every forwarded INVALID packet, as KUBE-FORWARD does (the namespace is the lab's);
    in the root namespace only those from the lab's pod links."""
    only_pods = ["-i", f"veth{prefix}+"] if ns is None else []
    rule = ["FORWARD", *only_pods, "-m", "conntrack", "--ctstate", "INVALID",
            "-m", "comment", "--comment", f"lbctl-test-invalid-drop:{prefix}", "-j", "DROP"]
    rp_filter = {link: _sysctl(f"/proc/sys/net/ipv4/conf/{link}/rp_filter", "1", ns) for link in links}
    liberal = None
    chains_before = _nft_filter_chains(ns=ns)
    subprocess.run(_on(ns, ["iptables", "-w", "-I", *rule]), check=True)
    try:
        liberal = _sysctl(TCP_BE_LIBERAL, "0", ns)   # exists once conntrack is loaded (by the rule)
        forget_conntrack(pod_cidr, ns)
        yield
    finally:
        subprocess.run(_on(ns, ["iptables", "-w", "-D", *rule]), check=False)
        _remove_what_iptables_nft_made(chains_before, ns)
        forget_conntrack(pod_cidr, ns)
        if liberal is not None:
            _sysctl(TCP_BE_LIBERAL, liberal, ns)
        for link, value in rp_filter.items():
            if value is not None:
                _sysctl(f"/proc/sys/net/ipv4/conf/{link}/rp_filter", value, ns)


def _nft_filter(family: str = "ip", ns: str | None = None) -> tuple[set[str], set[str]] | None:
    """(chains, chains with rules) of nftables table `family filter`, or None if there is none."""
    done = subprocess.run(_on(ns, ["nft", "-j", "list", "table", family, "filter"]), capture_output=True,
                          text=True)
    if done.returncode != 0:
        return None
    items = [next(iter(item.items())) for item in json.loads(done.stdout).get("nftables", [])]
    return ({b["name"] for kind, b in items if kind == "chain"},
            {b["chain"] for kind, b in items if kind == "rule"})


def _nft_filter_chains(ns: str | None = None) -> set[str] | None:
    table = _nft_filter(ns=ns)
    return None if table is None else table[0]


def _remove_what_iptables_nft_made(chains_before: set[str] | None, ns: str | None = None) -> None:
    """iptables-nft made `table ip filter` (or chains in it) for our rule: remove what it made,
    if nothing else uses it by now."""
    table = _nft_filter(ns=ns)
    if table is None:
        return
    chains, used = table
    if chains_before is None and not used:
        subprocess.run(_on(ns, ["nft", "delete", "table", "ip", "filter"]), check=False)
        return
    for chain in chains - (chains_before or set()) - used:
        subprocess.run(_on(ns, ["nft", "delete", "chain", "ip", "filter", chain]), check=False)


def masquerade_ports(proto: str, source: str, destination: str, ns: str | None = None) -> list[int]:
    """The reply direction's destination port of each of the node's conntrack entries of `proto`
    flows from `source` to `destination`: the port source NAT gave the flow (its own if none)."""
    done = subprocess.run(_on(ns, ["conntrack", "-L", "-p", proto, "-s", source, "-d", destination]),
                          capture_output=True, text=True, check=True)
    ports = []
    for line in done.stdout.splitlines():
        dports = [int(f.split("=")[1]) for f in line.split() if f.startswith("dport=")]
        if len(dports) == 2:
            ports.append(dports[1])
    return ports
