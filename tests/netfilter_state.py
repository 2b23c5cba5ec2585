"""Netfilter state as comparable data, for tests that check what a mode leaves behind.

``nft_state`` reads ``nft -j list ruleset`` (or one table), ``iptables_state`` reads
``iptables-save``; both drop what changes without meaning anything (rule handles, counters), so
that "after == before" compares rules, chains, sets and tables only.
"""
from __future__ import annotations

import json

from lbctl.datapath.kubeproxy.iptables_mode import parse_save
from lbctl.datapath.kubeproxy.proxier import HostRunner


def _clean(value):
    """JSON without handles and counter values, so that two rulesets compare by meaning."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in ("handle", "packets", "bytes")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def nft_state(runner=None, table: tuple[str, str] | None = None) -> dict:
    """{(family, table): {"chains": {name: [rules]}, "sets": {name: sorted elements}, ...}}."""
    argv = ["nft", "-j", "list", "ruleset"] if table is None else ["nft", "-j", "list", "table", *table]
    done = (runner or HostRunner()).run(argv)
    assert done.ok, done.stderr
    out: dict = {}
    for item in json.loads(done.stdout)["nftables"]:
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            continue
        key = (body["family"], body["name"] if kind == "table" else body["table"])
        entry = out.setdefault(key, {"chains": {}, "rules": {}, "sets": {}})
        if kind == "chain":
            entry["chains"][body["name"]] = json.dumps(_clean(body), sort_keys=True)
        elif kind == "rule":
            entry["rules"].setdefault(body["chain"], []).append(json.dumps(_clean(body["expr"]), sort_keys=True))
        elif kind in ("set", "map"):
            body = _clean(body)
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
            entry["sets"][body["name"]] = json.dumps(body, sort_keys=True)
    return out


def iptables_state(runner=None) -> dict:
    done = (runner or HostRunner()).run(["iptables-save"])
    assert done.ok, done.stderr
    out = {}
    for table, saved in parse_save(done.stdout).items():
        rules: dict[str, list[str]] = {c: [] for c in saved["chains"]}
        for rule in saved["rules"]:
            rules[rule.split()[1]].append(rule)
        out[table] = rules
    return out
