"""The eBPF mode's two netfilter rules (lbctl.datapath.ebpf.rules).

Without root: the ``nft -f`` text (marks from the settings, the table named after the pin dir,
the comments, the hooks), check-and-repair driven by what ``nft list`` answers, the parsing of
``nft -j list`` for the counters and the rule count, and removal, against a recording runner.
As root, in a network namespace made and deleted here: the table installed for real holds
exactly two rules, is repaired after ``nft flush table``, and is removed; and EbpfMode programming
1 and then 100,000 services leaves the same two rules, unchanged, and removes them on stop.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import TEST_PIN_DIR, config_for_tests

from lbctl.datapath.base import DEFAULT_PIN_DIR, DatapathError
from lbctl.datapath.ebpf import rules
from lbctl.datapath.kubeproxy.proxier import Completed, HostRunner

# --- a recording runner ----------------------------------------------------------------------------


class Nft:
    """Plays `nft`: records every command; ``listing`` is what `nft list table` prints (None: no
    such table), ``json_listing`` what `nft -j list table` prints; ``fail`` the subcommands
    ("-f", "delete") that exit 1."""

    def __init__(self, listing: str | None = None, json_listing: str | None = None, fail=()):
        self.calls: list[tuple[list[str], str | None]] = []
        self.listing, self.json_listing, self.fail = listing, json_listing, set(fail)

    def run(self, argv, input=None):
        argv = list(argv)
        self.calls.append((argv, input))
        assert argv[0] == "nft", argv
        if argv[1] in self.fail:
            return Completed(1, "", f"Error: {argv[1]} refused")
        if argv[1] == "-f":
            return Completed(0)
        if argv[1:3] == ["-j", "list"]:
            return Completed(0, self.json_listing) if self.json_listing is not None else \
                Completed(1, "", "Error: No such file or directory")
        if argv[1] == "list":
            return Completed(0, self.listing) if self.listing is not None else \
                Completed(1, "", "Error: No such file or directory")
        return Completed(0)

    def commands(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]

    def transactions(self) -> list[str]:
        return [text for argv, text in self.calls if argv[1:] == ["-f", "-"]]


def listing(table: str, masq_packets: int = 0, drop_packets: int = 0) -> str:
    """`nft list table` of our table, as nft 1.0 prints it."""
    return (f"table ip {table} {{\n"
            f"\tchain {rules.MASQUERADE_CHAIN} {{\n"
            f"\t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n"
            f"\t\tmeta mark & 0x00004000 == 0x00004000 meta mark set meta mark ^ 0x00004000 counter "
            f"packets {masq_packets} bytes {masq_packets * 60} masquerade fully-random "
            f"comment \"{rules.MASQUERADE_COMMENT}\"\n"
            f"\t}}\n"
            f"\tchain {rules.DROP_CHAIN} {{\n"
            f"\t\ttype filter hook prerouting priority raw; policy accept;\n"
            f"\t\tmeta mark & 0x00008000 == 0x00008000 counter packets {drop_packets} bytes "
            f"{drop_packets * 60} drop comment \"{rules.DROP_COMMENT}\"\n"
            f"\t}}\n}}\n")


def json_listing(table: str = "lbctl", masq=(7, 420), drop=(3, 180), extra_rules=()) -> str:
    """`nft -j list table` of our table: metainfo, table, chains, then the rules."""
    def rule(chain, handle, counter, verdict):
        return {"rule": {"family": "ip", "table": table, "chain": chain, "handle": handle,
                         "expr": [{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 16384]},
                                             "right": 16384}},
                                  {"counter": {"packets": counter[0], "bytes": counter[1]}}, verdict]}}
    items = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
             {"table": {"family": "ip", "name": table, "handle": 9}},
             {"chain": {"family": "ip", "table": table, "name": rules.MASQUERADE_CHAIN, "handle": 1,
                        "type": "nat", "hook": "postrouting", "prio": 99, "policy": "accept"}},
             {"chain": {"family": "ip", "table": table, "name": rules.DROP_CHAIN, "handle": 2,
                        "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}},
             rule(rules.MASQUERADE_CHAIN, 3, masq, {"masquerade": {"flags": "fully-random"}}),
             rule(rules.DROP_CHAIN, 4, drop, {"drop": None}), *extra_rules]
    return json.dumps({"nftables": items})


# --- the text ---------------------------------------------------------------------------------------


def test_table_name_is_lbctl_for_the_default_pin_dir_and_per_instance_otherwise():
    assert rules.table_name(DEFAULT_PIN_DIR) == "lbctl"
    assert rules.table_name(DEFAULT_PIN_DIR + "/") == "lbctl"
    assert rules.table_name("/sys/fs/bpf/lbctl-bench-modes") == "lbctl-lbctl-bench-modes"
    assert rules.table_name("/sys/fs/bpf/lbctl-bench-modes/") == "lbctl-lbctl-bench-modes"
    assert rules.table_name("/sys/fs/bpf/demo") != rules.table_name("/sys/fs/bpf/other")


def test_ruleset_carries_the_marks_table_hooks_and_comments():
    text = rules.MarkRules("lbctl-x", masquerade_mark=1 << 5, drop_mark=1 << 16).ruleset()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "table ip lbctl-x {"
    masq = lines.index(f"chain {rules.MASQUERADE_CHAIN} {{")
    assert lines[masq + 1] == "type nat hook postrouting priority srcnat - 1; policy accept;"
    assert lines[masq + 2] == ("meta l4proto { tcp, udp } meta mark & 0x00000020 == 0x00000020 "
                               "meta mark set meta mark ^ 0x00000020 counter masquerade to "
                               ":32768-65535 fully-random "
                               f"comment \"{rules.MASQUERADE_COMMENT}\"")
    drop = lines.index(f"chain {rules.DROP_CHAIN} {{")
    assert lines[drop + 1] == "type filter hook prerouting priority raw; policy accept;"
    assert lines[drop + 2] == f"meta mark & 0x00010000 == 0x00010000 counter drop comment \"{rules.DROP_COMMENT}\""
    # exactly two rules: the two lines with a verdict
    assert sum(1 for line in lines if line.endswith(f'comment "{rules.MASQUERADE_COMMENT}"')
               or line.endswith(f'comment "{rules.DROP_COMMENT}"')) == 2
    assert "0x00004000" not in text and "0x00008000" not in text, "the marks come from the arguments"


def test_default_marks_are_kube_proxys():
    text = rules.MarkRules().ruleset()
    assert "table ip lbctl {" in text
    assert "meta mark & 0x00004000 == 0x00004000 meta mark set meta mark ^ 0x00004000" in text
    assert "meta mark & 0x00008000 == 0x00008000 counter drop" in text


def test_replace_is_one_transaction_that_creates_or_empties_the_table_first():
    marks = rules.MarkRules("lbctl-t")
    lines = marks.replace().splitlines()
    # "add" makes the "delete" succeed on a node without the table; the rest recreates it
    assert lines[:2] == ["add table ip lbctl-t", "delete table ip lbctl-t"]
    assert "\n".join(lines[2:]) + "\n" == marks.ruleset()


# --- install, check and repair, remove (a recording runner) ----------------------------------------


def test_first_ensure_installs_even_when_a_table_is_there():
    nft = Nft(listing=listing("lbctl-t"))
    ruleset = rules.MarkRuleSet(rules.MarkRules("lbctl-t"), nft)
    assert ruleset.ensure() is True
    assert nft.transactions() == [rules.MarkRules("lbctl-t").replace()]


def test_ensure_leaves_an_unchanged_table_alone_whatever_its_counters():
    nft = Nft(listing=listing("lbctl-t"))
    ruleset = rules.MarkRuleSet(rules.MarkRules("lbctl-t"), nft)
    ruleset.ensure()
    nft.listing = listing("lbctl-t", masq_packets=1234, drop_packets=56)
    nft.calls.clear()
    assert ruleset.ensure() is False
    assert nft.transactions() == []
    assert nft.commands() == [["nft", "list", "table", "ip", "lbctl-t"]]


@pytest.mark.parametrize("damage", ["flushed", "deleted", "rule changed"])
def test_ensure_repairs_a_flushed_deleted_or_changed_table(damage):
    nft = Nft(listing=listing("lbctl-t"))
    ruleset = rules.MarkRuleSet(rules.MarkRules("lbctl-t"), nft)
    ruleset.ensure()
    nft.listing = {"flushed": "table ip lbctl-t {\n}\n", "deleted": None,
                   "rule changed": listing("lbctl-t").replace("counter packets 0 bytes 0 drop",
                                                              "counter packets 0 bytes 0 accept")}[damage]
    nft.calls.clear()
    assert ruleset.ensure() is True
    assert nft.transactions() == [rules.MarkRules("lbctl-t").replace()]


def test_a_refused_install_raises_naming_the_table_and_the_fix():
    nft = Nft(fail={"-f"})
    with pytest.raises(DatapathError, match=r"nft table ip lbctl-t\).*could not be installed.*"
                                            r"Error: -f refused.*make setup"):
        rules.MarkRuleSet(rules.MarkRules("lbctl-t"), nft).ensure()


def test_counters_come_from_the_json_listing_by_chain():
    nft = Nft(json_listing=json_listing("lbctl-t", masq=(7, 420), drop=(3, 180)))
    assert rules.read_counters("lbctl-t", nft) == {"masquerade": {"packets": 7, "bytes": 420},
                                                   "drop": {"packets": 3, "bytes": 180}}
    assert nft.commands() == [["nft", "-j", "list", "table", "ip", "lbctl-t"]]
    assert rules.MarkRuleSet(rules.MarkRules("lbctl-t"), nft).counters()["drop"]["packets"] == 3


def test_counters_ignore_rules_of_other_chains_and_are_none_without_a_table():
    other = {"rule": {"family": "ip", "table": "lbctl", "chain": "someone-elses", "handle": 9,
                      "expr": [{"counter": {"packets": 99, "bytes": 9900}}, {"accept": None}]}}
    found = rules.read_counters("lbctl", Nft(json_listing=json_listing(extra_rules=[other])))
    assert set(found) == {"masquerade", "drop"} and found["masquerade"]["packets"] == 7
    assert rules.read_counters("lbctl", Nft(json_listing=None)) is None
    assert rules.read_counters("lbctl", Nft(json_listing="not json {")) is None
    flushed = json.dumps({"nftables": [{"table": {"family": "ip", "name": "lbctl", "handle": 1}}]})
    assert rules.read_counters("lbctl", Nft(json_listing=flushed)) == {}


def test_rule_count_counts_rules_only():
    assert rules.rule_count("lbctl", Nft(json_listing=json_listing())) == 2
    other = {"rule": {"family": "ip", "table": "lbctl", "chain": rules.DROP_CHAIN, "expr": []}}
    assert rules.rule_count("lbctl", Nft(json_listing=json_listing(extra_rules=[other]))) == 3
    assert rules.rule_count("lbctl", Nft(json_listing=None)) == 0


def test_remove_deletes_only_a_table_that_is_there():
    nft = Nft(listing=None)
    assert rules.remove("lbctl-t", nft) == []
    assert nft.commands() == [["nft", "list", "table", "ip", "lbctl-t"]], "nothing deleted"
    nft = Nft(listing=listing("lbctl-t"))
    assert rules.remove("lbctl-t", nft) == ["nft table ip lbctl-t"]
    assert nft.commands()[-1] == ["nft", "delete", "table", "ip", "lbctl-t"]


def test_a_refused_removal_raises_naming_the_table():
    with pytest.raises(DatapathError, match=r"could not remove nft table ip lbctl-t: .*delete refused"):
        rules.remove("lbctl-t", Nft(listing=listing("lbctl-t"), fail={"delete"}))


# --- as root, in a namespace of our own --------------------------------------------------------------

NETNS = f"lbru{os.getpid() % 100000}"


@pytest.fixture
def netns_runner():
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        yield HostRunner(NETNS)
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=True)


def nft_json(runner: HostRunner, table: str) -> list[dict]:
    done = runner.run(["nft", "-j", "list", "table", "ip", table])
    assert done.ok, done.stderr
    return json.loads(done.stdout)["nftables"]


@pytest.mark.root
def test_installed_table_has_two_rules_is_repaired_after_a_flush_and_removed(netns_runner):
    table = rules.table_name(TEST_PIN_DIR)
    ruleset = rules.MarkRuleSet(rules.MarkRules(table), netns_runner)
    assert ruleset.ensure() is True
    items = nft_json(netns_runner, table)
    found = [i["rule"] for i in items if "rule" in i]
    assert sorted(r["chain"] for r in found) == sorted([rules.MASQUERADE_CHAIN, rules.DROP_CHAIN])
    assert {r.get("comment") for r in found} == {rules.MASQUERADE_COMMENT, rules.DROP_COMMENT}
    hooks = {i["chain"]["name"]: i["chain"]["hook"] for i in items if "chain" in i}
    assert hooks == {rules.MASQUERADE_CHAIN: "postrouting", rules.DROP_CHAIN: "prerouting"}
    assert rules.read_counters(table, netns_runner) == {"masquerade": {"packets": 0, "bytes": 0},
                                                        "drop": {"packets": 0, "bytes": 0}}
    assert ruleset.ensure() is False, "an intact table is left alone"

    assert netns_runner.run(["nft", "flush", "table", "ip", table]).ok
    assert rules.rule_count(table, netns_runner) == 0
    assert ruleset.ensure() is True
    assert rules.rule_count(table, netns_runner) == 2

    assert rules.remove(table, netns_runner) == [f"nft table ip {table}"]
    assert not netns_runner.run(["nft", "list", "table", "ip", table]).ok
    assert rules.remove(table, netns_runner) == []
    assert subprocess.run(["nft", "list", "table", "ip", table], capture_output=True).returncode != 0, \
        "the root namespace never had it"


def synthetic(count: int):
    from lbctl.bench.modes import synthetic_ports

    return synthetic_ports(count, node_name="rules-node")


@pytest.mark.root
def test_the_rule_set_is_the_same_for_1_and_100000_services(netns_runner):
    """EbpfMode's own table, in the namespace: two rules with 1 service and with 100,000, and
    the same listing (counters aside); the mode's cleanup removes it."""
    from lbctl.datapath.ebpf import loader as ebpf
    from lbctl.datapath.ebpf.mode import EbpfMode

    pin_dir = TEST_PIN_DIR + "-rules"
    cfg = config_for_tests(pin_dir=pin_dir, devices=("vethlbrnone*",), uplink_devices=(),
                           max_services=100_016, max_backends=160_000, services_map_size=262_144,
                           node_name="rules-node")
    mode = EbpfMode(cfg, switch_modes=False, runner=netns_runner, addresses=lambda: ["192.0.2.1"])
    table = rules.table_name(pin_dir)
    try:
        mode.start()
        listings = {}
        for count in (1, 100_000):
            result = mode.sync(synthetic(count))
            assert not result.errors, result.errors[:3]
            assert len(mode.reconciler.services) == count
            assert rules.rule_count(table, netns_runner) == 2, f"{count:,} services"
            listings[count] = rules._normalized(netns_runner.run(["nft", "list", "table", "ip", table]).stdout)
        assert listings[1] == listings[100_000]
        mode.stop(detach=True)
        assert rules.rule_count(table, netns_runner) == 0, "the mode's stop removes its table"
        assert not os.path.exists(pin_dir)
    finally:
        EbpfMode.cleanup(ebpf.DatapathConfig(pin_dir=pin_dir, devices=cfg.devices), netns_runner)
