"""The eBPF mode's netfilter rules: two, whatever the number of services.

The datapath marks what kube-proxy would masquerade (external traffic with eTP Cluster,
traffic from outside the cluster CIDR, --masquerade-all, ...) with the masquerade mark (0x4000,
--masquerade-bit) and what kube-proxy would drop (eTP or iTP Local without a local endpoint, a
source outside loadBalancerSourceRanges) with the drop mark (0x8000). Netfilter does the rest,
as kube-proxy's KUBE-POSTROUTING and KUBE-MARK-DROP did:

    table ip lbctl {
        chain masquerading {      # nat postrouting, just before iptables' nat POSTROUTING
            meta l4proto { tcp, udp } meta mark & M == M meta mark set meta mark ^ M counter
                masquerade to :32768-65535 fully-random
        }
        chain dropping {          # prerouting, before conntrack: no entry for a dropped packet
            meta mark & D == D counter drop
        }
    }

The masquerade picks its source ports outside the NodePort range (--service-node-port-range,
30000-32767: ports 32768-65535), as a node's own ephemeral ports are kept out of it. The uplink's
XDP program sees every packet before netfilter's conntrack does: a backend's answer to a
masqueraded flow whose port happened to be a NodePort (UDP: one answer in about 1,100 to a
service with one UDP NodePort) would look like a new NodePort flow, be balanced again and never
reach its client. kube-proxy's rules never meet it: nat chains see only a flow's first packet.
The datapath marks only TCP and UDP (the protocols it balances), which the port mapping needs.

Why nftables and a table of our own rather than iptables rules: the table is created, replaced
and deleted in one transaction (``nft -f``), it touches no chain another tool owns, and it
works the same whether the node's iptables is iptables-nft (Debian 12, kind) or legacy, and
next to kube-proxy's own nftables table. Its masquerade chain runs at srcnat - 1, before the
iptables nat POSTROUTING chain (kind's KIND-MASQ-AGENT): the first NAT decision for a
connection is the one netfilter keeps, as kube-proxy's KUBE-POSTROUTING jump at the top of
POSTROUTING makes it. The counters are what `lbctl dump maps` shows next to the datapath's.

The table is installed by the mode's start, checked and repaired by every resync (someone ran
``nft flush ruleset``), and removed by ``lbctl cleanup`` and when another mode takes over.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from lbctl.datapath.base import DEFAULT_PIN_DIR, DatapathError
from lbctl.datapath.kubeproxy.proxier import HostRunner, Runner

log = logging.getLogger(__name__)

TABLE = "lbctl"
MASQUERADE_CHAIN = "masquerading"
DROP_CHAIN = "dropping"
MASQUERADE_COMMENT = "lbctl: masquerade service traffic the datapath marked"
DROP_COMMENT = "lbctl: drop service traffic the datapath marked"


def masquerade_ports(node_port_range: tuple[int, int]) -> tuple[int, int]:
    """The source ports the masquerade picks: the larger run of 1024-65535 outside the NodePort
    range (the ports above it, 32768-65535, for kube-apiserver's default 30000-32767)."""
    low, high = node_port_range
    above = (max(high + 1, 1024), 65535)
    below = (1024, low - 1)
    runs = [r for r in (above, below) if r[1] - r[0] >= 0]
    if not runs:
        raise ValueError(f"NodePort range {low}-{high} leaves no source port for the masquerade "
                         "(1024-65535 all NodePorts)")
    return max(runs, key=lambda r: r[1] - r[0])


def table_name(pin_dir: str) -> str:
    """"lbctl", or "lbctl-<pin dir name>" for another instance (tests, the demo), so that each
    removes only its own table."""
    if pin_dir.rstrip("/") == DEFAULT_PIN_DIR:
        return TABLE
    return f"{TABLE}-{os.path.basename(pin_dir.rstrip('/'))}"


@dataclass(frozen=True)
class MarkRules:
    """The two rules, for one table name and pair of marks."""

    table: str = TABLE
    masquerade_mark: int = 0x4000
    drop_mark: int = 0x8000
    masquerade_ports: tuple[int, int] = (32768, 65535)    # masquerade_ports(the NodePort range)

    def ruleset(self) -> str:
        """The table as ``nft -f`` reads it."""
        masq, drop = f"{self.masquerade_mark:#010x}", f"{self.drop_mark:#010x}"
        low, high = self.masquerade_ports
        return (
            f"table ip {self.table} {{\n"
            f"\tchain {MASQUERADE_CHAIN} {{\n"
            f"\t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n"
            f"\t\tmeta l4proto {{ tcp, udp }} meta mark & {masq} == {masq} meta mark set meta mark ^ {masq} "
            f"counter masquerade to :{low}-{high} fully-random comment \"{MASQUERADE_COMMENT}\"\n"
            f"\t}}\n"
            f"\tchain {DROP_CHAIN} {{\n"
            f"\t\ttype filter hook prerouting priority raw; policy accept;\n"
            f"\t\tmeta mark & {drop} == {drop} counter drop comment \"{DROP_COMMENT}\"\n"
            f"\t}}\n"
            f"}}\n")

    def replace(self) -> str:
        """One transaction that creates the table or replaces whatever it held."""
        return f"add table ip {self.table}\ndelete table ip {self.table}\n{self.ruleset()}"


_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def _normalized(listing: str) -> str:
    """A listing without its counter values and handles: what must not change."""
    return "\n".join(line.strip() for line in _COUNTER.sub("counter", listing).splitlines() if line.strip())


class MarkRuleSet:
    """The table on this node (or in ``runner``'s namespace): install, check, count, remove."""

    def __init__(self, rules: MarkRules, runner: Runner | None = None):
        self.rules = rules
        self.runner = runner or HostRunner()
        self._installed: str | None = None    # the normalized listing right after our install

    def _nft(self, *args: str, input: str | None = None):
        return self.runner.run(["nft", *args], input=input)

    def _listing(self) -> str | None:
        done = self._nft("list", "table", "ip", self.rules.table)
        return done.stdout if done.ok else None

    def install(self) -> None:
        """Creates or replaces the table, atomically; DatapathError (with the fix) if nft refuses."""
        argv = ["nft", "-f", "-"]
        done = self.runner.run(argv, input=self.rules.replace())
        if not done.ok:
            raise DatapathError(f"the eBPF mode's masquerade and drop rules (nft table ip "
                                f"{self.rules.table}) could not be installed: {done.error(argv)}; "
                                "install nftables (`make setup`) and check `nft list ruleset`")
        listing = self._listing()
        self._installed = _normalized(listing) if listing is not None else None

    def ensure(self) -> bool:
        """Installs the table unless it holds exactly what we installed (first call: always,
        so that an older lbctl's table or other marks are replaced). True if it was (re)made."""
        if self._installed is not None:
            listing = self._listing()
            if listing is not None and _normalized(listing) == self._installed:
                return False
        self.install()
        return True

    def counters(self) -> dict[str, dict[str, int]] | None:
        """{"masquerade": {"packets", "bytes"}, "drop": {...}}, or None without the table."""
        return read_counters(self.rules.table, self.runner)


def read_counters(table: str = TABLE, runner: Runner | None = None) -> dict[str, dict[str, int]] | None:
    """The two rules' counters as nft reports them, or None (no table, no nft, not root)."""
    done = (runner or HostRunner()).run(["nft", "-j", "list", "table", "ip", table])
    if not done.ok:
        return None
    try:
        items = json.loads(done.stdout).get("nftables", [])
    except ValueError:
        return None
    found = {}
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule:
            continue
        name = {MASQUERADE_CHAIN: "masquerade", DROP_CHAIN: "drop"}.get(rule.get("chain"))
        for expr in rule.get("expr", ()):
            if name and isinstance(expr, dict) and "counter" in expr:
                counter = expr["counter"]
                found[name] = {"packets": int(counter.get("packets", 0)), "bytes": int(counter.get("bytes", 0))}
    return found


def remove(table: str = TABLE, runner: Runner | None = None) -> list[str]:
    """Deletes the table if it is there; what was removed, for `lbctl cleanup`'s report."""
    runner = runner or HostRunner()
    if not runner.run(["nft", "list", "table", "ip", table]).ok:
        return []     # no such table, or no nft at all: nothing of ours to remove
    argv = ["nft", "delete", "table", "ip", table]
    done = runner.run(argv)
    if not done.ok:
        raise DatapathError(f"could not remove nft table ip {table}: {done.error(argv)}")
    return [f"nft table ip {table}"]


def rule_count(table: str = TABLE, runner: Runner | None = None) -> int:
    """How many rules the table holds (the test that it is the same at 1 and 100,000 services)."""
    done = (runner or HostRunner()).run(["nft", "-j", "list", "table", "ip", table])
    if not done.ok:
        return 0
    return sum(1 for item in json.loads(done.stdout).get("nftables", []) if "rule" in item)
