"""kube-proxy's nftables mode as an lbctl datapath mode: ``lbctl run --mode nftables``.

Everything lives in ``table ip kube-proxy``, written by one ``nft -f -`` transaction per sync,
as kube-proxy v1.32 does it:

* a full sync (the first, every ``full_sync_every``-th, and any after a failure) is kube-proxy's
  whole transaction (``lbctl.datapath.kubeproxy.nftables.render_nftables``): base chains, every chain
  rewritten, every set and map flushed and refilled. The base chains' add+delete that kube-proxy
  does to reset their properties happens once per process, as there. Service chains found in
  the kernel that are no longer used are flushed; affinity sets no longer used are deleted.
* a partial sync writes only the difference from what the last successful sync left: new
  chains are added, the chains of services that changed (as kube-proxy's change trackers see
  it) are flushed and rewritten, map and set elements are deleted and added one by one, chains
  no longer used are flushed.
* flushed chains are deleted in a later transaction, at least a second after the one that
  stopped using them: before Linux 6.2 the kernel still counts a reference from a just-deleted
  map element for a moment and refuses to delete the chain (kube-proxy's staleChains).
* after each sync, UDP conntrack entries of removed endpoints are deleted.

The difference is computed on the rendered transaction itself (``Rendered``), so partial syncs
can never drift from what a full sync would write.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbctl.datapath.base import DatapathError
from lbctl.datapath.kubeproxy import common
from lbctl.datapath.kubeproxy.nftables import BASE_CHAINS, TABLE, NftablesConfig, render_nftables
from lbctl.datapath.kubeproxy.proxier import HostRunner, Proxier, ProxierOptions, Runner
from lbctl.model.objects import ServicePortInfo

log = logging.getLogger("lbctl.datapath.kubeproxy")

FAMILY = "ip"
PREFIX = f"{FAMILY} {TABLE} "
STALE_CHAIN_DELAY = 1.0       # seconds between flushing a chain and deleting it (kube-proxy: 1 s)

_ELEMENT = re.compile(r"^add element ip kube-proxy (?P<container>\S+) \{ (?P<body>.*) \}$")


def is_service_chain(chain: str) -> bool:
    """kube-proxy's isServiceChainName: service, endpoint, ... chains all contain a "/"."""
    return "/" in chain


def service_of(chain: str) -> str:
    """"endpoint-HASH-ns/name/proto/port__ip/port" -> "ns/name"."""
    rest = chain.split("-", 2)[2]
    namespace, name = rest.split("/")[:2]
    return f"{namespace}/{name}"


@dataclass
class Rendered:
    """A rendered full-sync transaction, taken apart so that two of them can be compared.

    ``setup``: every line that is not about one service (table, base chains, fixed chains and
    their rules, set and map declarations and flushes). ``chains``: service chain -> its rule
    lines. ``elements``: set or map -> key -> (value, line). ``affinity_sets``: name -> line.
    """

    setup: list[str] = field(default_factory=list)
    chains: dict[str, list[str]] = field(default_factory=dict)
    elements: dict[str, dict[str, tuple[str | None, str]]] = field(default_factory=dict)
    affinity_sets: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Rendered:
        r = cls()
        for line in text.splitlines():
            words = line.split(" ", 5)
            if len(words) >= 5 and words[2] == FAMILY and words[3] == TABLE:
                verb, kind, name = words[0], words[1], words[4]
                if kind == "chain" and is_service_chain(name) and verb in ("add", "flush"):
                    r.chains.setdefault(name, [])
                    continue
                if verb == "add" and kind == "rule" and is_service_chain(name):
                    r.chains.setdefault(name, []).append(line)
                    continue
                if verb == "add" and kind == "set" and name.startswith("affinity-"):
                    r.affinity_sets[name] = line
                    continue
                if kind == "element":
                    if verb == "add":
                        container, key, value = _element(line)
                        r.elements.setdefault(container, {})[key] = (value, line)
                    continue      # "delete element" only undoes an earlier add of this render
            r.setup.append(line)
        return r


def _element(line: str) -> tuple[str, str, str | None]:
    """'add element ip kube-proxy M { K [comment "c"] [: V] }' -> (M, K, V)."""
    match = _ELEMENT.match(line)
    if not match:
        raise ValueError(f"not an element line: {line}")
    body = match["body"]
    value = None
    if " : " in body:
        body, value = body.rsplit(" : ", 1)
    key = re.sub(r' comment "[^"]*"$', "", body)
    return match["container"], key, value


def partial_transaction(old: Rendered, new: Rendered, changed_services: set[str]) -> tuple[list[str], list[str]]:
    """The lines taking the kernel from ``old`` to ``new``, and the chains they leave stale.

    Order matters within the transaction: sets and chains are created before anything refers
    to them; elements are deleted before the chains they point to are flushed; affinity sets
    are deleted last, once no rule refers to them.
    """
    lines: list[str] = []
    for name in sorted(new.affinity_sets.keys() - old.affinity_sets.keys()):
        lines.append(new.affinity_sets[name])
    for chain in sorted(new.chains.keys() - old.chains.keys()):
        lines.append(f"add chain {PREFIX}{chain}")
    for chain, body in new.chains.items():
        if chain not in old.chains or old.chains[chain] != body or service_of(chain) in changed_services:
            lines.append(f"flush chain {PREFIX}{chain}")
            lines += body
    for container in sorted(old.elements.keys() | new.elements.keys()):
        before, after = old.elements.get(container, {}), new.elements.get(container, {})
        for key in sorted(before.keys() - after.keys()):
            lines.append(f"delete element {PREFIX}{container} {{ {key} }}")
        for key, (value, line) in sorted(after.items()):
            if key in before and before[key][0] == value:
                continue
            if key in before:
                lines.append(f"delete element {PREFIX}{container} {{ {key} }}")
            lines.append(line)
    stale = sorted(old.chains.keys() - new.chains.keys())
    lines += [f"flush chain {PREFIX}{chain}" for chain in stale]
    for name in sorted(old.affinity_sets.keys() - new.affinity_sets.keys()):
        lines.append(f"delete set {PREFIX}{name}")
    return lines, stale


def without_base_chain_reset(text: str) -> str:
    """The full transaction minus the once-per-process add+delete of the base chains."""
    reset = {f"add chain {PREFIX}{name}" for name, *_ in BASE_CHAINS}
    reset |= {f"delete chain {PREFIX}{name}" for name, *_ in BASE_CHAINS}
    return "".join(line + "\n" for line in text.splitlines() if line not in reset)


class NftablesMode(Proxier[NftablesConfig]):
    """kube-proxy's nftables proxier (IPv4)."""

    name = "nftables"

    def __init__(self, cfg: NftablesConfig, options: ProxierOptions = ProxierOptions(),
                 runner: Runner | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(cfg, options, runner)
        self.clock = clock
        self.rendered: Rendered | None = None     # what the last successful sync left
        self.base_chains_reset = False
        self.stale_chains: dict[str, float] = {}  # flushed, to delete: chain -> when it went stale
        self.transactions: list[str] = []         # the last few transactions, for tests and dumps

    def _check(self) -> None:
        self._require(["nft", "list", "tables"], package="nftables")

    def _apply(self, ports: Sequence[ServicePortInfo], full: bool) -> None:
        self.delete_stale_chains()
        text = render_nftables(ports, self.cfg)
        new = Rendered.parse(text)
        old, applied = self.rendered, self.applied
        if not full and old is not None and applied is not None and old.setup == new.setup:
            node = self.cfg.node_name
            changed = common.changed_services(common.proxied_ports(applied, self.family, node),
                                              common.proxied_ports(ports, self.family, node))
            lines, stale = partial_transaction(old, new, changed)
        else:
            # Asked for, or nothing to diff against, or something beyond services changed.
            full = True
            if self.base_chains_reset:
                text = without_base_chain_reset(text)
            lines, stale = [text.rstrip("\n")], self._stale_in_kernel(new)
            lines += [f"flush chain {PREFIX}{chain}" for chain in stale]
            lines += [f"delete set {PREFIX}{name}" for name in self._stale_affinity_sets(new)]
        transaction = "\n".join(lines) + "\n" if lines else ""
        if transaction:
            self._must(["nft", "-f", "-"], input=transaction)
            self.transactions = (self.transactions + [transaction])[-4:]
        self.rendered = new
        if full:
            self.base_chains_reset = True
        now = self.clock()
        for chain in stale:
            self.stale_chains.setdefault(chain, now)
        for chain in new.chains:
            self.stale_chains.pop(chain, None)

    def _listing(self, what: str) -> list[dict]:
        """``nft -j list chains|sets ip``, our table's entries; [] when there is none."""
        done = self.runner.run(["nft", "-j", "list", what, FAMILY])
        if not done.ok:
            return []
        kind = what[:-1]
        return [item[kind] for item in json.loads(done.stdout or "{}").get("nftables", [])
                if kind in item and item[kind].get("table") == TABLE]

    def _stale_in_kernel(self, new: Rendered) -> list[str]:
        return sorted(c["name"] for c in self._listing("chains")
                      if is_service_chain(c["name"]) and c["name"] not in new.chains)

    def _stale_affinity_sets(self, new: Rendered) -> list[str]:
        return sorted(s["name"] for s in self._listing("sets")
                      if s["name"].startswith("affinity-") and s["name"] not in new.affinity_sets)

    # --- stale chains --------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Called by the agent between syncs: deletes chains stale for long enough."""
        self.delete_stale_chains()

    def delete_stale_chains(self) -> int:
        """Deletes, in one transaction, chains flushed at least STALE_CHAIN_DELAY ago."""
        now = self.clock()
        due = sorted(c for c, since in self.stale_chains.items() if now - since >= STALE_CHAIN_DELAY)
        if not due:
            return 0
        text = "".join(f"delete chain {PREFIX}{chain}\n" for chain in due)
        done = self.runner.run(["nft", "-f", "-"], input=text)
        if not done.ok:
            log.warning("could not delete %d stale nftables chain(s), retrying later: %s",
                        len(due), done.error(["nft", "-f", "-"]))
            for chain in due:
                self.stale_chains[chain] = now
            return 0
        for chain in due:
            del self.stale_chains[chain]
        log.debug("deleted %d stale nftables chain(s)", len(due))
        return len(due)

    # --- reading back --------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        done = self.runner.run(["nft", "list", "table", FAMILY, TABLE])
        text = done.stdout if done.ok else ""
        chains = re.findall(r"^\tchain (\S+) \{", text, flags=re.M)
        return {"mode": self.name, "table": f"{FAMILY} {TABLE}", "present": done.ok,
                "full_syncs": self.full_syncs, "partial_syncs": self.partial_syncs,
                "chains": chains, "stale_chains": sorted(self.stale_chains),
                "services": sum(1 for c in chains if c.startswith("service-")),
                "ruleset": text.splitlines()}

    # --- cleanup -------------------------------------------------------------------------------

    @classmethod
    def cleanup(cls, runner: Runner | None = None) -> list[str]:
        """Deletes kube-proxy's tables (``ip`` and ``ip6 kube-proxy``), with all they hold."""
        runner = runner or HostRunner()
        removed = []
        for family in ("ip", "ip6"):
            listed = runner.run(["nft", "list", "tables", family])
            if not listed.ok or f"table {family} {TABLE}" not in listed.stdout.splitlines():
                continue
            done = runner.run(["nft", "delete", "table", family, TABLE])
            if not done.ok:
                raise DatapathError(f"nftables cleanup: {done.error(['nft', 'delete', 'table'])}")
            removed.append(f"nftables table {family} {TABLE}")
        return removed


def config_from(node_name: str, node_ips: Sequence[str], cluster_cidr: str | None = None,
                masquerade_all: bool = False, nodeport_addresses: Sequence[str] = (),
                **overrides: Any) -> NftablesConfig:
    return NftablesConfig(node_name=node_name, node_ips=tuple(node_ips), cluster_cidr=cluster_cidr,
                          masquerade_all=masquerade_all, nodeport_addresses=tuple(nodeport_addresses),
                          **overrides)
