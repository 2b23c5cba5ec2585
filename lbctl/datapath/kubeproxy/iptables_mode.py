"""kube-proxy's iptables mode as an lbctl datapath mode: ``lbctl run --mode iptables``.

The rules are kube-proxy v1.32's own (``lbctl.datapath.kubeproxy.iptables`` renders them); this module
programs them the way kube-proxy does:

* on a full sync, the jump rules in the built-in chains are ensured one by one, as kube-proxy's
  EnsureRule does (``iptables -C``, and ``-I`` if the rule is missing), after ``-N`` of their
  target chains;
* every sync is one ``iptables-restore --noflush`` transaction: full (every chain rewritten,
  per-service chains no longer used flushed and deleted, found by reading the nat table back)
  or partial (only the chains of services that changed since the last successful sync);
* after each sync, UDP conntrack entries of removed endpoints are deleted (see
  ``proxier.stale_udp_conntrack``).

``IptablesMode.cleanup`` removes exactly what kube-proxy's iptables mode makes: its jump rules
in the built-in chains, then its chains in the nat and filter tables, for IPv4 and IPv6.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from collections.abc import Sequence
from typing import Any

from lbctl.datapath.base import DatapathError
from lbctl.datapath.kubeproxy import iptables as rules
from lbctl.datapath.kubeproxy import probes
from lbctl.datapath.kubeproxy.iptables import IptablesConfig, render_iptables, render_iptables_partial
from lbctl.datapath.kubeproxy.proxier import HostRunner, Proxier, ProxierOptions, Runner, SyncFailed
from lbctl.model.objects import ServicePortInfo

log = logging.getLogger("lbctl.datapath.kubeproxy")

RESTORE_FLAGS = ("-w", "5", "-W", "100000", "--noflush", "--counters")

# Chains kube-proxy's iptables mode creates, per table. KUBE-MARK-MASQ and KUBE-FIREWALL are
# shared with kubelet on a real node; lbctl has no kubelet beside it, so they are ours to remove.
TOP_LEVEL_CHAINS = {
    "nat": (rules.KUBE_SERVICES, rules.KUBE_NODEPORTS, rules.KUBE_POSTROUTING, rules.KUBE_MARK_MASQ),
    "filter": (rules.KUBE_SERVICES, rules.KUBE_EXTERNAL_SERVICES, rules.KUBE_FORWARD,
               rules.KUBE_NODEPORTS, rules.KUBE_PROXY_FIREWALL, rules.KUBE_FIREWALL),
}
# Per-service chains (KUBE-XLB- is what releases before 1.24 called KUBE-SVL-).
SERVICE_CHAIN_PREFIXES = rules.SERVICE_CHAIN_PREFIXES + ("KUBE-XLB-",)
BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def is_ours(table: str, chain: str) -> bool:
    if chain in TOP_LEVEL_CHAINS.get(table, ()):
        return True
    return table == "nat" and chain.startswith(SERVICE_CHAIN_PREFIXES)


class IptablesMode(Proxier[IptablesConfig]):
    """kube-proxy's iptables proxier (IPv4)."""

    name = "iptables"

    def __init__(self, cfg: IptablesConfig, options: ProxierOptions = ProxierOptions(),
                 runner: Runner | None = None):
        super().__init__(cfg, options, runner)
        self.restores = 0          # transactions applied, for tests and dumps

    def _check(self) -> None:
        self._require(["iptables-save", "-t", "nat"], package="iptables")

    def _apply(self, ports: Sequence[ServicePortInfo], full: bool) -> None:
        if not full and self.applied is not None:
            text = render_iptables_partial(self.applied, ports, self.cfg)
        else:
            self._ensure_jump_rules()
            existing = parse_save(self._must(["iptables-save", "-t", "nat"]).stdout).get("nat", {})
            text = render_iptables(ports, self.cfg, existing_chains=existing.get("chains", ()))
        self._must(["iptables-restore", *RESTORE_FLAGS], input=text)
        self.restores += 1

    def _ensure_jump_rules(self) -> None:
        """kube-proxy's EnsureChain (-N, "exists" is fine) and EnsureRule(Prepend) (-C, then -I)."""
        for argv in rules.render_jump_chains(self.cfg):
            done = self.runner.run(argv)
            if not done.ok and "exists" not in done.stderr:
                raise SyncFailed(done.error(argv))
        for argv in rules.render_jump_rules(self.cfg):
            check = ["-C" if word == "-I" else word for word in argv]
            done = self.runner.run(check)
            if done.returncode == 1:          # no such rule
                self._must(argv)
            elif not done.ok:
                raise SyncFailed(done.error(check))

    # --- reading back --------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """kube-proxy's chains and the jump rules into them, as iptables-save prints them."""
        saved_tables = parse_save(self.runner.run(["iptables-save"]).stdout)
        tables: dict[str, dict[str, list[str]]] = {}
        for table in ("filter", "nat"):
            saved = saved_tables.get(table, {"chains": [], "rules": []})
            ours = [c for c in saved["chains"] if is_ours(table, c)]
            lines = [r for r in saved["rules"] if is_ours(table, _chain_of(r)) or
                     (_chain_of(r) in BUILTIN_CHAINS and is_ours(table, _target_of(r) or ""))]
            tables[table] = {"chains": ours, "rules": lines}
        return {"mode": self.name, "full_syncs": self.full_syncs, "partial_syncs": self.partial_syncs,
                "tables": tables,
                "services": sum(1 for c in tables["nat"]["chains"] if c.startswith("KUBE-SVC-"))}

    # --- cleanup -------------------------------------------------------------------------------

    @classmethod
    def cleanup(cls, runner: Runner | None = None) -> list[str]:
        """Removes kube-proxy's jump rules, then flushes and deletes its chains (IPv4 and IPv6).

        One iptables-save and one iptables-restore --noflush per family, and nothing at all
        when no chain of ours is there (a jump rule cannot exist without its target chain).
        """
        runner = runner or HostRunner()
        removed: list[str] = []
        for save, restore in (("iptables-save", "iptables-restore"),
                              ("ip6tables-save", "ip6tables-restore")):
            done = runner.run([save])
            if not done.ok:
                if save == "iptables-save":
                    log.warning("iptables cleanup: %s", done.error([save]))
                continue
            text, what = cleanup_restore(parse_save(done.stdout), save.split("-")[0])
            if not text:
                continue
            applied = runner.run([restore, "-w", "5", "--noflush"], input=text)
            if not applied.ok:
                raise DatapathError(f"iptables cleanup: {applied.error([restore])}: another rule "
                                    f"may still jump to one of kube-proxy's chains")
            removed += what
            removed += remove_empty_tables(runner, "ip6" if save.startswith("ip6") else "ip")
        return removed


def remove_empty_tables(runner: Runner, family: str) -> list[str]:
    """Deletes what iptables-nft made on first use and kube-proxy's rules left empty.

    iptables-nft creates the ``filter`` and ``nat`` tables and their built-in chains on demand.
    Once kube-proxy's chains are gone, an empty built-in chain with policy accept changes no
    packet, but it keeps a netfilter hook (for nat: connection tracking and NAT of every
    packet) on for nothing; such chains are deleted, and a table left with nothing in it too,
    so that the node is as before the mode ran. Rules, sets, user chains and drop policies
    (someone else's) stay, and so does any chain a rule still jumps to.
    """
    removed = []
    for table in ("filter", "nat"):
        done = runner.run(["nft", "-j", "list", "table", family, table])
        if not done.ok:
            continue
        try:
            items = [next(iter(item.items())) for item in json.loads(done.stdout).get("nftables", [])]
        except (ValueError, StopIteration, AttributeError):
            continue
        chains = [body for kind, body in items if kind == "chain"]
        used = {body.get("chain") for kind, body in items if kind == "rule"}
        empty = [c["name"] for c in chains if c["name"] in BUILTIN_CHAINS and "hook" in c
                 and c.get("policy", "accept") == "accept" and c["name"] not in used]
        if not empty:
            continue
        whole = all(kind in ("metainfo", "table") for kind, _ in items if kind != "chain") \
            and len(empty) == len(chains)
        text = (f"delete table {family} {table}\n" if whole else
                "".join(f"delete chain {family} {table} {name}\n" for name in empty))
        if runner.run(["nft", "-f", "-"], input=text).ok:
            removed.append(f"empty nftables table {family} {table} (iptables-nft)" if whole else
                           f"empty built-in chains {','.join(empty)} of nftables table {family} {table}")
    return removed


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save output -> {table: {"chains": [...], "rules": ["-A CHAIN ...", ...]}}."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), {"chains": [], "rules": []})
        elif current is None or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current["chains"].append(line[1:].split()[0])
        elif line.startswith("-A "):
            current["rules"].append(line)
    return tables


def _chain_of(rule_line: str) -> str:
    return rule_line.split()[1]


def _target_of(rule_line: str) -> str | None:
    words = shlex.split(rule_line)
    for flag in ("-j", "-g"):
        if flag in words and words.index(flag) + 1 < len(words):
            return words[words.index(flag) + 1]
    return None


def cleanup_restore(tables: dict[str, dict[str, list[str]]], binary: str = "iptables") -> tuple[str, list[str]]:
    """The restore input removing kube-proxy's objects from ``tables``, and what it removes.

    Per table: every chain of ours is flushed (its chain line) and deleted (-X), after the rules
    in built-in chains that jump to one of them are deleted (-D with the rule as saved).
    """
    out: list[str] = []
    what: list[str] = []
    for table in ("filter", "nat"):
        saved = tables.get(table)
        if not saved:
            continue
        ours = [c for c in saved["chains"] if is_ours(table, c)]
        if not ours:
            continue
        jumps = [r for r in saved["rules"]
                 if _chain_of(r) in BUILTIN_CHAINS and (_target_of(r) or "") in ours]
        out.append(f"*{table}")
        out += [rules.chain_line(c) for c in ours]
        out += ["-D" + r[2:] for r in jumps]
        out += [f"-X {c}" for c in ours]
        out.append("COMMIT")
        what += [f"{binary} -t {table} rule {r[3:]}" for r in jumps]
        what += [f"{binary} -t {table} chain {c}" for c in ours]
    return ("\n".join(out) + "\n" if out else ""), what


def config_from(node_name: str, node_ips: Sequence[str], cluster_cidr: str | None = None,
                masquerade_all: bool = False, nodeport_addresses: Sequence[str] = (),
                **overrides: Any) -> IptablesConfig:
    """IptablesConfig with what kube-proxy detects on this host (random-fully, tcp_be_liberal).

    nfacct is off: kube-proxy adds ``-m nfacct`` only after creating its two nfacct counters
    over netlink, and lbctl does not create them (kube-proxy's own fallback when that fails).
    """
    cfg = IptablesConfig(node_name=node_name, node_ips=tuple(node_ips), cluster_cidr=cluster_cidr,
                         masquerade_all=masquerade_all, nodeport_addresses=tuple(nodeport_addresses),
                         random_fully=probes.probe_random_fully(), nfacct=False,
                         tcp_be_liberal=probes.probe_tcp_be_liberal())
    return dataclasses.replace(cfg, **overrides)
