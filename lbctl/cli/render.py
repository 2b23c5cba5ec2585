"""`lbctl render iptables|nftables`: print the rules kube-proxy v1.32 would program.

    lbctl render iptables --manifests DIR --node-name NAME --node-ip IP [--node-ip IP ...]
                          [--cluster-cidr CIDR] [--masquerade-all]
                          [--nodeport-addresses CIDR[,CIDR...]] [--no-localhost-nodeports]
                          [--[no-]random-fully] [--[no-]nfacct] [--[no-]tcp-be-liberal]
                          [--jump-rules]
    lbctl render nftables --manifests DIR --node-name NAME --node-ip IP ... [--service-cidr CIDR]

The text goes to stdout (an iptables-restore input, or an ``nft -f`` transaction); problems
with the manifests or flags go to stderr. Nothing is programmed.

Three iptables settings that kube-proxy detects on its node default to what *this* host would
make kube-proxy choose; pass the flag to render for another node:

- ``--random-fully``: kube-proxy's HasRandomFully() is "iptables >= 1.6.2". We also require a
  kernel >= 3.14 (the first with NF_NAT_RANGE_PROTO_RANDOM_FULLY), which kube-proxy assumes.
- ``--nfacct``: kube-proxy creates two nfacct counters over netlink at startup and adds
  ``-m nfacct`` only if that worked. We answer "yes" when the nfnetlink_acct module is loaded,
  built in, or installed (netlink autoloads it); kube-proxy can still fail without
  CAP_NET_ADMIN, which we cannot see from here.
- ``--tcp-be-liberal``: net.netfilter.nf_conntrack_tcp_be_liberal != 0, read as kube-proxy does.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.iptables import IptablesConfig, render_iptables, render_jump_chains, render_jump_rules
from lbctl.datapath.kubeproxy.nftables import NftablesConfig, render_nftables

TCP_BE_LIBERAL_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
RANDOM_FULLY_MIN_IPTABLES = (1, 6, 2)
RANDOM_FULLY_MIN_KERNEL = (3, 14)


# --- host probes -------------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def probe_random_fully() -> bool:
    """iptables >= 1.6.2 (what kube-proxy checks) on a kernel >= 3.14."""
    try:
        out = subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    iptables_version = _version(out)
    kernel = _version(os.uname().release)
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


# --- CLI ---------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `render iptables` and `render nftables`; each sets `func` to its cmd_* function."""
    render = subparsers.add_parser("render", help="print the rules kube-proxy v1.32 would program "
                                                  "for the same manifests (nothing is applied)")
    modes = render.add_subparsers(dest="render_mode", metavar="{iptables,nftables}", required=True)

    ipt = modes.add_parser("iptables", help="iptables-restore input of a full sync")
    _common_args(ipt)
    ipt.add_argument("--no-localhost-nodeports", dest="localhost_nodeports", action="store_false",
                     help="--iptables-localhost-nodeports=false: no NodePorts on 127.0.0.1")
    for name, what in (("random-fully", "MASQUERADE --random-fully (iptables >= 1.6.2)"),
                       ("nfacct", "nfacct counters for INVALID drops and localhost NodePorts"),
                       ("tcp-be-liberal", "the node sets nf_conntrack_tcp_be_liberal: no INVALID drop")):
        ipt.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                         help=f"{what} (default: probe this host)")
    ipt.add_argument("--jump-rules", action="store_true",
                     help="print the iptables commands kube-proxy runs for the built-in chains instead")
    ipt.set_defaults(func=cmd_render_iptables)

    nft = modes.add_parser("nftables", help="nft -f transaction of a first full sync")
    _common_args(nft)
    nft.add_argument("--service-cidr", action="append", default=[], metavar="CIDR",
                     help="ServiceCIDR(s), for the drop rule on unallocated cluster IPs (v1.32 only "
                          "knows them with the MultiCIDRServiceAllocator gate; default: none)")
    nft.set_defaults(func=cmd_render_nftables)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifests", type=Path, required=True, metavar="DIR",
                        help="directory of Service/EndpointSlice/Endpoints YAML")
    parser.add_argument("--node-name", required=True, metavar="NAME",
                        help="this node's name (endpoint locality)")
    parser.add_argument("--node-ip", action="append", required=True, metavar="IP",
                        help="a node address; the first is the primary (repeat for more)")
    parser.add_argument("--cluster-cidr", default=None, metavar="CIDR[,CIDR]",
                        help="pod CIDR(s), comma-separated (detect-local-mode ClusterCIDR)")
    parser.add_argument("--masquerade-all", action="store_true", help="SNAT all service traffic")
    parser.add_argument("--nodeport-addresses", default="", metavar="CIDR[,CIDR...]",
                        help='addresses that accept NodePorts, or "primary" (default: iptables '
                             'every local address, nftables "primary")')
    parser.add_argument("--masquerade-bit", type=int, default=14, metavar="BIT",
                        help="fwmark bit (%(default)s)")
    parser.add_argument("--ip-family", type=int, choices=(4, 6), default=None,
                        help="which proxier to render (default: the first --node-ip's family)")


def _fail(mode: str, message: str, code: int = 2) -> int:
    print(f"lbctl render {mode}: {message}", file=sys.stderr)
    return code


def flag_errors(args) -> list[str]:
    """Flag values kube-proxy's validation would refuse, each with the fix (`lbctl render` and
    `lbctl run --mode iptables|nftables|ipvs` share these flags)."""
    errors = []
    for ip in args.node_ip:
        if common.parse_ip_sloppy(ip) is None:
            errors.append(f"--node-ip {ip!r} is not an IP address")
    cidrs = [c for c in (args.cluster_cidr or "").split(",") if c.strip()]
    cidrs += [c for c in args.nodeport_addresses.split(",") if c.strip() and c.strip() != "primary"]
    cidrs += getattr(args, "service_cidr", [])
    for cidr in cidrs:
        if common.parse_cidr_sloppy(cidr) is None:
            errors.append(f"{cidr!r} is not a CIDR (e.g. 10.244.0.0/16)")
    if not 0 <= getattr(args, "masquerade_bit", 14) <= 31:
        errors.append(f"--masquerade-bit {args.masquerade_bit} is out of range (0-31)")
    return errors


class ManifestsMissing(Exception):
    """--manifests is not a directory: rendering "no services" would look like a valid answer."""


def _load_ports(mode: str, directory: Path):
    """Service ports from the manifests; every problem is reported on stderr."""
    from lbctl.model.desired import service_ports
    from lbctl.sources.manifests import load_manifests

    if not directory.is_dir():
        raise ManifestsMissing(f"--manifests {directory}: not a directory")
    snapshot = load_manifests(directory)
    for problem in snapshot.problems:
        print(f"lbctl render {mode}: {problem}", file=sys.stderr)
    return service_ports(snapshot)


def nodeport_addresses(args) -> tuple[str, ...]:
    return tuple(c.strip() for c in args.nodeport_addresses.split(",") if c.strip())


def _print_rendered(mode: str, directory: Path, render: Callable[[Sequence], str]) -> int:
    """Load the manifests and print what `render` makes of their service ports."""
    try:
        ports = _load_ports(mode, directory)
    except ManifestsMissing as exc:
        return _fail(mode, str(exc), code=1)
    sys.stdout.write(render(ports))
    return 0


def cmd_render_iptables(args) -> int:
    """Print the restore input (or, with --jump-rules, the built-in chain commands)."""
    errors = flag_errors(args)
    if errors:
        return _fail("iptables", "; ".join(errors))
    cfg = IptablesConfig(
        node_name=args.node_name,
        node_ips=tuple(args.node_ip),
        cluster_cidr=args.cluster_cidr,
        masquerade_all=args.masquerade_all,
        nodeport_addresses=nodeport_addresses(args),
        localhost_nodeports=args.localhost_nodeports,
        random_fully=probe_random_fully() if args.random_fully is None else args.random_fully,
        nfacct=probe_nfacct() if args.nfacct is None else args.nfacct,
        tcp_be_liberal=probe_tcp_be_liberal() if args.tcp_be_liberal is None else args.tcp_be_liberal,
        masquerade_bit=args.masquerade_bit,
        ip_family=args.ip_family,
    )
    if args.jump_rules:
        for argv in render_jump_chains(cfg) + render_jump_rules(cfg):
            print(shlex.join(argv))
        return 0
    return _print_rendered("iptables", args.manifests, lambda ports: render_iptables(ports, cfg))


def cmd_render_nftables(args) -> int:
    """Print the nft -f transaction of kube-proxy's first full sync."""
    errors = flag_errors(args)
    if errors:
        return _fail("nftables", "; ".join(errors))
    cfg = NftablesConfig(
        node_name=args.node_name,
        node_ips=tuple(args.node_ip),
        cluster_cidr=args.cluster_cidr,
        masquerade_all=args.masquerade_all,
        nodeport_addresses=nodeport_addresses(args),
        service_cidrs=tuple(args.service_cidr),
        masquerade_bit=args.masquerade_bit,
        ip_family=args.ip_family,
    )
    return _print_rendered("nftables", args.manifests, lambda ports: render_nftables(ports, cfg))
