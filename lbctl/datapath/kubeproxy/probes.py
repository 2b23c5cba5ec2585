"""What kube-proxy detects on its node before it writes a rule, probed on this host.

``lbctl run --mode iptables`` uses these for its own node; ``lbctl render iptables`` uses them
as defaults that a flag overrides (to render for another node):

- ``probe_random_fully``: kube-proxy's HasRandomFully() is "iptables >= 1.6.2". We also require a
  kernel >= 3.14 (the first with NF_NAT_RANGE_PROTO_RANDOM_FULLY), which kube-proxy assumes.
- ``probe_nfacct``: kube-proxy creates two nfacct counters over netlink at startup and adds
  ``-m nfacct`` only if that worked. We answer "yes" when the nfnetlink_acct module is loaded,
  built in, or installed (netlink autoloads it); kube-proxy can still fail without
  CAP_NET_ADMIN, which we cannot see from here.
- ``probe_tcp_be_liberal``: net.netfilter.nf_conntrack_tcp_be_liberal != 0, read as kube-proxy
  does (no INVALID-drop rule is written then).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

TCP_BE_LIBERAL_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
RANDOM_FULLY_MIN_IPTABLES = (1, 6, 2)
RANDOM_FULLY_MIN_KERNEL = (3, 14)


def version(text: str) -> tuple[int, ...] | None:
    """The first "major.minor[.patch]" in ``text`` ("iptables v1.8.9 (nf_tables)" -> (1, 8, 9))."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def probe_random_fully() -> bool:
    """iptables >= 1.6.2 (what kube-proxy checks) on a kernel >= 3.14."""
    try:
        out = subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    iptables_version = version(out)
    kernel = version(os.uname().release)
    return (iptables_version is not None and iptables_version >= RANDOM_FULLY_MIN_IPTABLES
            and kernel is not None and kernel >= RANDOM_FULLY_MIN_KERNEL)


def probe_nfacct() -> bool:
    """Whether nfnetlink_acct is loaded, built in or installed as a module (see module doc)."""
    if Path("/sys/module/nfnetlink_acct").exists():
        return True
    modules = Path("/lib/modules") / os.uname().release
    for listing in ("modules.builtin", "modules.dep"):
        try:
            if "nfnetlink_acct" in (modules / listing).read_text():
                return True
        except OSError:
            continue
    return False


def probe_tcp_be_liberal() -> bool:
    try:
        return int(TCP_BE_LIBERAL_SYSCTL.read_text().strip() or "0") != 0
    except (OSError, ValueError):
        return False
