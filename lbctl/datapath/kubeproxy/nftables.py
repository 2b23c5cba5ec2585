"""The ``nft -f`` transaction kube-proxy v1.32's nftables proxier runs, as a pure function.

This mirrors ``setupNFTables`` and ``syncProxyRules`` in kubernetes
``pkg/proxy/nftables/proxier.go`` (v1.32: filter-prerouting/-input/-forward/-output at priority
dstnat-10, filter-output-post-dnat at dstnat+10, cluster-ips-check, separate
service-/nodeport-endpoints-check chains, mark-for-masquerade + masquerading), written out in
the text form of sigs.k8s.io/knftables (``Transaction.String()``), which is what kube-proxy
pipes to ``nft -f -``.

``render_nftables`` renders the first full sync of a kube-proxy that starts on a node without
a ``kube-proxy`` table: base chains are created after an add+delete (kube-proxy does that once,
to be able to change their priority), sets and maps are flushed (listing their elements fails
because the table does not exist yet), then every service is written. Rule text, comments and
chain names (``service-HASH-ns/name/proto/port``, ``endpoint-HASH-...__ip/port``) are
kube-proxy's; only the order of services (a Go map walk there) is made stable.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.common import ProxiedPort
from lbctl.model.objects import ServicePortInfo

TABLE = "kube-proxy"

# Regular chains, sets and maps (proxier.go constants).
SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NODEPORT_IPS = "nodeport-ips"
CLUSTER_IPS = "cluster-ips"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_IPS = "firewall-ips"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

# Base chains: (name, type, hook, priority). knftables writes priorities as numbers
# (dstnat = -100, srcnat = 100) because old nft rejects some named priorities in some hooks.
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)

# Jumps from base chains into regular chains (nftablesJumpChains): (target, source, match).
# REJECT is only valid in input/forward/output hooks on kernels < 5.9, hence no
# endpoints-check from filter-prerouting.
JUMP_CHAINS = (
    (NODEPORT_ENDPOINTS_CHECK, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, "filter-forward", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, "filter-output", "ct state new"),
    (FIREWALL_CHECK, "filter-prerouting", "ct state new"),
    (FIREWALL_CHECK, "filter-output", "ct state new"),
    (SERVICES, "nat-output", ""),
    (SERVICES, "nat-prerouting", ""),
    (MASQUERADING, "nat-postrouting", ""),
    (CLUSTER_IPS_CHECK, "filter-forward", "ct state new"),
    (CLUSTER_IPS_CHECK, "filter-output-post-dnat", "ct state new"),
)

# knftables.NameLengthMax (256) minus the longest chain prefix kube-proxy uses (16).
CHAIN_NAME_BASE_MAX = 256 - 16


@dataclass(frozen=True)
class NftablesConfig:
    """kube-proxy's nftables-mode settings that change the transaction it writes.

    ``nodeport_addresses`` empty means "primary", the v1.32 nftables default (only the primary
    node IPs accept NodePort traffic; iptables mode defaults to all local addresses).
    ``service_cidrs`` feed the "drop traffic to unallocated ClusterIPs" rule; kube-proxy only
    learns them from ServiceCIDR objects when the MultiCIDRServiceAllocator gate is on, which it
    is not by default in v1.32, so the default () leaves the rule out. ``ip_family`` and
    ``masquerade_mark`` are as in ``IptablesConfig``.
    """

    node_name: str
    node_ips: tuple[str, ...]
    cluster_cidr: str | None = None
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()
    masquerade_bit: int = 14
    ip_family: int | None = None
    masquerade_mark: str | None = None


# --- names -------------------------------------------------------------------------------------


def hash_and_truncate(name: str) -> str:
    """hashAndTruncate: "HASH8-name", cut to fit nftables' name limit."""
    name = common.b32_sha256(name)[:8] + "-" + name
    if len(name) > CHAIN_NAME_BASE_MAX:
        name = name[:CHAIN_NAME_BASE_MAX - 3] + "..."
    return name


def service_chain_base(view: common.ServicePortView) -> str:
    """servicePortChainNameBase: "HASH-ns/name/proto/portname"."""
    return hash_and_truncate(f"{view.namespace}/{view.name}/{view.protocol}/{view.port_name}")


def endpoint_chain_base(view: common.ServicePortView, endpoint: common.EndpointView) -> str:
    """servicePortEndpointChainNameBase: "HASH-ns/name/proto/portname__ip/port" (":" -> ".")."""
    ip = endpoint.ip.replace(":", ".")
    return hash_and_truncate(f"{view.namespace}/{view.name}/{view.protocol}/{view.port_name}__{ip}/{endpoint.port}")


def concat(*parts: object) -> str:
    """knftables.Concat: words joined by spaces, except that "@" sticks to the next word."""
    words: list[str] = []
    for part in parts:
        items = part if isinstance(part, (list, tuple)) else [part]
        for item in items:
            text = str(item)
            if text == "":
                continue
            if words and words[-1] == "@":
                words[-1] = "@" + text
            else:
                words.append(text)
    return " ".join(words)


# --- the transaction -----------------------------------------------------------------------------


class _Transaction:
    """A knftables Transaction: one line per operation, in the order they were queued."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.lines: list[str] = []

    def _op(self, verb: str, kind: str, name: str, body: str = "") -> None:
        self.lines.append(f"{verb} {kind} {self.family} {TABLE} {name}{body}".rstrip())

    def add_table(self, comment: str) -> None:
        self.lines.append(f'add table {self.family} {TABLE} {{ comment "{comment}" ; }}')

    def add_chain(self, name: str, base: tuple[str, str, int] | None = None, comment: str | None = None) -> None:
        body = ""
        if base is not None:
            chain_type, hook, priority = base
            body = f" {{ type {chain_type} hook {hook} priority {priority} ; }}"
        elif comment is not None:
            body = f' {{ comment "{comment}" ; }}'
        self._op("add", "chain", name, body)

    def flush(self, kind: str, name: str) -> None:
        self._op("flush", kind, name)

    def delete(self, kind: str, name: str) -> None:
        self._op("delete", kind, name)

    def add_rule(self, chain: str, text: str, comment: str | None = None) -> None:
        suffix = f' comment "{comment}"' if comment else ""
        self.lines.append(f"add rule {self.family} {TABLE} {chain} {text}{suffix}")

    def add_set(self, kind: str, name: str, type_: str, flags: Sequence[str] = (),
                timeout: int | None = None, comment: str | None = None) -> None:
        """A set or map in knftables' syntax, whose attribute order nft itself does not care about."""
        body = f"type {type_} ;"
        if flags:
            body += f" flags {','.join(flags)} ;"
        if timeout is not None:
            body += f" timeout {timeout}s ;"
        if comment is not None:
            body += f' comment "{comment}" ;'
        self._op("add", kind, name, f" {{ {body} }}")

    def add_element(self, kind: str, container: str, key: Sequence[str], value: str | None = None,
                    comment: str | None = None) -> None:
        body = " . ".join(key)
        if comment is not None:
            body += f' comment "{comment}"'
        if value is not None:
            body += f" : {value}"
        self.lines.append(f"add element {self.family} {TABLE} {container} {{ {body} }}")

    def delete_element(self, kind: str, container: str, key: Sequence[str]) -> None:
        self.lines.append(f"delete element {self.family} {TABLE} {container} {{ {' . '.join(key)} }}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Elements:
    """nftElementStorage after a failed read: starts empty, adds each key once."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        self.values: dict[tuple[str, ...], str | None] = {}

    def ensure(self, tx: _Transaction, key: Sequence[str], value: str | None = None,
               comment: str | None = None) -> None:
        """Add ``key`` unless this sync already added it with the same value."""
        key = tuple(key)
        if key in self.values:
            if self.values[key] == value:
                return
            tx.delete_element(self.kind, self.name, key)   # value changed: delete and re-add
        tx.add_element(self.kind, self.name, key, value, comment)
        self.values[key] = value


@dataclass
class _Sync:
    """Per-sync state: config-derived values and the element stores."""

    cfg: NftablesConfig
    node: common.NodeView
    nodeports: common.NodePortAddresses
    detector: common.LocalDetector
    mark: str
    tx: _Transaction
    elements: dict[str, _Elements]
    chains: set[str]

    @property
    def ip(self) -> str:
        return "ip6" if self.node.family == 6 else "ip"

    @property
    def addr_type(self) -> str:
        return "ipv6_addr" if self.node.family == 6 else "ipv4_addr"

    @property
    def no_localhost(self) -> str:
        return "ip6 daddr != ::1" if self.node.family == 6 else "ip daddr != 127.0.0.0/8"

    def ensure_chain(self, chain: str) -> None:
        """ensureChain: add and flush a chain once per transaction."""
        if chain in self.chains:
            return
        self.chains.add(chain)
        self.tx.add_chain(chain)
        self.tx.flush("chain", chain)

    def if_local(self) -> str:
        return f"{self.ip} saddr {self.detector.cidr}"

    def if_not_local(self) -> str:
        return f"{self.ip} saddr != {self.detector.cidr}"


# --- public API ---------------------------------------------------------------------------------


def render_nftables(ports: Sequence[ServicePortInfo], cfg: NftablesConfig) -> str:
    """The nft transaction of kube-proxy's first full sync of ``ports`` (see the module docstring)."""
    node = common.node_view(cfg.node_name, cfg.node_ips, cfg.ip_family)
    nodeport_values = cfg.nodeport_addresses or ("primary",)
    sync = _Sync(
        cfg=cfg,
        node=node,
        nodeports=common.nodeport_addresses(nodeport_values, node, cfg.node_ips),
        detector=common.local_detector(cfg.cluster_cidr, node.family),
        mark=cfg.masquerade_mark or common.masquerade_mark(cfg.masquerade_bit),
        tx=_Transaction("ip6" if node.family == 6 else "ip"),
        elements={name: _Elements(kind, name) for kind, name in _ELEMENT_CONTAINERS},
        chains=set(),
    )
    _setup(sync)
    sync.chains = set()   # syncProxyRules' activeChains starts empty
    for port in common.proxied_ports(ports, node.family, node.name):
        _write_service(sync, port)
    return sync.tx.text()


# The sets and maps whose elements kube-proxy tracks (nftElementStorage), in its order.
_ELEMENT_CONTAINERS = (
    ("set", CLUSTER_IPS),
    ("map", SERVICE_IPS),
    ("map", FIREWALL_IPS),
    ("map", NO_ENDPOINT_SERVICES),
    ("map", NO_ENDPOINT_NODEPORTS),
    ("map", SERVICE_NODEPORTS),
)


# --- setupNFTables -------------------------------------------------------------------------------


def _setup(sync: _Sync) -> None:
    tx, ip = sync.tx, sync.ip
    tx.add_table("rules for kube-proxy")
    # First sync of this kube-proxy: add+delete every base chain so changed properties
    # (e.g. priority) of an older kube-proxy's base chains cannot fail the transaction.
    for name, *_ in BASE_CHAINS:
        tx.add_chain(name)
        tx.delete("chain", name)
    for name, chain_type, hook, priority in BASE_CHAINS:
        tx.add_chain(name, base=(chain_type, hook, priority))
        tx.flush("chain", name)

    for target, source, match in JUMP_CHAINS:
        sync.ensure_chain(target)
        tx.add_rule(source, concat(match, "jump", target))
    for chain in (SERVICES, CLUSTER_IPS_CHECK, MASQUERADING, MARK_MASQ):
        sync.ensure_chain(chain)

    mark = sync.mark
    tx.add_rule(MARK_MASQ, concat("mark", "set", "mark", "or", mark))
    tx.add_rule(MASQUERADING, concat("mark", "and", mark, "==", "0", "return"))
    tx.add_rule(MASQUERADING, concat("mark", "set", "mark", "xor", mark))
    tx.add_rule(MASQUERADING, "masquerade fully-random")

    tx.add_set("set", CLUSTER_IPS, sync.addr_type, comment="Active ClusterIPs")
    tx.add_rule(CLUSTER_IPS_CHECK, concat(ip, "daddr", "@", CLUSTER_IPS, "reject"),
                comment="Reject traffic to invalid ports of ClusterIPs")
    service_cidrs = ",".join(str(c) for c in _service_cidrs(sync))
    if service_cidrs:
        tx.add_rule(CLUSTER_IPS_CHECK, concat(ip, "daddr", "{", service_cidrs, "}", "drop"),
                    comment="Drop traffic to unallocated ClusterIPs")

    _setup_nodeport_ips(sync)
    _setup_no_endpoint_handling(sync)
    _setup_firewall(sync)
    _setup_dispatch(sync)

    # readOrReset: listing the (not yet existing) sets fails on a clean node, so they are flushed.
    for kind, name in _ELEMENT_CONTAINERS:
        tx.flush(kind, name)


def _service_cidrs(sync: _Sync) -> list:
    cidrs = (common.parse_cidr_sloppy(c) for c in sync.cfg.service_cidrs)
    return [c for c in cidrs if c is not None and c.version == sync.node.family]


def _setup_nodeport_ips(sync: _Sync) -> None:
    """The set of IPs that accept NodePorts, deleted when every local IP does (match-all)."""
    tx = sync.tx
    tx.add_set("set", NODEPORT_IPS, sync.addr_type, comment="IPs that accept NodePort traffic")
    if sync.nodeports.match_all:
        tx.delete("set", NODEPORT_IPS)
        return
    tx.flush("set", NODEPORT_IPS)
    for ip in sync.nodeports.node_ips(sync.node):
        if ip.is_loopback:
            continue   # localhost NodePorts are not supported in nftables mode (logged)
        tx.add_element("set", NODEPORT_IPS, [str(ip)])


def _setup_no_endpoint_handling(sync: _Sync) -> None:
    tx, ip = sync.tx, sync.ip
    tx.add_set("map", NO_ENDPOINT_SERVICES, f"{sync.addr_type} . inet_proto . inet_service : verdict",
               comment="vmap to drop or reject packets to services with no endpoints")
    tx.add_set("map", NO_ENDPOINT_NODEPORTS, "inet_proto . inet_service : verdict",
               comment="vmap to drop or reject packets to service nodeports with no endpoints")
    tx.add_chain(REJECT_CHAIN, comment="helper for @no-endpoint-services / @no-endpoint-nodeports")
    tx.flush("chain", REJECT_CHAIN)
    tx.add_rule(REJECT_CHAIN, "reject")
    tx.add_rule(SERVICE_ENDPOINTS_CHECK,
                concat(ip, "daddr", ".", "meta l4proto", ".", "th dport", "vmap", "@", NO_ENDPOINT_SERVICES))
    destination = sync.no_localhost if sync.nodeports.match_all else concat(ip, "daddr", "@", NODEPORT_IPS)
    tx.add_rule(NODEPORT_ENDPOINTS_CHECK,
                concat(destination, "meta l4proto . th dport", "vmap", "@", NO_ENDPOINT_NODEPORTS))


def _setup_firewall(sync: _Sync) -> None:
    tx, ip = sync.tx, sync.ip
    tx.add_set("map", FIREWALL_IPS, f"{sync.addr_type} . inet_proto . inet_service : verdict",
               comment="destinations that are subject to LoadBalancerSourceRanges")
    sync.ensure_chain(FIREWALL_CHECK)
    tx.add_rule(FIREWALL_CHECK, concat(ip, "daddr", ".", "meta l4proto", ".", "th dport", "vmap", "@", FIREWALL_IPS))


def _setup_dispatch(sync: _Sync) -> None:
    tx, ip = sync.tx, sync.ip
    tx.add_set("map", SERVICE_IPS, f"{sync.addr_type} . inet_proto . inet_service : verdict",
               comment="ClusterIP, ExternalIP and LoadBalancer IP traffic")
    tx.add_set("map", SERVICE_NODEPORTS, "inet_proto . inet_service : verdict", comment="NodePort traffic")
    tx.add_rule(SERVICES, concat(ip, "daddr", ".", "meta l4proto", ".", "th dport", "vmap", "@", SERVICE_IPS))
    if sync.nodeports.match_all:
        destination = concat("fib daddr type local", sync.no_localhost)
    else:
        destination = concat(ip, "daddr @nodeport-ips")
    tx.add_rule(SERVICES, concat(destination, "meta l4proto . th dport", "vmap", "@", SERVICE_NODEPORTS))


# --- syncProxyRules, per service port -------------------------------------------------------------


@dataclass(frozen=True)
class _Plan(common.ServiceChains):
    """One service port's chains (see common.ServiceChains), and what nftables mode spells its own way."""

    no_endpoint_verdict: str    # in @no-endpoint-services/-nodeports where no endpoint serves


# The vmap verdicts of @no-endpoint-services and @no-endpoint-nodeports.
_VERDICTS = {common.Verdict.REJECT: f"goto {REJECT_CHAIN}", common.Verdict.DROP: "drop"}


def _plan(port: ProxiedPort, sync: _Sync) -> _Plan:
    view = port.view
    policy = common.service_policy(port, sync.cfg.masquerade_all, sync.detector)
    base = service_chain_base(view)
    return _Plan(
        policy=policy,
        cluster_chain="service-" + base,
        local_chain="local-" + base,
        external_chain="external-" + base,
        firewall_chain="firewall-" + base,
        # Unlike iptables mode, the firewall applies whether or not there are endpoints.
        uses_firewall_chain=bool(view.load_balancer_vips) and bool(view.load_balancer_source_ranges),
        no_endpoint_verdict=_VERDICTS[policy.no_endpoint_verdict],
    )


def _endpoint_chain(view: common.ServicePortView, endpoint: common.EndpointView) -> str:
    return "endpoint-" + endpoint_chain_base(view, endpoint)


def _affinity_set(view: common.ServicePortView, endpoint: common.EndpointView) -> str:
    return "affinity-" + endpoint_chain_base(view, endpoint)


def _write_service(sync: _Sync, port: ProxiedPort) -> None:
    view, cats = port.view, port.categories
    plan = _plan(port, sync)
    for endpoint in cats.all_reachable:
        sync.ensure_chain(_endpoint_chain(view, endpoint))
    if plan.policy.uses_cluster_endpoints:
        sync.ensure_chain(plan.cluster_chain)
    if plan.policy.uses_local_endpoints:
        sync.ensure_chain(plan.local_chain)
    if plan.policy.uses_external_chain:
        sync.ensure_chain(plan.external_chain)
    _write_service_elements(sync, port, plan)

    if plan.policy.has_internal:
        _write_internal_masquerade(sync, view, plan)
    if plan.policy.uses_external_chain:
        _write_external_chain(sync, view, plan)
    if plan.uses_firewall_chain:
        _write_firewall_chain(sync, view, plan)
    if view.sticky_seconds is not None:
        for endpoint in cats.all_reachable:
            sync.tx.add_set("set", _affinity_set(view, endpoint), sync.addr_type,
                            flags=("dynamic", "timeout"), timeout=view.sticky_seconds)
    if plan.policy.uses_cluster_endpoints:
        _write_service_to_endpoint_rules(sync, view, plan.cluster_chain, cats.cluster)
    if plan.policy.uses_local_endpoints:
        _write_service_to_endpoint_rules(sync, view, plan.local_chain, cats.local)
    for endpoint in cats.all_reachable:
        _write_endpoint_chain(sync, view, endpoint)


def _write_service_elements(sync: _Sync, port: ProxiedPort, plan: _Plan) -> None:
    """The set and map elements of one service port (ensureElem calls, in kube-proxy's order)."""
    view, el, tx = port.view, sync.elements, sync.tx
    name = view.name_string
    proto, svc_port = view.protocol, str(view.port)

    el[CLUSTER_IPS].ensure(tx, [view.cluster_ip])
    if plan.policy.has_internal:
        el[SERVICE_IPS].ensure(tx, [view.cluster_ip, proto, svc_port], f"goto {plan.internal_chain}")
    else:
        el[NO_ENDPOINT_SERVICES].ensure(tx, [view.cluster_ip, proto, svc_port], plan.no_endpoint_verdict, name)

    for external_ip in view.external_ips:
        if plan.policy.has_endpoints:
            el[SERVICE_IPS].ensure(tx, [external_ip, proto, svc_port], f"goto {plan.external_chain}")
        if not plan.policy.has_external:
            el[NO_ENDPOINT_SERVICES].ensure(tx, [external_ip, proto, svc_port], plan.no_endpoint_verdict, name)

    if plan.uses_firewall_chain:
        sync.ensure_chain(plan.firewall_chain)
    for lb_ip in view.load_balancer_vips:
        if plan.policy.has_endpoints:
            el[SERVICE_IPS].ensure(tx, [lb_ip, proto, svc_port], f"goto {plan.external_chain}")
        if plan.uses_firewall_chain:
            el[FIREWALL_IPS].ensure(tx, [lb_ip, proto, svc_port], f"goto {plan.firewall_chain}")
    if not plan.policy.has_external:
        for lb_ip in view.load_balancer_vips:
            el[NO_ENDPOINT_SERVICES].ensure(tx, [lb_ip, proto, svc_port], plan.no_endpoint_verdict, name)

    if view.node_port:
        node_port = str(view.node_port)
        if plan.policy.has_endpoints:
            el[SERVICE_NODEPORTS].ensure(tx, [proto, node_port], f"goto {plan.external_chain}")
        if not plan.policy.has_external:
            el[NO_ENDPOINT_NODEPORTS].ensure(tx, [proto, node_port], plan.no_endpoint_verdict, name)


def _write_internal_masquerade(sync: _Sync, view: common.ServicePortView, plan: _Plan) -> None:
    match = concat(sync.ip, "daddr", view.cluster_ip, view.protocol, "dport", view.port)
    masquerade = plan.policy.internal_masquerade
    if masquerade is common.Masquerade.ALL:
        sync.tx.add_rule(plan.internal_chain, concat(match, "jump", MARK_MASQ))
    elif masquerade is common.Masquerade.OFF_CLUSTER:
        # Masquerade off-cluster traffic to the VIP: it may be bridged off-node.
        sync.tx.add_rule(plan.internal_chain, concat(match, sync.if_not_local(), "jump", MARK_MASQ))


def _write_external_chain(sync: _Sync, view: common.ServicePortView, plan: _Plan) -> None:
    tx, chain = sync.tx, plan.external_chain
    if plan.policy.external_masquerade is common.Masquerade.ALL:
        tx.add_rule(chain, concat("jump", MARK_MASQ))
    else:
        if sync.detector.implemented:
            tx.add_rule(chain, concat(sync.if_local(), "goto", plan.cluster_chain),
                        comment="short-circuit pod traffic")
        tx.add_rule(chain, concat("fib", "saddr", "type", "local", "jump", MARK_MASQ),
                    comment="masquerade local traffic")
        tx.add_rule(chain, concat("fib", "saddr", "type", "local", "goto", plan.cluster_chain),
                    comment="short-circuit local traffic")
    if plan.policy.has_external:
        tx.add_rule(chain, concat("goto", plan.external_policy_chain))


def _write_firewall_chain(sync: _Sync, view: common.ServicePortView, plan: _Plan) -> None:
    sources: list[str] = []
    for cidr in view.load_balancer_source_ranges:
        if sources:
            sources.append(",")
        sources.append(str(cidr))
    if common.source_ranges_admit_node(view, sync.node.node_ip):
        # A node connecting to its own LB VIP loops back with the VIP as source.
        for lb_ip in view.load_balancer_vips:
            sources += [",", lb_ip]
    sync.tx.add_rule(plan.firewall_chain, concat(sync.ip, "saddr", "!=", "{", sources, "}", "drop"))


def _write_service_to_endpoint_rules(sync: _Sync, view: common.ServicePortView, chain: str,
                                     endpoints: Sequence[common.EndpointView]) -> None:
    if view.sticky_seconds is not None:
        for endpoint in endpoints:
            sync.tx.add_rule(chain, concat(sync.ip, "saddr", "@", _affinity_set(view, endpoint),
                                           "goto", _endpoint_chain(view, endpoint)))
    elements: list[str] = []
    for i, endpoint in enumerate(endpoints):
        elements += [str(i), ":", "goto", _endpoint_chain(view, endpoint)]
        if i != len(endpoints) - 1:
            elements.append(",")
    sync.tx.add_rule(chain, concat("numgen random mod", len(endpoints), "vmap", "{", elements, "}"))


def _write_endpoint_chain(sync: _Sync, view: common.ServicePortView, endpoint: common.EndpointView) -> None:
    chain, tx = _endpoint_chain(view, endpoint), sync.tx
    # Hairpin: a pod reaching itself through the service must be masqueraded.
    tx.add_rule(chain, concat(sync.ip, "saddr", endpoint.ip, "jump", MARK_MASQ))
    if view.sticky_seconds is not None:
        tx.add_rule(chain, concat("update", "@", _affinity_set(view, endpoint), "{", sync.ip, "saddr", "}"))
    tx.add_rule(chain, concat("meta l4proto", view.protocol, "dnat to", endpoint.string))
