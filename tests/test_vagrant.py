"""vagrant/: what can be checked without a VM, Docker or kind. The scripts parse (`bash -n`),
the kind config of every mode is deploy/kind/cluster.yaml with only kube-proxy's mode (and the
cluster name) changed, every kubectl flag the scripts use exists in this machine's kubectl,
every make target they call exists, and the Vagrantfile names scripts that exist (and parses,
with ruby when the machine has it)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VAGRANT = ROOT / "vagrant"
SCRIPTS = [VAGRANT / "provision.sh", VAGRANT / "kind-up.sh"]
MODES = ("lbctl", "iptables", "nftables", "ipvs")


def print_config(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VAGRANT / "kind-up.sh"), "--print-config", mode], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "LBCTL_SRC": str(ROOT)})


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_scripts_parse_and_stop_on_errors(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    assert script.stat().st_mode & 0o111, "executable"


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_is_the_lbctl_kind_config_with_kube_proxys_mode(mode):
    base = yaml.safe_load((ROOT / "deploy/kind/cluster.yaml").read_text())
    proc = print_config(mode)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["networking"]["kubeProxyMode"] == ("none" if mode == "lbctl" else mode)
    assert config["name"] == ("lbctl" if mode == "lbctl" else f"kube-proxy-{mode}")
    for cfg in (config, base):
        cfg["networking"].pop("kubeProxyMode")
        cfg.pop("name")
    assert config == base, "nodes, pod and service subnets are the same in every mode"


def test_an_unknown_mode_is_refused():
    proc = print_config("userspace")
    assert proc.returncode == 2 and "unknown mode 'userspace'" in proc.stderr


def commands(tool: str) -> list[list[str]]:
    """Every `tool ...` command in the scripts, as its words up to `--` (the container's command),
    a pipe, a redirection or the end of the command."""
    found = []
    for script in SCRIPTS:
        for line in script.read_text().replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0]
            for match in re.finditer(rf"(?:^|[\s($]){tool} (.*)", line):
                words = re.split(r" -- | \| |[;>)]| && ", match.group(1))[0].split()
                found.append(words)
    return found


def test_every_kubectl_flag_used_exists():
    assert shutil.which("kubectl"), "kubectl is part of the machine (the kube tests use it)"
    checked = 0
    for words in commands("kubectl"):
        if words[0] == "-n":                       # kubectl -n NAMESPACE SUBCOMMAND ...
            words = words[2:]
        positional = [w for w in words if not w.startswith("-")]
        sub = positional[:2] if positional[0] in ("rollout", "create", "config") else positional[:1]
        flags = {w.split("=")[0] for w in words if w.startswith("--")}
        help_text = subprocess.run(["kubectl", *sub, "--help"], capture_output=True, text=True).stdout
        help_text += subprocess.run(["kubectl", "options"], capture_output=True, text=True).stdout
        missing = [f for f in flags if not re.search(rf"(^|\s|,){re.escape(f)}[=\s\[:]", help_text, re.M)]
        assert not missing, f"kubectl {' '.join(sub)}: no flag {missing}"
        checked += 1
    assert checked >= 8, "every kubectl command of kind-up.sh was seen"


def test_every_make_target_called_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z0-9-]+):", makefile, re.M))
    called = set()
    for path in [*SCRIPTS, VAGRANT / "Vagrantfile"]:
        called |= set(re.findall(r"make -C \S+ ([a-z0-9-]+)", path.read_text()))
    assert called >= {"setup", "bench-modes", "demo-k8s"}
    assert called <= targets, called - targets


def test_the_vagrantfile_runs_the_scripts_that_exist():
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    paths = re.findall(r'path: "([^"]+)"', text)
    assert sorted(paths) == ["kind-up.sh", "provision.sh"]
    assert all((VAGRANT / p).exists() for p in paths)
    assert re.findall(r'config\.vm\.provision "(\w+)"', text) == ["setup", "kind", "bench"]
    assert 'ENV.fetch("LBCTL_KIND_MODE", "lbctl")' in text
    ruby = shutil.which("ruby")
    if ruby:
        proc = subprocess.run([ruby, "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True)
        assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


def test_pinned_versions_agree():
    """kind's release and the node image it lists, kubectl the lab's version."""
    provision, up = (s.read_text() for s in SCRIPTS)
    assert "KIND_VERSION=v0.33.0" in provision
    assert re.search(r'NODE_IMAGE="kindest/node:v1\.37\.0@sha256:[0-9a-f]{64}"', up)
    from lbctl.lab.kube import K8S_VERSION
    assert f"KUBECTL_VERSION={K8S_VERSION}" in provision
    assert "sha256sum --check" in provision, "downloads are checksummed"
