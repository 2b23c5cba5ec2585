"""Trace a packet through rendered kube-proxy iptables rules, as the kernel would walk them.

Modelled on the tracer in kube-proxy's own tests (pkg/proxy/iptables/proxier_test.go,
``tracePacket``), so lbctl's tests can ask the same questions kube-proxy's do: "a TCP packet
from 10.0.0.2 to 172.30.0.41:80 ends up at which endpoints, masqueraded or not, or is it
rejected or dropped?"

The walk: nat KUBE-SERVICES first (where PREROUTING and OUTPUT jump), then, with the
destination rewritten by any DNAT, the filter chains KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
KUBE-NODEPORTS and KUBE-PROXY-FIREWALL. A ``-m statistic`` rule is treated as "may match", so
every endpoint the random spread can pick is reported. Rules that depend on history (affinity
``--rcheck``, ``--mark``, ``--ctstate``) never match: the trace is of a new connection's first
packet. ``-m nfacct`` only counts, so it always matches.
"""
from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from lbctl.datapath.kubeproxy import common

TERMINAL_TARGETS = ("ACCEPT", "REJECT", "DROP")


@dataclass
class Rule:
    """One parsed ``-A`` line: the options a tracer needs, each as (negated, value)."""

    raw: str
    chain: str
    options: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def get(self, name: str) -> tuple[bool, str] | None:
        return self.options.get(name)

    @property
    def target(self) -> str | None:
        jump = self.get("-j")
        return jump[1] if jump else None


# Options that take a value; flags without a value are stored with value "".
_VALUED = {"-A", "-s", "-d", "-p", "-j", "--dport", "--sport", "--src-type", "--dst-type", "--comment",
           "--to-destination", "--probability", "--mode", "--name", "--seconds", "--mark",
           "--ctstate", "--nfacct-name", "--set-xmark", "--or-mark", "--xor-mark"}


def parse_rule(line: str) -> Rule:
    """Parse a rule the way kube-proxy's test parser does: skip "-m MODULE", honour "!"."""
    words = shlex.split(line)
    options: dict[str, tuple[bool, str]] = {}
    negated = False
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-m" and i + 1 < len(words):
            i += 2
            continue
        if word == "!":
            negated = True
            i += 1
            continue
        if word in _VALUED and i + 1 < len(words):
            options[word] = (negated, words[i + 1])
            i += 2
        else:
            options[word] = (negated, "")
            i += 1
        negated = False
    return Rule(raw=line, chain=options["-A"][1], options=options)


def parse_restore(text: str) -> dict[str, dict[str, list[Rule]]]:
    """iptables-restore input -> {table: {chain: [rules]}}; chain lines create empty chains."""
    tables: dict[str, dict[str, list[Rule]]] = {}
    chains: dict[str, list[Rule]] = {}
    for line in (l.strip() for l in text.splitlines()):
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            rule = parse_rule(line)
            chains.setdefault(rule.chain, []).append(rule)
        elif line.startswith("-X "):
            chains.pop(line.split()[1], None)
    return tables


@dataclass(frozen=True)
class Trace:
    """Where a packet went: endpoints ("ip:port") or a verdict, and whether it was masqueraded."""

    outputs: tuple[str, ...]
    masquerade: bool
    matched: tuple[str, ...]        # the raw rules that matched, for failure messages

    @property
    def output(self) -> str:
        """kube-proxy's test format: "10.0.0.1:80, 10.0.0.2:80", "REJECT", "" for no match."""
        return ", ".join(self.outputs)


class _Tracer:
    """One packet's walk; collects every DNAT/verdict it may reach and whether it was marked."""

    def __init__(self, tables: dict[str, dict[str, list[Rule]]], local_ips: set[str], src: str, proto: str,
                 dport: int) -> None:
        self.tables = tables
        self.local_ips = local_ips
        self.src, self.proto, self.dport = src, proto, str(dport)
        self.outputs: list[str] = []
        self.matched: list[str] = []
        self.masquerade = False

    def matches(self, rule: Rule, dst: str) -> bool:
        """Evaluate the matches kube-proxy's rules use, honouring "!"; others are ignored."""
        checks = (
            ("-s", lambda v: _address_matches(self.src, v)),
            ("--src-type", lambda v: v == ("LOCAL" if self.src in self.local_ips else "not-matched")),
            ("-p", lambda v: v == self.proto),
            ("-d", lambda v: _address_matches(dst, v)),
            ("--dst-type", lambda v: v == ("LOCAL" if dst in self.local_ips else "not-matched")),
            ("--dport", lambda v: v == self.dport),
        )
        for name, test in checks:
            option = rule.get(name)
            if option is not None and test(option[1]) == option[0]:
                return False
        # History-dependent matches never hold for the first packet of a connection.
        return not any(rule.get(name) for name in ("--rcheck", "--mark", "--ctstate"))

    def run(self, table: str, chain: str, dst: str) -> bool:
        """Walk one chain; True if a terminal target (DNAT, ACCEPT, REJECT, DROP) was hit."""
        for rule in self.tables.get(table, {}).get(chain, []):
            target = rule.target
            if target is None or not self.matches(rule, dst):
                continue
            self.matched.append(rule.raw)
            if target == "KUBE-MARK-MASQ":
                self.masquerade = True
            elif target == "RETURN":
                return False
            elif target in TERMINAL_TARGETS:
                self.outputs.append(target)
                return True
            elif target == "DNAT":
                to = rule.get("--to-destination")
                if to is None:
                    raise ValueError(f"DNAT without --to-destination: {rule.raw}")
                self.outputs.append(to[1])
                return True
            elif self.run(table, target, dst) and rule.get("--probability") is None:
                return True
            # A probabilistic jump may also not be taken: keep walking to collect the others.
        return False


def _address_matches(ip: str, value: str) -> bool:
    address = common.parse_ip_sloppy(ip)
    if "/" in value:
        network = common.parse_cidr_sloppy(value)
        return network is not None and address in network
    return address == common.parse_ip_sloppy(value)


def _host(endpoint: str) -> str:
    """"10.0.0.1:80" or "[fd00::1]:80" -> the IP."""
    if endpoint.startswith("["):
        return endpoint[1:endpoint.index("]")]
    return endpoint.rsplit(":", 1)[0]


def trace_iptables(restore_text: str, src: str, dst: str, dport: int, proto: str = "tcp",
                   node_ips: Iterable[str] = ()) -> Trace:
    """Trace a new connection from ``src`` to ``dst:dport`` through rendered kube-proxy rules.

    ``node_ips`` are the node's addresses (for ``-m addrtype --src-type/--dst-type LOCAL``);
    127.0.0.1 and ::1 are always local.
    """
    local_ips = {str(ipaddress.ip_address(ip)) for ip in node_ips} | {"127.0.0.1", "::1"}
    tracer = _Tracer(parse_restore(restore_text), local_ips, src, proto.lower(), dport)
    tracer.run("nat", "KUBE-SERVICES", dst)
    if tracer.outputs:
        dst = _host(tracer.outputs[0])
    for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
        tracer.run("filter", chain, dst)
    return Trace(tuple(tracer.outputs), tracer.masquerade, tuple(tracer.matched))
