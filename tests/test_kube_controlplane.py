"""The real control plane (lbctl.lab.kube): it starts, the real EndpointSlice controller builds
slices for kwok-style pods, readiness flips reach the slices, and stop leaves nothing."""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from kubeapi import wait_for

from lbctl.lab import kube, netns

ROOT = Path(__file__).resolve().parents[1]

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
"""


def test_wrapper_modules_pin_the_version_the_lab_runs():
    """hack/k8s requires K8S_VERSION and replaces every staging module with its v0.Y.Z twin."""
    go_mod = (ROOT / "hack/k8s/go.mod").read_text()
    assert re.search(rf"^require k8s\.io/kubernetes {re.escape(kube.K8S_VERSION)}$", go_mod, re.M)
    staging = "v0." + kube.K8S_VERSION.split(".", 1)[1]
    replaces = re.findall(r"^\t(k8s\.io/\S+) => (\S+) (\S+)$", go_mod, re.M)
    assert len(replaces) > 30
    assert {(old == new, version) for old, new, version in replaces} == {(True, staging)}
    assert "go.etcd.io/etcd/server/v3" in (ROOT / "hack/etcd/go.mod").read_text()


def test_missing_binaries_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    monkeypatch.setenv("LBCTL_K8S_CACHE", str(tmp_path / "cache"))
    with pytest.raises(kube.ControlPlaneError, match=r"make k8s-bins.*KUBEBUILDER_ASSETS"):
        kube.ControlPlane(tmp_path / "cp").start()
    assert not (tmp_path / "cp").exists()


@pytest.mark.kube
def test_api_server_serves_the_built_version(kube_control_plane):
    status, body = kube_control_plane.get("/version")
    assert status == 200
    assert json.loads(body)["gitVersion"] == kube.K8S_VERSION
    # kubectl and the official client reach it with the generated admin kubeconfig
    assert "kube-system" in kube_control_plane.kubectl("get", "namespaces", "-o", "name").stdout
    from kubernetes import client
    assert client.VersionApi(kube_control_plane.api()).get_code().git_version == kube.K8S_VERSION


def slice_endpoints(cp: kube.ControlPlane, namespace: str, service: str) -> dict[str, dict]:
    """Pod name -> {"ip", "ready", "node", "port"} over every slice of the service."""
    out = cp.kubectl("-n", namespace, "get", "endpointslices", "-o", "json",
                     "-l", f"kubernetes.io/service-name={service}").stdout
    found = {}
    for item in json.loads(out)["items"]:
        ports = [p["port"] for p in item.get("ports") or []]
        for ep in item.get("endpoints") or []:
            found[ep["targetRef"]["name"]] = {"ip": ep["addresses"][0],
                                              "ready": ep["conditions"]["ready"],
                                              "node": ep.get("nodeName"), "ports": ports}
    return found


@pytest.mark.kube
def test_endpointslice_controller_builds_slices_for_kwok_pods(kube_control_plane, kube_namespace,
                                                              kube_node):
    cp, ns = kube_control_plane, kube_namespace
    ips = {f"web-{i}": f"10.244.200.{10 + i}" for i in range(3)}
    for name, ip in ips.items():
        cp.create_pod(ns, name, node=kube_node, ip=ip, labels={"app": "web"})
    cp.create_pod(ns, "other", node=kube_node, ip="10.244.200.99", labels={"app": "other"})
    cp.kubectl("-n", ns, "apply", "-f", "-", input=SERVICE)

    want = {name: {"ip": ip, "ready": True, "node": kube_node, "ports": [8080]}
            for name, ip in ips.items()}
    wait_for(lambda: True if slice_endpoints(cp, ns, "web") == want else None,
             "EndpointSlice of web with the three ready pods")

    cp.set_pod_ready(ns, "web-1", False)
    want["web-1"] = {**want["web-1"], "ready": False}
    wait_for(lambda: True if slice_endpoints(cp, ns, "web") == want else None,
             "web-1 not ready in the slice")

    cp.set_pod_ready(ns, "web-1", True)
    want["web-1"] = {**want["web-1"], "ready": True}
    wait_for(lambda: True if slice_endpoints(cp, ns, "web") == want else None,
             "web-1 ready again in the slice")

    cp.kubectl("-n", ns, "delete", "pod", "web-2", "--grace-period=0", "--force")
    del want["web-2"]
    wait_for(lambda: True if slice_endpoints(cp, ns, "web") == want else None,
             "web-2 gone from the slice")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def watch_from(cp: kube.ControlPlane, namespace: str, rv: str) -> list[dict]:
    """The events of a short watch of the test's configmaps (label t=watch) from resourceVersion rv."""
    status, body = cp.get(f"/api/v1/namespaces/{namespace}/configmaps?watch=1&resourceVersion={rv}"
                          "&labelSelector=t%3Dwatch&timeoutSeconds=1", timeout=30)
    assert status == 200, body
    return [json.loads(line) for line in body.splitlines() if line.strip()]


@pytest.mark.kube
def test_restart_compaction_and_stop_leave_no_process_port_or_file(tmp_path):
    """A private control plane: etcd compaction plus an API server restart make a watch from an
    old resourceVersion fail with 410 Gone (what a source's relist path is tested with); then
    stop, from another process's view (the state file alone), leaves nothing."""
    cp = kube.ControlPlane(tmp_path / "cp", tie_to_parent=True).start()
    try:
        pids = dict(cp.state.pids)
        ports = (cp.state.etcd_port, cp.state.etcd_peer_port, cp.state.apiserver_port)
        assert sorted(pids) == sorted(kube.BINARIES)
        assert all(listening(p) for p in ports)
        assert cp.ready()

        def configmap(name: str) -> str:
            manifest = json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": name, "labels": {"t": "watch"}}})
            created = cp.kubectl("create", "-f", "-", "-o", "json", input=manifest).stdout
            return str(json.loads(created)["metadata"]["resourceVersion"])

        rv = configmap("a")
        configmap("b")
        assert [e["type"] for e in watch_from(cp, "default", rv)] == ["ADDED"]   # b only
        assert cp.etcd_compact() > int(rv)
        cp.restart("kube-apiserver")
        assert cp.state.pids["kube-apiserver"] != pids["kube-apiserver"]
        events = watch_from(cp, "default", rv)
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
        pids = dict(cp.state.pids)

        other = kube.ControlPlane.attach(tmp_path / "cp")
        assert other.state == cp.state
    except BaseException:
        cp.stop()
        raise
    other.stop()
    assert not any(netns.pid_alive(pid) for pid in pids.values())
    assert not any(listening(p) for p in ports)
    assert not (tmp_path / "cp").exists()
    other.stop()   # idempotent


HAND_MADE = """
apiVersion: v1
kind: Service
metadata: {name: web-by-hand, namespace: default}
spec:
  selector: {app: web}
  ports:
  - {port: 8081, targetPort: 8080, protocol: TCP}
"""


@pytest.mark.root
@pytest.mark.kube
def test_lab_up_kubernetes_registers_the_lab_and_lab_down_stops_it(tmp_path):
    """`lbctl lab up --kubernetes`: the lab's node, pods and services are in the API server and
    the real controller made the slices; a Service made with kubectl gets the lab's pods; lab
    down from another process leaves no control-plane process, port or file."""
    import dataclasses
    import subprocess
    import sys

    from lbctl.lab import cluster as lab

    third = 180 + os.getpid() % 20            # 10.244.180-199: test_lab uses 100-179
    spec = dataclasses.replace(lab.default_spec(f"lbk{os.getpid() % 100000}"), kubernetes=True,
                               pod_cidr=f"10.244.{third}.0/24", gateway=f"10.244.{third}.1")
    try:
        state = lab.lab_up(spec, tmp_path)
        assert state.made.kube_dir
        cp = kube.ControlPlane.attach(Path(state.made.kube_dir))
        pids = dict(cp.state.pids)
        for svc in spec.services:
            want = {pod: {"ip": state.pods[pod].ip, "ready": True, "node": lab.NODE_NAME,
                          "ports": sorted({p.target_port for p in svc.ports})} for pod in svc.backends}
            got = {name: {**ep, "ports": sorted(set(ep["ports"]))}
                   for name, ep in slice_endpoints(cp, svc.namespace, svc.name).items()}
            assert got == want
        nodes = json.loads(cp.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        # a node's InternalIP is its address on the lab network (kind's docker network), not a pod gateway
        assert [(n["metadata"]["name"], n["status"]["addresses"][0]["address"]) for n in nodes] == [
            (lab.NODE_NAME, state.nodes[lab.NODE_NAME].ip)]

        cp.kubectl("apply", "-f", "-", input=HAND_MADE)
        web = {pod: state.pods[pod].ip for pod in ("web-0", "web-1", "web-2")}
        wait_for(lambda: True if {n: e["ip"] for n, e in slice_endpoints(cp, "default", "web-by-hand").items()}
                 == web else None, "slice of the kubectl-made service")

        subprocess.run([sys.executable, "-c", "import sys; from lbctl.lab.cluster import lab_down; "
                        "sys.exit(0 if lab_down(sys.argv[1]) else 3)", spec.prefix],
                       check=True, timeout=120, env=netns.python_env())
        for pid in pids.values():
            netns.reap(pid)                   # our children: collect the zombies
        assert not any(netns.pid_alive(pid) for pid in pids.values())
        assert not any(listening(p) for p in (cp.state.etcd_port, cp.state.apiserver_port))
        assert not Path(state.made.kube_dir).exists()
        assert not lab.state_path(spec.prefix).exists()
    finally:
        lab.lab_down(spec.prefix)
