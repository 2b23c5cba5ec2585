"""`lbctl dump maps`: what the datapath holds, read from the pinned maps.

Works from any process (the agent need not run, bcc is not needed): maps are opened by their
pins. Service names come from the agent's state file; the maps themselves hold only numbers.
Frontends are listed by type (ClusterIP, NodePort, ExternalIP, LoadBalancer: the flags of their
slot 0), with the internal scope of eTP Local ones and their source ranges; then what is
attached where (tc and XDP per link, read from the kernel; socket programs per cgroup), and the
drop and masquerade counters, the datapath's and the two netfilter rules'.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

from lbctl.datapath.ebpf import decode, shared
from lbctl.datapath.ebpf.bpfsys import BpfMap

STATE_DIR = "/run/lbctl"   # the agent's files (bpffs holds no regular files); LBCTL_RUN_DIR overrides


def state_dir() -> str:
    """Where the agent keeps its files (lock, names, last good manifests): /run/lbctl, or
    $LBCTL_RUN_DIR (the test suite points it at a directory of its own)."""
    return os.environ.get("LBCTL_RUN_DIR") or STATE_DIR


def pin_tag(pin_dir: str) -> str:
    """A file name part for a pin dir: "/sys/fs/bpf/lbctl" -> "sys_fs_bpf_lbctl"."""
    return pin_dir.strip("/").replace("/", "_")


def state_file(pin_dir: str) -> str:
    """Where the agent records service names for a pin dir."""
    return os.path.join(state_dir(), f"agent-{pin_tag(pin_dir)}.json")


def source_state_file(pin_dir: str) -> str:
    """Where the agent's manifest source keeps the last good objects of every file, so that a
    restart while a file does not parse keeps that file's services."""
    return os.path.join(state_dir(), f"manifests-{pin_tag(pin_dir)}.json")


def write_names(pin_dir: str, names: dict[int, str]) -> None:
    os.makedirs(state_dir(), exist_ok=True)
    path = state_file(pin_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"service_names": {str(k): v for k, v in sorted(names.items())}}, f)
    os.replace(tmp, path)


def remove_names(pin_dir: str) -> None:
    try:
        os.unlink(state_file(pin_dir))
    except FileNotFoundError:
        pass


def read_names(pin_dir: str) -> dict[int, str]:
    try:
        with open(state_file(pin_dir)) as f:
            return {int(k): v for k, v in json.load(f)["service_names"].items()}
    except (OSError, ValueError, KeyError):
        return {}


@dataclass
class BackendRow:
    slot: int
    id: int
    address: str
    flows: int = 0
    packets: int = 0
    bytes: int = 0


@dataclass
class ServiceRow:
    id: int
    name: str
    frontend: str
    count: int
    affinity_timeout: int = 0       # sessionAffinity ClientIP (s); 0: none
    drop: bool = False              # without endpoints: drop (a Local policy), not reject
    type: str = "ClusterIP"         # ClusterIP | NodePort | ExternalIP | LoadBalancer
    etp_local: bool = False         # externalTrafficPolicy Local: `backends` are this node's
    source_ranges: list[str] = field(default_factory=list)   # loadBalancerSourceRanges
    flows: int = 0
    packets: int = 0
    bytes: int = 0
    backends: list[BackendRow] = field(default_factory=list)
    internal: list[BackendRow] | None = None   # the internal scope (pods, the node): every endpoint


TYPES = ("ClusterIP", "NodePort", "ExternalIP", "LoadBalancer")
_TYPE_FLAGS = (("LB_SVC_F_NODEPORT", "NodePort"), ("LB_SVC_F_EXTERNAL_IP", "ExternalIP"),
               ("LB_SVC_F_LOADBALANCER", "LoadBalancer"), ("LB_SVC_F_CLUSTERIP", "ClusterIP"))


def frontend_type(flags: int) -> str:
    """The type a frontend's flags name (an old agent's frontends carry CLUSTERIP only)."""
    for flag, name in _TYPE_FLAGS:
        if flags & shared.const(flag):
            return name
    return "ClusterIP"


def _sum_stats(values) -> tuple[int, int, int]:
    """(packets, bytes, flows) summed over the CPUs of one per-CPU lb_stats value."""
    packets = bytes_ = flows = 0
    for raw in values or ():
        p, b, f = decode.stats(raw)
        packets += p
        bytes_ += b
        flows += f
    return packets, bytes_, flows


def _stats_of(stats_map: Any, ids: set[int]) -> dict[int, tuple[int, int, int]]:
    """Counters of `ids`: one lookup each when they are few, else one batched walk of the
    whole array (a lookup per id would be a syscall per service)."""
    holder: Any = getattr(stats_map, "info", stats_map)
    size: int = holder.max_entries
    if len(ids) * 8 < size:
        return {i: _sum_stats(stats_map.lookup(shared.u32(i))) for i in ids}
    return {i: _sum_stats(value) for key, value in stats_map.items()
            if (i := decode.u32(key)[0]) in ids}


def _endpoint(address: bytes, port: int, proto: int) -> str:
    name = decode.PROTOCOLS[proto].value if proto in decode.PROTOCOLS else str(proto)
    return f"{decode.address(address)}:{decode.port(port)}/{name}"


MAPS = ("lb4_services", "lb4_backends", "lb_service_stats", "lb_backend_stats", "lb_global_stats",
        "lb4_ct", "lb4_source_ranges")


def collect(pin_dir: str, tc_name: str | None = None) -> dict:
    """The whole datapath state as plain data (what --json prints)."""
    path = lambda name: os.path.join(pin_dir, name)
    if not os.path.exists(path("lb4_services")):
        raise FileNotFoundError(f"no lbctl maps pinned under {pin_dir}: is `lbctl run` running "
                                "(or has it run since boot)?")
    with contextlib.ExitStack() as stack:
        maps = {name: stack.enter_context(BpfMap.open_pinned(path(name)))
                for name in MAPS if os.path.exists(path(name))}
        state = summarize(maps, read_names(pin_dir), pin_dir)
    state["attachments"] = attachments(pin_dir, tc_name)
    state["netfilter"] = _netfilter(pin_dir)
    return state


def summarize(maps: dict, names: dict[int, str], pin_dir: str) -> dict:
    """The maps' part of `collect`, from open maps (BpfMap or FakeMap): frontends by type with
    both scopes and their ranges, backends, conntrack, counters."""
    affinity_flag = shared.const("LB_SVC_F_AFFINITY")
    drop_flag = shared.const("LB_SVC_F_DROP")
    two_scopes = shared.const("LB_SVC_F_TWO_SCOPES")
    etp_local = shared.const("LB_SVC_F_ETP_LOCAL")
    internal = shared.const("LB_SCOPE_INTERNAL")
    backends = {}
    for key, value in maps["lb4_backends"].items():
        address, port, proto, _ = decode.backend(value)
        backends[decode.u32(key)[0]] = _endpoint(address, port, proto)
    frontends, slots, _ = decode.services(maps["lb4_services"].items(), affinity_flag)
    ranges: dict[int, set[str]] = {}
    for key, _ in maps["lb4_source_ranges"].items() if "lb4_source_ranges" in maps else ():
        service_id, cidr = decode.source_range(key)
        ranges.setdefault(service_id, set()).add(cidr)

    def slot_rows(raw: tuple, count: int) -> list[BackendRow]:
        have = slots.get(raw, {})
        return [BackendRow(slot, have[slot], backends.get(have[slot], "?"))
                for slot in sorted(have) if slot <= count]

    rows = {}
    for raw, (service_id, count, affinity, flags) in frontends.items():
        if raw[3] == internal:
            continue
        row = ServiceRow(service_id, names.get(service_id, ""), _endpoint(*raw[:3]), count, affinity,
                         bool(flags & drop_flag), frontend_type(flags), bool(flags & etp_local),
                         sorted(ranges.get(service_id, ())))
        row.backends = slot_rows(raw, count)
        inner = (*raw[:3], internal)
        if flags & two_scopes and inner in frontends:
            row.internal = slot_rows(inner, frontends[inner][1])
        rows[raw] = row
    service_stats = _stats_of(maps["lb_service_stats"], {row.id for row in rows.values()})
    backend_stats = _stats_of(maps["lb_backend_stats"], {b.id for row in rows.values()
                                                         for b in (*row.backends, *(row.internal or ()))})
    for row in rows.values():
        row.packets, row.bytes, row.flows = service_stats[row.id]
        for b in (*row.backends, *(row.internal or ())):
            b.packets, b.bytes, b.flows = backend_stats[b.id]
    counters = {}
    for index, name in enumerate(shared.stat_names()):
        values = maps["lb_global_stats"].lookup(shared.u32(index)) or []
        counters[name] = sum(int.from_bytes(v[:8], "little") for v in values)
    services = sorted(rows.values(), key=lambda r: (TYPES.index(r.type), r.name or "~", r.frontend))
    return {
        "pin_dir": pin_dir,
        "services": [_plain(s) for s in services],
        "backends": len(backends),
        "conntrack_entries": maps["lb4_ct"].count(),
        "counters": counters,
        "drops": {reason: counters.get(f"drop_{reason}", 0) for reason in DROP_REASONS},
        "masquerade": {"marked": counters.get("masquerade", 0)},
        "socket_lb": _socket_lb(pin_dir),
    }


def _socket_lb(pin_dir: str) -> list[dict]:
    """sock-lb: the cgroup attachments of the socket load balancer (lbctl.datapath.ebpf.sock)."""
    from lbctl.datapath.ebpf import sock

    return sock.attachments(pin_dir)


DROP_REASONS = ("etp_local", "source_range", "itp_local")


def _netfilter(pin_dir: str) -> dict:
    """The two mark rules' counters (nft), or None for each when the table is not there."""
    from lbctl.datapath.ebpf import rules

    counters = rules.read_counters(rules.table_name(pin_dir)) or {}
    return {"table": f"ip {rules.table_name(pin_dir)}", "installed": bool(counters),
            "masquerade": counters.get("masquerade"), "drop": counters.get("drop")}


def attachments(pin_dir: str, tc_name: str | None = None) -> dict:
    """What is attached where, read from the kernel: per link, the role (pod link or uplink),
    the tc programs and how the uplink is served (XDP native, generic, or tc only); per cgroup,
    the socket programs (the sock module's, when present)."""
    from lbctl.datapath.ebpf import loader as ebpf

    tc_name = tc_name or ebpf.DatapathConfig(pin_dir=pin_dir).tc_name
    links = []
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for index, name in ebpf.attached_links(ipr, tc_name):
                programs = _tc_programs(name, tc_name)
                uplink = any(p.startswith("lb_tc_uplink") for p in programs.values())
                links.append({"link": name, "ifindex": index, "role": "uplink" if uplink else "pod",
                              "mode": ebpf.uplink_mode(ipr, index, tc_name) if uplink else "tc",
                              "tc": programs})
    except OSError as exc:   # not root: netlink refuses nothing here, but the program names need it
        links.append({"error": str(exc)})
    return {"links": sorted(links, key=lambda link: (link.get("role", ""), link.get("link", ""))),
            "cgroups": _cgroup_attachments(pin_dir)}


def _tc_programs(link: str, tc_name: str) -> dict[str, str]:
    """{"ingress": program name, "egress": ...} of our filters on one link. Read from `tc filter
    show` (pyroute2 does not decode the program id of a bpf filter); kernel program names are
    cut at 15 characters ("lb_tc_uplink_in")."""
    found = {}
    for hook in ("ingress", "egress"):
        try:
            out = subprocess.run(["tc", "filter", "show", "dev", link, hook], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            words = line.split()
            match = _TC_PROGRAM.search(line)
            if tc_name in words and match:
                found[hook] = match.group(1)
    return found


_TC_PROGRAM = re.compile(r" id \d+ name (\S+)")


def _cgroup_attachments(pin_dir: str) -> list[dict]:
    """Socket-level load balancing's attachments grouped per cgroup: {"cgroup", "programs"}
    with one "<hook> <program>" per pinned link (lbctl.datapath.ebpf.sock reports a row per
    link)."""
    from lbctl.datapath.ebpf import sock

    return group_by_cgroup(sock.attachments(pin_dir))


def group_by_cgroup(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(str(row["cgroup"]), []).append(f"{row['hook']} {row['program']}")
    return [{"cgroup": cgroup, "programs": programs} for cgroup, programs in groups.items()]


def _plain(row: ServiceRow) -> dict:
    """asdict() without its deep copies (a hundred thousand rows)."""
    return dict(vars(row), backends=[vars(b).copy() for b in row.backends],
                internal=None if row.internal is None else [vars(b).copy() for b in row.internal])


def format_table(state: dict) -> str:
    """A listing in the spirit of `cilium-dbg bpf lb list` and `ipvsadm -Ln`, by frontend type."""
    lines = []
    header = f"{'SERVICE':<28} {'ID':>5} {'FRONTEND / BACKEND':<26} {'SLOT':>4} {'FLOWS':>8} {'PACKETS':>9} {'BYTES':>11}"
    lines.append(header)
    shown = None
    for s in state["services"]:
        kind = s.get("type", "ClusterIP")
        if kind != shown:
            count = sum(1 for x in state["services"] if x.get("type", "ClusterIP") == kind)
            lines.append(f"{kind} ({count})")
            shown = kind
        label = s["name"] or "-"
        note = "" if s["count"] else "  (no endpoints: drop)" if s.get("drop") else "  (no endpoints: reject)"
        if s.get("etp_local"):
            note = ("  (eTP Local: this node's endpoints"
                    + ("; none: drop)" if not s["count"] and s.get("drop") else ")"))
        if s["affinity_timeout"]:
            note += f"  (affinity ClientIP {s['affinity_timeout']}s)"
        if s.get("source_ranges"):
            note += f"  (from {', '.join(s['source_ranges'])} only)"
        lines.append(f"{label:<28} {s['id']:>5} {s['frontend']:<26} {0:>4} {s['flows']:>8} "
                     f"{s['packets']:>9} {s['bytes']:>11}{note}")
        for b in s["backends"]:
            lines.append(_backend_line(b))
        if s.get("internal") is not None:
            lines.append(f"{'':<28} {'':>5}   internal (pods, the node): {len(s['internal'])} endpoint(s)")
            for b in s["internal"]:
                lines.append(_backend_line(b))
    lines.append("")
    lines.append(f"{len(state['services'])} frontend(s), {state['backends']} backend(s), "
                 f"{state['conntrack_entries']} conntrack entries (2 per flow) in {state['pin_dir']}")
    for row in state.get("socket_lb", ()):   # sock-lb
        lines.append(f"socket LB: {row['hook']:<13} cgroup {row['cgroup']}  (link {row['link_id']}, "
                     f"program {row['program']} id {row['prog_id']})")
    counters = "  ".join(f"{k}={v}" for k, v in state["counters"].items() if v)
    lines.append(f"datapath counters: {counters or '(all zero)'}")
    if "drops" in state:
        drops = "  ".join(f"{k}={v}" for k, v in state["drops"].items())
        lines.append(f"dropped (drop mark): {drops}   masquerade-marked: {state['masquerade']['marked']}")
    nf = state.get("netfilter")
    if nf is not None:
        if nf["installed"]:
            lines.append(f"netfilter (nft table {nf['table']}): masquerade rule "
                         f"{_packets(nf['masquerade'])}, drop rule {_packets(nf['drop'])}")
        else:
            lines.append(f"netfilter: nft table {nf['table']} not installed (or not readable)")
    attached = state.get("attachments")
    if attached is not None:
        for link in attached["links"]:
            if "error" in link:
                lines.append(f"links: {link['error']}")
                continue
            tc = ", ".join(f"{hook} {prog}" for hook, prog in sorted(link["tc"].items()))
            lines.append(f"link {link['link']} ({link['role']}): {link['mode']}; tc {tc}")
        if not attached["links"]:
            lines.append("links: none attached")
        for group in attached["cgroups"]:
            lines.append(f"cgroup {group.get('cgroup')}: {', '.join(group.get('programs', ()))}")
        if not attached["cgroups"]:
            lines.append("cgroups: none attached")
    return "\n".join(lines)


def _backend_line(b: dict) -> str:
    return (f"{'':<28} {b['id']:>5}   -> {b['address']:<21} {b['slot']:>4} "
            f"{b['flows']:>8} {b['packets']:>9} {b['bytes']:>11}")


def _packets(counter: dict | None) -> str:
    return "missing" if counter is None else f"{counter['packets']} packets"
