"""`lbctl demo` (what `make demo` runs): lab, agent, traffic, spread, dump, teardown."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from lbctl.agent.lock import AgentLock, AgentRunning, running_agents
from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf import dump
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode, ProxySettings
from lbctl.lab import cluster as lab
from lbctl.lab import kube, netns
from lbctl.lab.client import request_spread
from lbctl.sources.manifests import ManifestSource

log = logging.getLogger("lbctl.cli.demo")


def bar(share: float, width: int = 30) -> str:
    return "#" * round(share * width)


def spread_table(results: list[tuple[str, str, dict]] | list[tuple[str, str, str, dict]]) -> str:
    """Answers per backend. Rows are (service port, target, report), or (from, service port,
    target, report) when the traffic comes from several places (a pod, the outside client)."""
    sourced = bool(results) and len(results[0]) == 4
    head = f"{'FROM':<22} " if sourced else ""
    lines = [f"{head}{'SERVICE PORT':<24} {'CLUSTER IP' if not sourced else 'TARGET':<22} {'BACKEND':<8} "
             f"{'ANSWERS':>7} {'SHARE':>6}"]
    for row in results:
        source, name, target, report = row if len(row) == 4 else ("", *row)
        answers = report["answers"]
        total = sum(answers.values())
        for pod in sorted(answers):
            share = answers[pod] / total if total else 0
            first = f"{source:<22} " if sourced else ""
            lines.append(f"{first}{name:<24} {target:<22} {pod:<8} {answers[pod]:>7} {share:>6.1%}  {bar(share)}")
            source = name = target = ""
        errors = {k: v for k, v in report["errors"].items() if v}
        if errors or not answers:
            lines.append(f"{head and ' ' * 23}{'':<24} {'':<22} errors: {errors or 'no answer'}")
    return "\n".join(lines)


def plot_spread(results: list[tuple[str, str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, (name, target, report) in zip(axes[0], results):
        pods = sorted(report["answers"])
        counts = [report["answers"][p] for p in pods]
        ax.bar(pods, counts, color="#3b7dd8")
        total = sum(counts)
        if pods:
            ax.axhline(total / len(pods), color="grey", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(f"{name}\n{target}", fontsize=9)
        ax.set_ylabel("answers")
        ax.legend(fontsize=7)
    fig.suptitle("lbctl demo: requests per backend through the service", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEMO_PIN_DIR = "/sys/fs/bpf/lbctl-demo"   # its own maps, and so its own tc filter name
DEMO_PREFIX = "lbdemo"                    # its own lab: netns lbdemo-*, links vethlbdemo*
DEMO_POD_CIDR, DEMO_GATEWAY = "10.244.100.0/24", "10.244.100.1"   # beside a default lab's
NODE_PORTS = {"http": 30080, "dns": 30053, "dns-tcp": 30053}      # --nodes N: web and dns as NodePorts
KUBECTL_SERVICE = "hello"                 # --kubernetes: the Service the demo makes with kubectl
KUBECTL_SERVICE_PORT = 8080               # on the web pods' port (8080)


def demo_spec(nodes: int = 1, kubernetes: bool = False) -> lab.LabSpec:
    return lab.LabSpec(prefix=DEMO_PREFIX, pod_cidr=DEMO_POD_CIDR, gateway=DEMO_GATEWAY, nodes=nodes,
                       kubernetes=kubernetes)


def demo_config() -> ebpf.DatapathConfig:
    """Only the demo lab's pod links, and maps of its own: a user's lab, maps and links (and an
    agent's) are never touched."""
    return ebpf.DatapathConfig(pin_dir=DEMO_PIN_DIR, devices=(f"veth{DEMO_PREFIX}*",),
                               node_name=lab.NODE_NAME)


def node_config(node: lab.Node) -> ebpf.DatapathConfig:
    """A node of a multi-node demo lab: its own pin dir, pod links, uplink eth0 (XDP, tc as
    fallback), node name and cgroup (socket load balancing of its host processes)."""
    return ebpf.DatapathConfig(pin_dir=node.pin_dir, devices=(f"veth{DEMO_PREFIX}*",),
                               uplink_devices=(node.uplink,), node_name=node.name,
                               cgroup_root=node.cgroup)


def run_demo(requests: int = 300, keep: bool = False, plot: Path | None = Path("out/demo-spread.png"),
             nodes: int = 1, kubernetes: bool = False) -> int:
    """The demo, next to nothing: it refuses to run beside an lbctl agent (whose filters would
    see the demo's pods too), holds the agent lock of its own pin dir while it runs, and tears
    down only what it made."""
    if kubernetes and nodes != 1:
        # the agents of a multi-node lab run inside the nodes' namespaces, where the lab's API
        # server (on this machine's loopback) cannot be reached
        print("lbctl demo: --kubernetes runs on one node (the lab's API server listens on this "
              "machine's loopback, which the nodes' namespaces do not reach): drop --nodes",
              file=sys.stderr)
        return 2
    lock = AgentLock(DEMO_PIN_DIR, "lbctl demo")
    try:
        lock.acquire()
        others = running_agents(exclude=lock.path)
    except AgentRunning as exc:
        print(f"lbctl demo: {exc}", file=sys.stderr)
        return 1
    try:
        if others:
            for holder in others:
                print(f"lbctl demo: refused, an lbctl agent runs on this node ({holder}); the demo "
                      "runs its own agent and must not share the node's pod links with another: "
                      "stop that agent first", file=sys.stderr)
            return 1
        return _demo(requests, keep, plot, nodes, kubernetes)
    finally:
        lock.release()


class DemoAgent:
    """One node's agent, in a thread (inside the node's namespace when it has one)."""

    def __init__(self, node: lab.Node | None, source: Any, mode: EbpfMode, keep: bool, describe: str):
        self.node, self.mode, self.describe = node, mode, describe
        self.pin_dir = mode.cfg.pin_dir
        self.agent = Agent(source, options=AgentOptions(interval=0.5, detach_on_exit=not keep), mode=mode)
        self.stop = threading.Event()
        ns = node.ns if node else None
        self.thread = threading.Thread(target=netns.in_netns, args=(ns, self.agent.run, self.stop, 600),
                                       name=f"agent-{node.name if node else 'demo'}", daemon=True)

    def start(self) -> None:
        print(f">> {self.describe} (in the background)")
        self.thread.start()
        deadline = time.monotonic() + 90
        while not self.agent.synced.wait(0.2):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the agent did not program the services within 90 s (see the log above)")

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(30)


def _demo(requests: int, keep: bool, plot: Path | None, nodes: int, kubernetes: bool) -> int:
    what = "pods in network namespaces" + (f" on {nodes} nodes" if nodes > 1 else "")
    print(f">> lbctl lab up --prefix {DEMO_PREFIX}" + (f" --nodes {nodes}" if nodes > 1 else "")
          + (" --kubernetes" if kubernetes else "") + f": {what}"
          + (", a real control plane holding them" if kubernetes else ", manifests for their services"))
    start = time.monotonic()
    try:
        state = lab.lab_up(demo_spec(nodes, kubernetes))
    except (lab.LabError, ValueError, kube.ControlPlaneError) as exc:
        print(f"lbctl demo: {exc}", file=sys.stderr)
        return 1
    print(lab.describe(state))
    if state.made.kube_dir:
        print(kube.describe(Path(state.made.kube_dir)))
    print(f"(up in {time.monotonic() - start:.1f} s)")
    agents: list[DemoAgent] = []
    sources: list[Any] = []
    try:
        cp = kube.ControlPlane.attach(Path(state.made.kube_dir)) if state.made.kube_dir else None
        services = lab_targets(state)
        if cp is not None:
            services.append(kubectl_service(cp))
        if nodes > 1:
            expose_node_ports(state)
        for node in state.node_list() if nodes > 1 else [None]:
            agents.append(start_agent(state, node, cp, keep, sources))
        results = send_traffic(state, services, requests)
        print("\n" + spread_table(results if nodes > 1 else [row[1:] for row in results]))
        if plot:
            plot_spread([(f"{src} -> {name}", target, report) for src, name, target, report in results]
                        if nodes > 1 else [row[1:] for row in results], plot)
            print(f"\n(plot: {plot})")
        for agent in agents:
            where = f" (node {agent.node.name})" if agent.node else ""
            print(f"\n>> lbctl dump maps --pin-dir {agent.pin_dir}{where}")
            ns = agent.node.ns if agent.node else None
            print(dump.format_table(netns.in_netns(ns, dump.collect, agent.pin_dir, agent.mode.cfg.tc_name)))
        failed = sum(sum(r["errors"].values()) + (not r["answers"]) for *_, r in results)
        return 1 if failed else 0
    finally:
        for agent in agents:
            agent.halt()
        for source in sources:
            source.stop()
        if keep:
            print(f"\n>> left up (--keep): lab '{state.prefix}', programs attached, maps pinned under "
                  f"{', '.join(a.pin_dir for a in agents)}.\n"
                  f"   lbctl lab down --prefix {state.prefix} && "
                  + " && ".join(f"lbctl cleanup --pin-dir {a.pin_dir} --keep-labs" for a in agents)
                  + "   removes everything")
        else:
            print("\n>> teardown: agents detached, maps unpinned, lab down"
                  + (", control plane stopped" if kubernetes else ""))
            for agent in agents:
                if os.path.exists(dump.source_state_file(agent.pin_dir)):
                    os.unlink(dump.source_state_file(agent.pin_dir))
            lab.lab_down(state.prefix)
        print(f"(demo: {time.monotonic() - start:.1f} s from lab up to teardown)")


Target = tuple[str, str, str, int, str]   # service key, port name, protocol, port, cluster IP


def lab_targets(state: lab.LabState) -> list[Target]:
    return [(svc.key, port.name, port.protocol, port.port, svc.cluster_ip)
            for svc in state.services.values() for port in svc.ports]


def kubectl_service(cp: kube.ControlPlane) -> Target:
    """A Service made the way a user makes one: `kubectl apply`, the API server allocating the
    ClusterIP, the EndpointSlice controller finding the web pods (label app=web)."""
    manifest = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": KUBECTL_SERVICE, "namespace": "default"},
                "spec": {"selector": {"app": "web"},
                         "ports": [{"name": "http", "port": KUBECTL_SERVICE_PORT, "protocol": "TCP",
                                    "targetPort": 8080}]}}
    text = yaml.safe_dump(manifest, sort_keys=False)
    print(f"\n>> kubectl --kubeconfig {cp.kubeconfig} apply -f - <<EOF\n{text}EOF")
    print(cp.kubectl("apply", "-f", "-", input=text).stdout.rstrip())
    cp.wait_for_endpoints({("default", KUBECTL_SERVICE): ("web-0", "web-1", "web-2")},
                          time.monotonic() + 60)
    for args in (("get", "service", KUBECTL_SERVICE, "-o", "wide"),
                 ("get", "endpointslices", "-l", f"kubernetes.io/service-name={KUBECTL_SERVICE}")):
        print(f">> kubectl {' '.join(args)}")
        print(cp.kubectl(*args).stdout.rstrip())
    ip = cp.kubectl("get", "service", KUBECTL_SERVICE, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    return (f"default/{KUBECTL_SERVICE}", "http", "TCP", KUBECTL_SERVICE_PORT, ip)


def expose_node_ports(state: lab.LabState) -> None:
    """Several nodes: web and dns become NodePorts (the manifests the agents read)."""
    for svc in state.services.values():
        path = Path(state.manifests_dir) / f"{svc.namespace}-{svc.name}.service.yaml"
        manifest = yaml.safe_load(path.read_text())
        manifest["spec"]["type"] = "NodePort"
        for port in manifest["spec"]["ports"]:
            port["nodePort"] = NODE_PORTS[port["name"]]
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        print(f">> {svc.key}: type NodePort, "
              + ", ".join(f"{p['name']} {p['nodePort']}/{p['protocol']}" for p in manifest["spec"]["ports"]))


def start_agent(state: lab.LabState, node: lab.Node | None, cp: kube.ControlPlane | None, keep: bool,
                sources: list[Any]) -> DemoAgent:
    if node is None:
        cfg = demo_config()
        mode = EbpfMode(cfg, switch_modes=False)   # a guest: other modes' rules stay
        flags = f"--pin-dir {cfg.pin_dir} --devices 'veth{DEMO_PREFIX}*' --node-name {cfg.node_name}"
    else:
        cfg = node_config(node)
        mode = EbpfMode(cfg, switch_modes=False,
                        settings=ProxySettings(node_ips=(node.ip,), cluster_cidr=state.spec.cluster_cidr))
        flags = (f"--pin-dir {cfg.pin_dir} --devices 'veth{DEMO_PREFIX}*' --uplink-devices {node.uplink} "
                 f"--node-name {node.name} --node-ip {node.ip} --cluster-cidr {state.spec.cluster_cidr} "
                 f"--cgroup-root {node.cgroup}")
    if cp is not None:
        from lbctl.sources.kubernetes import KubernetesSource, api_client
        source: Any = KubernetesSource(api_client(str(cp.kubeconfig)), cfg.node_name)
        sources.append(source)
        describe = f"lbctl run --source kubernetes --kubeconfig {cp.kubeconfig} {flags}"
    else:
        source = ManifestSource(state.manifests_dir, interval=0.5,
                                state_path=dump.source_state_file(cfg.pin_dir))
        describe = f"lbctl run --manifests {state.manifests_dir} {flags}"
    if node is not None and node.ns:
        describe = f"ip netns exec {node.ns} {describe}"
    agent = DemoAgent(node, source, mode, keep, describe)
    agent.start()
    return agent


def send_traffic(state: lab.LabState, services: list[Target], requests: int) -> list[tuple[str, str, str, dict]]:
    """Every service port from the first client pod (node 0); with several nodes also every
    NodePort from the outside client to each node."""
    client = state.clients[0]
    where = f" on {state.pods[client].node}" if len(state.nodes) > 1 else ""
    plan = [(f"{client}{where}", state.pods[client].ns, key, port_name, proto, f"{ip}:{port}")
            for key, port_name, proto, port, ip in services]
    if len(state.nodes) > 1:
        for node in state.node_list():
            plan += [(f"outside -> {node.name}", state.outside_ns, key, port_name, proto,
                      f"{node.ip}:{NODE_PORTS[port_name]}")
                     for key, port_name, proto, _port, _ip in services]
    results = []
    for source, ns, key, port_name, proto, target in plan:
        print(f">> {requests} {proto} requests from {source} to {key}:{port_name} at {target}")
        report = request_spread(ns, proto.lower(), target, requests)
        results.append((source, f"{key}:{port_name}", f"{target}/{proto}", report))
    return results
