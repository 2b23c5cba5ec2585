"""The eBPF datapath: compile and load bpf/prog/lbctl_tc.c and bpf/prog/lbctl_xdp.c with bcc, pin
their maps, attach them.

Kernel objects lbctl creates, and nothing else:
  - maps pinned under ``pin_dir`` (default /sys/fs/bpf/lbctl), reused across restarts;
  - the loaded programs pinned under ``pin_dir``/programs-<digest>/, adopted by the next start
    instead of compiling again when the digest of their source and configuration is the same
    (see "the programs across restarts" below);
  - one tc filter (bpf, direct-action, handle ``TC_HANDLE``, named ``TC_NAME``) at clsact
    ingress and one at egress of every matching link, at pref ``TC_PRIO`` unless another tool's
    filter holds that pref (then the nearest free pref before it, said in the log), and the
    clsact qdisc when no other filter remains on it;
  - on each uplink (the node's interface towards other nodes and outside), the same tc filters
    with the uplink's programs, and the XDP program ``XDP_PROGRAM``, native if the driver takes
    it, else generic, else none (tc alone does the work).

Two kinds of links (see ``attach`` and ``attach_uplink``):

  pod links (--devices)   tc ingress lb_tc_ingress: a pod's requests to any frontend (internal
                          scope), hairpin; tc egress lb_tc_egress: replies to pods.
  uplinks (--uplink-devices)
                          XDP lb_xdp_uplink: requests from outside to any frontend (lookup,
                          backend, DNAT, conntrack), verdict for tc left in the packet's metadata;
                          tc ingress lb_tc_uplink_ingress: the mark from XDP's metadata, or the
                          whole path when XDP did not run (tc mode) or left the packet to it
                          (rejects); tc egress lb_tc_uplink_egress: replies to outside clients,
                          after netfilter undid the masquerade.

The API the mode uses for uplinks::

    dp = EbpfDatapath(cfg).load()           # compiles both programs; fds below
    result = attach_uplink(ipr, ifindex, dp, cfg.tc_name, xdp=cfg.xdp)
    result.mode                             # "xdp-native" | "xdp-generic" | "tc"
    result.notes                            # why a mode was refused, tc pref moves: to log
    uplink_mode(ipr, ifindex, cfg.tc_name)  # the same, read from the kernel (dump), or None
    detach(ipr, ifindex, cfg.tc_name)       # tc filters and our XDP program, any link
    dp.write_config(cluster_cidr=..., masquerade_all=..., masq_mark=..., drop_mark=...,
                    drop_rule=True)         # once the constant drop rule is installed
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import platform
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbctl.datapath.base import DEFAULT_PIN_DIR, DatapathError
from lbctl.datapath.ebpf import bpfsys, shared, source
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_ARRAY as MAP_ARRAY
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_HASH as MAP_HASH
from lbctl.datapath.ebpf.bpfsys import MAP_TYPE_HASH_OF_MAPS as MAP_HASH_OF_MAPS
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

PROGRAMS = {"ingress": "lb_tc_ingress", "egress": "lb_tc_egress",
            "uplink_ingress": "lb_tc_uplink_ingress", "uplink_egress": "lb_tc_uplink_egress"}
XDP_PROGRAM = "lb_xdp_uplink"   # also its kernel name: how detach recognises our XDP program

# How an uplink is served (UplinkAttachment.mode, DatapathConfig.xdp).
MODE_XDP_NATIVE = "xdp-native"
MODE_XDP_GENERIC = "xdp-generic"
MODE_TC = "tc"
XDP_CHOICES = {"auto": (MODE_XDP_NATIVE, MODE_XDP_GENERIC), "native": (MODE_XDP_NATIVE,),
               "generic": (MODE_XDP_GENERIC,), "off": ()}
MAPS = ("lb4_services", "lb4_backends", "lb4_ct", "lb4_affinity", "lb_service_stats",
        "lb_backend_stats", "lb_global_stats", "lb4_source_ranges", "lb4_config", "lb4_maglev")
TC_SOURCE = shared.BPF_DIR / "prog" / "lbctl_tc.c"
XDP_SOURCE = shared.BPF_DIR / "prog" / "lbctl_xdp.c"
SOURCES = (TC_SOURCE, XDP_SOURCE)
PROGRAM_TYPES = {**{name: bpfsys.PROG_TYPE_SCHED_CLS for name in PROGRAMS.values()},
                 XDP_PROGRAM: bpfsys.PROG_TYPE_XDP}
PROGRAMS_PREFIX = "programs-"   # <pin dir>/programs-<digest>/<function>: the loaded programs


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
    uplink_devices: tuple[str, ...] = ()   # the uplinks (patterns); the mode picks the default
    xdp: str = "auto"                      # XDP_CHOICES: the XDP modes tried on uplinks, in order
    maglev_table_size: int = shared.const("LB_MAGLEV_DEFAULT_TABLE_SIZE")  # M of Maglev services without their own
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
            f"-DLB_MAGLEV_MAP_SIZE={self.maglev_map_size}",
            "-Wno-unused-function",
        ]

    @property
    def tc_name(self) -> str:
        """The tc filter name: "lbctl_tc", or "lbctl_tc:<pin dir>" for another instance
        (tests, bench), so that each cleans up only its own filters."""
        if self.pin_dir == DEFAULT_PIN_DIR:
            return TC_NAME
        return f"{TC_NAME}:{os.path.basename(self.pin_dir.rstrip('/'))}"

    @property
    def maglev_map_size(self) -> int:
        """Maglev tables: one per service id and scope at most."""
        return 2 * self.max_services

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
            "lb4_maglev": (MAP_HASH_OF_MAPS, s("lb4_maglev_key"), 4, self.maglev_map_size),
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
        self.xdp_bpf: Any = None   # the XDP program's bcc.BPF (its maps are the pinned ones)
        self.prog_fd = -1          # ingress program (balances requests)
        self.egress_fd = -1        # egress program (translates replies)
        self.uplink_ingress_fd = -1  # uplink tc ingress (marks from XDP, or the whole path)
        self.uplink_egress_fd = -1   # uplink tc egress (replies to outside clients)
        self.xdp_fd = -1           # uplink XDP
        self.maps: dict[str, BpfMap] = {}
        self._adopted: list[int] = []   # descriptors of the programs taken from their pins

    def load(self) -> EbpfDatapath:
        """Compiles the programs, or adopts the ones pinned under ``programs_dir`` when they were
        built from the same source text and configuration (``program_digest``) and use the maps
        pinned now: a restart then costs no compile, and the very programs that stayed attached
        while the agent was down keep serving (attach replaces a filter with itself)."""
        ensure_bpffs()
        made_dir = not os.path.isdir(self.cfg.pin_dir)
        os.makedirs(self.cfg.pin_dir, exist_ok=True)
        check_pins(self.cfg)
        texts = {path: source.program_text(path) for path in SOURCES}
        directory = programs_dir(self.cfg.pin_dir, program_digest(self.cfg, texts))
        why = "first load" if made_dir else self._adopt(directory)
        if why:
            check_kernel_headers()
            self._compile(texts, made_dir)
            pin_programs(self, directory)
            log.info("compiled %s (%s); the programs are pinned under %s for the next start",
                     ", ".join(p.name for p in SOURCES), why, directory)
        else:
            log.info("adopted the programs pinned under %s: built from this source and "
                     "configuration, on the maps pinned now (no compile)", directory)
        for name in MAPS:
            self.maps[name] = BpfMap.open_pinned(os.path.join(self.cfg.pin_dir, name))
        return self

    def _compile(self, texts: dict[Path, bytes], made_dir: bool) -> None:
        from bcc import BPF  # Debian's python3-bpfcc; imported late so unit tests need no bcc

        src = TC_SOURCE
        try:
            # bcc rewrites map calls only in the text it is given: lbctl's headers inlined
            self.bpf = BPF(text=texts[TC_SOURCE], cflags=self.cfg.cflags())
            self.prog_fd = self.bpf.load_func(PROGRAMS["ingress"].encode(), BPF.SCHED_CLS).fd
            self.egress_fd = self.bpf.load_func(PROGRAMS["egress"].encode(), BPF.SCHED_CLS).fd
            self.uplink_ingress_fd = self.bpf.load_func(PROGRAMS["uplink_ingress"].encode(), BPF.SCHED_CLS).fd
            self.uplink_egress_fd = self.bpf.load_func(PROGRAMS["uplink_egress"].encode(), BPF.SCHED_CLS).fd
            # a second object: its maps are the pins the first one made
            src = XDP_SOURCE
            self.xdp_bpf = BPF(text=texts[XDP_SOURCE], cflags=self.cfg.cflags())
            self.xdp_fd = self.xdp_bpf.load_func(XDP_PROGRAM.encode(), BPF.XDP).fd
        except Exception as exc:
            if made_dir:   # a first load: the maps bcc pinned before it failed are new, unused
                remove_pins(self.cfg.pin_dir)
            raise DatapathError(f"compiling/loading {src} failed: {exc}") from exc

    def program_fds(self) -> dict[str, int]:
        """Function name -> file descriptor of each loaded program."""
        return {PROGRAMS["ingress"]: self.prog_fd, PROGRAMS["egress"]: self.egress_fd,
                PROGRAMS["uplink_ingress"]: self.uplink_ingress_fd,
                PROGRAMS["uplink_egress"]: self.uplink_egress_fd, XDP_PROGRAM: self.xdp_fd}

    def _adopt(self, directory: str) -> str:
        """Takes the programs pinned in ``directory``; "" when done, else why not (then nothing
        is taken). Each must be the function it is named after, of its type, and every map it
        uses that bears one of our names must be the map pinned under that name now: a program
        still bound to maps that were unpinned since (`lbctl cleanup`, a pin removed by hand)
        is never adopted."""
        if not os.path.isdir(directory):
            return "no programs pinned for this source and configuration"
        pinned: dict[str, int] = {}
        for name in MAPS:
            try:
                fd = obj_get(os.path.join(self.cfg.pin_dir, name))
            except OSError:
                return f"map {name} is not pinned"
            try:
                pinned[name[:15]] = map_info(fd).id     # the kernel keeps 15 characters of a name
            finally:
                os.close(fd)
        fds: dict[str, int] = {}
        why = _check_programs(directory, pinned, fds)
        if why:
            for fd in fds.values():
                os.close(fd)
            return why
        self.prog_fd, self.egress_fd = fds[PROGRAMS["ingress"]], fds[PROGRAMS["egress"]]
        self.uplink_ingress_fd = fds[PROGRAMS["uplink_ingress"]]
        self.uplink_egress_fd = fds[PROGRAMS["uplink_egress"]]
        self.xdp_fd = fds[XDP_PROGRAM]
        self._adopted = list(fds.values())
        return ""

    def write_config(self, cluster_cidr: str | None = None, masquerade_all: bool = False,
                     masq_mark: int = shared.const("LB_MARK_MASQ_DEFAULT"),
                     drop_mark: int = shared.const("LB_MARK_DROP_DEFAULT"),
                     drop_rule: bool = False) -> None:
        """Sets the datapath's settings (lb4_config): --cluster-cidr (IPv4, or None),
        --masquerade-all, the two mark bits, and `drop_rule`: the constant filter rule dropping
        `drop_mark` is installed (in INPUT and FORWARD: a NodePort's drop is local, a ClusterIP's
        forwarded), so drops may leave as marks; False (and before the first call) the datapath
        drops them itself. Set it after installing the rule, clear it before removing the rule.
        Takes effect on the next packet."""
        self.maps["lb4_config"].update(shared.u32(0), shared.config_value(
            cluster_cidr, masquerade_all, masq_mark, drop_mark, drop_rule))

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        for fd in self._adopted:
            os.close(fd)
        if self._adopted:
            self._adopted = []
            self.prog_fd = self.egress_fd = self.uplink_ingress_fd = self.uplink_egress_fd = -1
            self.xdp_fd = -1
        if self.xdp_bpf is not None:
            self.xdp_bpf.cleanup()
            self.xdp_bpf = None
            self.xdp_fd = -1
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            self.prog_fd = self.egress_fd = self.uplink_ingress_fd = self.uplink_egress_fd = -1

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc):
        self.close()


# --- the programs across restarts ------------------------------------------------------------
#
# A start compiles both programs with bcc (seconds of CPU), unless the programs an earlier start
# loaded are still pinned under <pin dir>/programs-<digest>, where the digest covers everything
# the compiled code depends on: the exact text handed to bcc (the programs with lbctl's headers
# inlined), the flags (pin dir, map sizes), the kernel and bcc. Same digest: the same programs,
# so they are adopted as they are, and the filters on the links (which hold those very programs
# while the agent is down) are replaced by themselves. Pins live in memory: a reboot forgets
# them, and `lbctl cleanup` (remove_pins) removes them with the maps.


def program_digest(cfg: DatapathConfig, texts: dict[Path, bytes]) -> str:
    """What the compiled programs depend on, hashed: the directory name of their pins."""
    digest = hashlib.sha256()
    parts = [*(texts[p] for p in SOURCES), *(f.encode() for f in cfg.cflags()),
             platform.release().encode(), platform.version().encode(), _bcc_version().encode(),
             *(f"{name}:{kind}".encode() for name, kind in PROGRAM_TYPES.items())]
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:20]


def _bcc_version() -> str:
    """bcc's version, read without importing bcc (which loads libbcc): "" if not found."""
    import importlib.util

    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return ""
    try:
        return Path(spec.origin).with_name("version.py").read_text()
    except OSError:
        return ""


def programs_dir(pin_dir: str, digest: str) -> str:
    return os.path.join(pin_dir, f"{PROGRAMS_PREFIX}{digest}")


def _check_programs(directory: str, pinned: dict[str, int], fds: dict[str, int]) -> str:
    """Opens each program pinned in ``directory`` into ``fds``; "" if every one is the function
    it is named after, of its type, on the maps pinned now (``pinned``: map name cut to 15
    characters -> id), else why not."""
    try:
        for function, kind in PROGRAM_TYPES.items():
            fds[function] = obj_get(os.path.join(directory, function))
            info = bpfsys.prog_info(fds[function])
            if (info.name, info.type) != (function[:15], kind):
                return f"{directory}/{function} is another program ({info.name}, type {info.type})"
            for map_id in info.map_ids:
                fd = bpfsys.map_fd_by_id(map_id)
                try:
                    used = map_info(fd)
                finally:
                    os.close(fd)
                if used.name in pinned and pinned[used.name] != map_id:
                    return f"{directory}/{function} uses a map {used.name} that is no longer pinned"
    except OSError as exc:
        return f"the pinned programs cannot be used ({exc.strerror or exc})"
    return ""


def pin_programs(datapath: EbpfDatapath, directory: str) -> None:
    """Pins the freshly compiled programs under ``directory`` for the next start, and removes the
    pins of other builds. A failure only costs the next start a compile (logged)."""
    try:
        _remove_program_pins(datapath.cfg.pin_dir)
        os.mkdir(directory, 0o700)              # root only, as the map pins
        for function, fd in datapath.program_fds().items():
            obj_pin(fd, os.path.join(directory, function))
            os.chmod(os.path.join(directory, function), 0o600)
    except OSError as exc:
        log.warning("could not pin the programs under %s (%s): the next start compiles them again",
                    directory, exc.strerror or exc)
        _remove_program_pins(datapath.cfg.pin_dir)


def _remove_program_pins(pin_dir: str) -> list[str]:
    """Unpins every build's programs (attached ones stay attached: the links hold them)."""
    removed: list[str] = []
    if not os.path.isdir(pin_dir):
        return removed
    for name in sorted(os.listdir(pin_dir)):
        path = os.path.join(pin_dir, name)
        if name.startswith(PROGRAMS_PREFIX) and os.path.isdir(path):
            for pin in sorted(os.listdir(path)):
                os.unlink(os.path.join(path, pin))
            os.rmdir(path)
            removed.append(name)
    return removed


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


@dataclass(frozen=True)
class UplinkAttachment:
    """How an uplink is served: ``mode`` MODE_XDP_NATIVE, MODE_XDP_GENERIC or MODE_TC (XDP did
    not attach, or ``xdp="off"``); ``notes``: why an XDP mode was refused, tc pref moves (to log
    once)."""

    mode: str
    notes: tuple[str, ...] = ()


def _our_xdp(index: int) -> tuple[int, int]:
    """(XDP_ATTACHED_*, flags to detach it) of our XDP program on a link, (NONE, 0) if none is
    there or it is another tool's."""
    try:
        state = bpfsys.xdp_query(index)
    except OSError:
        return bpfsys.XDP_ATTACHED_NONE, 0
    for mode, prog_id, flags in ((bpfsys.XDP_ATTACHED_DRV, state.drv_prog_id, bpfsys.XDP_FLAGS_DRV_MODE),
                                 (bpfsys.XDP_ATTACHED_SKB, state.skb_prog_id, bpfsys.XDP_FLAGS_SKB_MODE)):
        if prog_id and bpfsys.prog_name(prog_id) == XDP_PROGRAM:
            return mode, flags
    return bpfsys.XDP_ATTACHED_NONE, 0


_XDP_FLAGS = {MODE_XDP_NATIVE: bpfsys.XDP_FLAGS_DRV_MODE, MODE_XDP_GENERIC: bpfsys.XDP_FLAGS_SKB_MODE}
_XDP_MODE_OF = {bpfsys.XDP_ATTACHED_DRV: MODE_XDP_NATIVE, bpfsys.XDP_ATTACHED_SKB: MODE_XDP_GENERIC}


def attach_uplink(ipr, index: int, datapath: EbpfDatapath, tc_name: str = TC_NAME,
                  xdp: str = "auto") -> UplinkAttachment:
    """Attaches the uplink programs to one link: tc first (ingress: marks from XDP's metadata,
    or the whole path; egress: replies to outside clients), then XDP in the first mode of
    ``XDP_CHOICES[xdp]`` the kernel takes (native, then generic for "auto"). tc goes first so
    that no packet XDP handles ever misses its mark. Our XDP program already on the link in an
    allowed mode is replaced in that mode (native and generic cannot coexist on a link); in a
    mode no longer allowed, removed. Another tool's XDP program is left alone: tc mode.
    Raises what tc raises (the link is then not served); an XDP refusal is only a note."""
    if xdp not in XDP_CHOICES:
        raise DatapathError(f"xdp must be one of {', '.join(XDP_CHOICES)}, not {xdp!r}")
    notes = attach(ipr, index, datapath.uplink_ingress_fd, datapath.uplink_egress_fd, tc_name)
    wanted = XDP_CHOICES[xdp]
    current, flags = _our_xdp(index)
    if current != bpfsys.XDP_ATTACHED_NONE and _XDP_MODE_OF.get(current) not in wanted:
        bpfsys.xdp_detach(index, flags)
        current = bpfsys.XDP_ATTACHED_NONE
    try:
        state = bpfsys.xdp_query(index)
    except OSError as exc:
        return UplinkAttachment(MODE_TC, (*notes, f"cannot query XDP: {exc}"))
    if current == bpfsys.XDP_ATTACHED_NONE and state.mode != bpfsys.XDP_ATTACHED_NONE:
        return UplinkAttachment(MODE_TC, (*notes, "another XDP program is attached (id "
                                          f"{state.drv_prog_id or state.skb_prog_id}): tc only"))
    order = (_XDP_MODE_OF[current],) if current in _XDP_MODE_OF else wanted
    for mode in order:
        try:
            bpfsys.xdp_attach(index, datapath.xdp_fd, _XDP_FLAGS[mode])
        except OSError as exc:
            notes.append(f"{mode} refused: {exc.strerror or exc}")
            continue
        return UplinkAttachment(mode, tuple(notes))
    return UplinkAttachment(MODE_TC, tuple(notes))


def uplink_mode(ipr, index: int, tc_name: str = TC_NAME) -> str | None:
    """How a link is served now, read from the kernel: MODE_XDP_NATIVE / MODE_XDP_GENERIC when
    our XDP program is there (with our tc filters), MODE_TC with only our tc filters, None
    when our filters are missing (not attached, or removed by someone)."""
    if not is_attached(ipr, index, tc_name):
        return None
    current, _ = _our_xdp(index)
    return _XDP_MODE_OF.get(current, MODE_TC)


def _detach_xdp(index: int) -> bool:
    current, flags = _our_xdp(index)
    if current == bpfsys.XDP_ATTACHED_NONE:
        return False
    try:
        bpfsys.xdp_detach(index, flags)
    except OSError as exc:
        if exc.errno not in (2, 19):
            raise
    return True


def detach(ipr, index: int, tc_name: str = TC_NAME) -> bool:
    """Removes our filters from one link, and clsact if no other filter is left on it; our XDP
    program too (an uplink's)."""
    removed = _detach_xdp(index) if _our_filters(ipr, index, tc_name) else False
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


def _any_lbctl_filter(ipr, index: int) -> bool:
    for parent in (TC_INGRESS, TC_EGRESS):
        for f in _filters(ipr, index, parent):
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None and hasattr(opts, "get_attr") else None
            if f.get_attr("TCA_KIND") == "bpf" and name and name.split(":")[0] == TC_NAME:
                return True
    return False


def detach_all(tc_name: str = TC_NAME) -> list[str]:
    """Removes our filters (and XDP) from every link; also our XDP program left on a link
    without any lbctl filter (its filters removed behind our back)."""
    from pyroute2 import IPRoute

    names = []
    with IPRoute() as ipr:
        for index, name in attached_links(ipr, tc_name):
            if detach(ipr, index, tc_name):
                names.append(name)
        for link in ipr.get_links():
            if not _any_lbctl_filter(ipr, link["index"]) and _detach_xdp(link["index"]):
                names.append(f"{link.get_attr('IFLA_IFNAME')} (XDP)")
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
    """Unpins our maps (the kernel frees them once no program uses them), and the programs pinned
    for the next start (``programs-<digest>/``, not counted in the names returned: the maps')."""
    _remove_program_pins(pin_dir)
    removed = []
    if os.path.isdir(pin_dir):
        for name in sorted(os.listdir(pin_dir)):
            if name in MAPS:
                os.unlink(os.path.join(pin_dir, name))
                removed.append(name)
        if not os.listdir(pin_dir):
            os.rmdir(pin_dir)
    return removed
