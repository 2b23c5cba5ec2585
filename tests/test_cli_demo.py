"""`lbctl demo` beside a user's lab: it runs on a lab, maps and links of its own, and leaves the
user's as they were. Needs root (a lab in network namespaces, the BPF program)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lbctl.agent.lock import running_agents
from lbctl.cli import demo
from lbctl.datapath.base import DEFAULT_PIN_DIR
from lbctl.lab import cluster as lab
from lbctl.lab import netns

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.root, pytest.mark.netns]


def test_the_demo_leaves_a_users_lab_and_maps_alone(tmp_path, capsys):
    prefix = f"lbu{os.getpid() % 1000}"
    users = lab.lab_up(lab.LabSpec(prefix=prefix, pod_cidr="10.244.202.0/24", gateway="10.244.202.1"),
                       tmp_path / "m")
    default_pins_before = os.path.exists(DEFAULT_PIN_DIR)
    try:
        assert demo.run_demo(requests=30, plot=None) == 0
        out = capsys.readouterr().out
        assert f"--pin-dir {demo.DEMO_PIN_DIR}" in out and "web-0" in out
        assert lab.state_path(prefix).exists(), "the user's lab is still up"
        assert all(subprocess.run(["ip", "netns", "pids", ns], capture_output=True).returncode == 0
                   for ns in users.namespaces())
        filters = subprocess.run(["tc", "filter", "show", "dev", users.host_links()[0], "ingress"],
                                 capture_output=True, text=True).stdout
        assert "lbctl" not in filters, "no filter on the user's links"
        assert os.path.exists(DEFAULT_PIN_DIR) == default_pins_before, "the node's pin dir untouched"
        assert not os.path.exists(demo.DEMO_PIN_DIR), "the demo's own maps are gone"
        assert not lab.state_path(demo.DEMO_PREFIX).exists(), "the demo's lab is down"
        assert running_agents() == []
    finally:
        lab.lab_down(prefix)
        lab.lab_down(demo.DEMO_PREFIX)


def answered_rows(out: str) -> dict[tuple[str, str], set[str]]:
    """(from, target) -> backends that answered, read from the demo's table by its columns
    (FROM 22, SERVICE PORT 24, TARGET 22, then BACKEND)."""
    rows: dict[tuple[str, str], set[str]] = {}
    table = out.split("\nFROM ", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    key = ("", "")
    for line in table:
        if "errors:" in line:
            continue
        if line[:22].strip():
            key = (line[:22].strip(), line[48:70].strip())
        rows.setdefault(key, set()).add(line[71:].split()[0])
    return rows


def nothing_left(prefix: str, pin_dirs: list[str]) -> None:
    assert not lab.state_path(prefix).exists(), "the demo's lab is down"
    assert not [ns for ns in netns.list_netns() if ns.startswith(prefix)], "no namespace left"
    assert not [p for p in pin_dirs if os.path.exists(p)], "no pinned maps left"
    assert not os.path.exists(str(lab.CGROUP_ROOT / f"lbctl-lab-{prefix}")), "no cgroup left"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"veth{prefix}" not in links and f"br{prefix}" not in links
    assert running_agents() == []


def test_the_demo_on_two_nodes_spreads_clusterip_and_nodeports_over_both(capsys):
    assert demo.run_demo(requests=60, plot=None, nodes=2) == 0
    out = capsys.readouterr().out
    state_nodes = lab.plan_nodes(demo.demo_spec(nodes=2))
    rows = answered_rows(out)
    web = {"web-0", "web-1", "web-2"}      # web-1 on node 1, web-0 and web-2 on node 0
    dns = {"dns-0", "dns-1"}
    assert rows[("client-0 on lab-node", "10.96.0.10:80/TCP")] == web
    assert rows[("client-0 on lab-node", "10.96.0.53:53/UDP")] == dns
    for node in state_nodes.values():
        assert rows[(f"outside -> {node.name}", f"{node.ip}:30080/TCP")] == web, node.name
        assert rows[(f"outside -> {node.name}", f"{node.ip}:30053/UDP")] == dns, node.name
        assert f"lbctl dump maps --pin-dir {node.pin_dir} (node {node.name})" in out
        assert "link eth0 (uplink): xdp" in out
    assert "errors:" not in out
    nothing_left(demo.DEMO_PREFIX, [n.pin_dir for n in state_nodes.values()])


def test_the_demo_refuses_kubernetes_on_several_nodes_and_too_many_nodes(capsys):
    assert demo.run_demo(requests=1, plot=None, nodes=2, kubernetes=True) == 2
    assert "--kubernetes runs on one node" in capsys.readouterr().err
    assert demo.run_demo(requests=1, plot=None, nodes=17) == 1
    assert "--nodes 17: a lab has 1 to 16 nodes" in capsys.readouterr().err
    assert not lab.state_path(demo.DEMO_PREFIX).exists()


@pytest.mark.kube
def test_make_demo_k8s_answers_from_every_backend_through_a_kubectl_service(tmp_path):
    """`make demo-k8s` as a user runs it: the Makefile's prerequisites, the real control plane,
    the agent --source kubernetes, a Service made with kubectl; then nothing is left."""
    env = {**os.environ, "DEMO_ARGS": "--requests 60"}
    proc = subprocess.run(["make", "-C", str(ROOT), "demo-k8s"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "service/hello created" in out, "the kubectl command and its output are shown"
    assert "lbctl run --source kubernetes --kubeconfig" in out
    table = out.split("\nSERVICE PORT", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    answered: dict[str, set[str]] = {}
    name = ""
    for line in table:
        if not line.startswith(" "):
            name = line.split()[0]
        answered.setdefault(name, set()).add(line[48:].split()[0])
    assert answered["default/hello:http"] == {"web-0", "web-1", "web-2"}
    assert answered["default/web:http"] == {"web-0", "web-1", "web-2"}
    assert answered["default/dns:dns"] == {"dns-0", "dns-1"}
    assert "errors:" not in out
    assert "default/hello:http" in out.split(">> lbctl dump maps", 1)[1], "the dump lists it"
    assert "control plane stopped" in out
    nothing_left(demo.DEMO_PREFIX, [demo.DEMO_PIN_DIR])
    assert not (lab.work_dir(demo.DEMO_PREFIX) / "kube").exists(), "the control plane's files are gone"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "lab-lbdemo/kube" not in ps, "no etcd or API server left running"
