"""`lbctl demo` (what `make demo` runs): lab, agent, traffic, spread, dump, teardown."""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from lbctl.agent.lock import AgentLock, AgentRunning, running_agents
from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf import dump
from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.lab import cluster as lab
from lbctl.lab.client import request_spread
from lbctl.sources.manifests import ManifestSource

log = logging.getLogger("lbctl.cli.demo")


def bar(share: float, width: int = 30) -> str:
    return "#" * round(share * width)


def spread_table(results: list[tuple[str, str, dict]]) -> str:
    lines = [f"{'SERVICE PORT':<24} {'CLUSTER IP':<22} {'BACKEND':<8} {'ANSWERS':>7} {'SHARE':>6}"]
    for name, target, report in results:
        answers = report["answers"]
        total = sum(answers.values())
        for pod in sorted(answers):
            share = answers[pod] / total if total else 0
            lines.append(f"{name:<24} {target:<22} {pod:<8} {answers[pod]:>7} {share:>6.1%}  {bar(share)}")
            name = target = ""
        errors = {k: v for k, v in report["errors"].items() if v}
        if errors:
            lines.append(f"{'':<24} {'':<22} errors: {errors}")
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
    fig.suptitle("lbctl demo: requests per backend through the ClusterIP", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEMO_PIN_DIR = "/sys/fs/bpf/lbctl-demo"   # its own maps, and so its own tc filter name
DEMO_PREFIX = "lbdemo"                    # its own lab: netns lbdemo-*, links vethlbdemo*
DEMO_POD_CIDR, DEMO_GATEWAY = "10.244.100.0/24", "10.244.100.1"   # beside a default lab's


def demo_spec() -> lab.LabSpec:
    return lab.LabSpec(prefix=DEMO_PREFIX, pod_cidr=DEMO_POD_CIDR, gateway=DEMO_GATEWAY)


def demo_config() -> ebpf.DatapathConfig:
    """Only the demo lab's pod links, and maps of its own: a user's lab, maps and links (and an
    agent's) are never touched."""
    return ebpf.DatapathConfig(pin_dir=DEMO_PIN_DIR, devices=(f"veth{DEMO_PREFIX}*",),
                               node_name=lab.NODE_NAME)


def run_demo(requests: int = 300, keep: bool = False, plot: Path | None = Path("out/demo-spread.png")) -> int:
    """The demo, next to nothing: it refuses to run beside an lbctl agent (whose filters would
    see the demo's pods too), holds the agent lock of its own pin dir while it runs, and tears
    down only what it made."""
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
        return _demo(requests, keep, plot)
    finally:
        lock.release()


def _demo(requests: int, keep: bool, plot: Path | None) -> int:
    print(">> lbctl lab up: pods in network namespaces, manifests for their services")
    state = lab.lab_up(demo_spec())
    print(lab.describe(state))
    cfg = demo_config()
    source_state = dump.source_state_file(cfg.pin_dir)
    agent = Agent(ManifestSource(state.manifests_dir, interval=0.5, state_path=source_state),
                  options=AgentOptions(interval=0.5, detach_on_exit=not keep),
                  mode=EbpfMode(cfg, switch_modes=False))   # a guest: other modes' rules stay
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), kwargs={"max_seconds": 600},
                              name="agent", daemon=True)
    try:
        print(f"\n>> lbctl run --manifests {state.manifests_dir} --pin-dir {cfg.pin_dir} (in the background)")
        thread.start()
        if not agent.synced.wait(60):
            raise RuntimeError("the agent did not program the services within 60 s (see the log above)")
        client = state.pods[state.clients[0]]
        results = []
        for svc in state.services.values():
            for port in svc.ports:
                target = f"{svc.cluster_ip}:{port.port}"
                print(f">> {requests} {port.protocol} requests from {state.clients[0]} to "
                      f"{svc.key}:{port.name} at {target}")
                report = request_spread(client.ns, port.protocol.lower(), target, requests)
                results.append((f"{svc.key}:{port.name}", f"{target}/{port.protocol}", report))
        print("\n" + spread_table(results))
        if plot:
            plot_spread(results, plot)
            print(f"\n(plot: {plot})")
        print(f"\n>> lbctl dump maps --pin-dir {cfg.pin_dir}")
        print(dump.format_table(dump.collect(cfg.pin_dir)))
        failed = sum(sum(r["errors"].values()) for _, _, r in results)
        return 1 if failed else 0
    finally:
        stop.set()
        thread.join(30)
        if keep:
            print(f"\n>> left up (--keep): lab '{state.prefix}', programs attached, maps pinned under {cfg.pin_dir}.\n"
                  f"   lbctl run --manifests {state.manifests_dir} --pin-dir {cfg.pin_dir} "
                  f"--devices 'veth{DEMO_PREFIX}*'   follows manifest changes\n"
                  f"   lbctl lab down --prefix {state.prefix} && lbctl cleanup --pin-dir {cfg.pin_dir} "
                  "--keep-labs   removes everything")
        else:
            print("\n>> teardown: agent detached, maps unpinned, lab down")
            if os.path.exists(source_state):
                os.unlink(source_state)
            lab.lab_down(state.prefix)
