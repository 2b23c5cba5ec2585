"""`lbctl dump maps`: what the datapath holds, read from the pinned maps.

Works from any process (the agent need not run, bcc is not needed): maps are opened by their
pins. Service names come from the agent's state file; the maps themselves hold only numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

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
    drop: bool = False              # without endpoints: drop (iTP Local), not reject
    flows: int = 0
    packets: int = 0
    bytes: int = 0
    backends: list[BackendRow] = field(default_factory=list)


def _sum_stats(values) -> tuple[int, int, int]:
    """(packets, bytes, flows) summed over the CPUs of one per-CPU lb_stats value."""
    packets = bytes_ = flows = 0
    for raw in values or ():
        p, b, f = decode.stats(raw)
        packets += p
        bytes_ += b
        flows += f
    return packets, bytes_, flows


def _stats_of(stats_map: BpfMap, ids: set[int]) -> dict[int, tuple[int, int, int]]:
    """Counters of `ids`: one lookup each when they are few, else one batched walk of the
    whole array (a lookup per id would be a syscall per service)."""
    if len(ids) * 8 < stats_map.info.max_entries:
        return {i: _sum_stats(stats_map.lookup(shared.u32(i))) for i in ids}
    return {i: _sum_stats(value) for key, value in stats_map.items()
            if (i := decode.u32(key)[0]) in ids}


def _endpoint(address: bytes, port: int, proto: int) -> str:
    name = decode.PROTOCOLS[proto].value if proto in decode.PROTOCOLS else str(proto)
    return f"{decode.address(address)}:{decode.port(port)}/{name}"


def collect(pin_dir: str) -> dict:
    """The whole datapath state as plain data (what --json prints)."""
    path = lambda name: os.path.join(pin_dir, name)
    if not os.path.exists(path("lb4_services")):
        raise FileNotFoundError(f"no lbctl maps pinned under {pin_dir}: is `lbctl run` running "
                                "(or has it run since boot)?")
    names = read_names(pin_dir)
    affinity_flag = shared.const("LB_SVC_F_AFFINITY")
    drop_flag = shared.const("LB_SVC_F_DROP")
    with BpfMap.open_pinned(path("lb4_services")) as svc_map, \
            BpfMap.open_pinned(path("lb4_backends")) as be_map, \
            BpfMap.open_pinned(path("lb_service_stats")) as svc_stats, \
            BpfMap.open_pinned(path("lb_backend_stats")) as be_stats, \
            BpfMap.open_pinned(path("lb_global_stats")) as glob, \
            BpfMap.open_pinned(path("lb4_ct")) as ct:
        backends = {}
        for key, value in be_map.items():
            address, port, proto, _ = decode.backend(value)
            backends[decode.u32(key)[0]] = _endpoint(address, port, proto)
        frontends, slots, _ = decode.services(svc_map.items(), affinity_flag)
        rows = {raw: ServiceRow(service_id, names.get(service_id, ""), _endpoint(*raw[:3]), count,
                                affinity, bool(flags & drop_flag))
                for raw, (service_id, count, affinity, flags) in frontends.items()}
        for raw, row in rows.items():
            have = slots.get(raw, {})
            row.backends = [BackendRow(slot, have[slot], backends.get(have[slot], "?"))
                            for slot in sorted(have) if slot <= row.count]
        service_stats = _stats_of(svc_stats, {row.id for row in rows.values()})
        backend_stats = _stats_of(be_stats, {b.id for row in rows.values() for b in row.backends})
        for row in rows.values():
            row.packets, row.bytes, row.flows = service_stats[row.id]
            for b in row.backends:
                b.packets, b.bytes, b.flows = backend_stats[b.id]
        counters = {}
        for index, name in enumerate(shared.stat_names()):
            values = glob.lookup(shared.u32(index)) or []
            counters[name] = sum(int.from_bytes(v[:8], "little") for v in values)
        ct_entries = ct.count()
    services = sorted(rows.values(), key=lambda r: (r.name or "~", r.frontend))
    return {
        "pin_dir": pin_dir,
        "services": [_plain(s) for s in services],
        "backends": len(backends),
        "conntrack_entries": ct_entries,
        "counters": counters,
    }


def _plain(row: ServiceRow) -> dict:
    """asdict() without its deep copies (a hundred thousand rows)."""
    return dict(vars(row), backends=[vars(b).copy() for b in row.backends])


def format_table(state: dict) -> str:
    """A listing in the spirit of `cilium-dbg bpf lb list` and `ipvsadm -Ln`."""
    lines = []
    header = f"{'SERVICE':<28} {'ID':>5} {'FRONTEND / BACKEND':<26} {'SLOT':>4} {'FLOWS':>8} {'PACKETS':>9} {'BYTES':>11}"
    lines.append(header)
    for s in state["services"]:
        label = s["name"] or "-"
        note = "" if s["count"] else "  (no endpoints: drop)" if s.get("drop") else "  (no endpoints: reject)"
        if s["affinity_timeout"]:
            note += f"  (affinity ClientIP {s['affinity_timeout']}s)"
        lines.append(f"{label:<28} {s['id']:>5} {s['frontend']:<26} {0:>4} {s['flows']:>8} "
                     f"{s['packets']:>9} {s['bytes']:>11}{note}")
        for b in s["backends"]:
            lines.append(f"{'':<28} {b['id']:>5}   -> {b['address']:<21} {b['slot']:>4} "
                         f"{b['flows']:>8} {b['packets']:>9} {b['bytes']:>11}")
    lines.append("")
    lines.append(f"{len(state['services'])} service(s), {state['backends']} backend(s), "
                 f"{state['conntrack_entries']} conntrack entries (2 per flow) in {state['pin_dir']}")
    counters = "  ".join(f"{k}={v}" for k, v in state["counters"].items() if v)
    lines.append(f"datapath counters: {counters or '(all zero)'}")
    return "\n".join(lines)

