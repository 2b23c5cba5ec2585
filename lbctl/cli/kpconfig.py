"""`lbctl run --config FILE`: kube-proxy's own configuration file (KubeProxyConfiguration,
kubeproxy.config.k8s.io/v1alpha1), so that a node's kube-proxy config (kubeadm's
`kube-proxy` ConfigMap, a kind cluster's) configures lbctl unchanged.

Fields lbctl applies, each to the flag of the same meaning:

    hostnameOverride -> --node-name          bindAddress -> --node-ip (unless 0.0.0.0 / ::)
    healthzBindAddress, metricsBindAddress, bindAddressHardFail -> the flags of the same name
    mode -> --mode ("" keeps lbctl's default, ebpf)
    clusterCIDR -> --cluster-cidr            nodePortAddresses -> --nodeport-addresses
    iptables.masqueradeBit, .masqueradeAll (nftables.* in nftables mode) -> --masquerade-bit, --masquerade-all
    iptables.localhostNodePorts -> --localhost-nodeports (where the flag exists)
    <mode>.syncPeriod -> --sync-period, <mode>.minSyncPeriod -> --min-sync-period (where it exists;
        the section is the mode's: iptables, nftables or ipvs, iptables for ebpf, as kube-proxy)
    conntrack.maxPerCore, conntrack.min -> --ct-size (eBPF mode: kube-proxy's nf_conntrack_max,
        max(maxPerCore x CPUs, min) flows, is 2x that many entries, two per flow)
    clientConnection.kubeconfig -> --kubeconfig, configSyncPeriod -> --config-sync-period (where they exist)
    logging.verbosity -> -v

A flag given on the command line wins over the file (kube-proxy's rule too). Fields that lbctl
does not apply (conntrack timeouts, oomScoreAdj, winkernel, featureGates, ...) are reported when
they are set, one warning each naming the field; unknown fields are reported as kube-proxy's
lenient decoding does, and the rest of the file is used. A file that is not a
KubeProxyConfiguration, or a value of the wrong type, is an error: the agent does not start.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from lbctl.agent.health import DEFAULT_HEALTHZ_BIND_ADDRESS, split_host_port
from lbctl.agent.metrics import DEFAULT_METRICS_BIND_ADDRESS

log = logging.getLogger("lbctl.cli.kpconfig")

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"


class ConfigError(ValueError):
    """The file cannot be used; the message names the file and the field."""


# Every field of KubeProxyConfiguration v1alpha1 (k8s.io/kube-proxy/config/v1alpha1/types.go):
# nested dicts for the sections, None for leaves. A field not here is unknown.
SCHEMA: dict[str, Any] = {
    "apiVersion": None, "kind": None, "featureGates": None,
    "clientConnection": {"kubeconfig": None, "acceptContentTypes": None, "contentType": None,
                         "qps": None, "burst": None},
    "logging": {"format": None, "flushFrequency": None, "verbosity": None, "vmodule": None,
                "options": None},
    "hostnameOverride": None, "bindAddress": None, "healthzBindAddress": None,
    "metricsBindAddress": None, "bindAddressHardFail": None, "enableProfiling": None,
    "showHiddenMetricsForVersion": None, "mode": None,
    "iptables": {"masqueradeBit": None, "masqueradeAll": None, "localhostNodePorts": None,
                 "snatNodeInternalIP": None, "syncPeriod": None, "minSyncPeriod": None},
    "ipvs": {"syncPeriod": None, "minSyncPeriod": None, "scheduler": None, "excludeCIDRs": None,
             "strictARP": None, "tcpTimeout": None, "tcpFinTimeout": None, "udpTimeout": None},
    "nftables": {"masqueradeBit": None, "masqueradeAll": None, "syncPeriod": None, "minSyncPeriod": None},
    "winkernel": {"networkName": None, "sourceVip": None, "enableDSR": None,
                  "rootHnsEndpointName": None, "forwardHealthCheckVip": None},
    "detectLocalMode": None,
    "detectLocal": {"bridgeInterface": None, "interfaceNamePrefix": None},
    "clusterCIDR": None, "nodePortAddresses": None, "oomScoreAdj": None,
    "conntrack": {"maxPerCore": None, "min": None, "tcpEstablishedTimeout": None,
                  "tcpCloseWaitTimeout": None, "tcpBeLiberal": None, "udpTimeout": None,
                  "udpStreamTimeout": None},
    "configSyncPeriod": None, "portRange": None, "windowsRunAsService": None,
    # older releases' fields, still accepted by their decoders
    "resourceContainer": None, "udpIdleTimeout": None,
}

# Fields lbctl does not apply, with the reason: reported only when set to something.
NOT_APPLIED = {
    "featureGates": "lbctl has no feature gates",
    "clientConnection.acceptContentTypes": "the Kubernetes client's content types are not configurable",
    "clientConnection.contentType": "the Kubernetes client's content types are not configurable",
    "clientConnection.qps": "the Kubernetes client is not rate limited by lbctl",
    "clientConnection.burst": "the Kubernetes client is not rate limited by lbctl",
    "logging.flushFrequency": "lbctl's log is written line by line",
    "logging.vmodule": "lbctl has one verbosity for every module",
    "logging.options": "lbctl writes text logs only",
    "enableProfiling": "lbctl serves no /debug/pprof",
    "showHiddenMetricsForVersion": "lbctl hides no metrics",
    "iptables.snatNodeInternalIP": "lbctl masquerades to the egress interface's address",
    "ipvs.excludeCIDRs": "lbctl's IPVS mode cleans only what it created",
    "ipvs.strictARP": "lbctl does not change arp_ignore / arp_announce",
    "ipvs.tcpTimeout": "lbctl does not change IPVS timeouts",
    "ipvs.tcpFinTimeout": "lbctl does not change IPVS timeouts",
    "ipvs.udpTimeout": "lbctl does not change IPVS timeouts",
    "winkernel": "Windows only",
    "detectLocal": "lbctl detects local traffic by clusterCIDR only",
    "oomScoreAdj": "lbctl does not change its OOM score (set it in the DaemonSet)",
    "conntrack.tcpEstablishedTimeout": "lbctl does not change the kernel's conntrack sysctls",
    "conntrack.tcpCloseWaitTimeout": "lbctl does not change the kernel's conntrack sysctls",
    "conntrack.tcpBeLiberal": "lbctl does not change the kernel's conntrack sysctls",
    "conntrack.udpTimeout": "lbctl does not change the kernel's conntrack sysctls",
    "conntrack.udpStreamTimeout": "lbctl does not change the kernel's conntrack sysctls",
    "portRange": "unused since the userspace proxy was removed",
    "windowsRunAsService": "Windows only",
    "resourceContainer": "removed from kube-proxy",
    "udpIdleTimeout": "removed from kube-proxy",
}

LBCTL_MODES = ("ebpf", "iptables", "nftables", "ipvs")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (metav1.Duration): "30s", "1m0s", "2h45m", "300ms", "0" -> seconds."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if not s or pos != len(s):
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 1m0s, 2h45m)")
    return sign * total


@dataclass
class KubeProxyConfig:
    """What a file asks of lbctl: flag destinations and values, and what it reports."""

    path: str
    values: dict[str, Any] = field(default_factory=dict)        # argparse dest -> value
    sources: dict[str, str] = field(default_factory=dict)       # dest -> the field it came from
    reports: list[str] = field(default_factory=list)            # fields not applied, unknown fields


def _is_set(value) -> bool:
    """A field the file sets to something (kubeadm writes many fields as null, "" or 0)."""
    if isinstance(value, dict):
        return any(_is_set(v) for v in value.values())
    return value not in (None, "", 0, False, [], {}) and value not in ("0s", "0")   # "0": a quantity


def _unknown(data: dict, schema: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in schema:
            found.append(name)
        elif isinstance(schema[key], dict) and isinstance(value, dict):
            found += _unknown(value, schema[key], name + ".")
    return found


def _get(data: dict, dotted: str):
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class _Reader:
    def __init__(self, path: str, data: dict):
        self.path, self.data = path, data
        self.config = KubeProxyConfig(path)

    def fail(self, name: str, message: str):
        raise ConfigError(f"{self.path}: {name}: {message}")

    def typed(self, name: str, kinds: tuple, what: str):
        value = _get(self.data, name)
        if value is None:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.fail(name, f"{what} expected (got {value!r})")
        return value

    def set(self, dest: str, value, name: str) -> None:
        self.config.values[dest] = value
        self.config.sources[dest] = name

    def report(self, name: str, why: str) -> None:
        self.config.reports.append(f"{self.path}: {name} is not applied: {why}")

    def duration(self, name: str) -> float | None:
        text = self.typed(name, (str,), "a duration")
        if text is None:
            return None
        try:
            return parse_duration(text)
        except ValueError as exc:
            self.fail(name, str(exc))
        return None


def read(path: str) -> KubeProxyConfig:
    """Parses the file; ConfigError when it cannot be used. Touches nothing else."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a KubeProxyConfiguration object, got {type(data).__name__}")
    if data.get("kind") != KIND or data.get("apiVersion") != API_VERSION:
        raise ConfigError(f"{path}: expected apiVersion {API_VERSION}, kind {KIND} (got apiVersion "
                          f"{data.get('apiVersion')!r}, kind {data.get('kind')!r})")
    r = _Reader(path, data)
    for name in _unknown(data, SCHEMA):
        r.config.reports.append(f"{path}: unknown field {name!r} (kube-proxy's strict decoding refuses "
                                f"it; ignored, as its lenient decoding does)")
    _node_and_listeners(r)
    mode = _mode(r)
    _masquerade_and_periods(r, mode)
    _conntrack(r, mode)
    _client_and_logging(r)
    for name, why in NOT_APPLIED.items():
        if _is_set(_get(data, name)):
            r.report(name, why)
    return r.config


def _node_and_listeners(r: _Reader) -> None:
    if name := r.typed("hostnameOverride", (str,), "a node name"):
        r.set("node_name", name.strip().lower(), "hostnameOverride")
    if address := r.typed("bindAddress", (str,), "an IP address"):
        from lbctl.model.addresses import parse_ip_sloppy

        ip = parse_ip_sloppy(address)
        if ip is None:
            r.fail("bindAddress", f"{address!r} is not an IP address")
        elif not ip.is_unspecified:
            r.set("node_ip", [str(ip)], "bindAddress")
    for name, dest in (("healthzBindAddress", "healthz_bind_address"),
                       ("metricsBindAddress", "metrics_bind_address")):
        if address := r.typed(name, (str,), "an address with a port"):
            try:
                split_host_port(address)
            except ValueError as exc:
                r.fail(name, str(exc))
            r.set(dest, address, name)
    if r.typed("bindAddressHardFail", (bool,), "true or false"):
        r.set("bind_address_hard_fail", True, "bindAddressHardFail")
    if cidr := r.typed("clusterCIDR", (str,), "a CIDR"):
        r.set("cluster_cidr", cidr, "clusterCIDR")
    addresses = r.typed("nodePortAddresses", (list,), "a list of CIDRs")
    if addresses:
        if not all(isinstance(a, str) for a in addresses):
            r.fail("nodePortAddresses", f"a list of CIDRs expected (got {addresses!r})")
        r.set("nodeport_addresses", ",".join(addresses), "nodePortAddresses")
    detect = r.typed("detectLocalMode", (str,), "a mode")
    if detect and detect != "ClusterCIDR":
        r.report("detectLocalMode", f"{detect} is not supported: lbctl detects local traffic by clusterCIDR")


def _mode(r: _Reader) -> str | None:
    mode = r.typed("mode", (str,), "a proxy mode")
    if not mode:
        return None
    if mode not in LBCTL_MODES:
        r.fail("mode", f"{mode!r} is not a mode of lbctl ({', '.join(LBCTL_MODES)})")
    r.set("mode", mode, "mode")
    return mode


def _section(mode: str | None, what: str) -> str:
    """The section a mode reads ``what`` from, as kube-proxy's v1alpha1 conversion does."""
    if mode == "nftables":
        return f"nftables.{what}"
    if mode == "ipvs" and what in ("syncPeriod", "minSyncPeriod"):
        return f"ipvs.{what}"
    return f"iptables.{what}"


def _masquerade_and_periods(r: _Reader, mode: str | None) -> None:
    bit = r.typed(_section(mode, "masqueradeBit"), (int,), "a whole number")
    if bit is not None:
        if not 0 <= bit <= 31:
            r.fail(_section(mode, "masqueradeBit"), f"out of range (0-31; got {bit})")
        r.set("masquerade_bit", bit, _section(mode, "masqueradeBit"))
    if r.typed(_section(mode, "masqueradeAll"), (bool,), "true or false"):
        r.set("masquerade_all", True, _section(mode, "masqueradeAll"))
    localhost = r.typed("iptables.localhostNodePorts", (bool,), "true or false")
    if localhost is not None:
        r.set("localhost_nodeports", localhost, "iptables.localhostNodePorts")
    for what, dest in (("syncPeriod", "sync_period"), ("minSyncPeriod", "min_sync_period")):
        name = _section(mode, what)
        seconds = r.duration(name)
        if not seconds:       # 0s is unset: kube-proxy's defaulting makes it 30s / 1s
            continue
        if seconds < 0:
            r.fail(name, f"must be > 0 (got {_get(r.data, name)})")
        r.set(dest, seconds, name)
    scheduler = r.typed("ipvs.scheduler", (str,), "a scheduler name")
    if scheduler and scheduler != "rr":
        r.report("ipvs.scheduler", f"{scheduler!r}: lbctl's IPVS mode schedules rr (kube-proxy's default)")


def conntrack_entries(max_per_core: int, minimum: int, cpus: int) -> int:
    """kube-proxy's nf_conntrack_max (max(maxPerCore x CPUs, min) flows) as eBPF conntrack map
    entries: two per flow."""
    return 2 * max(max_per_core * cpus, minimum)


def _conntrack(r: _Reader, mode: str | None) -> None:
    per_core = r.typed("conntrack.maxPerCore", (int,), "a whole number")
    minimum = r.typed("conntrack.min", (int,), "a whole number")
    for name, value in (("conntrack.maxPerCore", per_core), ("conntrack.min", minimum)):
        if value is not None and value < 0:
            r.fail(name, f"must be >= 0 (got {value})")
    if per_core is None and minimum is None:
        return
    if per_core == 0:     # kube-proxy: "leave the limit as-is and ignore min"
        return
    if mode not in (None, "ebpf"):
        r.report("conntrack.maxPerCore/min", "lbctl's kube-proxy modes do not change nf_conntrack_max")
        return
    entries = conntrack_entries(32768 if per_core is None else per_core, 131072 if minimum is None else minimum,
                                os.cpu_count() or 1)
    r.set("ct_size", min(entries, 0xFFFFFFFF), "conntrack.maxPerCore/min")


def _client_and_logging(r: _Reader) -> None:
    if kubeconfig := r.typed("clientConnection.kubeconfig", (str,), "a file name"):
        r.set("kubeconfig", kubeconfig, "clientConnection.kubeconfig")
    if (seconds := r.duration("configSyncPeriod")) is not None and seconds > 0:
        r.set("config_sync_period", seconds, "configSyncPeriod")
    verbosity = r.typed("logging.verbosity", (int,), "a whole number")
    if verbosity:
        r.set("v", verbosity, "logging.verbosity")
    fmt = r.typed("logging.format", (str,), "a log format")
    if fmt and fmt != "text":
        r.report("logging.format", f"{fmt!r}: lbctl writes text logs")


# --- flags -----------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`lbctl run`'s flags for operating like kube-proxy: the config file and the listeners."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="kube-proxy's configuration file (KubeProxyConfiguration, "
                             f"{API_VERSION}); flags given on the command line win over it")
    parser.add_argument("--healthz-bind-address", default=DEFAULT_HEALTHZ_BIND_ADDRESS, metavar="IP:PORT",
                        help="/healthz and /livez, as kube-proxy's (%(default)s; empty: off)")
    parser.add_argument("--metrics-bind-address", default=DEFAULT_METRICS_BIND_ADDRESS, metavar="IP:PORT",
                        help="Prometheus /metrics (%(default)s; empty: off)")
    parser.add_argument("--bind-address-hard-fail", action="store_true",
                        help="exit when the healthz or metrics address cannot be bound (default: "
                             "log it and keep trying, as kube-proxy)")


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (`run`), whose flags the file can set."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


class _Unset(list):
    """A default no flag gave (a list, so that action="append" can add to a copy of it)."""


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags ``argv`` gives explicitly: argv parsed again into a namespace
    where every destination holds a marker (argparse only fills the destinations it lacks with
    defaults, so a marker left is a flag not given)."""
    marks = {a.dest: _Unset() for a in parser._actions if a.dest != argparse.SUPPRESS}
    namespace = argparse.Namespace(**marks)
    parser.parse_known_args(list(argv), namespace=namespace)
    return {dest for dest in marks
            if not (isinstance(getattr(namespace, dest), _Unset) and not getattr(namespace, dest))}


def apply(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str],
          given_before: Sequence[str] = ()) -> KubeProxyConfig:
    """Sets ``args`` from the file ``args.config`` where no flag of the subcommand's ``argv`` was
    given (nor -v among the main command's options, ``given_before``); logs what the file asks
    that lbctl does not do. ConfigError when the file cannot be used."""
    config = read(args.config)
    given = explicit_dests(parser, argv)
    if any(t in ("-v", "--v") or t.startswith(("-v=", "--v=")) or re.fullmatch(r"-v\d+", t)
           for t in given_before):
        given.add("v")
    known = {a.dest for a in parser._actions} | {"v"}
    for dest, value in config.values.items():
        name = config.sources[dest]
        if dest not in known:
            config.reports.append(f"{config.path}: {name} is not applied: this lbctl has no flag for it")
        elif dest in given:
            log.info("%s: %s is overridden by the command line", config.path, name)
        else:
            setattr(args, dest, value)
            log.debug("%s: %s -> %s=%r", config.path, name, dest, value)
    for text in config.reports:
        log.warning("%s", text)
    return config
