"""An in-memory ``IpvsKernel`` for IPVS-mode tests: no IPVS, netlink or iptables needed.

``FakeKernel`` stands in for ``lbctl.datapath.kubeproxy.ipvs.kernel.LinuxKernel`` where it matters to
the mode (see its docstring); ``matched_sets`` lists the ipsets an iptables rule matches.
"""
from __future__ import annotations

import errno
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import replace

from lbctl.datapath.kubeproxy.ipvs.desired import IpsetSpec, RealServer, VirtualServer, local_addresses
from lbctl.datapath.kubeproxy.ipvs.kernel import IPVS_MISSING

_BUILTIN_CHAINS = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
                   "filter": ("INPUT", "FORWARD", "OUTPUT")}


class FakeKernel:
    """An in-memory IpvsKernel that behaves like the kernel where it matters to the mode: EEXIST
    and ENOENT on duplicate or missing objects, iptables-restore refusing rules that match
    missing ipsets, ipsets that rules reference cannot be destroyed.

    ``fail_on`` injects failures: a set of (operation, key) pairs, key as ``_key`` spells it
    (e.g. ("add_dest", "10.0.0.1:80/TCP 10.180.0.1:80")). ``log`` lists every write in order.
    ``set_connections`` stands in for traffic, for graceful-termination tests.
    """

    def __init__(self, node_addresses: Iterable[str] = ("192.168.0.2",), has_ipvs: bool = True):
        self.has_ipvs = has_ipvs
        self.services: dict[tuple, VirtualServer] = {}
        self.dests: dict[tuple, dict[tuple, RealServer]] = {}
        self.links: dict[str, set[str]] = {"lo": {"127.0.0.1", "::1"}, "eth0": set(node_addresses)}
        self.dummies: set[str] = set()
        self.ipsets: dict[str, IpsetSpec] = {}
        self.entries: dict[str, set[str]] = {}
        self.tables: dict[tuple[int, str], dict[str, list[tuple[str, ...]]]] = {}
        self.sysctls: dict[str, int] = {}
        self.fail_on: set[tuple[str, str]] = set()
        self.log: list[tuple[str, str]] = []
        self.restores: list[str] = []

    def _write(self, op: str, key: str) -> None:
        if (op, key) in self.fail_on:
            raise OSError(errno.EIO, f"injected failure: {op} {key}")
        self.log.append((op, key))

    def _ipvs(self) -> None:
        if not self.has_ipvs:
            raise OSError(errno.EPROTONOSUPPORT, IPVS_MISSING)

    def writes(self, op: str | None = None) -> list[tuple[str, str]]:
        return [entry for entry in self.log if op is None or entry[0] == op]

    def close(self) -> None:
        pass

    # IPVS
    def list_services(self) -> list[VirtualServer]:
        self._ipvs()
        return sorted(self.services.values())

    def add_service(self, vs: VirtualServer) -> None:
        self._ipvs()
        self._write("add_service", str(vs))
        if vs.key in self.services:
            raise OSError(errno.EEXIST, f"adding virtual server {vs}: exists")
        self.services[vs.key] = vs
        self.dests[vs.key] = {}

    def update_service(self, vs: VirtualServer) -> None:
        self._ipvs()
        self._write("update_service", str(vs))
        if vs.key not in self.services:
            raise OSError(errno.ESRCH, f"updating virtual server {vs}: no such service")
        self.services[vs.key] = vs

    def del_service(self, vs: VirtualServer) -> None:
        self._ipvs()
        self._write("del_service", str(vs))
        if self.services.pop(vs.key, None) is None:
            raise OSError(errno.ESRCH, f"deleting virtual server {vs}: no such service")
        self.dests.pop(vs.key, None)

    def list_dests(self, vs: VirtualServer) -> list[RealServer]:
        self._ipvs()
        if vs.key not in self.services:
            raise OSError(errno.ESRCH, f"listing real servers of {vs}: no such service")
        return sorted(self.dests[vs.key].values())

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs()
        self._write("add_dest", f"{vs} {rs}")
        dests = self._dests(vs)
        if rs.key in dests:
            raise OSError(errno.EEXIST, f"adding real server {rs} to {vs}: exists")
        dests[rs.key] = RealServer(rs.address, rs.port, rs.weight)

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs()
        self._write("update_dest", f"{vs} {rs} weight {rs.weight}")
        dests = self._dests(vs)
        if rs.key not in dests:
            raise OSError(errno.ENOENT, f"updating real server {rs} of {vs}: no such destination")
        dests[rs.key] = replace(dests[rs.key], weight=rs.weight)

    def del_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._ipvs()
        self._write("del_dest", f"{vs} {rs}")
        if self._dests(vs).pop(rs.key, None) is None:
            raise OSError(errno.ENOENT, f"deleting real server {rs} of {vs}: no such destination")

    def _dests(self, vs: VirtualServer) -> dict[tuple, RealServer]:
        if vs.key not in self.dests:
            raise OSError(errno.ESRCH, f"{vs}: no such service")
        return self.dests[vs.key]

    def set_connections(self, vs: VirtualServer, address: str, port: int, active: int, inactive: int = 0) -> None:
        dests = self._dests(vs)
        dests[(address, port)] = replace(dests[(address, port)], active_conns=active, inactive_conns=inactive)

    # the dummy device and addresses
    def ensure_dummy(self, device: str) -> bool:
        if device in self.links:
            return False
        self._write("ensure_dummy", device)
        self.links[device] = set()
        self.dummies.add(device)
        return True

    def delete_dummy(self, device: str) -> bool:
        if device not in self.links:
            return False
        if device not in self.dummies:
            raise OSError(errno.EINVAL, f"{device} is not a dummy device; left alone")
        self._write("delete_dummy", device)
        del self.links[device]
        self.dummies.discard(device)
        return True

    def list_addresses(self, device: str) -> set[str]:
        if device not in self.links:
            raise OSError(errno.ENODEV, f"listing addresses of {device}: no such device")
        return set(self.links[device])

    def add_address(self, device: str, address: str) -> None:
        self._write("add_address", address)
        if address in self.list_addresses(device):
            raise OSError(errno.EEXIST, f"adding {address} to {device}: exists")
        self.links[device].add(address)

    def del_address(self, device: str, address: str) -> None:
        self._write("del_address", address)
        if address not in self.list_addresses(device):
            raise OSError(errno.EADDRNOTAVAIL, f"deleting {address} from {device}: not there")
        self.links[device].discard(address)

    def node_addresses(self, exclude_device: str, family: int) -> list[str]:
        found = {a for name, addresses in self.links.items() if name != exclude_device for a in addresses}
        return local_addresses(found, family)

    # ipsets
    def list_ipsets(self) -> set[str]:
        return set(self.ipsets)

    def create_ipset(self, spec: IpsetSpec) -> None:
        self._write("create_ipset", spec.name)
        existing = self.ipsets.get(spec.name)
        if existing is not None and existing.set_type != spec.set_type:
            raise OSError(errno.EEXIST, f"creating ipset {spec.name}: exists with type {existing.set_type}")
        self.ipsets[spec.name] = spec
        self.entries.setdefault(spec.name, set())

    def destroy_ipset(self, name: str) -> None:
        self._write("destroy_ipset", name)
        if name not in self.ipsets:
            raise OSError(errno.ENOENT, f"destroying ipset {name}: does not exist")
        if any(name in matched_sets(rule) for chains in self.tables.values()
               for rules in chains.values() for rule in rules):
            raise OSError(errno.EBUSY, f"destroying ipset {name}: in use by iptables")
        del self.ipsets[name]
        del self.entries[name]

    def list_entries(self, name: str) -> set[str]:
        return set(self.entries.get(name, ()))

    def add_entry(self, spec: IpsetSpec, entry: str) -> None:
        self._write("add_entry", f"{spec.name} {entry}")
        if spec.name not in self.ipsets:
            raise OSError(errno.ENOENT, f"adding {entry}: ipset {spec.name} does not exist")
        self.entries[spec.name].add(entry)

    def del_entry(self, spec: IpsetSpec, entry: str) -> None:
        self._write("del_entry", f"{spec.name} {entry}")
        if entry not in self.entries.get(spec.name, ()):
            raise OSError(errno.ENOENT, f"deleting {entry} from ipset {spec.name}: not a member")
        self.entries[spec.name].discard(entry)

    # iptables
    def _table(self, family: int, table: str) -> dict[str, list[tuple[str, ...]]]:
        return self.tables.setdefault((family, table), {c: [] for c in _BUILTIN_CHAINS[table]})

    def restore_iptables(self, text: str, family: int) -> None:
        """iptables-restore --noflush: a declared chain is created or flushed, -A appends, -X
        deletes; a table is committed whole or not at all."""
        self._write("restore_iptables", str(family))
        pending: dict[str, dict[str, list[tuple[str, ...]]]] = {}
        table: str | None = None
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            if line.startswith("*"):
                table = line[1:]
                pending[table] = {c: list(r) for c, r in self._table(family, table).items()}
            elif line == "COMMIT":
                table = None
            elif table is None:
                raise OSError(errno.EINVAL, f"iptables-restore: line {line!r} is outside a table")
            elif line.startswith(":"):
                pending[table][line[1:].split()[0]] = []
            else:
                words = tuple(shlex.split(line))
                chain = words[1]
                if words[0] == "-X":
                    pending[table].pop(chain, None)
                    continue
                if words[0] != "-A" or chain not in pending[table]:
                    raise OSError(errno.EINVAL, f"iptables-restore: line {line!r}: no chain {chain}")
                for name in matched_sets(words):
                    if name not in self.ipsets:
                        raise OSError(errno.ENOENT, f"iptables-restore: Set {name} doesn't exist")
                pending[table][chain].append(words[2:])
        for name, chains in pending.items():
            self.tables[(family, name)] = chains
        self.restores.append(text)

    def rules(self, family: int, table: str, chain: str) -> list[str]:
        """A chain's rules as "-A CHAIN ..." lines (shlex-joined), for tests."""
        return [" ".join(["-A", chain, *(shlex.quote(w) for w in r)])
                for r in self._table(family, table).get(chain, [])]

    def ensure_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        rules = self._table(family, table)[chain]
        if tuple(args) in rules:
            return False
        self._write("ensure_rule", f"{table} {chain} {' '.join(args)}")
        rules.insert(0, tuple(args))
        return True

    def delete_rule(self, family: int, table: str, chain: str, args: Sequence[str]) -> bool:
        rules = self._table(family, table).get(chain, [])
        if tuple(args) not in rules:
            return False
        self._write("delete_rule", f"{table} {chain} {' '.join(args)}")
        rules[:] = [r for r in rules if r != tuple(args)]
        return True

    def list_chains(self, family: int, table: str) -> set[str]:
        return set(self._table(family, table))

    def delete_chains(self, family: int, table: str, chains: Sequence[str]) -> None:
        self._write("delete_chains", f"{table} {' '.join(chains)}")
        current = self._table(family, table)
        for chain, rules in current.items():
            for rule in rules:
                target = rule[rule.index("-j") + 1] if "-j" in rule else None
                if chain not in chains and target in chains:
                    raise OSError(errno.EBUSY, f"deleting chain {target}: referenced from {chain}")
        for chain in chains:
            current.pop(chain, None)

    def set_sysctl(self, name: str, value: int) -> None:
        if self.sysctls.get(name) == value:
            return
        self._write("set_sysctl", f"{name}={value}")
        self.sysctls[name] = value


def matched_sets(words: Sequence[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--match-set"]


