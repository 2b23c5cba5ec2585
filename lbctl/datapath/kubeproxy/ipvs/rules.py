"""The iptables rules and sysctls kube-proxy v1.32's IPVS proxier keeps beside IPVS, as text.

``render_ipvs_iptables(desired, cfg)`` is the ``iptables-restore --noflush`` input: constant
apart from which ipsets are empty, the config and the load-balancer IPs the node may not reach
(per-service work happens in IPVS and ipsets). ``JUMP_RULES`` are the rules kept at the top of
the built-in chains; ``ipvs_sysctls`` the sysctls NewProxier ensures.
"""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass

from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.iptables import forward_accept_rules, masquerade_rules, rule
from lbctl.datapath.kubeproxy.ipvs.desired import (
    CLUSTER_IP,
    EXTERNAL_IP,
    EXTERNAL_IP_LOCAL,
    HEALTH_CHECK_NODE_PORT,
    IPSET_INFO,
    IPVS_IPS,
    LOAD_BALANCER,
    LOAD_BALANCER_FW,
    LOAD_BALANCER_LOCAL,
    LOAD_BALANCER_SOURCE_CIDR,
    LOAD_BALANCER_SOURCE_IP,
    LOOP_BACK,
    NODE_PORT_LOCAL_SCTP,
    NODE_PORT_LOCAL_TCP,
    NODE_PORT_LOCAL_UDP,
    NODE_PORT_SCTP,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    IpvsConfig,
    IpvsDesired,
    set_name,
)

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

# (table, chain) in kube-proxy's iptablesChains order: declared in every restore.
IPTABLES_CHAINS = (
    ("nat", KUBE_SERVICES),
    ("nat", KUBE_POSTROUTING),
    ("nat", KUBE_NODE_PORT),
    ("nat", KUBE_LOAD_BALANCER),
    ("nat", KUBE_MARK_MASQ),
    ("filter", KUBE_FORWARD),
    ("filter", KUBE_NODE_PORT),
    ("filter", KUBE_PROXY_FIREWALL),
    ("filter", KUBE_SOURCE_RANGES_FIREWALL),
    ("filter", KUBE_IPVS_FILTER),
    ("filter", KUBE_IPVS_OUT_FILTER),
)


@dataclass(frozen=True)
class JumpRule:
    """A rule kube-proxy keeps at the top of a built-in chain (iptablesJumpChain, EnsureRule
    Prepend). Not part of the restore text, which must not flush the built-in chains."""

    table: str
    chain: str          # built-in chain
    target: str
    comment: str

    @property
    def args(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", self.comment, "-j", self.target)


JUMP_RULES = (
    JumpRule("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    JumpRule("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    JumpRule("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    JumpRule("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)

# ipsetWithIptablesChain: (set, table, from chain, target, match directions, protocol match).
# The Local sets come before their catch-all sets: RETURN first, then mark for masquerade.
_SET_RULES = (
    (LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)


# The comment of each set goes into the iptables rule matching it (ipsets have none).
_COMMENTS = {name: comment for name, _type, comment in IPSET_INFO}


def _comment(base: str) -> str:
    """IPSet.getComment(): the set's comment in double quotes, as iptables-restore wants it."""
    return f'"{_COMMENTS[base]}"'


def render_ipvs_iptables(desired: IpvsDesired, cfg: IpvsConfig) -> str:
    """The iptables-restore input (``--noflush``) kube-proxy v1.32's IPVS proxier writes.

    Constant apart from which sets are empty, ``cfg`` and the load-balancer IPs the node may not
    reach: per-service work happens in IPVS and ipsets. nat comes before filter, as kube-proxy
    concatenates its buffers. Rules that match empty sets are left out, as kube-proxy does, except
    the ones in KUBE-IPVS-FILTER and the health-check rule, which it always writes.
    """
    family = desired.family
    mark = cfg.mark

    def name(base: str) -> str:
        return set_name(base, family)

    def nonempty(base: str) -> bool:
        return bool(desired.members(base))

    nat = ["*nat", *(f":{c} - [0:0]" for t, c in IPTABLES_CHAINS if t == "nat")]
    filt = ["*filter", *(f":{c} - [0:0]" for t, c in IPTABLES_CHAINS if t == "filter")]

    nat.append(rule("-A", KUBE_SERVICES, "-s", "::1/128" if family == 6 else "127.0.0.0/8", "-j", "RETURN"))
    for base, table, chain, target, match, proto in _SET_RULES:
        if not nonempty(base):
            continue
        words = ["-A", chain] + (["-p", proto] if proto else [])
        words += ["-m", "comment", "--comment", _comment(base), "-m", "set", "--match-set", name(base), match,
                  "-j", target]
        (nat if table == "nat" else filt).append(rule(*words))

    if nonempty(CLUSTER_IP):
        words = ["-A", KUBE_SERVICES, "-m", "comment", "--comment", _comment(CLUSTER_IP),
                 "-m", "set", "--match-set", name(CLUSTER_IP)]
        detector = common.local_detector(cfg.cluster_cidr, family)
        if cfg.masquerade_all:
            words += ["dst,dst"]
        elif detector.implemented:
            # Off-cluster traffic to a cluster IP (a static route to the node) is masqueraded.
            words += ["dst,dst", "!", "-s", str(detector.cidr)]
        else:
            # No pod CIDR: masquerade node-originated traffic whose source is a service VIP (the
            # kernel picks a kube-ipvs0 address as source to reach a VIP).
            words += ["src,dst"]
        nat.append(rule(*words, "-j", KUBE_MARK_MASQ))

    for base, masquerade in ((EXTERNAL_IP, True), (EXTERNAL_IP_LOCAL, False)):
        if not nonempty(base):
            continue
        words = ["-A", KUBE_SERVICES, "-m", "comment", "--comment", _comment(base),
                 "-m", "set", "--match-set", name(base), "dst,dst"]
        if masquerade:
            nat.append(rule(*words, "-j", KUBE_MARK_MASQ))
        # Traffic from off the machine (not bridged from a pod, not from a local process), and
        # traffic to external IPs that happen to be local (GCE LB addresses), is accepted.
        nat.append(rule(*words, "-m", "physdev", "!", "--physdev-is-in", "-m", "addrtype", "!",
                         "--src-type", "LOCAL", "-j", "ACCEPT"))
        nat.append(rule(*words, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"))

    nat.append(rule("-A", KUBE_SERVICES, "-m", "addrtype", "--dst-type", "LOCAL", "-j", KUBE_NODE_PORT))
    nat.append(rule("-A", KUBE_LOAD_BALANCER, "-j", KUBE_MARK_MASQ))
    filt.append(rule("-A", KUBE_SOURCE_RANGES_FIREWALL, "-j", "DROP"))
    for entry in desired.no_node_access:
        filt.append(rule("-A", KUBE_IPVS_OUT_FILTER, "-s", entry.address, "-m", "ipvs", "--vaddr", entry.address,
                          "--vproto", entry.protocol, "--vport", str(entry.port), "-j", "DROP"))
    # acceptIPVSTraffic: accept what IPVS serves, in case later rules would block it.
    for base in (CLUSTER_IP, LOAD_BALANCER):
        if nonempty(base):
            nat.append(rule("-A", KUBE_SERVICES, "-m", "set", "--match-set", name(base), "dst,dst", "-j", "ACCEPT"))

    filt += forward_accept_rules(mark)
    filt.append(rule("-A", KUBE_NODE_PORT, "-m", "comment", "--comment", _comment(HEALTH_CHECK_NODE_PORT),
                      "-m", "set", "--match-set", name(HEALTH_CHECK_NODE_PORT), "dst", "-j", "ACCEPT"))
    # KUBE-IPVS-FILTER: a service address is local (kube-ipvs0), so without this every host port
    # would answer on it (kubernetes issue 72236). Service ports return; other new connections
    # to those addresses are rejected.
    for base in (LOAD_BALANCER, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL):
        filt.append(rule("-A", KUBE_IPVS_FILTER, "-m", "set", "--match-set", name(base), "dst,dst", "-j", "RETURN"))
    filt.append(rule("-A", KUBE_IPVS_FILTER, "-m", "set", "--match-set", name(HEALTH_CHECK_NODE_PORT), "dst",
                      "-j", "RETURN"))
    filt.append(rule("-A", KUBE_IPVS_FILTER, "-m", "conntrack", "--ctstate", "NEW", "-m", "set", "--match-set",
                      name(IPVS_IPS), "dst", "-j", "REJECT"))

    nat += masquerade_rules(mark, cfg.random_fully)
    return "\n".join([*nat, "COMMIT", *filt, "COMMIT"]) + "\n"


def render_ipvs_jump_rules(cfg: IpvsConfig) -> list[list[str]]:
    """The argv kube-proxy runs (EnsureRule Prepend, after ``-C`` finds it missing) per jump rule."""
    binary = "ip6tables" if cfg.family == 6 else "iptables"
    return [[binary, "-w", "5", "-W", "100000", "-I", j.chain, "-t", j.table, *j.args] for j in JUMP_RULES]


def ipvs_sysctls(cfg: IpvsConfig, kernel_release: str | None = None) -> list[tuple[str, int]]:
    """The sysctls kube-proxy's NewProxier ensures, in its order.

    conn_reuse_mode=0 only on kernels 4.1 to 5.8 (kubernetes issue 93297: later kernels fixed the
    1-second delay that made kube-proxy turn it off).
    """
    release = kernel_release if kernel_release is not None else platform.release()
    values = [("net/ipv4/vs/conntrack", 1)]
    version = tuple(int(x) for x in re.findall(r"\d+", release)[:2]) or (0, 0)
    if (4, 1) <= version < (5, 9):
        values.append(("net/ipv4/vs/conn_reuse_mode", 0))
    values += [("net/ipv4/vs/expire_nodest_conn", 1), ("net/ipv4/vs/expire_quiescent_template", 1),
               ("net/ipv4/ip_forward", 1)]
    if cfg.strict_arp:
        values += [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)]
    return values


