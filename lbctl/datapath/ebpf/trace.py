"""`lbctl trace`: what the datapath does with one packet, decided by the datapath's own code.

Katran's simulator runs the real balancer code; so does this. The tc program
(bpf/prog/lbctl_tc.c) is compiled again with ``-DLB_TRACE``, a build in which every map write
of the datapath (conntrack create, touch and stale deletes, affinity updates, counters) is
compiled out where it is made, and which reports its decisions in a map of its own
(``lb_trace``: one ``lb4_trace_result``, see bpf/lib/stats.h). That build runs on a crafted
frame (lbctl.datapath.ebpf.packets) through BPF_PROG_TEST_RUN against the live maps: the
verdict, the output frame (destination and source as rewritten) and the report say what the
datapath would do, expiry, closing state, the backend re-check, affinity and hairpin included,
and no map changes. A packet the ingress program passes on is run through the egress program
as well: that is where replies are translated, on their way into the client's pod. With
``uplink``, the packet arrives by the uplink instead (a client outside the cluster, or another
node): the uplink's tc programs run (the XDP program decides as the tc ingress program does;
they share lib/lb.h), replies translated at egress of the uplink.

The maps are reached through pins of our own: bcc's BPF_TABLE_PINNED reuses a pin when it
exists and creates (and pins) a map when not, so the trace build is pointed at a private
directory holding new pins of the very maps found under the pin dir, removed when done. Nothing
is ever created under the pin dir, even if the agent's pins vanish meanwhile. A trace killed
before it removed them (SIGKILL; `lbctl trace` turns SIGTERM and SIGHUP into an exception)
leaves ``lbctl-trace-<pid>-*``: the next trace, and `lbctl cleanup`, remove those of dead pids
(remove_stale_pin_dirs).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from lbctl.datapath.base import DatapathError
from lbctl.datapath.ebpf import dump, loader, shared, source
from lbctl.datapath.ebpf.bpfsys import BpfMap, map_info, obj_get, obj_pin, prog_test_run
from lbctl.datapath.ebpf.packets import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, frame

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VERDICTS = {TC_ACT_OK: "pass", TC_ACT_SHOT: "drop", TC_ACT_REDIRECT: "redirect"}
TCP_FLAG_LETTERS = {"S": TCP_SYN, "A": TCP_ACK, "F": TCP_FIN, "R": TCP_RST, "P": TCP_PSH}
HAIRPIN_ADDR = str(ipaddress.IPv4Address(shared.const("LB_HAIRPIN_ADDR")))

# LB_TRACE_F_* flag names, by bit: "service", "ct_found", ...
FLAG_NAMES = {getattr(shared.lib, n): n[len("LB_TRACE_F_"):].lower()
              for n in dir(shared.lib) if n.startswith("LB_TRACE_F_")}


class TraceError(Exception):
    """The trace cannot run; the message says why and what to do."""


# --- the packet ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Packet:
    src: str
    sport: int
    dst: str
    dport: int
    proto: str                      # "tcp" | "udp"
    tcp_flags: str = "S"            # letters of TCP_FLAG_LETTERS ("" for UDP)

    def frame(self) -> bytes:
        flags = sum(TCP_FLAG_LETTERS[c] for c in set(self.tcp_flags))
        return frame(self.src, self.dst, self.sport, self.dport, self.proto, flags=flags)

    def __str__(self) -> str:
        flags = f" [{self.tcp_flags}]" if self.proto == "tcp" else ""
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}/{self.proto.upper()}{flags}"


def parse_endpoint(text: str, what: str, with_proto: bool = False) -> tuple[str, int, str]:
    """"IP:PORT[/proto]" -> (ip, port, proto). ValueError names the part that is wrong."""
    rest, _, proto = text.partition("/") if with_proto else (text, "", "")
    proto = (proto or "tcp").lower()
    address, sep, port_text = rest.rpartition(":")
    if not sep or not address:
        raise ValueError(f"{what} {text!r}: use IP:PORT{'[/tcp|udp]' if with_proto else ''}")
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"{what} {text!r}: {address!r} is not an IPv4 address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r}: port {port_text!r} out of range (1-65535)")
    if proto not in ("tcp", "udp"):
        raise ValueError(f"{what} {text!r}: protocol {proto!r}: the datapath balances tcp and udp")
    return address, int(port_text), proto


def parse_tcp_flags(text: str) -> str:
    letters = text.upper()
    bad = sorted(set(letters) - set(TCP_FLAG_LETTERS))
    if bad or not letters:
        raise ValueError(f"--tcp-flags {text!r}: use letters of {''.join(TCP_FLAG_LETTERS)} "
                         "(S syn, A ack, F fin, R rst, P psh), e.g. S or A or FA")
    return "".join(c for c in TCP_FLAG_LETTERS if c in letters)


@dataclass
class Frame:
    """The addresses of an output frame, as the next hop would read them."""

    src: str
    dst: str
    proto: str                     # "tcp", "udp", "icmp" or a number
    sport: int = 0
    dport: int = 0
    detail: str = ""               # TCP flags, or the ICMP type/code

    def __str__(self) -> str:
        if self.proto == "icmp":
            return f"{self.src} -> {self.dst} ICMP {self.detail}"
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}/{self.proto.upper()}" + \
            (f" [{self.detail}]" if self.detail else "")


def read_frame(data: bytes) -> Frame | None:
    if len(data) < 34 or data[12:14] != b"\x08\x00":
        return None
    ihl = (data[14] & 0x0F) * 4
    proto, src, dst = data[23], socket.inet_ntoa(data[26:30]), socket.inet_ntoa(data[30:34])
    l4 = data[14 + ihl:]
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        detail = ""
        if proto == 6 and len(l4) >= 14:
            detail = "".join(c for c, bit in TCP_FLAG_LETTERS.items() if l4[13] & bit)
        return Frame(src, dst, "tcp" if proto == 6 else "udp", sport, dport, detail)
    if proto == 1 and len(l4) >= 2:
        what = "port unreachable" if l4[:2] == b"\x03\x03" else f"type {l4[0]} code {l4[1]}"
        return Frame(src, dst, "icmp", detail=what)
    return Frame(src, dst, str(proto))


# --- what one program run decided ---------------------------------------------------------------

@dataclass
class Step:
    """One program run: the hook, its verdict, what it counted and reported, its output."""

    hook: str                       # "ingress" (pod -> node) | "egress" (node -> pod), or
                                    # "uplink-in" / "uplink-out" (outside <-> node)
    verdict: str                    # pass | drop | redirect (back out of the link it came by)
    counted: list[str]              # LB_STAT_* names the real program would count
    flags: list[str]                # LB_TRACE_F_* names
    service_id: int
    backend_id: int
    ct_backend_id: int
    slot: int
    count: int
    output: Frame | None
    mark: int = 0                   # bits the packet leaves with (masquerade, drop)

    def has(self, name: str) -> bool:
        return name in self.flags or name in self.counted


@dataclass
class Trace:
    packet: Packet
    steps: list[Step]
    service: str | None = None           # namespace/name:port
    service_id: int = 0
    frontend: str | None = None          # VIP:port/PROTO
    backend: str | None = None           # address:port of the backend chosen or replying
    backend_id: int = 0
    decision: str = ""                   # new_flow, conntrack_hit, reselect, reject_rst, ...
    reason: str = ""                     # the decision in words
    notes: list[str] = field(default_factory=list)
    output: Frame | None = None

    def lines(self) -> list[str]:
        out = [f"packet    {self.packet}"]
        if self.frontend:
            name = self.service or "(no name: the agent's state file has none)"
            count = self.steps[0].count
            out.append(f"service   {name} (id {self.service_id}), frontend {self.frontend}, "
                       f"{count} backend slot{'s' * (count != 1)}")
        elif self.service:
            out.append(f"service   {self.service} (id {self.service_id})")
        out.append(f"verdict   {self.decision}: {self.reason}")
        if self.backend:
            out.append(f"backend   {self.backend} (id {self.backend_id})")
        for note in self.notes:
            out.append(f"note      {note}")
        if self.output is not None:
            out.append(f"out       {self.output}")
        for step in self.steps:
            out.append(f"  {step.hook:<10} {step.verdict:<9} counted {', '.join(step.counted) or '-'}")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


# --- running the trace build --------------------------------------------------------------------

class Tracer:
    """The trace build of the program, attached to the maps pinned under `pin_dir`."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self.bpf: Any = None            # bcc.BPF of the trace build, once open
        self.fds: dict[str, int] = {}
        self.private_dir = ""
        self.ingress_fd = self.egress_fd = -1
        self.uplink_ingress_fd = self.uplink_egress_fd = -1

    def __enter__(self) -> Tracer:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> Tracer:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        missing = [n for n in loader.MAPS if not os.path.exists(os.path.join(self.pin_dir, n))]
        if missing:
            raise TraceError(f"no lbctl maps pinned under {self.pin_dir} (missing: {', '.join(missing)}): "
                             "is `lbctl run` running, or has it run since boot? (--pin-dir names "
                             "another instance)")
        try:
            for name in loader.MAPS:
                self.fds[name] = obj_get(os.path.join(self.pin_dir, name))
        except OSError as exc:
            raise TraceError(f"cannot open the maps under {self.pin_dir}: {exc} (run as root)") from exc
        sizes = {name: map_info(fd) for name, fd in self.fds.items()}
        cfg = loader.DatapathConfig(
            pin_dir=self.pin_dir, max_services=sizes["lb_service_stats"].max_entries,
            max_backends=sizes["lb4_backends"].max_entries,
            services_map_size=sizes["lb4_services"].max_entries, ct_size=sizes["lb4_ct"].max_entries,
            affinity_size=sizes["lb4_affinity"].max_entries, devices=())
        for name, want in cfg.expected_maps().items():
            info = sizes[name]
            have = (info.type, info.key_size, info.value_size, info.max_entries)
            if have != want:
                raise TraceError(f"pinned map {self.pin_dir}/{name} has type/key/value/entries "
                                 f"{'/'.join(map(str, have))}, this lbctl's program wants "
                                 f"{'/'.join(map(str, want))}: the maps come from another lbctl version")
        # Everything that can fail before the pins of our own exist.
        try:
            from bcc import BPF
        except ImportError as exc:
            raise TraceError(f"bcc is not importable ({exc}): `make setup` installs python3-bpfcc") from exc
        try:
            loader.check_kernel_headers()
        except DatapathError as exc:
            raise TraceError(str(exc)) from exc
        # Pins of our own, next to the pin dir (same bpffs; it refuses names starting with a dot).
        parent = pins_parent(self.pin_dir)
        remove_stale_pin_dirs(parent)
        private_dir = os.path.join(parent, f"{PRIVATE_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.mkdir(private_dir, 0o700)
            self.private_dir = private_dir
            for name, fd in self.fds.items():
                obj_pin(fd, os.path.join(self.private_dir, name))
        except OSError as exc:
            raise TraceError(f"cannot pin the maps again under {private_dir}: {exc.strerror or exc} "
                             f"(the trace pins them next to --pin-dir, which must be a directory "
                             f"below a bpffs mount such as /sys/fs/bpf/lbctl)") from exc
        src = shared.BPF_DIR / "prog" / "lbctl_tc.c"
        flags = [f for f in _replace_pin_dir(cfg.cflags(), self.private_dir)] + ["-DLB_TRACE"]
        try:
            self.bpf = BPF(text=source.program_text(src), cflags=flags)
            self.ingress_fd = self.bpf.load_func(loader.PROGRAMS["ingress"].encode(), BPF.SCHED_CLS).fd
            self.egress_fd = self.bpf.load_func(loader.PROGRAMS["egress"].encode(), BPF.SCHED_CLS).fd
            self.uplink_ingress_fd = self.bpf.load_func(loader.PROGRAMS["uplink_ingress"].encode(),
                                                        BPF.SCHED_CLS).fd
            self.uplink_egress_fd = self.bpf.load_func(loader.PROGRAMS["uplink_egress"].encode(),
                                                       BPF.SCHED_CLS).fd
        except Exception as exc:
            raise TraceError(f"compiling the trace build of {src} failed: {exc}") from exc
        finally:
            self._remove_private_pins()   # the loaded programs hold the maps now

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        self._remove_private_pins()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _remove_private_pins(self) -> None:
        if self.private_dir and os.path.isdir(self.private_dir):
            for name in os.listdir(self.private_dir):
                os.unlink(os.path.join(self.private_dir, name))
            os.rmdir(self.private_dir)

    def _run(self, hook: str, data: bytes) -> tuple[Step, bytes]:
        fd = {"ingress": self.ingress_fd, "egress": self.egress_fd, "uplink-in": self.uplink_ingress_fd,
              "uplink-out": self.uplink_egress_fd}[hook]
        try:
            res = prog_test_run(fd, data)
        except OSError as exc:
            raise TraceError(f"running the trace build ({hook}) failed: {exc.strerror or exc}") from exc
        table = self.bpf[b"lb_trace"]
        r = shared.view("lb4_trace_result", bytes(table[table.Key(0)]))
        names = shared.stat_names()
        step = Step(hook=hook, verdict=VERDICTS.get(res.retval, str(res.retval)),
                    counted=[n for i, n in enumerate(names) if r.stats & (1 << i)],
                    flags=[n for bit, n in sorted(FLAG_NAMES.items()) if r.flags & bit],
                    service_id=r.service_id, backend_id=r.backend_id, ct_backend_id=r.ct_backend_id,
                    slot=r.slot, count=r.count, output=read_frame(res.data), mark=r.mark)
        return step, res.data

    def trace(self, packet: Packet, uplink: bool = False) -> Trace:
        """`uplink`: the packet arrives by the uplink (from outside the node), not a pod's link."""
        ingress, egress_hook = ("uplink-in", "uplink-out") if uplink else ("ingress", "egress")
        step, out = self._run(ingress, packet.frame())
        steps = [step]
        if step.verdict == "pass" and not step.has("service"):
            # on into the node, and to a pod: where a reply is translated
            egress, _ = self._run(egress_hook, out)
            if egress.has("reply"):
                steps.append(egress)
        return explain(self.pin_dir, packet, steps)


def _replace_pin_dir(cflags: list[str], pin_dir: str) -> list[str]:
    """cflags with LB_PIN_DIR set to `pin_dir`; ValueError if they did not set it (the trace
    build would then open, or create, maps under the default pin dir)."""
    ours = f'-DLB_PIN_DIR="{pin_dir}"'
    out = [ours if f.startswith("-DLB_PIN_DIR=") else f for f in cflags]
    if ours not in out:
        raise ValueError(f"the datapath's cflags set no LB_PIN_DIR: {cflags}")
    return out


PRIVATE_PREFIX = "lbctl-trace-"
_PRIVATE_NAME = re.compile(rf"^{PRIVATE_PREFIX}(\d+)-[0-9a-f]+$")


def pins_parent(pin_dir: str) -> str:
    """Where a trace of the maps under `pin_dir` pins them again."""
    return os.path.dirname(os.path.abspath(pin_dir).rstrip("/"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_pin_dirs(parent: str) -> list[str]:
    """Removes the private pin dirs (``lbctl-trace-<pid>-<hex>``) under `parent` whose trace
    process is gone, as a SIGKILL leaves them; returns their paths. A dir that cannot be
    removed is left (the next call tries again)."""
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in sorted(names):
        match = _PRIVATE_NAME.match(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        try:
            for pin in os.listdir(path):
                os.unlink(os.path.join(path, pin))
            os.rmdir(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def trace(pin_dir: str, packet: Packet, uplink: bool = False) -> Trace:
    """One packet through the trace build (compiled for this call)."""
    with Tracer(pin_dir) as tracer:
        return tracer.trace(packet, uplink)


# --- in words -----------------------------------------------------------------------------------

def _backend_address(pin_dir: str, backend_id: int) -> str | None:
    path = os.path.join(pin_dir, "lb4_backends")
    try:
        with BpfMap.open_pinned(path) as backends:
            raw = backends.lookup(shared.u32(backend_id))
    except OSError:
        return None
    if raw is None:
        return None
    b = shared.view("lb4_backend", raw)
    draining = " (draining)" if b.flags & shared.const("LB_BACKEND_F_DRAINING") else ""
    return f"{shared.from_be32(b.address)}:{shared.from_be16(b.port)}{draining}"


def explain(pin_dir: str, packet: Packet, steps: list[Step]) -> Trace:
    """The decision of the last step that acted, in an operator's words."""
    first, last = steps[0], steps[-1]
    names = dump.read_names(pin_dir)
    t = Trace(packet=packet, steps=steps, output=last.output)
    t.service_id = last.service_id or first.service_id
    t.service = names.get(t.service_id) if t.service_id else None
    if first.has("hairpin") or last.has("hairpin"):
        t.notes.append(f"hairpin: the pod reaches itself; its source becomes {HAIRPIN_ADDR} and the "
                       "packet goes straight back out of the pod's link")
    if first.has("service"):
        t.frontend = f"{packet.dst}:{packet.dport}/{packet.proto.upper()}"
        _explain_service(pin_dir, t, first)
    elif last.has("reply"):
        _explain_reply(pin_dir, t, last)
    else:
        reason = next((n for n in first.counted if n.startswith("pass_")), "pass_no_service")
        t.decision = "pass"
        t.reason = {
            "pass_not_ip": "not IPv4: passed untouched",
            "pass_malformed": "truncated or inconsistent headers: passed untouched",
            "pass_fragment": "an IP fragment: passed untouched",
        }.get(reason, "no service at this address and port, and no tracked flow it replies to: "
                      "passed untouched")
    for counter, note in (("ct_full", "the conntrack table refused the entry (ct_full)"),
                          ("nat_failed", "a rewrite failed: the packet is dropped (nat_failed)")):
        if any(counter in s.counted for s in steps):
            t.notes.append(note)
    return t


def _explain_service(pin_dir: str, t: Trace, step: Step) -> None:
    t.backend_id = step.backend_id
    t.backend = _backend_address(pin_dir, step.backend_id) if step.backend_id else None
    if step.has("svc_midflow_miss"):
        t.notes.append("a TCP segment without SYN and no conntrack entry (evicted, or a flow older "
                       "than the maps): balanced as a new flow, so a backend that never saw the "
                       "connection answers with a RST")
    if step.has("masquerade"):
        t.notes.append(f"leaves with the masquerade mark ({step.mark:#x}): lbctl's POSTROUTING rule "
                       "masquerades the source, as kube-proxy's KUBE-POSTROUTING")
    dropped_by_mark = (f": leaves untouched with the drop mark ({step.mark:#x}), which lbctl's "
                       "filter rule drops (kube-proxy's KUBE-MARK-DROP)" if step.mark else
                       ": dropped by the datapath (the control plane has not said its drop rule "
                       "is in place)")
    if step.has("source_range_drop"):
        t.decision, t.reason = "drop", "source outside the service's loadBalancerSourceRanges" + dropped_by_mark
        return
    if step.has("pass_untracked"):
        t.decision, t.reason = "pass", ("a TCP segment without SYN to a NodePort/external address, of "
                                        "no flow lbctl tracks: passed to the stack (a reply to a "
                                        "connection netfilter masqueraded is netfilter's)")
        return
    if step.has("no_backend") and step.has("svc_drop"):
        t.backend = None
        policy = ("externalTrafficPolicy Local" if step.has("drop_etp_local")
                  else "internalTrafficPolicy Local")
        t.decision, t.reason = "drop", (f"no endpoints and the frontend says drop ({policy} without "
                                        "a local endpoint)" + dropped_by_mark)
        return
    if step.has("no_backend"):
        if step.verdict == "drop":
            t.backend = None
            if step.count:
                t.decision, t.reason = "drop", f"slot {step.slot} names no backend (a service half made?)"
            else:
                t.decision, t.reason = "drop", ("no endpoints, and this packet gets no reject either "
                                                "(a RST is not answered, nor a packet with IP options "
                                                "or one the reject could not be built for): dropped")
        elif t.output is not None and t.output.proto == "icmp":
            t.decision, t.reason = "reject_icmp", "no endpoints: ICMP port unreachable back to the client"
        else:
            t.decision, t.reason = "reject_rst", "no endpoints: TCP RST back to the client"
        return
    if step.has("svc_ct_hit"):
        t.decision = "conntrack_hit"
        t.reason = "a tracked flow: it keeps its backend"
        return
    chosen = ("from the client's sessionAffinity entry" if step.has("affinity")
              else f"slot {step.slot} of {step.count}, at random (another run may pick another slot)")
    if step.has("svc_reselect"):
        t.decision = "reselect"
        why = ("a SYN on a closed tuple (RST or FIN both ways)" if step.has("ct_closing")
               else "its entry expired" if step.has("ct_expired")
               else f"its backend {step.ct_backend_id} was deleted or changed" if step.has("ct_backend_gone")
               else "its entry is no longer valid")
        t.reason = f"a known flow chooses again, {why}: backend {chosen}"
    else:
        t.decision = "new_flow"
        t.reason = f"no conntrack entry: backend {chosen}"


def _explain_reply(pin_dir: str, t: Trace, step: Step) -> None:
    t.backend_id = step.backend_id
    t.backend = _backend_address(pin_dir, step.backend_id)
    where = ("at egress toward the client" if step.hook in ("egress", "uplink-out")
             else "at ingress (hairpin)")
    if step.has("revnat"):
        source_ = f"{t.output.src}:{t.output.sport}" if t.output else "the service address"
        t.decision, t.reason = "revnat", f"reply of a tracked flow: source rewritten to {source_} {where}"
    elif step.has("stale_reply"):
        why = ("expired, and this is a SYN-ACK or not TCP" if step.has("ct_expired")
               else "names another backend")
        t.decision, t.reason = "pass", (f"a leftover reply entry of a finished flow (its forward entry "
                                        f"{why}): passed untouched; the datapath removes the entry")
    elif step.has("ct_evicted"):
        t.decision, t.reason = "pass", ("a reply entry whose flow's forward entry is gone (evicted by "
                                        "the LRU: lb4_ct too small?): passed untouched; the datapath "
                                        "removes the entry")
    else:
        t.decision, t.reason = "pass", "matched a reply entry"
