"""What the real kube-proxy programs against what lbctl's renderers say it programs.

lbctl's iptables and nftables modes render kube-proxy v1.32's rules (lbctl.datapath.kubeproxy,
`lbctl render`); the benchmark runs the real v1.37.2 binary beside them. `compare_rules` says
where the two differ for the same Services and EndpointSlices, after normalising what differs
without meaning anything:

* both sides in the kernel's own form: iptables-save output, and `nft list table` output (a
  renderer's text is applied in a scratch namespace and read back first: `kernel_form`), so
  match order, quoting and implicit `-m tcp` are the kernel's on both sides;
* counters (`[0:0]`, `counter packets N bytes M`), handles, `#` lines, COMMIT;
* rule comments are compared apart from the rules (a rule that differs only in its comment is
  reported under "comments", not as two different rules);
* set and map elements are compared as sets (their listed order is the kernel's hash order);
* only kube-proxy's own objects: KUBE-* chains and the rules of built-in chains that jump to one
  (iptables), the tables named kube-proxy (nftables). Others (the lab's KIND-MASQ-AGENT) stay out.

Chain names are not normalised: KUBE-SVC-/KUBE-SEP- (iptables) and service-/endpoint- (nftables)
names are hashes of the service port's name, protocol and endpoint in both, so equal objects give
equal names, and a name that differs is a real difference.

    report = compare_rules(real_text, lbctl_text, kind="nftables")
    report["same"], report["rules"]["only_real"], ...
"""
from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lbctl.lab import netns

KINDS = ("iptables", "nftables")
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
_COUNTER = re.compile(r"\bcounter packets \d+ bytes \d+")
_HANDLE = re.compile(r"\s*# handle \d+$")
# Chains kube-proxy's iptables mode writes service by service in Go map order, which is random
# from one sync to the next: their order is compared within each service (the rules sharing a
# comment) and for the comment-less rules counted from the chain's end (KUBE-SERVICES' jump to
# KUBE-NODEPORTS is last), never across services.
MAP_ORDER_CHAINS = {"nat/KUBE-SERVICES", "nat/KUBE-NODEPORTS", "filter/KUBE-SERVICES",
                    "filter/KUBE-EXTERNAL-SERVICES", "filter/KUBE-NODEPORTS"}


@dataclass
class Ruleset:
    """kube-proxy's part of a ruleset: chain -> [(rule without its comment, comment)], and for
    nftables set/map -> (declaration lines, elements). Chains are "table/chain"."""

    chains: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    sets: dict[str, tuple[tuple[str, ...], frozenset[str]]] = field(default_factory=dict)


# --- iptables ----------------------------------------------------------------------------------


def parse_iptables(text: str) -> Ruleset:
    """iptables-save output (or restore input) -> kube-proxy's chains and rules."""
    out = Ruleset()
    table = ""
    declared: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if line.startswith(":"):
            declared.append(f"{table}/{line[1:].split()[0]}")
            continue
        words = shlex.split(line)
        if words[:1] != ["-A"] or len(words) < 2:
            continue
        chain = words[1]
        rest = words[2:]
        comment = ""
        if "--comment" in rest:
            at = rest.index("--comment")
            comment = rest[at + 1]
            start = at - 2 if at >= 2 and rest[at - 2:at] == ["-m", "comment"] else at
            rest = rest[:start] + rest[at + 2:]
        body = shlex.join(rest)
        if chain.startswith("KUBE-") or (chain in BUILTIN and "KUBE-" in body):
            out.chains.setdefault(f"{table}/{chain}", []).append((body, comment))
    for name in declared:
        if name.split("/", 1)[1].startswith("KUBE-"):
            out.chains.setdefault(name, [])
    return out


# --- nftables ----------------------------------------------------------------------------------


def parse_nft(text: str) -> Ruleset:
    """`nft list table|ruleset` output -> the chains, sets and maps of every table named
    kube-proxy ("ip kube-proxy/chain")."""
    out = Ruleset()
    table = None
    block: tuple[str, str] | None = None           # ("chain"|"set"|"map", name)
    decl: list[str] = []
    elements: list[str] = []
    in_elements = False
    for raw in text.splitlines():
        line = _HANDLE.sub("", raw).strip()
        if not line:
            continue
        if line.startswith("table "):
            words = line.split()
            table = f"{words[1]} {words[2]}" if words[2] == "kube-proxy" else None
            continue
        if table is None:
            continue
        if in_elements:
            elements.append(line)
            if line.endswith("}"):
                in_elements = False
            continue
        m = re.match(r"^(chain|set|map) (\S+) \{$", line)
        if m:
            block, decl, elements = (m.group(1), m.group(2)), [], []
            if block[0] == "chain":
                out.chains[f"{table}/{block[1]}"] = []
            continue
        if line == "}":
            if block and block[0] != "chain":
                out.sets[f"{table}/{block[1]}"] = (tuple(decl), frozenset(_elements(" ".join(elements))))
            block = None
            continue
        if block is None:
            continue                               # the table's own comment, flags
        if block[0] == "chain":
            if line.startswith("type ") and "hook" in line:
                decl.append(line)
                out.chains[f"{table}/{block[1]}"].append((f"[{line}]", ""))
            elif line.startswith("comment "):
                pass                               # a chain's comment: not a rule
            else:
                body, comment = _split_comment(_COUNTER.sub("counter", line))
                out.chains[f"{table}/{block[1]}"].append((body, comment))
        elif line.startswith("elements = {"):
            elements = [line[len("elements = "):]]
            in_elements = not line.endswith("}")
        else:
            decl.append(line)
    return out


def _split_comment(rule: str) -> tuple[str, str]:
    m = re.search(r' comment "((?:[^"\\]|\\.)*)"', rule)
    if not m:
        return rule, ""
    return (rule[:m.start()] + rule[m.end():]).strip(), m.group(1)


def _elements(text: str) -> list[str]:
    """'{ a, b comment "x, y" : goto c }' -> ['a', 'b comment "x, y" : goto c']."""
    inner = text.strip()
    if inner.startswith("{"):
        inner = inner[1:]
    if inner.endswith("}"):
        inner = inner[:-1]
    items, current, quoted = [], "", False
    for ch in inner:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current.strip())
    return [" ".join(item.split()) for item in items]


# --- the comparison ----------------------------------------------------------------------------


def compare_rules(real_text: str, lbctl_text: str, kind: str = "iptables") -> dict[str, Any]:
    """Where lbctl's rules and the real kube-proxy's differ (both texts in kernel form: see the
    module docstring). Returns

        {"kind", "same": bool,
         "chains": {"only_real": [...], "only_lbctl": [...]},
         "rules": {"only_real": {chain: [rule, ...]}, "only_lbctl": {...}},   # comments apart
         "order": [chains holding the same rules in another order],
         "comments": {chain: [[real comment, lbctl comment], ...]},  # same rule, other comment
         "sets": {"only_real": [...], "only_lbctl": [...],
                  "declaration": {name: {"real": [...], "lbctl": [...]}},
                  "elements": {name: {"only_real": [...], "only_lbctl": [...]}}}}   # nftables
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    parse = parse_iptables if kind == "iptables" else parse_nft
    real, ours = parse(real_text), parse(lbctl_text)
    report: dict[str, Any] = {
        "kind": kind,
        "chains": {"only_real": sorted(set(real.chains) - set(ours.chains)),
                   "only_lbctl": sorted(set(ours.chains) - set(real.chains))},
        "rules": {"only_real": {}, "only_lbctl": {}}, "order": [], "comments": {},
        "sets": {"only_real": sorted(set(real.sets) - set(ours.sets)),
                 "only_lbctl": sorted(set(ours.sets) - set(real.sets)),
                 "declaration": {}, "elements": {}},
    }
    for chain in sorted(set(real.chains) & set(ours.chains)):
        _diff_chain(chain, real.chains[chain], ours.chains[chain], report)
    for name in sorted(set(real.sets) & set(ours.sets)):
        (rdecl, relem), (odecl, oelem) = real.sets[name], ours.sets[name]
        if rdecl != odecl:
            report["sets"]["declaration"][name] = {"real": list(rdecl), "lbctl": list(odecl)}
        if relem != oelem:
            report["sets"]["elements"][name] = {"only_real": sorted(relem - oelem),
                                                "only_lbctl": sorted(oelem - relem)}
    sets = report["sets"]
    report["same"] = not (report["chains"]["only_real"] or report["chains"]["only_lbctl"]
                          or report["rules"]["only_real"] or report["rules"]["only_lbctl"]
                          or report["order"] or report["comments"] or sets["only_real"]
                          or sets["only_lbctl"] or sets["declaration"] or sets["elements"])
    return report


def _diff_chain(chain: str, real: list[tuple[str, str]], ours: list[tuple[str, str]],
                report: dict[str, Any]) -> None:
    rb, ob = Counter(b for b, _ in real), Counter(b for b, _ in ours)
    only_real, only_ours = rb - ob, ob - rb
    if only_real:
        report["rules"]["only_real"][chain] = [b for b in dict.fromkeys(b for b, _ in real) if b in only_real]
    if only_ours:
        report["rules"]["only_lbctl"][chain] = [b for b in dict.fromkeys(b for b, _ in ours) if b in only_ours]
    common = rb & ob
    if _order(chain, [(b, c) for b, c in real if b in common]) != \
            _order(chain, [(b, c) for b, c in ours if b in common]):
        report["order"].append(chain)
    comments = []
    for body in common:
        rc = [c for b, c in real if b == body]
        oc = [c for b, c in ours if b == body]
        comments += [[r, o] for r, o in zip(rc, oc) if r != o]
    if comments:
        report["comments"][chain] = comments


def _order(chain: str, rules: list[tuple[str, str]]) -> Any:
    """What of a chain's order means something: all of it, or for MAP_ORDER_CHAINS the order
    within each service and the comment-less rules' positions from the end."""
    if chain not in MAP_ORDER_CHAINS:
        return [b for b, _ in rules]
    groups: dict[str, list[str]] = {}
    for body, comment in rules:
        if comment:
            groups.setdefault(comment, []).append(body)
    tail = [(len(rules) - i, body) for i, (body, comment) in enumerate(rules) if not comment]
    return sorted(groups.items()), tail


def summary(report: dict[str, Any]) -> list[str]:
    """The report as lines a person reads (the benchmark report's "where they differ")."""
    lines = []
    for side, who in (("only_real", "only the real kube-proxy"), ("only_lbctl", "only lbctl")):
        for chain in report["chains"][side]:
            lines.append(f"chain {chain}: {who}")
        for chain, rules in report["rules"][side].items():
            lines += [f"{chain}: {who}: {rule}" for rule in rules]
        for name in report["sets"][side]:
            lines.append(f"set/map {name}: {who}")
    for chain in report["order"]:
        lines.append(f"{chain}: the same rules in another order")
    for chain, pairs in report["comments"].items():
        lines += [f"{chain}: comment {r!r} (real) vs {o!r} (lbctl)" for r, o in pairs]
    for name, decl in report["sets"]["declaration"].items():
        lines.append(f"set/map {name}: declared {decl['real']} (real) vs {decl['lbctl']} (lbctl)")
    for name, elems in report["sets"]["elements"].items():
        lines.append(f"set/map {name}: elements only real {elems['only_real']}, only lbctl "
                     f"{elems['only_lbctl']}")
    return lines


# --- reading rules from a namespace ------------------------------------------------------------


def read_rules(ns: str | None, kind: str) -> str:
    """What namespace ns holds, in kernel form: iptables-save, or every kube-proxy nft table."""
    enter = netns.enter_argv(ns)
    if kind == "iptables":
        return netns.run([*enter, "iptables-save"]).stdout
    tables = netns.run([*enter, "nft", "list", "tables"]).stdout.split("\n")
    return "".join(netns.run([*enter, "nft", "list", "table", *line.split()[1:3]]).stdout
                   for line in tables if line.split()[-1:] == ["kube-proxy"])


def kernel_form(text: str, kind: str, scratch_ns: str, jump_commands: Sequence[Sequence[str]] = ()) -> str:
    """A renderer's text as the kernel lists it: applied in a fresh namespace `scratch_ns`
    (made and deleted here) after `jump_commands` (iptables: the built-in chains' jump rules,
    `lbctl render iptables --jump-rules`), and read back with read_rules."""
    netns.add_netns(scratch_ns)
    try:
        enter = netns.enter_argv(scratch_ns)
        for argv in jump_commands:
            netns.run([*enter, *argv])
        restore = ["iptables-restore", "--noflush", "-w"] if kind == "iptables" else ["nft", "-f", "-"]
        netns.run([*enter, *restore], input=text)
        return read_rules(scratch_ns, kind)
    finally:
        for pid in netns.netns_pids(scratch_ns):
            netns.stop_process(pid)
        netns.del_netns(scratch_ns)
