"""The eBPF datapath: compile and load bpf/prog/lbctl_tc.c with bcc, pin its maps, attach it.

Kernel objects lbctl creates, and nothing else:
  - maps pinned under ``pin_dir`` (default /sys/fs/bpf/lbctl), reused across restarts;
  - one tc filter (bpf, direct-action, handle ``TC_HANDLE``, named ``TC_NAME``) at clsact
    ingress and one at egress of every matching link, at pref ``TC_PRIO`` unless another tool's
    filter holds that pref (then the nearest free pref before it, said in the log), and the
    clsact qdisc when no other filter remains on it.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import platform
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbctl.datapath.base import DEFAULT_PIN_DIR, DatapathError
from lbctl.datapath.ebpf import shared, source
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_ARRAY as MAP_ARRAY
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_HASH as MAP_HASH
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_LPM_TRIE as MAP_LPM_TRIE
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_LRU_HASH as MAP_LRU_HASH
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_PERCPU_ARRAY as MAP_PERCPU_ARRAY
from lbctl.datapath.ebpf.bpfsys import BpfMap, map_info, obj_get, obj_pin

log = logging.getLogger(__name__)

BPFFS = "/sys/fs/bpf"
# The interfaces pod traffic enters the node by: host side of pod veths as kind (kindnet),
# flannel and the bridge/ptp plugins name them (veth*), Calico (cali*), Cilium (lxc*),
# Weave (vethwe*), Antrea (antrea-*/*-<hash>: use --devices).
DEFAULT_DEVICES = ("veth*", "cali*", "lxc*")

TC_PRIO = 27            # tc filter preference ("pref 27")
TC_HANDLE = 0x1BC       # tc filter handle
TC_NAME = "lbctl_tc"    # shown by `tc filter show`; how cleanup recognises our filters
TC_INGRESS = 0xFFFFFFF2  # clsact ingress parent (ffff:fff2)
TC_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003

PROGRAMS = {"ingress": "lb_tc_ingress", "egress": "lb_tc_egress"}
MAPS = ("lb4_services", "lb4_backends", "lb4_ct", "lb4_affinity", "lb_service_stats",
        "lb_backend_stats", "lb_global_stats", "lb4_source_ranges", "lb4_config")


@dataclass(frozen=True)
class DatapathConfig:
    """Map sizes (see README, "Sizing") and where the maps are pinned. The default sizes are the
    shared header's (``LB_*_MAP_SIZE``, ``LB_SERVICE_IDS``): one definition for C and Python."""

    pin_dir: str = DEFAULT_PIN_DIR
    max_services: int = shared.const("LB_SERVICE_IDS")               # service ids: frontends (VIP:port/proto)
    max_backends: int = shared.const("LB_BACKENDS_MAP_SIZE")         # backend ids (endpoint address:port/proto)
    services_map_size: int = shared.const("LB_SERVICES_MAP_SIZE")    # frontends + backend slots
    ct_size: int = shared.const("LB_CT_MAP_SIZE")                    # conntrack entries, two per flow
    affinity_size: int = shared.const("LB_AFFINITY_MAP_SIZE")        # sessionAffinity entries (client, service)
    devices: tuple[str, ...] = DEFAULT_DEVICES
    node_name: str = field(default_factory=lambda: socket.gethostname().strip().lower())  # iTP Local
    cgroup_root: str | None = None   # socket LB of host traffic in this cgroup v2 (lbctl.datapath.ebpf.sock)

    def cflags(self) -> list[str]:
        return [
            f"-I{shared.BPF_DIR}",
            f"-I{shared.BPF_DIR / 'include'}",
            f'-DLB_PIN_DIR="{self.pin_dir}"',
            f"-DLB_SERVICE_IDS={self.max_services}",
            f"-DLB_BACKENDS_MAP_SIZE={self.max_backends}",
            f"-DLB_SERVICES_MAP_SIZE={self.services_map_size}",
            f"-DLB_CT_MAP_SIZE={self.ct_size}",
            f"-DLB_AFFINITY_MAP_SIZE={self.affinity_size}",
            "-Wno-unused-function",
        ]

    @property
    def tc_name(self) -> str:
        """The tc filter name: "lbctl_tc", or "lbctl_tc:<pin dir>" for another instance
        (tests, bench), so that each cleans up only its own filters."""
        if self.pin_dir == DEFAULT_PIN_DIR:
            return TC_NAME
        return f"{TC_NAME}:{os.path.basename(self.pin_dir.rstrip('/'))}"

    def expected_maps(self) -> dict[str, tuple[int, int, int, int]]:
        """name -> (map type, key size, value size, max entries), to check pins left by an
        earlier run."""
        s = shared.sizeof
        return {
            "lb4_services": (MAP_HASH, s("lb4_service_key"), s("lb4_service_value"), self.services_map_size),
            "lb4_backends": (MAP_HASH, 4, s("lb4_backend"), self.max_backends),
            "lb4_ct": (MAP_LRU_HASH, s("lb4_ct_key"), s("lb4_ct_value"), self.ct_size),
            "lb4_affinity": (MAP_LRU_HASH, s("lb4_affinity_key"), s("lb4_affinity_value"), self.affinity_size),
            "lb_service_stats": (MAP_PERCPU_ARRAY, 4, s("lb_stats"), self.max_services),
            "lb_backend_stats": (MAP_PERCPU_ARRAY, 4, s("lb_stats"), self.max_backends),
            "lb_global_stats": (MAP_PERCPU_ARRAY, 4, 8, shared.const("LB_STAT_MAX")),
            "lb4_source_ranges": (MAP_LPM_TRIE, s("lb4_source_range_key"), 1,
                                  shared.const("LB_SOURCE_RANGES_MAP_SIZE")),
            "lb4_config": (MAP_ARRAY, 4, s("lb4_config"), 1),
        }


def matches(ifname: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(ifname, p) for p in patterns)


def ensure_bpffs() -> None:
    """Mounts bpffs at /sys/fs/bpf if nothing is mounted there (as Cilium's agent does)."""
    with open("/proc/mounts") as mounts:
        if any(line.split()[1] == BPFFS and line.split()[2] == "bpf" for line in mounts):
            return
    os.makedirs(BPFFS, exist_ok=True)
    ret = os.system(f"mount -t bpf bpf {BPFFS}")
    if ret != 0:
        raise DatapathError(f"cannot mount bpffs at {BPFFS}: run `mount -t bpf bpf {BPFFS}` as root")


def check_kernel_headers() -> None:
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").is_dir():
        raise DatapathError(
            f"bcc needs kernel headers at {build} and there are none: run `make setup`, which "
            "installs Debian's linux-headers-amd64 and links its -amd64 tree as build/ and its "
            "-common tree as source/ (see README, \"Set-up\")")


def check_pins(cfg: DatapathConfig) -> None:
    """Refuses to reuse pinned maps whose layout or size differs from this configuration."""
    for name, want in cfg.expected_maps().items():
        path = os.path.join(cfg.pin_dir, name)
        if not os.path.exists(path):
            continue
        fd = obj_get(path)
        try:
            info = map_info(fd)
        finally:
            os.close(fd)
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        if have != want:
            raise DatapathError(
                f"pinned map {path} has type/key/value/entries {'/'.join(map(str, have))}, this "
                f"configuration wants {'/'.join(map(str, want))}: run `lbctl cleanup` (forgets "
                "established flows) or start with the old sizes")


class EbpfDatapath:
    """The loaded program and its maps. `load()` first; `close()` releases file descriptors
    (pinned maps and attached filters stay; see `detach_all` and `cleanup`)."""

    def __init__(self, cfg: DatapathConfig = DatapathConfig()):
        self.cfg = cfg
        self.bpf: Any = None       # bcc.BPF once loaded
        self.prog_fd = -1          # ingress program (balances requests)
        self.egress_fd = -1        # egress program (translates replies)
        self.maps: dict[str, BpfMap] = {}

    def load(self) -> EbpfDatapath:
        ensure_bpffs()
        check_kernel_headers()
        made_dir = not os.path.isdir(self.cfg.pin_dir)
        os.makedirs(self.cfg.pin_dir, exist_ok=True)
        check_pins(self.cfg)
        from bcc import BPF  # Debian's python3-bpfcc; imported late so unit tests need no bcc

        src = shared.BPF_DIR / "prog" / "lbctl_tc.c"
        try:
            # bcc rewrites map calls only in the text it is given: lbctl's headers inlined
            self.bpf = BPF(text=source.program_text(src), cflags=self.cfg.cflags())
            self.prog_fd = self.bpf.load_func(PROGRAMS["ingress"].encode(), BPF.SCHED_CLS).fd
            self.egress_fd = self.bpf.load_func(PROGRAMS["egress"].encode(), BPF.SCHED_CLS).fd
        except Exception as exc:
            if made_dir:   # a first load: the maps bcc pinned before it failed are new, unused
                remove_pins(self.cfg.pin_dir)
            raise DatapathError(f"compiling/loading {src} failed: {exc}") from exc
        for name in MAPS:
            self.maps[name] = BpfMap.open_pinned(os.path.join(self.cfg.pin_dir, name))
        return self

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            self.prog_fd = self.egress_fd = -1

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc):
        self.close()


# --- attaching ---------------------------------------------------------------------------------

def _filters(ipr, index: int, parent: int) -> list:
    try:
        return list(ipr.get_filters(index, parent=parent))
    except Exception:  # no clsact on this link (or the link is gone)
        return []


def _ours(f, tc_name: str) -> bool:
    """Our filter, whatever pref it got (TC_PRIO, or a free one next to it)."""
    opts = f.get_attr("TCA_OPTIONS")
    name = opts.get_attr("TCA_BPF_NAME") if opts is not None and hasattr(opts, "get_attr") else None
    return f.get_attr("TCA_KIND") == "bpf" and name == tc_name and bool(f["handle"])


def _pref(f) -> int:
    return f["info"] >> 16


def _describe(f) -> str:
    return f"{f.get_attr('TCA_KIND') or '?'} filter (pref {_pref(f)}, handle {f['handle']:#x})"


def choose_pref(filters: list, tc_name: str) -> tuple[int, list]:
    """The pref for our filter on one hook: where it already is; else TC_PRIO when no other
    filter uses it; else the nearest free pref below (tc runs lower prefs first, so lbctl still
    sees every packet it would have seen at TC_PRIO), else the nearest above. Returns the pref
    and the foreign filters at TC_PRIO that made us move (to be named in the log)."""
    ours = [f for f in filters if _ours(f, tc_name)]
    if ours:
        return _pref(ours[0]), []
    taken = {_pref(f) for f in filters}
    if TC_PRIO not in taken:
        return TC_PRIO, []
    blockers = [f for f in filters if _pref(f) == TC_PRIO and f["handle"]]
    for pref in [*range(TC_PRIO - 1, 0, -1), *range(TC_PRIO + 1, 0x10000)]:
        if pref not in taken:
            return pref, blockers
    raise DatapathError("every tc filter pref (1-65535) is taken: "
                        + ", ".join(_describe(f) for f in blockers))


def _our_filters(ipr, index: int, tc_name: str) -> list[tuple[int, object]]:
    """(parent, filter) for each of our filters on a link, at ingress and egress."""
    return [(parent, f) for parent in (TC_INGRESS, TC_EGRESS)
            for f in _filters(ipr, index, parent) if _ours(f, tc_name)]


def is_attached(ipr, index: int, tc_name: str = TC_NAME) -> bool:
    """Both our filters (ingress and egress) are on the link."""
    return {parent for parent, _ in _our_filters(ipr, index, tc_name)} == {TC_INGRESS, TC_EGRESS}


def attach(ipr, index: int, prog_fd: int, egress_fd: int, tc_name: str = TC_NAME) -> list[str]:
    """Attaches (or atomically replaces) our filter at clsact ingress and egress of one link.
    Ingress sees what the pod sends: requests to services are balanced there (and a pod's
    answers to itself, hairpin, are sent straight back); a local backend's reply passes it
    untouched, so netfilter and routing see backend -> client. Egress sees what reaches the pod:
    replies of its flows are translated back to the VIP there, whether the backend is local or
    on another node (via the uplink).

    A foreign filter at TC_PRIO (another tool's) would make the kernel refuse ours (EINVAL:
    one pref holds filters of one kind): ours then takes a free pref next to it
    (``choose_pref``). Returns one note per such move, naming the foreign filter."""
    try:
        ipr.tc("add", "clsact", index)
    except Exception as exc:  # EEXIST: clsact already there (ours or another tool's)
        if getattr(exc, "code", None) != 17:
            raise
    notes = []
    for parent, fd in ((TC_INGRESS, prog_fd), (TC_EGRESS, egress_fd)):
        pref, blockers = choose_pref(_filters(ipr, index, parent), tc_name)
        if blockers:
            hook = "ingress" if parent == TC_INGRESS else "egress"
            kinds = " and ".join(sorted({f.get_attr("TCA_KIND") or "?" for f in blockers}))
            notes.append(f"{hook} pref {TC_PRIO} holds another tool's {kinds} filter "
                         f"(handle {blockers[0]['handle']:#x}): lbctl's filter is at pref "
                         f"{pref}{', before it' if pref < TC_PRIO else ''} (lbctl passes packets on "
                         "with TC_ACT_OK: filters after it at this hook see none)")
        ipr.tc("replace-filter", "bpf", index, TC_HANDLE, fd=fd, name=tc_name,
               parent=parent, prio=pref, direct_action=True, protocol=ETH_P_ALL)
    return notes


def detach(ipr, index: int, tc_name: str = TC_NAME) -> bool:
    """Removes our filters from one link, and clsact if no other filter is left on it."""
    removed = False
    for parent, f in _our_filters(ipr, index, tc_name):
        try:
            ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=parent, prio=_pref(f),
                   protocol=ETH_P_ALL)
            removed = True
        except Exception as exc:
            if getattr(exc, "code", None) not in (2, 19):  # ENOENT, ENODEV: already gone
                raise
    if removed and not any(f["handle"] for parent in (TC_INGRESS, TC_EGRESS)
                           for f in _filters(ipr, index, parent)):
        try:
            ipr.tc("del", "clsact", index)
        except Exception:
            pass
    return removed


def attached_links(ipr, tc_name: str = TC_NAME) -> list[tuple[int, str]]:
    """(index, name) of every link carrying our filter."""
    return [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()
            if _our_filters(ipr, link["index"], tc_name)]


def detach_all(tc_name: str = TC_NAME) -> list[str]:
    from pyroute2 import IPRoute

    names = []
    with IPRoute() as ipr:
        for index, name in attached_links(ipr, tc_name):
            if detach(ipr, index, tc_name):
                names.append(name)
    return names


def repin(datapath: EbpfDatapath) -> list[str]:
    """Pins again the maps of a loaded datapath whose pins were removed (a `lbctl cleanup
    --force` while the agent runs: the program still uses the maps, nothing else can reach
    them). Returns the names pinned again."""
    missing = [name for name in datapath.maps
               if not os.path.exists(os.path.join(datapath.cfg.pin_dir, name))]
    if missing:
        os.makedirs(datapath.cfg.pin_dir, exist_ok=True)
    for name in missing:
        obj_pin(datapath.maps[name].fd, os.path.join(datapath.cfg.pin_dir, name))
    return missing


def remove_pins(pin_dir: str = DEFAULT_PIN_DIR) -> list[str]:
    """Unpins our maps (the kernel frees them once no program uses them)."""
    removed = []
    if os.path.isdir(pin_dir):
        for name in sorted(os.listdir(pin_dir)):
            if name in MAPS:
                os.unlink(os.path.join(pin_dir, name))
                removed.append(name)
        if not os.listdir(pin_dir):
            os.rmdir(pin_dir)
    return removed
