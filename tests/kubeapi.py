"""The real Kubernetes control plane for tests: one etcd + kube-apiserver + kube-controller-manager
per test session (lbctl.lab.kube), started on first use and shared by every test that asks.

    def test_x(kube_control_plane, kube_namespace):
        kube_control_plane.kubectl("-n", kube_namespace, "apply", "-f", "-", input=manifest)

`kube_namespace` gives each test a namespace of its own, so tests sharing the API server do not
see each other's objects; `kube_node` a registered Node for kwok-style pods. Imported by conftest.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from lbctl.lab.kube import ControlPlane

T = TypeVar("T")
WAIT_TIMEOUT = 60.0          # seconds for a controller to act: a safety net, never the assertion
_namespaces = itertools.count()


@pytest.fixture(scope="session")
def kube_control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """A running control plane; the processes die with the test run even if it is killed."""
    cp = ControlPlane(tmp_path_factory.mktemp("kube") / "control-plane", tie_to_parent=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def kube_namespace(kube_control_plane: ControlPlane, request) -> Iterator[str]:
    """A fresh namespace, deleted after the test (without waiting for its finalizers)."""
    words = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())
    name = f"t{next(_namespaces)}-{words}"[:60].strip("-")
    kube_control_plane.kubectl("create", "namespace", name)
    wait_for(lambda: kube_control_plane.get(
        f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200 or None,
        f"serviceaccount {name}/default")
    yield name
    kube_control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def kube_node(kube_control_plane: ControlPlane) -> str:
    """A Node object (no kubelet) for kwok-style pods: InternalIP 192.0.2.10 (TEST-NET-1)."""
    kube_control_plane.register_node("kube-test-node", "192.0.2.10")
    return "kube-test-node"


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = WAIT_TIMEOUT) -> T:
    """probe() until it returns something other than None; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)

