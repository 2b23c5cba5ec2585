"""Configuration from command-line flags, in one place: `lbctl run` (every mode) and `lbctl
render` declare the kube-proxy flags with ``add_kube_proxy_flags`` and build a mode's
configuration with ``kube_proxy_config``, so the rules a node runs and the rules `render`
prints come from the same code.

What the two differ in is said here: `render` describes any node, so --node-name and --node-ip
are required and nfacct is probed; `run` is this node, so both default to this host (hostname,
the default route's source address) and nfacct is off (lbctl does not create kube-proxy's
nfacct counters, and kube-proxy leaves ``-m nfacct`` out when it cannot).
"""
from __future__ import annotations

import argparse
from typing import Any

from lbctl.cli import argtypes
from lbctl.datapath.ebpf import loader as ebpf

KUBE_PROXY_MODES = ("iptables", "nftables", "ipvs")


def add_kube_proxy_flags(parser: argparse.ArgumentParser | Any, *, required: bool) -> None:
    """kube-proxy's flags; `required` for render (another node), defaults from this host for run."""
    parser.add_argument("--node-name", "--hostname-override", dest="node_name", required=required, default=None,
                        metavar="NAME", help="this node's name, for endpoint locality (internalTrafficPolicy, "
                             "externalTrafficPolicy Local) and the Node the kubernetes source watches"
                        + ("" if required else "; default: $NODE_NAME, else the hostname"))
    parser.add_argument("--node-ip", action="append", required=required, default=None if required else [],
                        metavar="IP", help="a node address, the first is the primary (repeat for more)"
                        + ("" if required else "; default: the source address of the default route"))
    parser.add_argument("--cluster-cidr", default=None, metavar="CIDR[,CIDR]",
                        help="pod CIDR(s): traffic from elsewhere to a cluster IP is masqueraded; "
                             "without it nothing is, unless --masquerade-all")
    parser.add_argument("--masquerade-all", action="store_true", help="SNAT all service traffic")
    parser.add_argument("--nodeport-addresses", default="", metavar="CIDR[,CIDR...]",
                        help='addresses that accept NodePorts, or "primary" (default: iptables every '
                             'local address, nftables "primary")')
    parser.add_argument("--masquerade-bit", type=argtypes.int_range(0, 31), default=14, metavar="BIT",
                        help="fwmark bit for packets to masquerade, 0-31 (%(default)s)")


def add_source_flags(parser: argparse.ArgumentParser | Any) -> None:
    """What the manifests are validated against, for `run` and `render` alike."""
    parser.add_argument("--service-node-port-range", type=argtypes.port_range, default=(30000, 32767),
                        metavar="LOW-HIGH", help="the nodePorts the cluster's API server accepts (its "
                        "--service-node-port-range): a Service with another is refused (30000-32767)")


def flag_errors(args) -> list[str]:
    """Flag values kube-proxy's validation would refuse, each with the fix."""
    from lbctl.datapath.kubeproxy import common

    errors = []
    for ip in args.node_ip or ():
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


def nodeport_addresses(args) -> tuple[str, ...]:
    return tuple(c.strip() for c in args.nodeport_addresses.split(",") if c.strip())


def node_name(args) -> str:
    """--node-name (--hostname-override), else $NODE_NAME (a DaemonSet's downward API), else
    the hostname, as kube-proxy's."""
    import os

    from lbctl.datapath.kubeproxy import proxier

    return args.node_name or os.environ.get("NODE_NAME") or proxier.node_name()


def _node_ips(args) -> tuple[str, ...]:
    if args.node_ip:
        return tuple(args.node_ip)
    from lbctl.datapath.kubeproxy import proxier

    primary = proxier.primary_ipv4()
    if primary is None:
        raise ValueError("no default route to take the node IP from: give --node-ip")
    return (primary,)


def _host(args, flag: str, probe) -> bool:
    """A host property: the flag when given (render), else what this host says."""
    value = getattr(args, flag, None)
    return probe() if value is None else value


def kube_proxy_config(mode: str, args, *, rendering: bool = False):
    """IptablesConfig, NftablesConfig or IpvsConfig from the flags; ValueError (naming the flag
    and the fix) when a value is bad. `rendering`: for `lbctl render` (nfacct probed)."""
    errors = flag_errors(args)
    if errors:
        raise ValueError("; ".join(errors))
    common = dict(node_name=node_name(args), node_ips=_node_ips(args), cluster_cidr=args.cluster_cidr,
                  masquerade_all=args.masquerade_all, nodeport_addresses=nodeport_addresses(args),
                  masquerade_bit=args.masquerade_bit, ip_family=getattr(args, "ip_family", None))
    if mode == "iptables":
        from lbctl.datapath.kubeproxy import probes
        from lbctl.datapath.kubeproxy.iptables import IptablesConfig

        return IptablesConfig(
            **common, localhost_nodeports=getattr(args, "localhost_nodeports", True),
            random_fully=_host(args, "random_fully", probes.probe_random_fully),
            nfacct=_host(args, "nfacct", probes.probe_nfacct) if rendering else False,
            tcp_be_liberal=_host(args, "tcp_be_liberal", probes.probe_tcp_be_liberal))
    if mode == "nftables":
        from lbctl.datapath.kubeproxy.nftables import NftablesConfig

        return NftablesConfig(**common, service_cidrs=tuple(getattr(args, "service_cidr", ())))
    if mode == "ipvs":
        from lbctl.datapath.kubeproxy.ipvs import IpvsConfig

        return IpvsConfig(**common)
    raise ValueError(f"unknown kube-proxy mode {mode!r} (one of {', '.join(KUBE_PROXY_MODES)})")


def datapath_config(args) -> ebpf.DatapathConfig:
    """The eBPF datapath's configuration from `lbctl run`'s flags. --uplink-devices not given:
    the default route's interface (none without a default route); "none": no uplink."""
    devices = tuple(x for x in getattr(args, "devices", "").split(",") if x) or ebpf.DEFAULT_DEVICES
    uplinks_flag = getattr(args, "uplink_devices", None)
    if uplinks_flag is None:
        from lbctl.datapath.ebpf.mode import default_uplinks

        uplinks = default_uplinks()
    elif uplinks_flag.strip() == "none":
        uplinks = ()
    else:
        uplinks = tuple(x.strip() for x in uplinks_flag.split(",") if x.strip())
    return ebpf.DatapathConfig(
        pin_dir=args.pin_dir, max_services=args.max_services, max_backends=args.max_backends,
        services_map_size=args.services_map_size, ct_size=args.ct_size, devices=devices,
        uplink_devices=uplinks, xdp=getattr(args, "xdp", "auto"), node_name=node_name(args), cgroup_root=getattr(args, "cgroup_root", None),
        maglev_table_size=getattr(args, "maglev_table_size", ebpf.DatapathConfig.maglev_table_size))


def proxy_settings(args):
    """The kube-proxy flags the eBPF mode takes (ProxySettings); ValueError naming the flag
    when a value is bad. No --node-ip and no default route: no node IP (NodePorts still on
    every local address)."""
    from lbctl.datapath.ebpf.mode import ProxySettings
    from lbctl.datapath.kubeproxy import proxier

    errors = flag_errors(args)
    if errors:
        raise ValueError("; ".join(errors))
    node_ips = tuple(args.node_ip or ())
    if not node_ips:
        primary = proxier.primary_ipv4()
        node_ips = (primary,) if primary else ()
    return ProxySettings(node_ips=node_ips, nodeport_addresses=nodeport_addresses(args),
                         cluster_cidr=args.cluster_cidr, masquerade_all=args.masquerade_all,
                         masquerade_bit=args.masquerade_bit,
                         node_port_range=tuple(args.service_node_port_range))
