"""lbctl: the command line.

  lbctl run --manifests DIR [--mode ebpf|iptables|nftables|ipvs]   the agent (foreground)
  lbctl status [--json]          what the agent did last: source, last sync, counts, errors
  lbctl dump maps [--json]       what the datapath holds
  lbctl trace SRC:P VIP:P/proto  what the datapath does with a packet (its own code, no writes)
  lbctl cleanup                  remove everything lbctl created (every mode's objects)
  lbctl lab up|down              a small cluster in network namespaces
  lbctl demo [--keep] [--nodes N] [--kubernetes]   lab + agent + traffic + dump (`make demo`)
  lbctl bench                    ns/packet through BPF_PROG_TEST_RUN
  lbctl bench --modes none,ebpf,iptables,nftables   the datapaths side by side, end to end
  lbctl bench --k8s-latency      API server change -> maps -> traffic, at 1,000 and 10,000 services
  lbctl render iptables|nftables kube-proxy's rules for the same manifests
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from lbctl.datapath.ebpf import loader as ebpf

log = logging.getLogger("lbctl")

DEFAULT_MANIFESTS = "/etc/lbctl/manifests"


def _datapath_args(p: argparse.ArgumentParser) -> None:
    d = ebpf.DatapathConfig()
    p.add_argument("--pin-dir", default=d.pin_dir, help="bpffs directory for the maps (%(default)s)")


def build_mode(args):
    """The datapath mode `lbctl run --mode` asks for (kube-proxy modes imported only when used).
    ValueError (naming the flag) when a flag is bad. Touches no kernel."""
    from lbctl.cli import config

    if args.mode == "ebpf":
        from lbctl.datapath.ebpf.mode import EbpfMode
        return EbpfMode(config.datapath_config(args), settings=config.proxy_settings(args))
    cfg = config.kube_proxy_config(args.mode, args)
    if args.mode in ("iptables", "nftables"):
        from lbctl.datapath.kubeproxy import iptables_mode, nftables_mode
        from lbctl.datapath.kubeproxy.proxier import ProxierOptions

        options = ProxierOptions(full_sync_every=args.full_sync_every, ebpf_pin_dir=args.pin_dir)
        if args.mode == "iptables":
            return iptables_mode.IptablesMode(cfg, options)
        return nftables_mode.NftablesMode(cfg, options)
    from lbctl.datapath.kubeproxy import ipvs
    return ipvs.IpvsMode(cfg, ebpf_pin_dir=args.pin_dir)


def cmd_run(args) -> int:
    previous = os.umask(0o077)    # the lock, pins, state and status files: root's only (0600, dirs 0700)
    try:
        return _run(args)
    finally:
        os.umask(previous)


def _run(args) -> int:
    from lbctl.agent.lock import AgentLock, AgentRunning, running_agents
    from lbctl.agent.loop import Agent, AgentOptions
    from lbctl.datapath.ebpf import dump
    from lbctl.sources.base import SourceUnavailable
    from lbctl.sources.manifests import ManifestSource

    try:
        mode = build_mode(args)
    except ValueError as exc:
        log.error("lbctl run --mode %s: %s", args.mode, exc)
        return 2
    except ebpf.DatapathError as exc:
        log.error("%s", exc)
        return 1
    # One agent per node, whatever the mode: taken before anything touches the kernel.
    lock = AgentLock(args.pin_dir, f"lbctl run --mode {args.mode}")
    try:
        lock.acquire()
        # another pin dir is another datapath, but the same node, links and netfilter tables:
        # refused too (two starting at once both refuse; the next try wins)
        others = running_agents(exclude=lock.path)
        if others:
            lock.release()
            raise AgentRunning(others[0], f"lbctl run --mode {args.mode}")
    except AgentRunning as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("lbctl run: cannot take the agent lock %s: %s (run as root)", lock.path,
                  exc.strerror or exc)
        return 1
    source: Any = None
    operations = None
    try:
        if args.source == "kubernetes":
            from lbctl.cli import config
            from lbctl.sources.kubernetes import KubernetesSource, api_client

            try:
                api = api_client(args.kubeconfig, args.master)
            except ValueError as exc:
                log.error("lbctl run --source kubernetes: %s", exc)
                return 2
            source = KubernetesSource(api, config.node_name(args), node_port_range=args.service_node_port_range)
            where = f"API server {source.server} (node {source.node_name})"
        else:
            source = ManifestSource(args.manifests, interval=args.interval,
                                    state_path=dump.source_state_file(args.pin_dir),
                                    node_port_range=args.service_node_port_range)
            where = f"manifests {args.manifests}"
        try:
            operations = start_operations(args, source, where)
        except OSError as exc:   # --bind-address-hard-fail: a listener could not be bound
            log.error("lbctl run: %s", exc.strerror or exc)
            return 1
        agent = Agent(source, mode=mode, observer=operations,
                      options=AgentOptions(interval=args.interval, detach_on_exit=args.detach_on_exit,
                                           sync_period=args.sync_period, min_sync_period=args.min_sync_period))
        stop = threading.Event()

        def _stop(signum, _frame) -> None:
            # said in the log, so that what the agent did after it is plain: the turn under way
            # (a sync) ends, then the agent exits, leaving the datapath as it is
            log.info("lbctl run: %s received: exiting once the turn under way (if any) ends",
                     signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)
        if args.mode == "ebpf":
            log.info("lbctl run: %s, devices %s, uplinks %s, maps %s", where,
                     ",".join(mode.cfg.devices), ",".join(mode.cfg.uplink_devices) or "none",
                     mode.cfg.pin_dir)
        else:
            log.info("lbctl run --mode %s: %s", args.mode, where)
        try:
            agent.run(stop, max_seconds=args.max_seconds)
        except SourceUnavailable as exc:
            fix = ("check --kubeconfig/--master and that the API server answers" if args.source == "kubernetes"
                   else "fix --manifests, or create the directory")
            log.error("lbctl run: %s; not starting, nothing on this node was changed (%s, and start "
                      "again)", exc, fix)
            return 1
        except ebpf.DatapathError as exc:
            log.error("%s", exc)
            return 1
        return 0
    finally:
        if operations is not None:
            operations.stop()
        if source is not None and hasattr(source, "stop"):
            source.stop()
        lock.release()


def start_operations(args, source, where: str):
    """What `lbctl run` serves besides the datapath, as kube-proxy: /healthz and /livez, /metrics,
    the healthCheckNodePorts, the status file. `source`'s Node object (``source.node``, where
    the source watches it) makes /healthz 503 while the node is being deleted."""
    from lbctl.agent import health, metrics, servicehealth, status
    from lbctl.cli import config

    status.restrict_files(args.pin_dir)     # what an earlier run (older umask) left
    node = config.node_name(args)
    proxy = health.ProxyHealth(timeout=2 * args.sync_period, node=lambda: getattr(source, "node", None))
    listeners: dict[str, str] = {}
    ops = status.Operations(mode=args.mode, source=where, pin_dir=args.pin_dir, node_name=node,
                            health=proxy, metrics=metrics.Metrics(
                                args.mode, args.pin_dir if args.mode == "ebpf" else None, proxy),
                            listeners=listeners)
    try:
        node_ips = config._node_ips(args)
    except ValueError:
        node_ips = ()
    addresses = servicehealth.listen_addresses(config.nodeport_addresses(args), node_ips,
                                               servicehealth.host_ipv4_addresses)
    ops.service_health = servicehealth.ServiceHealthServer(node, addresses, proxy.is_healthy)
    if args.healthz_bind_address:
        ops.servers.append(health.serve_health(proxy, args.healthz_bind_address, args.bind_address_hard_fail))
        listeners["healthz"] = args.healthz_bind_address
    if args.metrics_bind_address:
        ops.servers.append(metrics.serve_metrics(ops.metrics, args.metrics_bind_address,
                                                 args.bind_address_hard_fail))
        listeners["metrics"] = args.metrics_bind_address
    return ops


def cmd_status(args) -> int:
    from lbctl.agent import status

    return status.cmd_status(args)


def cmd_dump_maps(args) -> int:
    from lbctl.datapath.ebpf import dump

    try:
        state = dump.collect(args.pin_dir)
    except (FileNotFoundError, PermissionError) as exc:
        print(f"lbctl dump maps: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2) if args.json else dump.format_table(state))
    return 0


def cmd_trace(args) -> int:
    """`lbctl trace`: the datapath's own program decides (its trace build, on a crafted frame,
    against the pinned maps; nothing is written). Exit 0, 1 (cannot trace), 2 (bad arguments)."""
    from lbctl.datapath.ebpf import trace

    try:
        src, sport, _ = trace.parse_endpoint(args.source, "source")
        dst, dport, proto = trace.parse_endpoint(args.destination, "destination", with_proto=True)
        flags = trace.parse_tcp_flags(args.tcp_flags) if proto == "tcp" else ""
    except ValueError as exc:
        print(f"lbctl trace: {exc}", file=sys.stderr)
        return 2
    def _terminated(signum, _frame):
        # an exception, so that the trace removes its temporary pins on the way out
        raise SystemExit(128 + signum)

    handlers = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = trace.trace(args.pin_dir, trace.Packet(src, sport, dst, dport, proto, flags),
                             uplink=args.uplink)
    except trace.TraceError as exc:
        print(f"lbctl trace: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lbctl trace: {exc.strerror or exc}"
              f"{f': {exc.filename}' if exc.filename else ''} (run as root?)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print("\n".join(result.lines()))
    return 0


def cmd_cleanup(args) -> int:
    """Removes exactly what lbctl created: our tc filters (and clsact left empty by them),
    pinned maps, the agent's state files, the kube-proxy modes' rules (iptables chains and jump
    rules, the nftables table, IPVS objects), and labs that `lbctl lab up` built.

    Not while an agent runs (it would keep programming what cleanup removes, and its node would
    be left half served): that needs --force. The lock is held meanwhile, so no agent starts."""
    from lbctl.agent.lock import AgentLock, AgentRunning, running_agents
    from lbctl.datapath.base import MODES, cleanup_mode
    from lbctl.datapath.ebpf import dump, trace
    from lbctl.lab import cluster as lab

    lock = AgentLock(args.pin_dir, "lbctl cleanup")
    try:
        lock.acquire()
        others = running_agents(exclude=lock.path)
    except AgentRunning as exc:
        lock.release()
        others = [exc.holder]
    except OSError as exc:
        print(f"lbctl cleanup: cannot read the agent locks in {dump.state_dir()}: {exc.strerror or exc} "
              "(run as root)", file=sys.stderr)
        return 1
    try:
        if others and not args.force:
            for holder in others:
                print(f"lbctl cleanup: an lbctl agent is running: {holder}", file=sys.stderr)
            print("lbctl cleanup: refused, it would remove what a running agent programs; stop the "
                  "agent first, or give --force (the agent then re-creates what it owns at its next "
                  "resync)", file=sys.stderr)
            return 1
        for holder in others:
            print(f"lbctl cleanup: --force: removing what a running agent programs ({holder})",
                  file=sys.stderr)
        removed, failed = [], []
        for name in MODES:
            try:
                removed += cleanup_mode(name, args.pin_dir)
            except Exception as exc:
                failed.append(f"{name} mode: {exc}")
        for leftover in trace.remove_stale_pin_dirs(trace.pins_parent(args.pin_dir)):
            removed.append(f"leftover pins of a killed `lbctl trace` {leftover}")
        from lbctl.agent.status import status_file

        for state in (dump.source_state_file(args.pin_dir), status_file(args.pin_dir)):
            if os.path.exists(state):
                os.unlink(state)
                removed.append(f"state file {state}")
        labs = []
        if not args.keep_labs:
            for path in sorted(lab.RUN_DIR.glob("lab-*.json")):
                prefix = path.name[len("lab-"):-len(".json")]
                lab.lab_down(prefix)
                labs.append(prefix)
        for what in removed:
            print(f"removed {what}")
        for what in failed:
            print(f"lbctl cleanup: {what}", file=sys.stderr)
        print(f"removed {len(removed)} datapath object(s); labs removed: {', '.join(labs) or 'none'}")
        return 1 if failed else 0
    finally:
        lock.release()


def cmd_bench(args) -> int:
    """`lbctl bench`: the tc program through BPF_PROG_TEST_RUN, or with --modes every datapath
    end to end (lbctl.bench.modes), or with --k8s-latency how long a change in the API server
    takes to reach the datapath (lbctl.bench.k8s_latency)."""
    if args.compare:
        if args.k8s_latency:
            print("lbctl bench: --compare and --k8s-latency are two benchmarks; give one", file=sys.stderr)
            return 2
        from lbctl.bench.compare import cmd_bench_compare
        return cmd_bench_compare(args)
    if args.k8s_latency:
        if args.modes:
            print("lbctl bench: --k8s-latency and --modes are two benchmarks; give one", file=sys.stderr)
            return 2
        from lbctl.bench.k8s_latency import cmd_bench_k8s_latency
        return cmd_bench_k8s_latency(args)
    if args.modes:
        from lbctl.bench.modes import cmd_bench_modes
        return cmd_bench_modes(args)
    from lbctl.bench import prog as bench

    args.services = args.services or "10,100000"
    return bench.cmd_bench(args)


def cmd_demo(args) -> int:
    from lbctl.cli.demo import run_demo

    return run_demo(requests=args.requests, keep=args.keep, nodes=args.nodes, kubernetes=args.kubernetes)


def version() -> str:
    import lbctl

    number = getattr(lbctl, "__version__", None)
    if number is None:   # lbctl imported as a namespace package (an editable install's finder)
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            number = installed("lbctl")
        except PackageNotFoundError:
            number = "0+unknown"
    return f"lbctl {number}"


def _verbosity_flag(parser: argparse.ArgumentParser, default) -> None:
    from lbctl.cli import argtypes

    parser.add_argument("-v", "--v", default=default, type=argtypes.int_range(0), metavar="N",
                        help="log verbosity, as kube-proxy's: 0 changes and problems, 2 a line per "
                             "sync, 4 and more debugging")


def build_parser() -> argparse.ArgumentParser:
    from lbctl.cli import argtypes, config

    parser = argparse.ArgumentParser(prog="lbctl", description="eBPF replacement for kube-proxy")
    _verbosity_flag(parser, 0)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)

    d = ebpf.DatapathConfig()
    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--source", default="manifests", choices=["manifests", "kubernetes"],
                     help="where Services and EndpointSlices come from: a directory of manifests, or "
                          "the API server (list and watch, as kube-proxy) (%(default)s)")
    run.add_argument("--manifests", default=DEFAULT_MANIFESTS,
                     help="directory of Service/EndpointSlice/Endpoints YAML (%(default)s)")
    run.add_argument("--kubeconfig", default=None, metavar="FILE",
                     help="kubernetes: the kubeconfig to reach the API server with (default: the "
                          "in-cluster ServiceAccount, KUBERNETES_SERVICE_HOST/PORT)")
    run.add_argument("--master", default=None, metavar="URL",
                     help="kubernetes: the API server's address, overriding the kubeconfig's (reach "
                          "it without the `kubernetes` ClusterIP lbctl provides itself)")
    run.add_argument("--mode", default="ebpf", choices=["ebpf", "iptables", "nftables", "ipvs"],
                     help="datapath: ebpf (tc programs and BPF maps), or kube-proxy v1.32's "
                          "iptables, nftables or ipvs mode (%(default)s)")
    run.add_argument("--devices", default=",".join(ebpf.DEFAULT_DEVICES),
                     help="ebpf: comma-separated link name patterns to attach to (%(default)s)")
    run.add_argument("--uplink-devices", default=None, metavar="PATTERNS",
                     help="ebpf: the node's links towards other nodes and outside (NodePort, "
                          "externalIPs, LoadBalancer from outside): XDP and tc programs; "
                          "comma-separated patterns, \"none\" for none (default: the default "
                          "route's interface)")
    run.add_argument("--xdp", default="auto", choices=["auto", "native", "generic", "off"],
                     help="ebpf: XDP on uplinks: native, else generic (auto), only one of them, "
                          "or off (tc alone) (%(default)s)")
    run.add_argument("--cgroup-root", nargs="?", const="/sys/fs/cgroup/unified", default=None,
                     metavar="CGROUP2_DIR",
                     help="ebpf: balance host-originated traffic (the node's processes, hostNetwork "
                          "pods) at the socket, with cgroup programs attached to this cgroup v2 "
                          "directory; given alone: %(const)s, the whole node. Default: off")
    _datapath_args(run)
    kp = run.add_argument_group("kube-proxy's flags (every mode; ebpf takes --node-ip, --cluster-cidr, "
                                "--masquerade-all, --nodeport-addresses, --masquerade-bit)")
    config.add_kube_proxy_flags(kp, required=False)
    kp.add_argument("--full-sync-every", type=argtypes.positive_int, default=10, metavar="N",
                    help="iptables/nftables: every Nth sync rewrites everything, the others only "
                         "what changed (%(default)s)")
    run.add_argument("--max-services", type=argtypes.id_count, default=d.max_services,
                     help="service ids, one per VIP:port/proto (%(default)s)")
    run.add_argument("--max-backends", type=argtypes.id_count, default=d.max_backends,
                     help="backend ids, one per endpoint address:port/proto (%(default)s)")
    run.add_argument("--services-map-size", type=argtypes.map_size, default=d.services_map_size,
                     help="frontends + backend slots (%(default)s)")
    run.add_argument("--ct-size", type=argtypes.map_size, default=d.ct_size,
                     help="conntrack entries, two per flow (%(default)s)")
    run.add_argument("--maglev-table-size", type=argtypes.maglev_table_size, default=d.maglev_table_size,
                     metavar="M", help="ebpf: slots of the Maglev table of a service annotated "
                     "lbctl.io/lb-algorithm: maglev without lbctl.io/maglev-table-size; a prime "
                     "(%(default)s, as Cilium)")
    run.add_argument("--interval", type=argtypes.positive_float, default=1.0,
                     help="seconds between manifest polls (%(default)s)")
    config.add_source_flags(run)
    run.add_argument("--min-sync-period", type=argtypes.non_negative_float, default=1.0, metavar="SECONDS",
                     help="changes coalesce into at most one sync per this many seconds; a change "
                          "after a quiet period is synced at once (kube-proxy's --min-sync-period; "
                          "%(default)s)")
    run.add_argument("--sync-period", type=argtypes.positive_float, default=30.0, metavar="SECONDS",
                     help="seconds between full resyncs, which read the kernel back and repair "
                          "whatever changed behind the agent's back (kube-proxy's --sync-period; "
                          "%(default)s)")
    run.add_argument("--detach-on-exit", action="store_true",
                     help="on exit detach programs and unpin maps (default: leave the datapath "
                          "serving, so a restart moves no flow)")
    run.add_argument("--max-seconds", type=argtypes.positive_float, default=None,
                     help="exit after this long")
    _verbosity_flag(run, argparse.SUPPRESS)   # `lbctl run -v 2`, as `kube-proxy -v 2`
    from lbctl.cli import kpconfig
    kpconfig.add_flags(run)
    run.set_defaults(func=cmd_run)

    status_p = sub.add_parser("status", help="the agent's last sync, counts and errors (every mode)")
    status_p.add_argument("--pin-dir", default=None,
                          help="only the agent of this pin dir (default: every agent's status file)")
    status_p.add_argument("--json", action="store_true")
    status_p.set_defaults(func=cmd_status)

    dump_p = sub.add_parser("dump", help="show datapath state")
    dump_sub = dump_p.add_subparsers(dest="what", required=True)
    maps = dump_sub.add_parser("maps", help="services, backends and counters from the pinned maps")
    maps.add_argument("--json", action="store_true")
    _datapath_args(maps)
    maps.set_defaults(func=cmd_dump_maps)

    trace = sub.add_parser(
        "trace", help="what the datapath does with one packet: its own program decides, on the "
                      "pinned maps, writing nothing")
    trace.add_argument("source", help="client IP:port (a pod, or a backend for a reply)")
    trace.add_argument("destination", help="IP:port[/tcp|udp] (a service, or a client for a reply)")
    trace.add_argument("--tcp-flags", default="S", metavar="FLAGS",
                       help="TCP flags of the packet: S (a new connection, the default), A (a "
                            "segment of an open one), FA, R... (letters S A F R P)")
    trace.add_argument("--uplink", action="store_true",
                       help="the packet arrives by the uplink (a client outside the node: NodePort, "
                            "externalIPs, LoadBalancer), not by a pod's link")
    trace.add_argument("--json", action="store_true")
    _datapath_args(trace)
    trace.set_defaults(func=cmd_trace)

    cleanup = sub.add_parser("cleanup", help="remove everything lbctl created")
    _datapath_args(cleanup)
    cleanup.add_argument("--keep-labs", action="store_true", help="leave `lbctl lab` labs up")
    cleanup.add_argument("--force", action="store_true",
                         help="even while an agent runs (it re-creates what it owns at its next resync)")
    cleanup.set_defaults(func=cmd_cleanup)

    from lbctl.lab import cluster as lab
    lab.register(sub)

    demo = sub.add_parser("demo", help="lab + agent + traffic + dump, then teardown")
    demo.add_argument("--keep", action="store_true", help="leave the lab and datapath up")
    demo.add_argument("--requests", type=argtypes.positive_int, default=300,
                      help="requests per service port (%(default)s)")
    demo.add_argument("--nodes", type=argtypes.positive_int, default=1,
                      help="lab nodes, each with its own agent; more than 1: web and dns also as "
                           "NodePorts, reached from the outside client on every node (%(default)s)")
    demo.add_argument("--kubernetes", action="store_true",
                      help="the real control plane too (`make k8s-bins`): the agent runs --source "
                           "kubernetes, and a Service is made with kubectl (`make demo-k8s`)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench", help="ns/packet through BPF_PROG_TEST_RUN; with --modes, new TCP connections "
                      "through each datapath (none, ebpf, iptables, nftables) side by side")
    bench.add_argument("--services", type=argtypes.counts, default=None,
                       help="comma-separated service counts (default 10,100000; with --modes "
                            "10,1000,10000; with --k8s-latency 1000,10000)")
    bench.add_argument("--backends", type=argtypes.positive_int, default=2,
                       help="backends per service (BPF_PROG_TEST_RUN bench)")
    bench.add_argument("--repeat", type=argtypes.positive_int, default=200_000,
                       help="runs per measured path (BPF_PROG_TEST_RUN bench)")
    bench.add_argument("--new-flows", type=argtypes.positive_int, default=2000,
                       help="new flows timed one by one (BPF_PROG_TEST_RUN bench)")
    bench.add_argument("--plot", default=None, help="write a PNG plot here")
    bench.add_argument("--json", action="store_true")
    modes = bench.add_argument_group(
        "datapaths side by side (--modes): a lab in network namespaces, the same services "
        "programmed by each mode in turn, real connections from a client pod")
    modes.add_argument("--modes", default=None, metavar="MODE[,MODE...]",
                       help="compare these: none (no load balancer, the baseline), ebpf, "
                            "iptables, nftables")
    modes.add_argument("--connections", type=argtypes.positive_int, default=5000,
                       help="connections per round, per mode and service count (%(default)s)")
    modes.add_argument("--seconds", type=argtypes.positive_float, default=10.0,
                       help="at most this long per round (%(default)s)")
    modes.add_argument("--rounds", type=argtypes.positive_int, default=3,
                       help="rounds per mode and service count; conn/s is the median (%(default)s)")
    modes.add_argument("--workers", type=argtypes.positive_int, default=4,
                       help="client processes, one connection in flight each (%(default)s)")
    modes.add_argument("--sync-timeout", type=argtypes.positive_float, default=300.0,
                       help="seconds one iptables-restore or nft transaction may take (%(default)s)")
    modes.add_argument("--nodes", type=argtypes.positive_int, default=1,
                       help="lab nodes (%(default)s: the root namespace is the node); 2: clients on "
                            "node 0, backends on node 1, plus NodePort from outside to node 0")
    k8s = bench.add_argument_group(
        "change to datapath (--k8s-latency): a lab, a real control plane (`make k8s-bins`) and "
        "`lbctl run --source kubernetes`; pod Ready flips through the API server, timed to the "
        "maps, to a client's traffic and by the agent's network-programming metric")
    k8s.add_argument("--k8s-latency", action="store_true",
                     help="run this benchmark (JSON and plot in --out-dir)")
    k8s.add_argument("--changes", type=argtypes.positive_int, default=None,
                     help="endpoint changes per service count (20; with --compare 5 per mode)")
    k8s.add_argument("--change-timeout", type=argtypes.positive_float, default=30.0, metavar="SECONDS",
                     help="give up on a change after this long (%(default)s)")
    k8s.add_argument("--out-dir", default="out",
                     help="where the JSON (raw samples) and the plot go (%(default)s)")
    compare = bench.add_argument_group(
        "against the real kube-proxy (--compare, `make bench`): a two-node lab, a real control "
        "plane, nginx backends and tools/connload; modes direct, ebpf, kube-proxy-iptables, "
        "kube-proxy-nftables, iptables, nftables (--modes chooses), one after another per "
        "--services count (default 1,1000,10000)")
    compare.add_argument("--compare", action="store_true",
                         help="run this benchmark (JSON, markdown and plots in --out-dir)")
    compare.add_argument("--endpoints", type=argtypes.positive_int, default=10,
                         help="endpoints per service, one nginx pod each (%(default)s)")
    compare.add_argument("--runs", type=argtypes.positive_int, default=3,
                         help="fixed-rate and max-rate runs per mode and count (%(default)s)")
    compare.add_argument("--rate", type=argtypes.positive_float, default=1000.0,
                         help="offered new connections/s of the fixed-rate runs (%(default)s)")
    compare.add_argument("--duration", type=argtypes.positive_float, default=4.0,
                         help="seconds per run (%(default)s)")
    compare.add_argument("--concurrency", type=argtypes.positive_int, default=16,
                         help="connections in flight in the max-rate runs (%(default)s)")
    compare.add_argument("--mode-max", default=None, metavar="MODE=N[,MODE=N...]",
                         help="run MODE only up to N services (its rows above say so): "
                              "one iptables-restore of lbctl's rendering of 10,000 services x 10 "
                              "endpoints took 84 min here")
    bench.set_defaults(func=cmd_bench)

    from lbctl.cli import render as render_cmd
    render_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lbctl import log as logs

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # --help, --version, or a refused flag (argparse said why)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    logs.setup(args.v)
    args.verbose = args.v > 0     # what `lbctl bench --modes` reads (it was `-v` alone before -v N)
    if getattr(args, "config", None):
        from lbctl.cli import kpconfig

        try:
            at = argv.index(args.command)
            kpconfig.apply(args, kpconfig.subparser(parser, args.command), argv[at + 1:], argv[:at])
        except kpconfig.ConfigError as exc:
            log.error("lbctl %s --config: %s", args.command, exc)
            return 2
        logging.getLogger().setLevel(logs.V(args.v))
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lbctl dump maps | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        logs.flush()


if __name__ == "__main__":
    sys.exit(main())
