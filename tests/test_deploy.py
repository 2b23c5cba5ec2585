"""deploy/: every manifest is accepted by the real API server (server-side dry run), the RBAC is
kube-proxy's system:node-proxier and no more, the DaemonSet is wired to what the agent needs,
and the image's kernel-header fallback really compiles the datapath."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
SA = "system:serviceaccount:kube-system:lbctl"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, over every manifest."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for path in MANIFESTS for doc in documents(path)}


def test_every_yaml_in_deploy_is_a_manifest_or_the_kind_config():
    every = sorted(p.relative_to(DEPLOY) for p in DEPLOY.rglob("*.y*ml"))
    assert every == sorted([p.relative_to(DEPLOY) for p in MANIFESTS] + [Path("kind/cluster.yaml")])
    kind = yaml.safe_load((DEPLOY / "kind/cluster.yaml").read_text())
    assert kind["kind"] == "Cluster" and kind["networking"]["kubeProxyMode"] == "none"
    assert kind["name"] + "-control-plane" == env(daemonset())["KUBERNETES_SERVICE_HOST"]


@pytest.mark.kube
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_accepted_by_the_api_server(kube_control_plane, path):
    out = kube_control_plane.kubectl("apply", "--dry-run=server", "-f", str(path), "-o", "name").stdout
    assert sorted(out.split()) == sorted(f"{doc['kind'].lower()}.{group(doc)}/{doc['metadata']['name']}"
                                         .replace("./", "/") for doc in documents(path))


def group(doc: dict) -> str:
    """The group part of `kubectl -o name` ("" for the core group)."""
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def normalized(rules: list[dict]) -> set[tuple]:
    """Rules as a set of (group, resource, verb) grants, the way the authorizer reads them."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule.get("verbs", [])}


@pytest.mark.kube
def test_cluster_role_is_the_bootstrap_node_proxier(kube_control_plane):
    live = json.loads(kube_control_plane.kubectl("get", "clusterrole", "system:node-proxier",
                                                 "-o", "json").stdout)
    ours = objects()[("ClusterRole", "lbctl:node-proxier")]
    assert normalized(ours["rules"]) == normalized(live["rules"])


@pytest.mark.kube
def test_service_account_can_do_what_kube_proxy_does_and_no_more(kube_control_plane):
    cp = kube_control_plane
    rbac = str(DEPLOY / "kubernetes/rbac.yaml")
    cp.kubectl("apply", "-f", rbac)
    try:
        def can(verb: str, resource: str) -> bool:
            proc = cp.kubectl("auth", "can-i", f"--as={SA}", verb, resource, "-A", check=False)
            return proc.stdout.strip() == "yes"

        allowed = [("list", "services"), ("watch", "services"), ("watch", "endpointslices.discovery.k8s.io"),
                   ("list", "endpointslices.discovery.k8s.io"), ("get", "nodes"), ("watch", "nodes"),
                   ("list", "servicecidrs.networking.k8s.io"), ("create", "events"),
                   ("patch", "events.events.k8s.io")]
        denied = [("get", "secrets"), ("list", "pods"), ("update", "services"), ("delete", "nodes"),
                  ("create", "endpointslices.discovery.k8s.io"), ("patch", "nodes/status"),
                  ("get", "configmaps")]
        assert [a for a in allowed if not can(*a)] == []
        assert [d for d in denied if can(*d)] == []
    finally:
        cp.kubectl("delete", "-f", rbac, "--wait=false")


def daemonset() -> dict:
    return objects()[("DaemonSet", "lbctl")]


def env(ds: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_daemonset_runs_like_kube_proxy():
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert (("ServiceAccount", pod["serviceAccountName"]) in objects())
    container = pod["containers"][0]
    assert container["securityContext"] == {"privileged": True}
    args = container["command"]
    assert args[:3] == ["/usr/local/bin/lbctl-entrypoint", "lbctl", "run"]
    assert "--source=kubernetes" in args


def test_daemonset_mounts_what_the_agent_uses():
    pod = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}

    def host_path(mount_path: str) -> str:
        return volumes[mounts[mount_path]["name"]]["hostPath"]["path"]

    assert host_path("/sys/fs/bpf") == "/sys/fs/bpf"
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"   # pins outlive the pod
    assert host_path("/run/lbctl/cgroupv2") == "/sys/fs/cgroup"
    assert host_path("/run/lbctl") == "/run/lbctl"
    assert host_path("/lib/modules") == "/lib/modules"
    assert host_path("/usr/src") == "/usr/src"
    # --config names a file of the ConfigMap that is mounted, and it is a KubeProxyConfiguration
    config_arg = next(a for a in pod["containers"][0]["command"] if a.startswith("--config="))
    config_path = Path(config_arg.split("=", 1)[1])
    config_map = objects()[("ConfigMap", volumes[mounts[str(config_path.parent)]["name"]]["configMap"]["name"])]
    kpc = yaml.safe_load(config_map["data"][config_path.name])
    assert kpc["kind"] == "KubeProxyConfiguration"
    assert kpc["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"


def entrypoint(modules: Path, shipped: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "BCC_KERNEL_SOURCE"}
    environ.update(LBCTL_MODULES_DIR=str(modules), LBCTL_SHIPPED_HEADERS=str(shipped))
    return subprocess.run([str(DEPLOY / "entrypoint.sh"), *argv], capture_output=True, text=True,
                          env=environ, timeout=300)


COMPILE = """
from bcc import BPF
from lbctl.datapath.ebpf import loader, shared, source
cfg = loader.DatapathConfig(pin_dir={pin!r})
bpf = BPF(text=source.program_text(shared.BPF_DIR / "prog" / "lbctl_tc.c"), cflags=cfg.cflags())
print(bpf.load_func(loader.PROGRAMS["ingress"].encode(), BPF.SCHED_CLS).fd > 0)
"""


def test_entrypoint_prefers_the_node_headers_and_names_the_fix_without_any(tmp_path):
    kver = os.uname().release
    (tmp_path / "node" / kver).mkdir(parents=True)
    (tmp_path / "node" / kver / "build").symlink_to(f"/lib/modules/{kver}/build")
    show = ("sh", "-c", "echo ${BCC_KERNEL_SOURCE:-unset}")
    node = entrypoint(tmp_path / "node", tmp_path / "none", *show)
    assert node.returncode == 0 and node.stdout.strip() == "unset", node.stderr
    assert "the node's" in node.stderr
    neither = entrypoint(tmp_path / "empty", tmp_path / "none", *show)
    assert neither.returncode == 1 and neither.stdout == ""
    assert f"install linux-headers-{kver}" in neither.stderr


@pytest.mark.root
def test_image_headers_compile_the_datapath_on_a_node_without_headers(tmp_path):
    """What a kind node gets: no headers under /lib/modules, so the entrypoint points bcc at the
    tree the Dockerfile builds (with the same script: Debian's headers merged), and the datapath
    program compiles and loads against it."""
    from lbctl.datapath.ebpf import loader as ebpf

    shipped = tmp_path / "kernel-headers"
    subprocess.run([str(DEPLOY / "merge-kernel-headers.sh"), "/usr/src", str(shipped)], check=True)
    pin = f"/sys/fs/bpf/lbctl-test-deploy-{os.getpid()}"
    argv = (sys.executable, "-c", COMPILE.format(pin=pin))
    try:
        proc = entrypoint(tmp_path / "no-headers", shipped, *argv)
    finally:
        ebpf.remove_pins(pin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"
    assert "using the image's" in proc.stderr and str(shipped) in proc.stderr
