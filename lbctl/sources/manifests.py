"""Services and endpoints from a directory of Kubernetes manifests.

The manifest source is lbctl's stand-in for the API server: it reads the ``Service``,
``EndpointSlice`` (discovery.k8s.io/v1) and legacy ``Endpoints`` objects that ``kubectl get -o yaml``
prints, and turns them into the frozen objects of ``lbctl.model.objects``.

Bad input never stops the rest: every object that cannot be used becomes one ``Problem`` that names
it, says what is wrong and what was done, and everything else is kept. The checks follow the
API server's own validation, because a manifest the API server would refuse must not program a
datapath here either.

Legacy ``Endpoints`` are converted the way the EndpointSlice mirroring controller does it: one
slice per subset and address family, labelled with the Endpoints' name as service name.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lbctl.model.objects import (
    ClusterSnapshot,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Problem,
    Protocol,
    Service,
    ServicePort,
)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 64 << 20   # a manifest file larger than this is refused, not parsed
MAX_NESTING = 200           # [ and { nesting: Kubernetes objects need a dozen levels
SERVICE_NAME_LABEL = "kubernetes.io/service-name"           # ties an EndpointSlice to its Service
SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"  # "true": Endpoints not mirrored
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
TRAFFIC_POLICIES = ("Cluster", "Local")
SESSION_AFFINITIES = ("None", "ClientIP")
DEFAULT_AFFINITY_TIMEOUT = 10800                            # seconds, Kubernetes' default
MAX_AFFINITY_TIMEOUT = 86400                                # the API server refuses more
RACY_WINDOW_NS = 2_000_000_000                              # see ManifestSource.poll

# The characters of the API server's DNS_LABEL and IANA_SVC_NAME (port names): lowercase
# letters, digits and '-', not at either end. The lengths and extra rules differ; see below.
_LABEL_CHARS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when available: 10x faster


class _Invalid(ValueError):
    """Raised by the field parsers; the caller turns the message into one Problem."""


# --- public API ------------------------------------------------------------------------------


@typing.runtime_checkable
class Source(typing.Protocol):
    """Where cluster state comes from: manifests now, the Kubernetes API later.

    The agent calls ``poll()`` in its loop; it returns a whole new snapshot when anything
    changed and ``None`` otherwise, so the agent only computes and syncs when there is news.
    """

    def poll(self) -> ClusterSnapshot | None: ...


def parse_documents(
    docs: Iterable[Any], origin: str
) -> tuple[list[Service], list[EndpointSlice], list[Problem]]:
    """Parse already-loaded documents (dicts) from one origin (a file name, for messages).

    Objects of other kinds are ignored silently. Checks that need every file at once (duplicate
    objects, slices of unknown services) are done by ``load_manifests``/``build_snapshot``.
    """
    parsed = _Parsed()
    for number, doc in enumerate(docs, start=1):
        _parse_document(parsed, doc, origin, f"document {number}")
    return parsed.services, [s for rec in parsed.records for s in rec.slices], parsed.problems


def load_manifests(directory: Path | str) -> ClusterSnapshot:
    """Read every manifest under ``directory`` (recursively, in sorted order) into a snapshot.

    Never raises for bad input: unreadable files, malformed YAML and invalid objects all end up
    in ``snapshot.problems``.
    """
    files, problems = _manifest_files(Path(directory))
    return _load_files(files, problems)


def build_snapshot(
    services: Iterable[Service],
    slices: Iterable[EndpointSlice],
    problems: Iterable[Problem] = (),
) -> ClusterSnapshot:
    """Join parsed objects into a snapshot: first of duplicates wins, orphan slices are reported.

    For sources other than manifests (tests, the future API source); ``load_manifests`` uses the
    same rules.
    """
    records = [_Record(f"EndpointSlice {s.key}", s.origin, s.service_key, (s,)) for s in slices]
    return _snapshot(list(services), records, list(problems))


class ManifestSource:
    """A ``Source`` that watches a directory of manifests.

    ``poll()`` stats every manifest file and re-reads the directory only when the set of files or
    a file's (mtime_ns, size, inode) changed since the last snapshot. ``interval`` is how often
    the agent should call ``poll()``, in seconds.
    """

    def __init__(self, directory: Path | str, interval: float = 1.0) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self._fingerprint: tuple | None = None
        self._snapshot: ClusterSnapshot | None = None
        self._racy = False
        self._last_good: dict[Path, list[Any]] = {}

    def poll(self) -> ClusterSnapshot | None:
        """Return a fresh snapshot the first time and after any change, else ``None``.

        A file written twice within the file system's timestamp granularity can keep the same
        mtime and size ("racy git" problem). So while any file is younger than RACY_WINDOW_NS
        the directory is re-read on every poll, and the snapshot is returned only if its content
        differs from the last one.
        """
        scan_started = time.time_ns()
        files, problems = _manifest_files(self.directory)
        fingerprint = _fingerprint(files, problems)
        if self._snapshot is not None and fingerprint == self._fingerprint and not self._racy:
            return None
        snapshot = _load_files(files, problems, self._last_good)
        news = (
            self._snapshot is None
            or fingerprint != self._fingerprint
            or snapshot != self._snapshot
        )
        self._fingerprint, self._snapshot = fingerprint, snapshot
        self._racy = _is_racy(fingerprint, scan_started)
        return snapshot if news else None


# --- files -----------------------------------------------------------------------------------


def _manifest_files(directory: Path) -> tuple[list[Path], list[Problem]]:
    """Every manifest file under ``directory``, sorted by path components.

    Hidden files and directories are skipped: a ConfigMap mounted as a volume holds every file
    twice (``name.yaml`` and ``..2024_01_01.../name.yaml``), and ``.git`` holds nothing for us.
    """
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        return [], [Problem(f"directory {directory}", f"{what}; no objects read from it")]
    problems: list[Problem] = []

    def unlistable(error: OSError) -> None:
        problems.append(Problem(
            f"directory {error.filename}",
            f"cannot list: {error.strerror}; its manifests skipped, others loaded",
        ))

    files = []
    for root, dirs, names in os.walk(directory, onerror=unlistable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(
            Path(root, name) for name in names
            if not name.startswith(".") and name.endswith(MANIFEST_SUFFIXES)
        )
    files.sort(key=lambda path: path.relative_to(directory).parts)
    return files, problems


class _FileState(typing.NamedTuple):
    path: str
    mtime_ns: int | None
    size: int | None
    inode: int | None
    error: int | None                    # errno when stat failed


def _fingerprint(files: list[Path], problems: list[Problem]) -> tuple:
    """What must stay equal for the directory to count as unchanged: names and stat results."""
    states = []
    for path in files:
        try:
            st = os.stat(path)           # follows symlinks: ConfigMap volumes swap link targets
            states.append(_FileState(str(path), st.st_mtime_ns, st.st_size, st.st_ino, None))
        except OSError as error:
            states.append(_FileState(str(path), None, None, None, error.errno))
    return tuple(states), tuple(problems)


def _is_racy(fingerprint: tuple, scan_started_ns: int) -> bool:
    """True when some file is so young that a later write might not change its mtime."""
    states, _ = fingerprint
    return any(s.mtime_ns is not None and s.mtime_ns >= scan_started_ns - RACY_WINDOW_NS for s in states)


def _load_files(files: list[Path], problems: list[Problem],
                last_good: dict[Path, list[Any]] | None = None) -> ClusterSnapshot:
    """Parse files into a snapshot. With `last_good` (a watching source's memory), a file that
    stops parsing keeps the documents it last parsed to, as the API server keeps the old object
    when an update is invalid: a typo while editing never deletes the file's services."""
    parsed = _Parsed(problems=list(problems))
    if last_good is not None:
        for gone in set(last_good) - set(files):
            del last_good[gone]
    for path in files:
        docs, problem = _read_documents(path)
        if last_good is not None:
            if problem is None:
                last_good[path] = docs
            elif path in last_good:
                docs = last_good[path]
                reason = problem.message.split("; ")[0]
                problem = Problem(problem.obj, f"{reason}; keeping the {len(docs)} document(s) "
                                               "it last held until it is fixed")
        for number, doc in enumerate(docs, start=1):
            _parse_document(parsed, doc, str(path), f"document {number}")
        if problem:
            parsed.problems.append(problem)
    return _snapshot(parsed.services, parsed.records, parsed.problems)


def _read_documents(path: Path) -> tuple[list[Any], Problem | None]:
    """Load one file; on a syntax error keep the documents before it and return a Problem."""
    obj = f"file {path}"
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return [], Problem(obj, f"larger than {MAX_FILE_BYTES >> 20} MiB; file skipped, others loaded")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        return [], Problem(obj, f"cannot read: {error.strerror or error}; file skipped, others loaded")
    except UnicodeDecodeError as error:
        return [], Problem(obj, f"not UTF-8 ({error.reason} at byte {error.start}); file skipped, others loaded")
    depth = _flow_depth(text)
    if depth > MAX_NESTING:
        # libyaml recurses per level and overflows the C stack long before Python notices:
        # refuse such a file before parsing it.
        return [], Problem(obj, f"nested {depth} levels deep (at most {MAX_NESTING}); file skipped, "
                                "others loaded")
    if path.suffix == ".json":
        try:
            return [json.loads(text)], None
        except json.JSONDecodeError as error:
            return [], Problem(obj, f"malformed JSON at line {error.lineno}: {error.msg}; file skipped, others loaded")
        except RecursionError:
            return [], Problem(obj, "nested too deep; file skipped, others loaded")
    docs: list[Any] = []
    try:
        for doc in yaml.load_all(text, Loader=_Loader):
            docs.append(doc)
    except yaml.YAMLError as error:
        return docs, Problem(obj, f"malformed YAML{_yaml_position(error)}: {_yaml_reason(error)}; "
                                  f"{len(docs)} document(s) before it kept, rest of the file skipped")
    except RecursionError:
        return docs, Problem(obj, f"nested too deep; {len(docs)} document(s) before it kept, rest of "
                                  "the file skipped")
    return docs, None


_BRACKETS = re.compile(r"[][{}]")


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ and { in the text (quotes ignored: an upper bound). Only the
    brackets are visited, so block-style YAML costs next to nothing."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif depth:
            depth -= 1
    return deepest


def _yaml_position(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _yaml_reason(error: yaml.YAMLError) -> str:
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error)


# --- documents -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One parsed EndpointSlice or Endpoints object and the slices it became."""

    label: str                          # "EndpointSlice default/web-abc", "Endpoints default/db"
    origin: str
    service_key: str
    slices: tuple[EndpointSlice, ...]


@dataclass
class _Parsed:
    services: list[Service] = field(default_factory=list)
    records: list[_Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# kind -> (API group, the version we read, what is skipped when the object is invalid)
_KINDS = {
    "Service": ("", "v1", "service skipped, others programmed"),
    "Endpoints": ("", "v1", "endpoints skipped, others kept"),
    "EndpointSlice": ("discovery.k8s.io", "v1", "slice skipped, others kept"),
}


def _parse_document(parsed: _Parsed, doc: Any, origin: str, position: str) -> None:
    """Dispatch one document by kind; lists are unpacked, unknown kinds ignored."""
    if doc is None:                      # empty document, e.g. a trailing "---"
        return
    if not isinstance(doc, dict):
        parsed.problems.append(Problem(
            f"file {origin}", f"{position} is a {_type_name(doc)}, not a mapping; skipped, others kept"))
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        if " item " in position:         # a List inside a List: no such thing (and YAML
            parsed.problems.append(Problem(  # aliases could make it loop forever)
                f"file {origin}", f"{position} is a List inside a List; skipped, others kept"))
            return
        for number, item in enumerate(doc["items"], start=1):
            _parse_document(parsed, item, origin, f"{position} item {number}")
        return
    if kind not in _KINDS:
        return                           # Deployment, ConfigMap, Kustomization, ...: not ours
    _parse_object(parsed, doc, kind, origin, position)


def _parse_object(parsed: _Parsed, doc: dict, kind: str, origin: str, position: str) -> None:
    """One Service, EndpointSlice or Endpoints: kept, or skipped with exactly one Problem."""
    group, version, consequence = _KINDS[kind]
    api = doc.get("apiVersion")
    api_group, api_version = _split_api_version(api)
    if api is not None and api_group != group:
        return                           # same kind name in another API group (Knative Service)
    namespace, name = _identity(doc)
    if name is None:
        parsed.problems.append(Problem(
            f"{kind} without name ({origin} {position})", f"metadata.name missing; {consequence}"))
        return
    obj = f"{kind} {namespace}/{name}"

    def report(message: str) -> None:
        parsed.problems.append(Problem(obj, _with_origin(message, origin)))

    if api_version != version:
        wanted = f"{group}/{version}" if group else version
        shown = "missing" if api is None else f"{_show(api)} not supported"
        report(f"apiVersion {shown} (use {wanted}); {consequence}")
        return
    warnings: list[str] = []             # reported only if the object is kept after all
    try:
        if kind == "Service":
            parsed.services.append(_service(doc, namespace, name, origin, warnings.append))
        elif kind == "EndpointSlice":
            eps = _endpoint_slice(doc, namespace, name, origin, warnings.append)
            parsed.records.append(_Record(obj, origin, eps.service_key, (eps,)))
        else:
            slices = _endpoints(doc, namespace, name, origin, warnings.append)
            if slices is not None:
                parsed.records.append(_Record(obj, origin, f"{namespace}/{name}", slices))
    except _Invalid as error:
        report(f"{error}; {consequence}")
        return
    for warning in warnings:
        report(warning)


def _split_api_version(value: Any) -> tuple[str, str]:
    """(group, version): "discovery.k8s.io/v1" -> ("discovery.k8s.io", "v1"); "v1" -> ("", "v1")."""
    if not isinstance(value, str):
        return "", ""
    group, _, version = value.rpartition("/")
    return group, version


def _identity(doc: dict) -> tuple[str, str | None]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name")
    namespace = meta.get("namespace")
    return (
        namespace if isinstance(namespace, str) and namespace else "default",
        name if isinstance(name, str) and name else None,
    )


def _labels(doc: dict) -> dict:
    meta = doc.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return labels if isinstance(labels, dict) else {}


def _with_origin(message: str, origin: str) -> str:
    return f"{message} ({origin})" if origin else message


# --- Service ---------------------------------------------------------------------------------


def _service(doc: dict, namespace: str, name: str, origin: str, warn: Callable[[str], None]) -> Service:
    spec = _mapping(doc.get("spec"), "spec")
    status = _mapping(doc.get("status"), "status")
    service_type = _choice(spec.get("type"), "type", SERVICE_TYPES, default="ClusterIP")
    affinity, timeout = _session_affinity(spec)
    return Service(
        namespace=namespace,
        name=name,
        type=service_type,
        cluster_ips=_cluster_ips(spec, service_type, warn),
        ports=_service_ports(spec.get("ports")),
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        external_ips=tuple(
            _ip(ip, f"externalIPs[{i}]") for i, ip in enumerate(_list(spec.get("externalIPs"), "externalIPs"))
        ),
        load_balancer_ips=_load_balancer_ips(status),
        load_balancer_source_ranges=tuple(
            _cidr(cidr, f"loadBalancerSourceRanges[{i}]")
            for i, cidr in enumerate(_list(spec.get("loadBalancerSourceRanges"), "loadBalancerSourceRanges"))
        ),
        external_traffic_policy=_choice(
            spec.get("externalTrafficPolicy"), "externalTrafficPolicy", TRAFFIC_POLICIES, default="Cluster"),
        internal_traffic_policy=_choice(
            spec.get("internalTrafficPolicy"), "internalTrafficPolicy", TRAFFIC_POLICIES, default="Cluster"),
        health_check_node_port=_optional_port(spec.get("healthCheckNodePort"), "healthCheckNodePort"),
        has_selector=bool(spec.get("selector")),   # empty or absent: endpoints managed by hand
        origin=origin,
    )


def _cluster_ips(spec: dict, service_type: str, warn: Callable[[str], None]) -> tuple[str, ...]:
    """spec.clusterIP / spec.clusterIPs, checked as the API server does; () when headless."""
    if service_type == "ExternalName":
        return ()                        # a DNS alias: nothing to proxy
    single = spec.get("clusterIP")
    listed = _list(spec.get("clusterIPs"), "clusterIPs")
    if single in (None, "") and not listed:
        warn("spec.clusterIP missing: nothing allocates one when reading manifests; set it "
             "(as `kubectl get svc` shows it) or \"None\" for headless; service kept without a cluster IP")
        return ()
    if single not in (None, "") and listed and listed[0] != single:
        raise _Invalid(f"clusterIPs[0] {_show(listed[0])} differs from clusterIP {_show(single)}")
    values = listed or [single]
    if "None" in values:
        if values != ["None"]:
            raise _Invalid(f"clusterIPs {_show(values)}: \"None\" (headless) must be the only value")
        if service_type != "ClusterIP":
            raise _Invalid(f"clusterIP \"None\" (headless) is only valid for type ClusterIP, not {service_type}")
        return ()
    name = "clusterIPs" if listed else "clusterIP"
    ips = tuple(_unicast(_ip(ip, f"{name}[{i}]" if listed else name), f"{name}[{i}]" if listed else name)
                for i, ip in enumerate(values))
    if len(ips) > 2 or (len(ips) == 2 and _family(ips[0]) == _family(ips[1])):
        raise _Invalid(f"clusterIPs {_show(list(ips))}: at most one address per IP family")
    return ips


def _service_ports(raw: Any) -> tuple[ServicePort, ...]:
    ports = tuple(_service_port(p, i) for i, p in enumerate(_list(raw, "ports")))
    _check_port_set(ports)
    return ports


def _service_port(raw: Any, index: int) -> ServicePort:
    spec = _mapping(raw, f"ports[{index}]")
    name = _port_name(spec.get("name"))
    port = _port_number(spec.get("port"), "port")
    return ServicePort(
        name=name,
        port=port,
        protocol=_protocol(spec.get("protocol")),
        target_port=_target_port(spec.get("targetPort"), port),
        node_port=_optional_port(spec.get("nodePort"), "nodePort"),
    )


def _check_port_set(ports: tuple[ServicePort, ...]) -> None:
    """Names must be unique and present when there are several ports; port/protocol unique."""
    names: set[str] = set()
    numbers: set[tuple[int, Protocol]] = set()
    for port in ports:
        if len(ports) > 1 and not port.name:
            raise _Invalid(f"port {port.port}/{port.protocol.value} has no name; "
                           f"every port needs a name when a service has several")
        if port.name in names:
            raise _Invalid(f"duplicate port name \"{port.name}\"")
        if (port.port, port.protocol) in numbers:
            raise _Invalid(f"duplicate port {port.port}/{port.protocol.value}")
        names.add(port.name)
        numbers.add((port.port, port.protocol))


def _port_name(value: Any) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_CHARS.fullmatch(value):
        raise _Invalid(f"port name {_show(value)} invalid (lowercase letters, digits and '-', at most 63)")
    return value


def _target_port(value: Any, port: int) -> int | str:
    """A number, or the name of a container port (an IANA service name); defaults to ``port``."""
    if value is None or value == "" or (_is_int(value) and value == 0):
        return port                      # the API server's defaulting: 0 and "" mean "same as port"
    if isinstance(value, str):
        if not _is_iana_svc_name(value):
            raise _Invalid(f"targetPort {_show(value)} is not a valid port name (at most 15 characters: "
                           f"lowercase letters, digits and single '-' inside, at least one letter)")
        return value
    return _port_number(value, "targetPort")


def _is_iana_svc_name(value: str) -> bool:
    return (
        len(value) <= 15
        and _LABEL_CHARS.fullmatch(value) is not None
        and "--" not in value
        and any("a" <= c <= "z" for c in value)
    )


def _session_affinity(spec: dict) -> tuple[str, int]:
    affinity = _choice(spec.get("sessionAffinity"), "sessionAffinity", SESSION_AFFINITIES, default="None")
    if affinity != "ClientIP":
        return affinity, DEFAULT_AFFINITY_TIMEOUT
    config = _mapping(spec.get("sessionAffinityConfig"), "sessionAffinityConfig")
    client_ip = _mapping(config.get("clientIP"), "sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return affinity, DEFAULT_AFFINITY_TIMEOUT
    if not _is_int(timeout) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise _Invalid(f"sessionAffinityConfig.clientIP.timeoutSeconds {_show(timeout)} "
                       f"out of range (1-{MAX_AFFINITY_TIMEOUT})")
    return affinity, timeout


def _load_balancer_ips(status: dict) -> tuple[str, ...]:
    """status.loadBalancer.ingress[].ip; entries with only a hostname are not addresses we match."""
    load_balancer = _mapping(status.get("loadBalancer"), "status.loadBalancer")
    ips = []
    for i, raw in enumerate(_list(load_balancer.get("ingress"), "status.loadBalancer.ingress")):
        ingress = _mapping(raw, f"status.loadBalancer.ingress[{i}]")
        if ingress.get("ip") not in (None, ""):
            ips.append(_ip(ingress["ip"], f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(ips)


# --- EndpointSlice ---------------------------------------------------------------------------


def _endpoint_slice(doc: dict, namespace: str, name: str, origin: str,
                    warn: Callable[[str], None]) -> EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice; a bad port or endpoint drops only itself."""
    service_name = _labels(doc).get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        raise _Invalid(f"label {SERVICE_NAME_LABEL} missing, so no service uses it")
    address_type = doc.get("addressType")
    if address_type not in ADDRESS_TYPES:
        raise _Invalid(f"addressType {_show(address_type)} unknown (IPv4, IPv6 or FQDN)")
    ports = []
    for i, raw in enumerate(_list(doc.get("ports"), "ports")):
        try:
            ports.append(_endpoint_port(raw))
        except _Invalid as error:
            warn(f"ports[{i}]: {error}; port dropped, rest of the slice kept")
    endpoints = []
    for i, raw in enumerate(_list(doc.get("endpoints"), "endpoints")):
        try:
            endpoints.append(_slice_endpoint(raw, address_type))
        except _Invalid as error:
            warn(f"endpoints[{i}]: {error}; endpoint dropped, rest of the slice kept")
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        origin=origin,
    )


def _endpoint_port(raw: Any) -> EndpointPort:
    spec = _mapping(raw, "port")
    name = spec.get("name") or ""
    if not isinstance(name, str):
        raise _Invalid(f"port name {_show(name)} is not a string")
    return EndpointPort(name=name, port=_port_number(spec.get("port"), "port"),
                        protocol=_protocol(spec.get("protocol")))


def _slice_endpoint(raw: Any, address_type: str) -> Endpoint:
    spec = _mapping(raw, "endpoint")
    addresses = _list(spec.get("addresses"), "addresses")
    if not addresses:
        raise _Invalid("no addresses")
    conditions = _mapping(spec.get("conditions"), "conditions")
    return Endpoint(
        addresses=tuple(_endpoint_address(a, address_type) for a in addresses),
        # The v1 API's defaults, as kube-proxy applies them: nil ready and nil serving mean
        # true, nil terminating means false.
        ready=_condition(conditions, "ready", default=True),
        serving=_condition(conditions, "serving", default=True),
        terminating=_condition(conditions, "terminating", default=False),
        node_name=_optional_str(spec.get("nodeName"), "nodeName"),
        zone=_optional_str(spec.get("zone"), "zone"),
        hostname=_optional_str(spec.get("hostname"), "hostname"),
    )


def _endpoint_address(value: Any, address_type: str) -> str:
    if address_type == "FQDN":
        if not isinstance(value, str) or not value:
            raise _Invalid(f"address {_show(value)} is not a domain name")
        return value
    address = _unicast(_ip(value, "address"), "address")
    if _family(address) != address_type:
        raise _Invalid(f"address {_show(value)} is not an {address_type} address")
    return address


def _condition(conditions: dict, name: str, default: bool) -> bool:
    value = conditions.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(f"conditions.{name} {_show(value)} is not true or false")
    return value


# --- legacy Endpoints ------------------------------------------------------------------------


def _endpoints(doc: dict, namespace: str, name: str, origin: str,
               warn: Callable[[str], None]) -> tuple[EndpointSlice, ...] | None:
    """Legacy v1 Endpoints as the mirroring controller turns them into EndpointSlices.

    Unlike that controller, Endpoints of services with a selector are mirrored too: with
    manifests there is no EndpointSlice controller to make slices from the selector, and a copy
    of slices that also exist is harmless (``desired.service_ports`` deduplicates endpoints).
    ``None`` when the object asks not to be mirrored.
    """
    if _labels(doc).get(SKIP_MIRROR_LABEL) == "true":
        return None
    slices: list[EndpointSlice] = []
    for i, raw in enumerate(_list(doc.get("subsets"), "subsets")):
        for family, ports, endpoints in _mirror_subset(raw, i, warn):
            slices.append(EndpointSlice(
                namespace=namespace,
                name=f"{name}-mirror-{len(slices)}",
                service_name=name,
                address_type=family,
                ports=ports,
                endpoints=endpoints,
                origin=origin,
            ))
    return tuple(slices)


def _mirror_subset(
    raw: Any, index: int, warn: Callable[[str], None]
) -> list[tuple[str, tuple[EndpointPort, ...], tuple[Endpoint, ...]]]:
    """One subset as (addressType, ports, endpoints), one triple per address family present."""
    subset = _mapping(raw, f"subsets[{index}]")
    ports = _subset_ports(subset, index, warn)
    by_family: dict[str, list[Endpoint]] = {"IPv4": [], "IPv6": []}
    for key, ready in (("addresses", True), ("notReadyAddresses", False)):
        for j, address in enumerate(_list(subset.get(key), f"subsets[{index}].{key}")):
            try:
                endpoint = _legacy_endpoint(address, ready, f"subsets[{index}].{key}[{j}]")
            except _Invalid as error:
                warn(f"{error}; address dropped, the rest kept")
                continue
            by_family[_family(endpoint.addresses[0])].append(endpoint)
    return [(family, ports, tuple(endpoints)) for family, endpoints in by_family.items() if endpoints]


def _subset_ports(subset: dict, index: int, warn: Callable[[str], None]) -> tuple[EndpointPort, ...]:
    ports = []
    for j, raw in enumerate(_list(subset.get("ports"), f"subsets[{index}].ports")):
        try:
            ports.append(_endpoint_port(raw))
        except _Invalid as error:
            warn(f"subsets[{index}].ports[{j}]: {error}; port dropped, the rest kept")
    return tuple(ports)


def _legacy_endpoint(raw: Any, ready: bool, where: str) -> Endpoint:
    spec = _mapping(raw, where)
    try:
        address = _unicast(_ip(spec.get("ip"), "ip"), "ip")
    except _Invalid as error:
        raise _Invalid(f"{where}: {error}") from None
    return Endpoint(
        addresses=(address,),
        ready=ready,
        serving=ready,                   # Endpoints cannot say "terminating but serving"
        terminating=False,
        node_name=_optional_str(spec.get("nodeName"), "nodeName"),
        hostname=_optional_str(spec.get("hostname"), "hostname"),
    )


# --- the whole snapshot ----------------------------------------------------------------------


def _snapshot(services: list[Service], records: list[_Record], problems: list[Problem]) -> ClusterSnapshot:
    """Drop duplicates (the first wins); report slices whose service is absent but keep them."""
    problems = list(problems)
    kept: dict[str, Service] = {}
    for service in services:
        first = kept.get(service.key)
        if first is None:
            kept[service.key] = service
        else:
            problems.append(Problem(f"Service {service.key}", _duplicate(first.origin, service.origin)))
    slices: dict[str, list[EndpointSlice]] = {}
    seen: dict[str, str] = {}
    for record in records:
        if record.label in seen:
            problems.append(Problem(record.label, _duplicate(seen[record.label], record.origin)))
            continue
        seen[record.label] = record.origin
        if record.service_key not in kept:
            problems.append(Problem(record.label, _with_origin(
                f"Service {record.service_key} not found; kept, used once the service appears",
                record.origin)))
        if record.slices:
            slices.setdefault(record.service_key, []).extend(record.slices)
    return ClusterSnapshot(
        services=dict(sorted(kept.items())),
        slices={key: tuple(value) for key, value in sorted(slices.items())},
        problems=tuple(problems),
    )


def _duplicate(first: str, second: str) -> str:
    if first == second:
        return f"defined twice in {first}; the first kept, the second ignored"
    return f"defined twice, in {first} and in {second}; the one in {first} kept, the other ignored"


# --- field helpers ---------------------------------------------------------------------------


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"{what} is a {_type_name(value)}, not a mapping")
    return value


def _list(value: Any, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"{what} is a {_type_name(value)}, not a list")
    return value


def _choice(value: Any, what: str, allowed: tuple[str, ...], default: str) -> str:
    if value in (None, ""):
        return default
    if value not in allowed:
        raise _Invalid(f"{what} {_show(value)} unknown ({', '.join(allowed)})")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _port_number(value: Any, what: str) -> int:
    if value is None:
        raise _Invalid(f"{what} missing")
    if not _is_int(value):
        raise _Invalid(f"{what} {_show(value)} is not a number")
    if not 1 <= value <= 65535:
        raise _Invalid(f"{what} {value} out of range (1-65535)")
    return value


def _optional_port(value: Any, what: str) -> int | None:
    """nodePort and healthCheckNodePort: absent or 0 means "not set" (the API server allocates)."""
    if value is None or (_is_int(value) and value == 0):
        return None
    return _port_number(value, what)


def _protocol(value: Any) -> Protocol:
    if value is None:
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise _Invalid(f"protocol {_show(value)} not supported (TCP, UDP or SCTP)") from None


def _ip(value: Any, what: str) -> str:
    """A valid address in canonical form, so that equal addresses compare equal."""
    if not isinstance(value, str):
        raise _Invalid(f"{what} {_show(value)} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _Invalid(f"{what} {_show(value)} is not a valid IP address") from None


def _unicast(address: str, what: str) -> str:
    """The API server refuses these for service and endpoint addresses (ValidateNonSpecialIP):
    a datapath given 0.0.0.0, 127.0.0.1, a multicast or a link-local address (lbctl's hairpin
    address is one) would steer traffic nowhere or somewhere surprising."""
    ip = ipaddress.ip_address(address)
    for special, label in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                           (ip.is_multicast, "multicast"), (ip.is_link_local, "link-local")):
        if special:
            raise _Invalid(f"{what} {address} is a {label} address")
    return address


def _cidr(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{what} {_show(value)} is not a CIDR")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise _Invalid(f"{what} {_show(value)} is not a valid CIDR") from None


def _family(address: str) -> str:
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


def _optional_str(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{what} {_show(value)} is not a string")
    return value


def _show(value: Any) -> str:
    """A value as it would look in JSON, for messages: "ICMP", 70000, ["a", "b"]."""
    return json.dumps(value, default=str)


def _type_name(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)
