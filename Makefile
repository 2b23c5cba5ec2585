# lbctl: every install step lives here, idempotent, and fast when already done.
#   make demo   - install what is needed, build the lab, run the agent, show the spread and the maps
#   make test   - install what is needed, run the whole suite (as root)
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
KVER      := $(shell uname -r)
KDIR      := /lib/modules/$(KVER)
APT_PKGS  := python3-bpfcc libbpfcc linux-headers-amd64 python3-venv iproute2 iptables nftables ipset conntrack \
             gcc libc6-dev nginx-light wrk curl
CC        := gcc
CONNLOAD  := build/connload
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup apt-deps kernel-headers venv demo lint test test-unit bench bench-quick bench-modes bench-k8s bench-tools clean k8s-bins demo-k8s

help:
	@echo "make demo        lab + agent + traffic + 'lbctl dump maps' (KEEP=1 leaves the lab up)"
	@echo "make test        the whole suite (root: BPF programs and network namespaces)"
	@echo "make bench       eBPF vs the real kube-proxy (iptables, nftables) vs direct: docs/benchmarks/ (< 15 min)"
	@echo "make bench-quick ns/packet through BPF_PROG_TEST_RUN at 10 and 100,000 services"
	@echo "make bench-modes eBPF vs iptables vs nftables vs no load balancer, real connections"
	@echo "make bench-tools build/connload, the C load generator the benchmarks run (tools/connload.c)"
	@echo "make bench-k8s   API server change -> maps -> traffic at 1,000 and 10,000 services (real control plane)"
	@echo "make lint        ruff and mypy (make test runs them first)"
	@echo "make setup       only install (apt packages, kernel headers for bcc, virtualenv)"
	@echo "make k8s-bins    build etcd, kube-apiserver, kube-controller-manager, kube-proxy (once, cached)"
	@echo "make demo-k8s    lab + real API server + agent --source kubernetes + a kubectl-made service"

setup: apt-deps kernel-headers venv

# Debian packages. bcc comes from Debian (python3-bpfcc/libbpfcc); the PyPI "bcc" is unrelated.
apt-deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "error: need root to install:$$missing" >&2; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing \
	  || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; }; \
	fi

# bcc compiles C against /lib/modules/$(uname -r)/build. When the running kernel has no headers
# package (a cloud or custom kernel), expose Debian's linux-headers-amd64 tree there: the -amd64
# tree as build/, the -common tree as source/. Real headers, if present, are never touched.
kernel-headers: apt-deps
	@if [ -e $(KDIR)/build/include/linux/kconfig.h ] || [ -e $(KDIR)/build/include/generated/autoconf.h ]; then exit 0; fi; \
	amd64=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1); \
	common=$$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1); \
	if [ -z "$$amd64" ] || [ -z "$$common" ]; then \
	  echo "error: no kernel headers for bcc: install linux-headers-amd64 (apt-get install linux-headers-amd64)" >&2; exit 1; fi; \
	echo ">> exposing $$amd64 as $(KDIR)/build and $$common as $(KDIR)/source"; \
	mkdir -p $(KDIR) && ln -sfn $$amd64 $(KDIR)/build && ln -sfn $$common $(KDIR)/source

# Debian's python3 (the one python3-bpfcc is built for), with system site-packages so bcc is seen.
venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml | apt-deps
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -c 'import bcc, cffi, pyroute2, yaml' || { echo "error: bcc (python3-bpfcc) not importable from $(VENV)" >&2; exit 1; }
	touch $@

demo: setup
	$(VENV)/bin/lbctl demo $(if $(KEEP),--keep) $(DEMO_ARGS)

# The demo on the real control plane: a Service made with kubectl, the agent --source kubernetes.
demo-k8s: setup k8s-bins
	$(VENV)/bin/lbctl demo --kubernetes $(if $(KEEP),--keep) $(DEMO_ARGS)

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade) and mypy, configured in pyproject.toml
lint: venv
	$(VENV)/bin/ruff check lbctl tests
	$(VENV)/bin/mypy

test: setup lint k8s-bins bench-tools
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q -m 'not root and not kube' $(PYTEST_ARGS)

bench-quick: setup
	$(VENV)/bin/lbctl bench --services 10,100000 --plot out/bench-quick.png

# The benchmarks' load: build/connload (fixed offered rate, connect latency, every sample), wrk
# (maximum rate), nginx from Debian as the backends; no Python in the measured path.
bench-tools: $(CONNLOAD)
$(CONNLOAD): tools/connload.c | apt-deps
	@mkdir -p $(@D)
	$(CC) -O2 -Wall -Wextra -pthread -o $@ $< -lm

# The benchmark of record (docs/benchmarks.md): eBPF against the real kube-proxy binary in
# iptables and nftables mode, lbctl's own renderings and no proxy at all, over 1, 1,000 and
# 10,000 services x 10 endpoints, then the per-packet cost of the BPF programs through
# BPF_PROG_TEST_RUN up to 50,000 services. Raw samples, tables and plots in $(BENCH_OUT).
# BENCH_ARGS="--services 1,1000,10000,50000 --mode-max ..." for the long curves.
BENCH_OUT  ?= docs/benchmarks
BENCH_ARGS ?= --services 1,1000,10000 --runs 3 --duration 3 --changes 5
bench: setup k8s-bins bench-tools
	$(VENV)/bin/lbctl bench --compare --out-dir $(BENCH_OUT) $(BENCH_ARGS)
	$(VENV)/bin/lbctl bench --services 1,1000,10000,50000 --backends 10 --json --plot $(BENCH_OUT)/prog.png > $(BENCH_OUT)/prog.json

bench-modes: setup bench-tools
	$(VENV)/bin/lbctl bench --modes none,ebpf,iptables,nftables --services 10,1000,10000 --nodes 2 --plot out/bench-modes.png

# JSON (every sample) and plot in out/; BENCH_K8S_ARGS="--services 1000 --changes 10" to shorten.
BENCH_K8S_ARGS ?=
bench-k8s: setup k8s-bins
	$(VENV)/bin/lbctl bench --k8s-latency --out-dir out $(BENCH_K8S_ARGS)

# The real Kubernetes control plane, built from Go modules (hack/k8s, hack/etcd) once per machine
# into ~/.cache/lbctl/k8s-<version>/; KUBEBUILDER_ASSETS with the binaries skips the build.
k8s-bins:
	@PATH="$$PATH:/usr/local/go/bin" hack/build-k8s.sh >/dev/null

clean:
	rm -rf $(VENV) *.egg-info out .pytest_cache build
