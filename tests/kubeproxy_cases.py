"""Shared inputs and helpers for the kube-proxy renderer tests (iptables, nftables, trace).

The builders translate kube-proxy's own unit-test fixtures (makeTestService /
makeTestEndpointSlice in pkg/proxy/{iptables,nftables}/proxier_test.go) into lbctl's model,
with kube-proxy's conventions:

    Pod IPs 10.0.0.0/8, ClusterIPs 172.30.0.0/16, node IP 192.168.0.2 (other local addresses
    192.168.1.2 and 192.168.99.11), external IPs 192.168.99.0/24, LB IPs 1.2.3.4, 5.6.7.8,
    9.10.11.12, non-cluster clients 203.0.113.0/24, LB source range 203.0.113.0/25.

The normalizers port the comparison helpers of those tests (sortIPTablesRules,
checkIPTablesRuleJumps, sortNFTablesTransaction) so that golden files can hold kube-proxy's
expected output exactly as its tests spell it.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lbctl.model.objects import EndpointInfo, Protocol, Service, ServicePort, ServicePortInfo

GOLDEN = Path(__file__).parent / "golden"

TEST_NODE_NAME = "test-node"
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_NODE_IPS = (TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP)
TEST_EXTERNAL_CLIENT = "203.0.113.2"
TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
POD_CIDR = "10.0.0.0/8"


# --- model builders ---------------------------------------------------------------------------


def port(name: str, number: int, protocol: str = "TCP", node_port: int | None = None,
         target_port: int | str | None = None) -> ServicePort:
    return ServicePort(name=name, port=number, protocol=Protocol(protocol),
                       target_port=number if target_port is None else target_port, node_port=node_port)


def service(namespace: str, name: str, cluster_ip: str, *ports: ServicePort, **fields) -> Service:
    return Service(namespace=namespace, name=name, cluster_ips=(cluster_ip,), ports=tuple(ports), **fields)


def ep(address: str, port_number: int, node: str | None = None, ready: bool = True,
       serving: bool = True, terminating: bool = False) -> EndpointInfo:
    """An endpoint; kube-proxy's nil NodeName is None here, nil Ready/Serving mean true."""
    return EndpointInfo(address=address, port=port_number, ready=ready, serving=serving,
                        terminating=terminating, node_name=node)


def info(svc: Service, port_name: str, *endpoints: EndpointInfo, protocol: str | None = None) -> ServicePortInfo:
    """The ServicePortInfo of ``svc``'s port named ``port_name`` with these endpoints."""
    matching = [p for p in svc.ports if p.name == port_name and (protocol is None or p.protocol.value == protocol)]
    assert len(matching) == 1, f"{svc.key} has no single port {port_name!r}"
    return ServicePortInfo(svc, matching[0], tuple(endpoints))


def golden(kind: str, name: str) -> str:
    return (GOLDEN / kind / name).read_text()


# --- one manifest for the `lbctl render` command tests -----------------------------------------

CLI_MANIFESTS = """\
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: NodePort
  clusterIP: 172.30.0.41
  selector: {app: svc1}
  ports: [{name: p80, port: 80, protocol: TCP, targetPort: 80, nodePort: 30001}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc1-abc
  namespace: ns1
  labels: {kubernetes.io/service-name: svc1}
addressType: IPv4
ports: [{name: p80, port: 80, protocol: TCP}]
endpoints:
- addresses: [10.180.0.1]
  conditions: {ready: true}
  nodeName: test-node
"""


def write_cli_manifests(directory: Path) -> Path:
    """A manifests directory holding CLI_MANIFESTS."""
    (directory / "svc1.yaml").write_text(CLI_MANIFESTS)
    return directory


def cli_ports() -> list[ServicePortInfo]:
    """What CLI_MANIFESTS hold, built directly in the model."""
    svc = service("ns1", "svc1", "172.30.0.41", port("p80", 80, node_port=30001), type="NodePort")
    return [info(svc, "p80", ep("10.180.0.1", 80, node=TEST_NODE_NAME))]


# --- iptables: sortIPTablesRules and checkIPTablesRuleJumps -----------------------------------


@dataclass
class _Chain:
    name: str
    rules: list[str] = field(default_factory=list)
    deleted: bool = False


def _comment_of(rule: str) -> str | None:
    words = shlex.split(rule)
    for i, word in enumerate(words[:-1]):
        if word == "--comment":
            return words[i + 1]
    return None


def _service_name(rule: str) -> str:
    """orderByCommentServiceName: the comment up to the first space or colon."""
    comment = _comment_of(rule) or ""
    return re.split(r"[ :]", comment, maxsplit=1)[0]


def _chain_key(name: str) -> tuple[int, str]:
    if name == "KUBE-NODEPORTS":
        return 0, name
    if name == "KUBE-SERVICES":
        return 1, name
    return (2 if name.startswith("KUBE-") else 3), name


def sort_iptables_rules(data: str) -> str:
    """kube-proxy's sortIPTablesRules: a canonical form independent of service order.

    Tables and chains are sorted (KUBE-NODEPORTS, KUBE-SERVICES, then KUBE-*), rules are grouped
    by chain in their original order, except KUBE-NODEPORTS / KUBE-SERVICES rules which are
    ordered by the service name in their comment (the nodeports jump stays last), and "-X"
    lines come after all rules, as iptablestest.IPTablesDump.String() prints them.
    """
    tables: list[tuple[str, list[_Chain]]] = []
    for line in (l.strip() for l in data.strip("\n").splitlines()):
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            tables.append((line[1:], []))
            continue
        chains = tables[-1][1]
        if line.startswith(":"):
            chains.append(_Chain(line[1:].split()[0]))
        elif line.startswith("-A "):
            name = line.split()[1]
            next(c for c in chains if c.name == name).rules.append(line)
        elif line.startswith("-X "):
            next(c for c in chains if c.name == line.split()[1]).deleted = True
        else:
            raise ValueError(f"unexpected line {line!r}")

    out = []
    for table, chains in sorted(tables):
        chains.sort(key=lambda c: _chain_key(c.name))
        for chain in chains:
            if chain.name == "KUBE-NODEPORTS" or (chain.name == "KUBE-SERVICES" and table == "filter"):
                chain.rules.sort(key=_service_name)
            elif chain.name == "KUBE-SERVICES":
                chain.rules.sort(key=lambda r: ("must be the last rule" in (_comment_of(r) or ""), _service_name(r)))
        out.append(f"*{table}")
        out += [f":{c.name} - [0:0]" for c in chains]
        out += [r for c in chains for r in c.rules]
        out += [f"-X {c.name}" for c in chains if c.deleted]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def check_iptables_rule_jumps(data: str) -> None:
    """checkIPTablesRuleJumps: every jump targets a created, non-empty chain; no unused chains."""
    builtin_targets = {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
    always_present = {"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
                      "KUBE-FORWARD", "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"}
    for table in re.split(r"^COMMIT$", data, flags=re.M)[:-1]:
        lines = table.strip().splitlines()
        created = {l[1:].split()[0] for l in lines if l.startswith(":")}
        created -= {l.split()[1] for l in lines if l.startswith("-X ")}
        filled = {l.split()[1] for l in lines if l.startswith("-A ")}
        jumped = {m.group(1) for l in lines for m in [re.search(r"-j (\S+)", l)] if m} - builtin_targets
        assert not (jumped | filled) - created, f"{lines[0]}: chains used but not created: {(jumped | filled) - created}"
        assert not jumped - filled - {"KUBE-NODEPORTS"}, f"{lines[0]}: chains jumped to without rules: {jumped - filled}"
        assert not created - jumped - always_present, f"{lines[0]}: chains created but unused: {created - jumped}"


def iptables_chain(data: str, table: str, chain: str) -> list[str]:
    """The rules of one chain, in order (assertIPTablesChainEqual)."""
    current = None
    rules = []
    for line in data.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(f"-A {chain} "):
            rules.append(line)
    return rules


# --- nftables: applying a transaction and sortNFTablesTransaction ------------------------------


_OBJECT_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


def apply_nft_transaction(transaction: str) -> str:
    """The table a transaction leaves behind, as knftables.Fake.Dump() lists it ("add ..." lines).

    kube-proxy's nftables tests compare the Dump of a fake after the sync, not the transaction;
    this replays add / flush / delete the way nft does on an empty ruleset.
    """
    objects: dict[tuple[str, str], str] = {}       # (kind, name) -> "add ..." line
    rules: dict[str, list[str]] = {}
    elements: dict[str, dict[str, str]] = {}
    for line in transaction.splitlines():
        words = line.split(" ")
        if not line.strip():
            continue
        verb, kind = words[0], words[1]
        name = words[4] if len(words) > 4 else ""
        if verb == "add" and kind == "rule":
            rules.setdefault(name, []).append(line)
        elif verb == "add" and kind == "element":
            key = line.split("{", 1)[1].rsplit("}", 1)[0].split(" : ")[0].split(" comment ")[0].strip()
            elements.setdefault(name, {})[key] = line
        elif verb == "add":
            objects[(kind, name)] = line
        elif verb == "flush" and kind == "chain":
            rules.pop(name, None)
        elif verb == "flush":
            elements.pop(name, None)
        elif verb == "delete" and kind == "element":
            key = line.split("{", 1)[1].rsplit("}", 1)[0].strip()
            elements.get(name, {}).pop(key, None)
        elif verb == "delete":
            objects.pop((kind, name), None)
            rules.pop(name, None)
            elements.pop(name, None)
        else:
            raise ValueError(f"unexpected operation {line!r}")
    lines = list(objects.values())
    lines += [r for chain_rules in rules.values() for r in chain_rules]
    lines += [e for container in elements.values() for e in container.values()]
    return "\n".join(lines) + "\n"


def sort_nftables_transaction(text: str) -> str:
    """sortNFTablesTransaction: drop blanks and comments; order by object type, then name.

    Rules keep their relative order within a chain; other lines with the same type and name
    sort by their text.
    """
    lines = [l.strip() for l in text.splitlines()]
    lines = [l for l in lines if l and not l.startswith("#")]

    def key(line: str):
        words = line.split(" ")
        kind, name = words[1], words[4] if len(words) > 4 else ""
        return (-_OBJECT_ORDER.get(kind, 0), name, "" if kind == "rule" else line)

    return "\n".join(sorted(lines, key=key)) + "\n"


def nft_chain_rules(transaction: str, chain: str) -> list[str]:
    """The rules a chain ends up with after the transaction (assertNFTablesChainEqual)."""
    prefix_len = len("add rule ip kube-proxy ")
    return [l.split(" ", 5)[5] for l in apply_nft_transaction(transaction).splitlines()
            if l.startswith("add rule ") and l.split(" ")[4] == chain and len(l) > prefix_len]
