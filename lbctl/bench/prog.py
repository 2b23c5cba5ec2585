"""`lbctl bench`: ns/packet of the tc and XDP programs through BPF_PROG_TEST_RUN, by number of
services.

The kernel times the program alone (no stack, no driver), averaged over `repeat` runs, so the
figures compare datapath lookups, not end-to-end throughput. Each run also times no-op tc and
XDP programs: ratios to them are what to compare across machines, not absolute nanoseconds.
Measured paths:
  established  a pod's packet of a tracked flow to a ClusterIP (tc, pod link: service lookup +
               conntrack hit + DNAT)
  NodePort tc  an outside client's packet of a tracked flow to a NodePort (the uplink's tc
               ingress program in tc mode: the same, plus the masquerade mark)
  NodePort XDP the same packet through the XDP program (metadata for tc instead of the mark)
  new flow     first packet of a flow (service lookup, conntrack miss, random slot, two
               conntrack inserts, DNAT). Each needs a fresh source port, so it is timed one run
               at a time, and single runs are cold (caches, timer): the figure is the
               established one plus the median difference between the first run of N new
               flows and a second run of the same N packets (then established), both cold
  passthrough  IPv4 TCP to no service (service miss + reply-conntrack miss)
BPF_PROG_TEST_RUN runs the program `repeat` times on one buffer: after a real DNAT every later
run would see a packet to the backend (a passthrough). So the frontends timed on tracked flows
have their own address and port as their one backend: the rewrite (checksum updates and
stores included) leaves the packet as it was, and every run takes the same path.
Also reported: how long the control plane took to program the services (one full sync).
"""
from __future__ import annotations

import ipaddress
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lbctl.datapath.ebpf import bpfsys, shared
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.packets import TCP_ACK, TCP_SYN, frame
from lbctl.datapath.ebpf.reconcile import Reconciler, entry
from lbctl.model.objects import Backend, DesiredState, Frontend, Protocol

BENCH_PIN_DIR = "/sys/fs/bpf/lbctl-bench"
SERVICE_BASE = int(ipaddress.IPv4Address("10.96.0.0"))
BACKEND_BASE = int(ipaddress.IPv4Address("10.128.0.0"))
CLIENT = "10.244.0.2"
OUTSIDE = "172.18.0.100"          # an outside client (NodePort)
MEASURED_VIP = "10.95.0.1"        # the ClusterIP timed on a tracked flow (outside SERVICE_BASE's range)
NODE_IP = "172.18.0.2"            # the node address of the NodePort timed
NODE_PORT = 30080


@dataclass
class BenchResult:
    services: int
    backends_per_service: int
    sync_seconds: float
    established_ns: float
    new_flow_ns: float
    passthrough_ns: float
    noop_ns: float
    nodeport_tc_ns: float = 0.0
    nodeport_xdp_ns: float = 0.0
    xdp_noop_ns: float = 0.0


def _pow2(n: int) -> int:
    return 1 << max(10, (n - 1).bit_length())


def synthetic_state(services: int, backends_per_service: int) -> DesiredState:
    entries = {}
    for i in range(services):
        fe = Frontend(str(ipaddress.IPv4Address(SERVICE_BASE + i)), 80, Protocol.TCP)
        bes = [Backend(str(ipaddress.IPv4Address(BACKEND_BASE + i * backends_per_service + j)), 8080,
                       Protocol.TCP) for j in range(backends_per_service)]
        entries[fe] = entry(f"bench/svc-{i}:http", fe, *bes)
    return DesiredState(entries)


def noop_programs():
    """A tc and an XDP program that do nothing: the cost of BPF_PROG_TEST_RUN itself."""
    from bcc import BPF

    b = BPF(text=b"int noop(struct __sk_buff *skb) { return 0; }\n"
                 b"int xdp_noop(struct xdp_md *ctx) { return 2; }")
    return b, b.load_func(b"noop", BPF.SCHED_CLS).fd, b.load_func(b"xdp_noop", BPF.XDP).fd


def put_self_frontend(dp, address: str, port: int, flags: int, service_id: int, backend_id: int) -> None:
    """A frontend whose one backend is its own address and port (see the module docstring),
    written straight into the maps with ids the reconciler does not hand out."""
    dp.maps["lb4_backends"].update(shared.u32(backend_id), shared.backend_value(address, port, 6))
    dp.maps["lb4_services"].update(shared.service_key(address, port, 6),
                                   shared.service_value(count=1, flags=flags, service_id=service_id))
    dp.maps["lb4_services"].update(shared.service_key(address, port, 6, slot=1),
                                   shared.service_value(backend_id=backend_id, service_id=service_id))


def measure(prog_fd: int, packet: bytes, repeat: int) -> float:
    return bpfsys.prog_test_run(prog_fd, packet, repeat=repeat).duration_ns


def single_runs(prog_fd: int, target: str, runs: int) -> float:
    """Median ns of `runs` single runs, one per source port (a new flow the first time)."""
    samples = []
    for i in range(runs):
        pkt = frame(CLIENT, target, 1024 + (i % 60000), 80, "tcp", flags=TCP_SYN, seq=i)
        samples.append(bpfsys.prog_test_run(prog_fd, pkt, repeat=1).duration_ns)
    return statistics.median(samples)


def run_bench(counts: list[int], backends_per_service: int = 2, repeat: int = 200_000,
              new_flow_runs: int = 2000, progress=print) -> list[BenchResult]:
    biggest = max(counts)
    cfg = ebpf.DatapathConfig(
        pin_dir=BENCH_PIN_DIR, max_services=_pow2(biggest + 1),
        max_backends=_pow2(biggest * backends_per_service + 1),
        services_map_size=_pow2(biggest * (backends_per_service + 1)),
        ct_size=_pow2(8 * new_flow_runs), devices=())
    ebpf.remove_pins(BENCH_PIN_DIR)
    results = []
    noop_bpf, noop_fd, xdp_noop_fd = noop_programs()
    dp = ebpf.EbpfDatapath(cfg).load()
    try:
        reconciler = Reconciler(dp.maps, cfg.max_services, cfg.max_backends)
        put_self_frontend(dp, MEASURED_VIP, 80, shared.const("LB_SVC_F_CLUSTERIP"),
                          cfg.max_services - 1, cfg.max_backends - 1)
        put_self_frontend(dp, NODE_IP, NODE_PORT, shared.const("LB_SVC_F_NODEPORT"),
                          cfg.max_services - 2, cfg.max_backends - 2)
        for n in counts:
            progress(f"programming {n:,} services x {backends_per_service} backends ...")
            desired = synthetic_state(n, backends_per_service)
            started = time.monotonic()
            sync = reconciler.sync(desired)
            sync_seconds = time.monotonic() - started
            if sync.errors:
                raise RuntimeError(f"sync failed: {sync.errors}")
            target = str(ipaddress.IPv4Address(SERVICE_BASE + n // 2))
            established = frame(CLIENT, MEASURED_VIP, 40000, 80, "tcp", flags=TCP_ACK)
            bpfsys.prog_test_run(dp.prog_fd, frame(CLIENT, MEASURED_VIP, 40000, 80, "tcp"))  # open the flows
            nodeport = frame(OUTSIDE, NODE_IP, 40000, NODE_PORT, "tcp", flags=TCP_ACK)
            bpfsys.prog_test_run(dp.uplink_ingress_fd, frame(OUTSIDE, NODE_IP, 40000, NODE_PORT, "tcp"))
            progress(f"  measuring ({repeat:,} runs per path, {new_flow_runs:,} new flows) ...")
            established_ns = measure(dp.prog_fd, established, repeat)
            nodeport_tc_ns = measure(dp.uplink_ingress_fd, nodeport, repeat)
            nodeport_xdp_ns = measure(dp.xdp_fd, nodeport, repeat)
            first = single_runs(dp.prog_fd, target, new_flow_runs)
            again = single_runs(dp.prog_fd, target, new_flow_runs)
            result = BenchResult(
                services=n, backends_per_service=backends_per_service, sync_seconds=sync_seconds,
                established_ns=established_ns, new_flow_ns=established_ns + first - again,
                passthrough_ns=measure(dp.prog_fd, frame(CLIENT, "10.244.9.9", 40000, 80, "tcp"), repeat),
                noop_ns=measure(noop_fd, established, repeat), nodeport_tc_ns=nodeport_tc_ns,
                nodeport_xdp_ns=nodeport_xdp_ns, xdp_noop_ns=measure(xdp_noop_fd, nodeport, repeat))
            results.append(result)
            progress(f"  {format_row(result)}")
            ct = dp.maps["lb4_ct"]
            for key in list(ct.keys()):
                ct.delete(key)
        reconciler.sync(DesiredState())
    finally:
        dp.close()
        noop_bpf.cleanup()
        ebpf.remove_pins(BENCH_PIN_DIR)
    return results


HEADER = (f"{'SERVICES':>9} {'SYNC s':>7} {'ESTABLISHED ns':>15} {'NEW FLOW ns':>12} "
          f"{'PASSTHROUGH ns':>15} {'NO-OP ns':>9} {'EST/NO-OP':>10} {'NODEPORT TC ns':>15} "
          f"{'NODEPORT XDP ns':>16} {'XDP NO-OP ns':>13}")


def format_row(r: BenchResult) -> str:
    ratio = r.established_ns / r.noop_ns if r.noop_ns else float("nan")
    return (f"{r.services:>9,} {r.sync_seconds:>7.2f} {r.established_ns:>15.0f} {r.new_flow_ns:>12.0f} "
            f"{r.passthrough_ns:>15.0f} {r.noop_ns:>9.0f} {ratio:>10.1f} {r.nodeport_tc_ns:>15.0f} "
            f"{r.nodeport_xdp_ns:>16.0f} {r.xdp_noop_ns:>13.0f}")


def plot(results: list[BenchResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [("established", "established_ns"), ("new flow", "new_flow_ns"),
             ("passthrough", "passthrough_ns"), ("no-op tc", "noop_ns"),
             ("NodePort tc", "nodeport_tc_ns"), ("NodePort XDP", "nodeport_xdp_ns"),
             ("no-op XDP", "xdp_noop_ns")]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + i * width for j in range(len(paths))]
        ys = [getattr(r, attr) for _, attr in paths]
        ax.bar(xs, ys, width, label=f"{r.services:,} services")
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(paths))])
    ax.set_xticklabels([name for name, _ in paths])
    ax.set_ylabel("ns per packet (BPF_PROG_TEST_RUN)")
    ax.set_title("lbctl tc and XDP program cost by path and number of services")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_bench(args) -> int:
    counts = [int(c) for c in args.services.split(",")]
    progress = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    if not args.json:
        print("lbctl bench: tc and XDP programs through BPF_PROG_TEST_RUN (kernel-timed, program only)")
    results = run_bench(counts, args.backends, args.repeat, args.new_flows, progress)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print()
        print(HEADER)
        for r in results:
            print(format_row(r))
        if len(results) > 1:
            a, b = results[0], results[-1]
            print(f"\nestablished flow: {b.services:,} services cost {b.established_ns / a.established_ns:.2f}x "
                  f"what {a.services:,} do (a hash lookup does not grow with the table)")
    if args.plot:
        plot(results, Path(args.plot))
        if not args.json:
            print(f"plot: {args.plot}")
    return 0
