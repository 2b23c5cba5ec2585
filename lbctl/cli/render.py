"""`lbctl render iptables|nftables`: print the rules kube-proxy v1.32 would program.

    lbctl render iptables --manifests DIR --node-name NAME --node-ip IP [--node-ip IP ...]
                          [--cluster-cidr CIDR] [--masquerade-all]
                          [--nodeport-addresses CIDR[,CIDR...]] [--no-localhost-nodeports]
                          [--[no-]random-fully] [--[no-]nfacct] [--[no-]tcp-be-liberal]
                          [--jump-rules]
    lbctl render nftables --manifests DIR --node-name NAME --node-ip IP ... [--service-cidr CIDR]

The text goes to stdout (an iptables-restore input, or an ``nft -f`` transaction); problems
with the manifests or flags go to stderr. Nothing is programmed.

Three iptables settings that kube-proxy detects on its node (``--random-fully``, ``--nfacct``,
``--tcp-be-liberal``) default to what *this* host would make kube-proxy choose
(``lbctl.datapath.kubeproxy.probes`` says how each is probed); pass the flag to render for
another node.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lbctl.cli import config
from lbctl.datapath.kubeproxy.iptables import render_iptables, render_jump_chains, render_jump_rules
from lbctl.datapath.kubeproxy.nftables import render_nftables

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
    config.add_kube_proxy_flags(parser, required=True)
    config.add_source_flags(parser)
    parser.add_argument("--ip-family", type=int, choices=(4, 6), default=None,
                        help="which proxier to render (default: the first --node-ip's family)")


def _fail(mode: str, message: str, code: int = 2) -> int:
    print(f"lbctl render {mode}: {message}", file=sys.stderr)
    return code


class ManifestsMissing(Exception):
    """--manifests is not a directory: rendering "no services" would look like a valid answer."""


def _load_ports(mode: str, directory: Path, node_port_range: tuple[int, int]):
    """Service ports from the manifests; every problem is reported on stderr."""
    from lbctl.model.desired import service_ports
    from lbctl.sources.manifests import SourceUnavailable, load_manifests

    if not directory.is_dir():
        raise ManifestsMissing(f"--manifests {directory}: not a directory")
    try:
        snapshot = load_manifests(directory, node_port_range)
    except SourceUnavailable as exc:     # exists but cannot be read (permission denied, ...)
        raise ManifestsMissing(f"--manifests {directory}: {exc.reason}") from None
    for problem in snapshot.problems:
        print(f"lbctl render {mode}: {problem}", file=sys.stderr)
    return service_ports(snapshot)


def _print_rendered(mode: str, args, render: Callable[[Sequence], str]) -> int:
    """Load the manifests and print what `render` makes of their service ports."""
    try:
        ports = _load_ports(mode, args.manifests, args.service_node_port_range)
    except ManifestsMissing as exc:
        return _fail(mode, str(exc), code=1)
    sys.stdout.write(render(ports))
    return 0


def cmd_render_iptables(args) -> int:
    """Print the restore input (or, with --jump-rules, the built-in chain commands)."""
    try:
        cfg = config.kube_proxy_config("iptables", args, rendering=True)
    except ValueError as exc:
        return _fail("iptables", str(exc))
    if args.jump_rules:
        for argv in render_jump_chains(cfg) + render_jump_rules(cfg):
            print(shlex.join(argv))
        return 0
    return _print_rendered("iptables", args, lambda ports: render_iptables(ports, cfg))


def cmd_render_nftables(args) -> int:
    """Print the nft -f transaction of kube-proxy's first full sync."""
    try:
        cfg = config.kube_proxy_config("nftables", args, rendering=True)
    except ValueError as exc:
        return _fail("nftables", str(exc))
    return _print_rendered("nftables", args, lambda ports: render_nftables(ports, cfg))
