"""kube-proxy v1.32's rules, rendered from lbctl's model, to compare lbctl against kube-proxy.

Pure renderers (no kernel is touched): ``render_iptables`` / ``render_iptables_partial`` give
the iptables-restore input of kube-proxy's iptables mode, ``render_jump_rules`` the rules it
adds to the built-in chains, ``render_nftables`` the ``nft -f`` transaction of its nftables
mode. ``trace_iptables`` walks rendered iptables rules the way a packet would.
"""
from lbctl.datapath.kubeproxy.iptables import (
    IptablesConfig,
    render_iptables,
    render_iptables_partial,
    render_jump_chains,
    render_jump_rules,
)
from lbctl.datapath.kubeproxy.nftables import NftablesConfig, render_nftables
from lbctl.testing.iptables_trace import Trace, trace_iptables

__all__ = [
    "IptablesConfig",
    "NftablesConfig",
    "Trace",
    "render_iptables",
    "render_iptables_partial",
    "render_jump_chains",
    "render_jump_rules",
    "render_nftables",
    "trace_iptables",
]
