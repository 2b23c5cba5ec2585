"""A wheel (a non-editable install, as a container image gets) carries everything lbctl needs:
the BPF sources are package data, found without the source tree. Built from this checkout,
installed into a fresh virtualenv, run from a directory that holds no lbctl."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("lbctl-*.whl"))
    # Debian's python3 with system site-packages: bcc is python3-bpfcc, as in make setup
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True)
    subprocess.run([str(tmp / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True)
    return tmp


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "venv/bin/lbctl"), *args], capture_output=True, text=True,
                          cwd=venv, env=env, timeout=120)


def test_wheel_ships_the_bpf_sources(wheel_venv):
    out = subprocess.run([str(wheel_venv / "venv/bin/python"), "-c",
                          "from lbctl.datapath.ebpf import shared; print(shared.BPF_DIR)"],
                         capture_output=True, text=True, cwd=wheel_venv, check=True).stdout.strip()
    assert out.startswith(str(wheel_venv / "venv")), out
    assert (Path(out) / "include" / "lbctl_shared.h").is_file()
    assert (Path(out) / "prog" / "lbctl_tc.c").is_file()


def test_wheel_holds_every_package(wheel_venv):
    """pyproject lists packages by name: one forgotten there would be missing from the wheel."""
    packages = sorted(".".join(init.parent.relative_to(ROOT).parts)
                      for init in (ROOT / "lbctl").rglob("__init__.py"))
    code = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)"
    done = subprocess.run([str(wheel_venv / "venv/bin/python"), "-c", code, *packages],
                          capture_output=True, text=True, cwd=wheel_venv)
    assert done.returncode == 0, done.stderr


def test_wheel_cli_reports_its_version(wheel_venv):
    from lbctl import __version__

    done = run(wheel_venv, "--version")
    assert done.returncode == 0, done.stderr
    assert __version__ in done.stdout


@pytest.mark.root
def test_wheel_compiles_and_runs_the_datapath(wheel_venv):
    """bcc compiles the packaged C and the program runs (BPF_PROG_TEST_RUN, own pin dir)."""
    done = run(wheel_venv, "bench", "--services", "10", "--repeat", "10", "--new-flows", "10", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows and rows[0]["services"] == 10 and rows[0]["established_ns"] > 0
