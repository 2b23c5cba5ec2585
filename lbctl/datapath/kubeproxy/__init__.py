"""kube-proxy v1.32's three proxiers as lbctl datapath modes, and their rules as pure functions.

    common.py          kube-proxy's view of service ports and endpoints for one IP family, and
                       the per-service traffic policy both rule renderers follow
    iptables.py        the iptables-restore input of the iptables proxier (pure)
    nftables.py        the ``nft -f`` transaction of the nftables proxier (pure)
    proxier.py         what the iptables and nftables modes share: the Mode bookkeeping
                       (``Proxier``), the command ``Runner``, stale UDP conntrack clean-up
    iptables_mode.py   ``lbctl run --mode iptables``: programs iptables.py's rules
    nftables_mode.py   ``lbctl run --mode nftables``: programs nftables.py's transactions
    probes.py          what kube-proxy detects on its node (--random-fully, nfacct, tcp_be_liberal)
    ipvs/              ``lbctl run --mode ipvs``: desired state, rules, kernel interface, mode

Nothing here touches the eBPF datapath or the layers above (agent, CLI); the test doubles (the
iptables tracer, the fake IPVS kernel) live in ``lbctl.testing``. The renderers exported here
(``render_iptables``, ``render_iptables_partial``, ``render_jump_chains``/``render_jump_rules``,
``render_nftables``) touch no kernel.
"""
from lbctl.datapath.kubeproxy.iptables import (
    IptablesConfig,
    render_iptables,
    render_iptables_partial,
    render_jump_chains,
    render_jump_rules,
)
from lbctl.datapath.kubeproxy.nftables import NftablesConfig, render_nftables

__all__ = [
    "IptablesConfig",
    "NftablesConfig",
    "render_iptables",
    "render_iptables_partial",
    "render_jump_chains",
    "render_jump_rules",
    "render_nftables",
]
