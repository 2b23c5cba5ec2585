"""After k8s-ops and k8s-source are merged: /healthz follows this node's Node object in the real
API server (kube-proxy's SyncNode): tainted ToBeDeletedByClusterAutoscaler -> 503, nodeEligible
false; the taint removed -> 200; /livez unaffected."""
from __future__ import annotations

import json

import pytest
from kubeapi import wait_for

from lbctl.agent.health import ProxyHealth
from lbctl.sources.kubernetes import KubernetesSource, api_client

pytestmark = pytest.mark.root


def test_healthz_follows_the_node_in_the_api_server(kube_control_plane):
    node = "kube-ops-node"
    kube_control_plane.register_node(node, "192.0.2.11")
    source = KubernetesSource(api_client(str(kube_control_plane.kubeconfig), None), node)
    source.start()
    try:
        health = ProxyHealth(timeout=60, node=lambda: source.node)
        wait_for(lambda: source.node is not None or None, "the Node listed")
        assert health.answer("/healthz")[0] == 200
        kube_control_plane.kubectl("taint", "node", node, "ToBeDeletedByClusterAutoscaler=1:NoSchedule")
        wait_for(lambda: health.answer("/healthz")[0] == 503 or None, "healthz 503 after the taint")
        assert json.loads(health.answer("/healthz")[1])["nodeEligible"] is False
        assert health.answer("/livez")[0] == 200
        kube_control_plane.kubectl("taint", "node", node, "ToBeDeletedByClusterAutoscaler-")
        wait_for(lambda: health.answer("/healthz")[0] == 200 or None, "healthz 200 after the untaint")
        kube_control_plane.kubectl("delete", "node", node)
        wait_for(lambda: health.answer("/healthz")[0] == 503 or None, "healthz 503 after the Node is deleted")
    finally:
        source.stop()
