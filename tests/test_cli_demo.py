"""`lbctl demo` beside a user's lab: it runs on a lab, maps and links of its own, and leaves the
user's as they were. Needs root (a lab in network namespaces, the BPF program)."""
from __future__ import annotations

import os
import subprocess

import pytest

from lbctl.agent.lock import running_agents
from lbctl.cli import demo
from lbctl.datapath.base import DEFAULT_PIN_DIR
from lbctl.lab import cluster as lab

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
