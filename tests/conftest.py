"""Shared fixtures. Tests marked `root` load BPF programs or build network namespaces; CI runs
everything as root. Every fixture that creates a kernel object removes it in its teardown."""
from __future__ import annotations

import os

import pytest
from kubeapi import kube_control_plane, kube_namespace, kube_node  # noqa: F401  (shared fixtures)

from lbctl.datapath.ebpf import loader as ebpf
from lbctl.datapath.ebpf.reconcile import Reconciler

TEST_PIN_DIR = f"/sys/fs/bpf/lbctl-test-{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def agent_run_dir(tmp_path_factory):
    """The agent's files (its lock, service names, last good manifests: /run/lbctl on a node) go
    to a directory of this session, $LBCTL_RUN_DIR, for in-process agents and `lbctl`
    subprocesses alike: no test reads a real agent's files or leaves any there. No lock may be
    left behind."""
    path = tmp_path_factory.mktemp("run-lbctl")
    saved = os.environ.get("LBCTL_RUN_DIR")
    os.environ["LBCTL_RUN_DIR"] = str(path)
    yield path
    if saved is None:
        del os.environ["LBCTL_RUN_DIR"]
    else:
        os.environ["LBCTL_RUN_DIR"] = saved
    assert not sorted(p.name for p in path.glob("*.lock")), "a test left an agent lock behind"
    if os.geteuid() == 0:
        import subprocess
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        mine = [t for t in tables.split() if t.startswith(f"lbctl-{os.path.basename(TEST_PIN_DIR)}")]
        assert not mine, f"a test left the eBPF mode's mark table(s) behind: {mine}"


def config_for_tests(**overrides) -> ebpf.DatapathConfig:
    values = dict(pin_dir=TEST_PIN_DIR, max_services=1024, max_backends=4096,
                  services_map_size=8192, ct_size=8192, devices=("vethlbt*",))
    values.update(overrides)
    return ebpf.DatapathConfig(**values)


@pytest.fixture(scope="session")
def loaded_datapath():
    dp = ebpf.EbpfDatapath(config_for_tests()).load()
    try:
        yield dp
    finally:
        dp.close()
        ebpf.detach_all(dp.cfg.tc_name)
        ebpf.remove_pins(dp.cfg.pin_dir)


def clear_maps(dp: ebpf.EbpfDatapath) -> None:
    from lbctl.datapath.ebpf import shared

    for name in ("lb4_services", "lb4_backends", "lb4_ct", "lb4_affinity"):
        m = dp.maps[name]
        for key in list(m.keys()):
            m.delete(key)
    for name in ("lb_service_stats", "lb_backend_stats"):
        m = dp.maps[name]
        for index in range(min(64, m.info.max_entries)):
            m.update(shared.u32(index), shared.new("lb_stats"))
    g = dp.maps["lb_global_stats"]
    for index in range(g.info.max_entries):
        g.update(shared.u32(index), bytes(8))
    ranges = dp.maps["lb4_source_ranges"]
    for key in list(ranges.keys()):
        ranges.delete(key)
    dp.maps["lb4_config"].update(shared.u32(0), shared.config_value())


@pytest.fixture
def datapath(loaded_datapath):
    """The loaded program with empty maps, and a reconciler over them."""
    clear_maps(loaded_datapath)
    loaded_datapath.reconciler = Reconciler(loaded_datapath.maps, 1024, 4096)
    yield loaded_datapath
    clear_maps(loaded_datapath)
