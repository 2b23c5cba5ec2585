"""The iptables-restore input kube-proxy v1.32's iptables proxier writes, as pure functions.

This mirrors ``syncProxyRules`` in kubernetes ``pkg/proxy/iptables/proxier.go`` step by step,
so lbctl can program exactly the rules kube-proxy would for the same services, endpoints and
flags, and compare against them honestly. Rule text, argument order, comments and chain-name
hashes are kube-proxy's; only the order of services (a Go map walk there) is made stable here.

Three entry points:

- ``render_iptables``: a full sync (every chain rewritten).
- ``render_iptables_partial``: the partial sync kube-proxy does when only some services changed
  since its last successful sync: KUBE-SERVICES and the other top-level chains are rewritten in
  full, but the per-service chains (KUBE-SVC/SVL/EXT/FW/SEP) only for changed services, and
  chains that are no longer used are flushed and deleted (``-X``).
- ``render_jump_rules``: the rules kube-proxy adds to the built-in chains with separate
  ``iptables -I`` calls (never part of the restore input, which must not flush PREROUTING etc.).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.common import NodePortAddresses, NodeView, ProxiedPort
from lbctl.model.objects import ServicePortInfo

# Top-level chains (pkg/proxy/iptables/proxier.go constants).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"   # kubelet's anti-martian chain, duplicated by kube-proxy

# Per-service chain prefixes; anything with these prefixes is kube-proxy's to delete.
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-")

# nfacct counters (pkg/proxy/metrics): packets dropped as INVALID, localhost NodePort accepts.
NFACCT_CT_INVALID = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST_NODEPORTS = "localhost_nps_accepted_pkts"

NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


@dataclass(frozen=True)
class IptablesConfig:
    """kube-proxy's iptables-mode settings that change the rules it writes.

    ``node_ips``: the node's addresses, primary first (kube-proxy's nodeIP); all of them count as
    addresses on the node's interfaces when matching --nodeport-addresses.
    ``nodeport_addresses``: CIDRs, or ("primary",); empty means every local address, the v1.32
    iptables default. ``random_fully``: iptables >= 1.6.2 (``HasRandomFully``). ``nfacct``: the
    nfacct counters could be created (adds ``-m nfacct`` to two rules). ``tcp_be_liberal``: the
    node sets net.netfilter.nf_conntrack_tcp_be_liberal, so no INVALID-drop rule is written.

    Added beyond the flag set: ``ip_family`` (4 or 6; None = the primary node IP's family; kube-proxy
    runs one proxier per family) and ``masquerade_mark`` (None = derived from ``masquerade_bit``
    as kube-proxy does; kube-proxy's unit tests inject "0x4000" directly).
    """

    node_name: str
    node_ips: tuple[str, ...]
    cluster_cidr: str | None = None
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()
    localhost_nodeports: bool = True
    random_fully: bool = False
    nfacct: bool = False
    tcp_be_liberal: bool = False
    masquerade_bit: int = 14
    ip_family: int | None = None
    masquerade_mark: str | None = None


# --- chain names -------------------------------------------------------------------------------


def port_proto_hash(name_string: str, protocol: str) -> str:
    """portProtoHash: base32(sha256(servicePortName + lowercase protocol))[:16]."""
    return common.b32_sha256(name_string + protocol)[:16]


def service_chain(view: common.ServicePortView, prefix: str) -> str:
    """KUBE-SVC-/KUBE-SVL-/KUBE-EXT-/KUBE-FW- + the service port's hash."""
    return prefix + port_proto_hash(view.name_string, view.protocol)


def endpoint_chain(view: common.ServicePortView, endpoint: common.EndpointView) -> str:
    """servicePortEndpointChainName: sha256(servicePortName + protocol + "ip:port")."""
    return "KUBE-SEP-" + common.b32_sha256(view.name_string + view.protocol + endpoint.string)[:16]


def probability(n: int) -> str:
    """computeProbability: fmt.Sprintf("%0.10f", 1.0/n)."""
    return f"{1.0 / n:0.10f}"


def chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


def rule(*words: str) -> str:
    """One restore line: kube-proxy's LineBuffer joins words with single spaces."""
    return " ".join(w for w in words if w != "")


def _quoted(text: str) -> str:
    return f'"{text}"'


# --- rules the IPVS proxier writes too --------------------------------------------------------


def masquerade_rules(mark: str, random_fully: bool) -> list[str]:
    """KUBE-POSTROUTING and KUBE-MARK-MASQ: a packet marked for masquerade is masqueraded on
    its way out, the mark cleared first so that one re-traversing the stack is not masqueraded
    twice. The same in the iptables and the IPVS proxier."""
    return [
        rule("-A", KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN"),
        rule("-A", KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark),
        rule("-A", KUBE_POSTROUTING, "-m", "comment", "--comment",
             _quoted("kubernetes service traffic requiring SNAT"), "-j", "MASQUERADE",
             "--random-fully" if random_fully else ""),
        rule("-A", KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark),
    ]


def forward_accept_rules(mark: str) -> list[str]:
    """KUBE-FORWARD's accepts of service traffic (marked) and of established flows, which later
    FORWARD rules or a drop policy would otherwise stop. The same in the iptables and the IPVS
    proxier."""
    return [
        rule("-A", KUBE_FORWARD, "-m", "comment", "--comment", _quoted("kubernetes forwarding rules"),
             "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT"),
        rule("-A", KUBE_FORWARD, "-m", "comment", "--comment", _quoted("kubernetes forwarding conntrack rule"),
             "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
    ]


# --- the sync context ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sync:
    """Everything derived from the config that syncProxyRules reads, computed once."""

    cfg: IptablesConfig
    node: NodeView
    nodeports: NodePortAddresses
    detector: common.LocalDetector
    mark: str
    localhost_nodeports: bool
    large_cluster: bool

    @property
    def ipv6(self) -> bool:
        return self.node.family == 6

    @property
    def localhost_nodeport_accounting(self) -> bool:
        return self.localhost_nodeports and not self.ipv6 and self.cfg.nfacct

    def comment(self, text: str) -> list[str]:
        """appendServiceCommentLocked: endpoint comments are dropped in large-cluster mode."""
        return [] if self.large_cluster else ["-m", "comment", "--comment", text]


def _sync_context(cfg: IptablesConfig, ports: Sequence[ProxiedPort], node: NodeView) -> _Sync:
    nodeports = common.nodeport_addresses(cfg.nodeport_addresses, node, cfg.node_ips)
    return _Sync(
        cfg=cfg,
        node=node,
        nodeports=nodeports,
        detector=common.local_detector(cfg.cluster_cidr, node.family),
        mark=cfg.masquerade_mark or common.masquerade_mark(cfg.masquerade_bit),
        # NewProxier: localhost NodePorts need 127.0.0.0/8 inside --nodeport-addresses.
        localhost_nodeports=cfg.localhost_nodeports and nodeports.contains_ipv4_loopback,
        large_cluster=common.large_cluster_mode(ports),
    )


class _Restore:
    """The four line buffers syncProxyRules fills: filter and nat, chain lines and rules."""

    def __init__(self) -> None:
        self.filter_chains: list[str] = []
        self.filter_rules: list[str] = []
        self.nat_chains: list[str] = []
        self.nat_rules: list[str] = []

    def text(self) -> str:
        lines = ["*filter", *self.filter_chains, *self.filter_rules, "COMMIT",
                 "*nat", *self.nat_chains, *self.nat_rules, "COMMIT"]
        return "\n".join(lines) + "\n"


class _Lines(Protocol):
    """A line buffer: a list, or a _Discard."""

    def append(self, line: str, /) -> None: ...
    def extend(self, lines: Iterable[str], /) -> None: ...


class _Discard:
    """Where a partial sync sends the chains of unchanged services (NewDiscardLineBuffer)."""

    def append(self, line: str, /) -> None:
        pass

    def extend(self, lines: Iterable[str], /) -> None:
        pass


# --- public API ---------------------------------------------------------------------------------


def render_iptables(ports: Sequence[ServicePortInfo], cfg: IptablesConfig,
                    existing_chains: Iterable[str] = ()) -> str:
    """The iptables-restore input of a full sync of ``ports``, as kube-proxy v1.32 writes it.

    ``existing_chains`` are the nat chains already in the kernel (what kube-proxy reads back with
    iptables-save); per-service chains among them that are no longer used are flushed and
    deleted. Empty (the default) is a first sync on a clean node.
    """
    node = common.node_view(cfg.node_name, cfg.node_ips, cfg.ip_family)
    current = common.proxied_ports(ports, node.family, node.name)
    return _render(current, cfg, node, changed=None, existing_chains=set(existing_chains))


def render_iptables_partial(previous: Sequence[ServicePortInfo], current: Sequence[ServicePortInfo],
                            cfg: IptablesConfig) -> str:
    """The restore input of kube-proxy's partial sync from ``previous`` to ``current``.

    The previous sync (full or partial) is assumed to have succeeded, so the nat table holds
    exactly the chains it used. Services whose ports or endpoints changed (as kube-proxy's change
    trackers compare them, per service) get their chains rewritten; the others keep theirs and
    are left out; chains no longer used are deleted. KUBE-SERVICES, KUBE-NODEPORTS, the filter
    table etc. are always written in full, as kube-proxy does.
    """
    node = common.node_view(cfg.node_name, cfg.node_ips, cfg.ip_family)
    before = common.proxied_ports(previous, node.family, node.name)
    after = common.proxied_ports(current, node.family, node.name)
    existing = active_nat_chains(before, cfg, node)
    return _render(after, cfg, node, changed=common.changed_services(before, after),
                   existing_chains=existing)


def active_nat_chains(ports: Sequence[ProxiedPort], cfg: IptablesConfig, node: NodeView) -> set[str]:
    """The per-service nat chains a sync of ``ports`` creates (kube-proxy's activeNATChains)."""
    restore = _Restore()
    return _write_services(restore, ports, _sync_context(cfg, ports, node), changed=None)


def render_jump_rules(cfg: IptablesConfig) -> list[list[str]]:
    """The argv of the rules kube-proxy inserts into the built-in chains (iptablesJumpChains).

    kube-proxy runs each with EnsureRule(Prepend): ``iptables -w 5 -W 100000 -C ...`` and, if the
    rule is missing, the ``-I`` shown here. The target chains must exist first; see
    ``render_jump_chains``. Includes the two KUBE-FIREWALL jumps kube-proxy duplicates from
    kubelet (iptablesKubeletJumpChains), which carry no comment.
    """
    binary = "ip6tables" if _family(cfg) == 6 else "iptables"
    commands = []
    for table, target, source, comment, extra in _JUMP_CHAINS:
        args = list(extra)
        if comment:
            args += ["-m", "comment", "--comment", comment]
        commands.append([binary, *_WAIT_FLAGS, "-I", source, "-t", table, *args, "-j", target])
    return commands


def render_jump_chains(cfg: IptablesConfig) -> list[list[str]]:
    """The ``iptables -N`` kube-proxy runs (EnsureChain) before adding the jump rules."""
    binary = "ip6tables" if _family(cfg) == 6 else "iptables"
    seen: list[tuple[str, str]] = []
    for table, target, _source, _comment, _extra in _JUMP_CHAINS:
        if (table, target) not in seen:
            seen.append((table, target))
    return [[binary, *_WAIT_FLAGS, "-N", target, "-t", table] for table, target in seen]


# utiliptables passes "-w 5 -W 100000" to iptables >= 1.6.1.
_WAIT_FLAGS = ("-w", "5", "-W", "100000")

_CT_NEW = ("-m", "conntrack", "--ctstate", "NEW")

# (table, target chain, built-in chain, comment, extra match args), in kube-proxy's order.
_JUMP_CHAINS = (
    ("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", _CT_NEW),
    ("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", _CT_NEW),
    ("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports", ()),
    ("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", _CT_NEW),
    ("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _CT_NEW),
    ("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules", ()),
    ("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _CT_NEW),
    ("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _CT_NEW),
    ("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _CT_NEW),
    ("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", ()),
    ("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals", ()),
    ("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules", ()),
    ("filter", KUBE_FIREWALL, "INPUT", "", ()),
    ("filter", KUBE_FIREWALL, "OUTPUT", "", ()),
)


def _family(cfg: IptablesConfig) -> int:
    return common.node_view(cfg.node_name, cfg.node_ips, cfg.ip_family).family


# --- syncProxyRules ----------------------------------------------------------------------------


def _render(ports: Sequence[ProxiedPort], cfg: IptablesConfig, node: NodeView,
            changed: set[str] | None, existing_chains: set[str]) -> str:
    """One sync; ``changed`` None means full, else the services whose chains are rewritten."""
    sync = _sync_context(cfg, ports, node)
    restore = _Restore()
    _write_base(restore, sync)
    active = _write_services(restore, ports, sync, changed)
    _write_stale_chain_deletions(restore, existing_chains - active)
    _write_nodeports_jump(restore, sync)
    _write_forward_rules(restore, sync)
    return restore.text()


def _write_base(restore: _Restore, sync: _Sync) -> None:
    """Top-level chains, KUBE-POSTROUTING, KUBE-MARK-MASQ and the localnet protection rule."""
    for chain in (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL):
        restore.filter_chains.append(chain_line(chain))
    for chain in (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ):
        restore.nat_chains.append(chain_line(chain))

    restore.nat_rules += masquerade_rules(sync.mark, sync.cfg.random_fully)
    if not sync.ipv6 and sync.localhost_nodeports:
        # route_localnet=1 (needed for NodePorts on 127.0.0.1) lets martian packets to 127/8
        # in from outside; kube-proxy (and kubelet) drop them here. https://issue.k8s.io/90259
        restore.filter_chains.append(chain_line(KUBE_FIREWALL))
        restore.filter_rules.append(rule(
            "-A", KUBE_FIREWALL, "-m", "comment", "--comment", _quoted("block incoming localnet connections"),
            "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8",
            "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"))


@dataclass(frozen=True)
class _Plan(common.ServiceChains):
    """One service port's chains (see common.ServiceChains), and what iptables mode spells its own way."""

    internal_filter: tuple[str, str]   # (target, comment) when internal traffic is not DNATed
    external_filter: tuple[str, str]


def _filter(verdict: common.Verdict | None, name: str) -> tuple[str, str]:
    """The filter-table (target, comment) for traffic no endpoint serves; ("", "") where one does."""
    if verdict is common.Verdict.REJECT:
        return "REJECT", _quoted(f"{name} has no endpoints")
    if verdict is common.Verdict.DROP:
        return "DROP", _quoted(f"{name} has no local endpoints")
    return "", ""


def _plan(port: ProxiedPort, sync: _Sync) -> _Plan:
    view = port.view
    policy = common.service_policy(port, sync.cfg.masquerade_all, sync.detector)
    return _Plan(
        policy=policy,
        cluster_chain=service_chain(view, "KUBE-SVC-"),
        local_chain=service_chain(view, "KUBE-SVL-"),
        external_chain=service_chain(view, "KUBE-EXT-"),
        firewall_chain=service_chain(view, "KUBE-FW-"),
        uses_firewall_chain=(policy.has_endpoints and bool(view.load_balancer_vips)
                             and bool(view.load_balancer_source_ranges)),
        internal_filter=_filter(policy.internal_verdict, view.name_string),
        external_filter=_filter(policy.external_verdict, view.name_string),
    )


def _write_services(restore: _Restore, ports: Sequence[ProxiedPort], sync: _Sync,
                    changed: set[str] | None) -> set[str]:
    """Rules for every service port; returns the per-service chains in use (activeNATChains)."""
    active: set[str] = set()
    for port in ports:
        plan = _plan(port, sync)
        _write_service_dispatch(restore, port, plan, sync)
        skip = changed is not None and port.view.service_key not in changed
        chains: _Lines = _Discard() if skip else restore.nat_chains
        rules: _Lines = _Discard() if skip else restore.nat_rules
        active |= _write_service_chains(chains, rules, port, plan, sync)
    return active


def _dport_match(view: common.ServicePortView, destination: str, port: int) -> list[str]:
    """"-m tcp -p tcp -d IP --dport N", kube-proxy's order of these words."""
    return ["-m", view.protocol, "-p", view.protocol, "-d", destination, "--dport", str(port)]


def _write_service_dispatch(restore: _Restore, port: ProxiedPort, plan: _Plan, sync: _Sync) -> None:
    """What syncProxyRules writes for a service into the top-level chains, changed or not."""
    view = port.view
    name = view.name_string
    nat, filt = restore.nat_rules, restore.filter_rules

    # Capture the clusterIP.
    if plan.policy.has_internal:
        nat.append(rule("-A", KUBE_SERVICES, "-m", "comment", "--comment", _quoted(f"{name} cluster IP"),
                        *_dport_match(view, view.cluster_ip, view.port), "-j", plan.internal_chain))
    else:
        target, comment = plan.internal_filter
        filt.append(rule("-A", KUBE_SERVICES, "-m", "comment", "--comment", comment,
                         *_dport_match(view, view.cluster_ip, view.port), "-j", target))

    # Capture externalIPs.
    for external_ip in view.external_ips:
        if plan.policy.has_endpoints:
            nat.append(rule("-A", KUBE_SERVICES, "-m", "comment", "--comment", _quoted(f"{name} external IP"),
                            *_dport_match(view, external_ip, view.port), "-j", plan.external_chain))
        if not plan.policy.has_external:
            filt.append(_external_filter_rule(view, plan, _dport_match(view, external_ip, view.port)))

    # Capture load-balancer ingress.
    lb_target = plan.firewall_chain if plan.uses_firewall_chain else plan.external_chain
    for lb_ip in view.load_balancer_vips:
        if plan.policy.has_endpoints:
            nat.append(rule("-A", KUBE_SERVICES, "-m", "comment", "--comment", _quoted(f"{name} loadbalancer IP"),
                            *_dport_match(view, lb_ip, view.port), "-j", lb_target))
        if plan.uses_firewall_chain:
            filt.append(rule("-A", KUBE_PROXY_FIREWALL, "-m", "comment", "--comment",
                             _quoted(f"{name} traffic not accepted by {plan.firewall_chain}"),
                             *_dport_match(view, lb_ip, view.port), "-j", "DROP"))
    if not plan.policy.has_external:
        for lb_ip in view.load_balancer_vips:
            filt.append(_external_filter_rule(view, plan, _dport_match(view, lb_ip, view.port)))

    # Capture nodeports (never subject to loadBalancerSourceRanges).
    if view.node_port:
        _write_nodeport_dispatch(restore, view, plan, sync)

    # Health check node ports are accepted whether or not there are local endpoints.
    if view.health_check_node_port:
        filt.append(rule("-A", KUBE_NODEPORTS, "-m", "comment", "--comment",
                         _quoted(f"{name} health check node port"), "-m", "tcp", "-p", "tcp",
                         "--dport", str(view.health_check_node_port), "-j", "ACCEPT"))


def _external_filter_rule(view: common.ServicePortView, plan: _Plan, match: list[str]) -> str:
    target, comment = plan.external_filter
    return rule("-A", KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", comment, *match, "-j", target)


def _write_nodeport_dispatch(restore: _Restore, view: common.ServicePortView, plan: _Plan, sync: _Sync) -> None:
    name, node_port = view.name_string, str(view.node_port)
    if plan.policy.has_endpoints:
        if sync.localhost_nodeport_accounting:
            restore.nat_rules.append(rule(
                "-A", KUBE_NODEPORTS, "-m", "comment", "--comment", name,
                "-m", view.protocol, "-p", view.protocol, "-d", "127.0.0.0/8", "--dport", node_port,
                "-m", "nfacct", "--nfacct-name", NFACCT_LOCALHOST_NODEPORTS, "-j", plan.external_chain))
        restore.nat_rules.append(rule(
            "-A", KUBE_NODEPORTS, "-m", "comment", "--comment", name,
            "-m", view.protocol, "-p", view.protocol, "--dport", node_port, "-j", plan.external_chain))
    if not plan.policy.has_external:
        target, comment = plan.external_filter
        restore.filter_rules.append(rule(
            "-A", KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", comment,
            "-m", "addrtype", "--dst-type", "LOCAL", "-m", view.protocol, "-p", view.protocol,
            "--dport", node_port, "-j", target))


def _write_service_chains(chains: _Lines, rules: _Lines, port: ProxiedPort, plan: _Plan,
                          sync: _Sync) -> set[str]:
    """The KUBE-SVC/SVL/EXT/FW/SEP chains of one service port; returns their names."""
    view, cats = port.view, port.categories
    active: set[str] = set()

    def write_chain(chain: str, lines: Iterable[str]) -> None:
        chains.append(chain_line(chain))
        active.add(chain)
        rules.extend(lines)

    if plan.policy.has_internal:
        match = ["-m", "comment", "--comment", _quoted(f"{view.name_string} cluster IP"),
                 *_dport_match(view, view.cluster_ip, view.port)]
        masquerade = plan.policy.internal_masquerade
        if masquerade is common.Masquerade.ALL:
            rules.append(rule("-A", plan.internal_chain, *match, "-j", KUBE_MARK_MASQ))
        elif masquerade is common.Masquerade.OFF_CLUSTER:
            # Masquerade off-cluster traffic to the VIP: it may be bridged off-node.
            rules.append(rule("-A", plan.internal_chain, *match, "!", "-s", str(sync.detector.cidr),
                              "-j", KUBE_MARK_MASQ))

    if plan.policy.uses_external_chain:
        write_chain(plan.external_chain, _external_chain_rules(view, plan, sync))
    if plan.uses_firewall_chain:
        write_chain(plan.firewall_chain, _firewall_chain_rules(view, plan, sync))
    if plan.policy.uses_cluster_endpoints:
        write_chain(plan.cluster_chain, _service_to_endpoint_rules(view, plan.cluster_chain, cats.cluster, sync))
    if plan.policy.uses_local_endpoints:
        write_chain(plan.local_chain, _service_to_endpoint_rules(view, plan.local_chain, cats.local, sync))
    for endpoint in cats.all_reachable:
        chain = endpoint_chain(view, endpoint)
        write_chain(chain, _endpoint_chain_rules(view, endpoint, chain, sync))
    return active


def _external_chain_rules(view: common.ServicePortView, plan: _Plan, sync: _Sync) -> list[str]:
    """KUBE-EXT: masquerade (eTP=Cluster), or the eTP=Local short-circuits, then the policy chain."""
    name, chain = view.name_string, plan.external_chain
    lines = []
    if plan.policy.external_masquerade is common.Masquerade.ALL:
        # Endpoints may be on other nodes: masquerade so replies come back through us.
        lines.append(rule("-A", chain, "-m", "comment", "--comment",
                          _quoted(f"masquerade traffic for {name} external destinations"), "-j", KUBE_MARK_MASQ))
    else:
        if sync.detector.implemented:
            # Pod -> external IP acts as if it left and came back: all endpoints, no masquerade.
            lines.append(rule("-A", chain, "-m", "comment", "--comment",
                              _quoted(f"pod traffic for {name} external destinations"),
                              "-s", str(sync.detector.cidr), "-j", plan.cluster_chain))
        # From the node itself the source is a node IP: masquerade and use every endpoint.
        lines.append(rule("-A", chain, "-m", "comment", "--comment",
                          _quoted(f"masquerade LOCAL traffic for {name} external destinations"),
                          "-m", "addrtype", "--src-type", "LOCAL", "-j", KUBE_MARK_MASQ))
        lines.append(rule("-A", chain, "-m", "comment", "--comment",
                          _quoted(f"route LOCAL traffic for {name} external destinations"),
                          "-m", "addrtype", "--src-type", "LOCAL", "-j", plan.cluster_chain))
    if plan.policy.has_external:
        lines.append(rule("-A", chain, "-j", plan.external_policy_chain))
    return lines


def _firewall_chain_rules(view: common.ServicePortView, plan: _Plan, sync: _Sync) -> list[str]:
    """KUBE-FW: accept loadBalancerSourceRanges; the rest falls through to KUBE-PROXY-FIREWALL."""
    head = ["-A", plan.firewall_chain, "-m", "comment", "--comment", _quoted(f"{view.name_string} loadbalancer IP")]
    lines = [rule(*head, "-s", str(cidr), "-j", plan.external_chain) for cidr in view.load_balancer_source_ranges]
    if common.source_ranges_admit_node(view, sync.node.node_ip):
        # A node connecting to its own LB VIP loops back with the VIP as source.
        for lb_ip in view.load_balancer_vips:
            lines.append(rule(*head, "-s", lb_ip, "-j", plan.external_chain))
    lines.append(rule("-A", plan.firewall_chain, "-m", "comment", "--comment",
                      _quoted(f"other traffic to {view.name_string} will be dropped by KUBE-PROXY-FIREWALL")))
    return lines


def _service_to_endpoint_rules(view: common.ServicePortView, chain: str,
                               endpoints: Sequence[common.EndpointView], sync: _Sync) -> list[str]:
    """writeServiceToEndpointRules: affinity checks first, then the 1/(n-i) random spread."""
    lines = []
    if view.sticky_seconds is not None:
        for endpoint in endpoints:
            target = endpoint_chain(view, endpoint)
            lines.append(rule("-A", chain, *sync.comment(_quoted(f"{view.name_string} -> {endpoint.string}")),
                              "-m", "recent", "--name", target, "--rcheck", "--seconds",
                              str(view.sticky_seconds), "--reap", "-j", target))
    count = len(endpoints)
    for i, endpoint in enumerate(endpoints):
        spread = ["-m", "statistic", "--mode", "random", "--probability", probability(count - i)] \
            if i < count - 1 else []
        lines.append(rule("-A", chain, *sync.comment(_quoted(f"{view.name_string} -> {endpoint.string}")),
                          *spread, "-j", endpoint_chain(view, endpoint)))
    return lines


def _endpoint_chain_rules(view: common.ServicePortView, endpoint: common.EndpointView,
                          chain: str, sync: _Sync) -> list[str]:
    """KUBE-SEP: masquerade hairpin traffic, record affinity, DNAT."""
    head = ["-A", chain, *sync.comment(view.name_string)]
    affinity = ["-m", "recent", "--name", chain, "--set"] if view.sticky_seconds is not None else []
    return [
        rule(*head, "-s", endpoint.ip, "-j", KUBE_MARK_MASQ),
        rule(*head, *affinity, "-m", view.protocol, "-p", view.protocol,
             "-j", "DNAT", "--to-destination", endpoint.string),
    ]


def _write_stale_chain_deletions(restore: _Restore, stale: set[str]) -> None:
    """Flush (chain line) and delete per-service chains no longer used; others are not ours."""
    for chain in sorted(c for c in stale if c.startswith(SERVICE_CHAIN_PREFIXES)):
        restore.nat_chains.append(chain_line(chain))
        restore.nat_rules.append(rule("-X", chain))


def _write_nodeports_jump(restore: _Restore, sync: _Sync) -> None:
    """The tail of nat KUBE-SERVICES: hand local-destination traffic to KUBE-NODEPORTS."""
    if sync.nodeports.match_all:
        destinations = ["-m", "addrtype", "--dst-type", "LOCAL"]
        if sync.ipv6:
            destinations += ["!", "-d", "::1/128"]
        elif not sync.localhost_nodeports:
            destinations += ["!", "-d", "127.0.0.0/8"]
        restore.nat_rules.append(rule("-A", KUBE_SERVICES, "-m", "comment", "--comment", NODEPORTS_COMMENT,
                                      *destinations, "-j", KUBE_NODEPORTS))
        return
    for ip in sync.nodeports.node_ips(sync.node):
        if ip.is_loopback and (sync.ipv6 or not sync.localhost_nodeports):
            continue   # kube-proxy logs an error and skips it
        restore.nat_rules.append(rule("-A", KUBE_SERVICES, "-m", "comment", "--comment", NODEPORTS_COMMENT,
                                      "-d", str(ip), "-j", KUBE_NODEPORTS))


def _write_forward_rules(restore: _Restore, sync: _Sync) -> None:
    """KUBE-FORWARD: drop INVALID (unless tcp_be_liberal), accept marked and established traffic."""
    if not sync.cfg.tcp_be_liberal:
        accounting = ["-m", "nfacct", "--nfacct-name", NFACCT_CT_INVALID] if sync.cfg.nfacct else []
        restore.filter_rules.append(rule("-A", KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID",
                                         *accounting, "-j", "DROP"))
    restore.filter_rules += forward_accept_rules(sync.mark)
