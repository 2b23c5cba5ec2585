"""API-server style validation: Kubernetes objects as plain dicts in, model objects and Problems out.

``Service``, ``EndpointSlice`` (discovery.k8s.io/v1) and legacy ``Endpoints`` objects, as
``kubectl get -o yaml`` prints them or a watch delivers them, become the frozen objects of
``lbctl.model.objects``. Nothing here reads files or YAML: the manifest source calls these
functions per document, a Kubernetes API source will call them per object.

Bad input never stops the rest: every object that cannot be used becomes one ``Problem`` that
names it, says what is wrong and what was done, and everything else is kept. The checks are the
API server's own (k8s.io/kubernetes pkg/apis/core/validation ValidateService and
ValidateEndpoints, pkg/apis/discovery/validation ValidateEndpointSlice, apimachinery's name
rules, and the node port allocator's range), applied after the API server's defaulting: a
manifest the API server would refuse must not program a datapath here either. Where the API
server refuses a whole EndpointSlice for one bad endpoint or port, only that part is dropped.

Addresses are read as kube-proxy reads them, with netutils.ParseIPSloppy and ParseCIDRSloppy:
old API servers stored IPv4 octets with leading zeros, which are decimal (``10.0.0.010`` is
10.0.0.10). Every address and CIDR is kept in canonical form, so equal addresses compare equal.

Legacy ``Endpoints`` are converted the way the EndpointSlice mirroring controller does it: one
slice per subset and address family, labelled with the Endpoints' name as service name.

Not checked (nothing lbctl reads depends on them): label and selector syntax, annotations
(but lbctl's own, ``lbctl.io/lb-algorithm`` and ``lbctl.io/maglev-table-size``),
appProtocol, trafficDistribution, loadBalancerClass, the status' hostnames and ipMode.
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lbctl.model import addresses
from lbctl.model.objects import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Problem,
    Protocol,
    Service,
    ServicePort,
    is_prime,
)
from lbctl.sources.base import Record, with_origin

SERVICE_NAME_LABEL = "kubernetes.io/service-name"           # ties an EndpointSlice to its Service
SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"  # "true": Endpoints not mirrored
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
IP_FAMILIES = ("IPv4", "IPv6")
IP_FAMILY_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")
TRAFFIC_POLICIES = ("Cluster", "Local")
SESSION_AFFINITIES = ("None", "ClientIP")
DEFAULT_AFFINITY_TIMEOUT = 10800                            # seconds, Kubernetes' default
MAX_AFFINITY_TIMEOUT = 86400                                # the API server refuses more
DEFAULT_NODE_PORT_RANGE = (30000, 32767)                    # kube-apiserver --service-node-port-range
KUBELET_PORT = 10250                                        # a LoadBalancer may not expose it
MAX_SLICE_ENDPOINTS = 1000                                  # discovery validation's limits
MAX_ENDPOINT_ADDRESSES = 100
MAX_SLICE_PORTS = 20000
# lbctl's own Service annotations (read by the eBPF datapath only): Maglev consistent hashing
# instead of uniform random backend choice, and its table size (a prime, Cilium's limits).
LB_ALGORITHM_ANNOTATION = "lbctl.io/lb-algorithm"
MAGLEV_TABLE_SIZE_ANNOTATION = "lbctl.io/maglev-table-size"
LB_ALGORITHMS = ("random", "maglev")
MAGLEV_TABLE_SIZES = (3, 131071)

# The characters of the API server's DNS_LABEL and IANA_SVC_NAME (port names): lowercase
# letters, digits and '-', not at either end. The lengths and extra rules differ; see below.
_LABEL_CHARS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

DNS1123_LABEL_RULE = ("a DNS-1123 label: at most 63 characters, lowercase letters, digits and '-', "
                      "starting and ending with a letter or digit")
DNS1035_LABEL_RULE = ("a DNS-1035 label: at most 63 characters, lowercase letters, digits and '-', "
                      "starting with a letter and ending with a letter or digit")
DNS1123_SUBDOMAIN_RULE = ("a DNS-1123 subdomain: at most 253 characters, lowercase letters, digits, "
                          "'-' and '.', starting and ending with a letter or digit")


class Invalid(ValueError):
    """Raised by the field parsers; the caller turns the message into one Problem."""


# --- names, ports, addresses -----------------------------------------------------------------


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _LABEL_CHARS.fullmatch(value) is not None


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1035_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(value) is not None


def parse_port_range(text: str) -> tuple[int, int]:
    """kube-apiserver's --service-node-port-range: "30000-32767", "30000+2767" or one port."""
    base, sep, rest = text.strip().partition("-")
    if not sep:
        base, sep, rest = text.strip().partition("+")
    try:
        low = int(base)
        high = low if not sep else (int(rest) if sep == "-" else low + int(rest))
    except ValueError:
        raise ValueError(f"port range {text!r} is not LOW-HIGH (e.g. 30000-32767)") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"port range {text!r} must lie within 1-65535, low before high")
    return low, high


def parse_ip_sloppy(text: Any) -> str | None:
    """An address as kube-proxy reads it (``lbctl.model.addresses``), in canonical form."""
    ip = addresses.parse_ip_sloppy(text)
    return None if ip is None else str(ip)


def parse_cidr_sloppy(text: Any) -> str | None:
    """A CIDR as kube-proxy reads it (``lbctl.model.addresses``), in canonical form."""
    network = addresses.parse_cidr_sloppy(text)
    return None if network is None else str(network)


# --- documents -------------------------------------------------------------------------------


@dataclass
class Parsed:
    """What the documents of one or more origins parsed to, in input order."""

    services: list[Service] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


# kind -> (API group, the version we read, what is skipped when the object is invalid,
#          the name rule of the kind: (check, description))
_KINDS: dict[str, tuple[str, str, str, Callable[[str], bool], str]] = {
    "Service": ("", "v1", "service skipped, others programmed", is_dns1035_label, DNS1035_LABEL_RULE),
    "Endpoints": ("", "v1", "endpoints skipped, others kept", is_dns1123_subdomain, DNS1123_SUBDOMAIN_RULE),
    "EndpointSlice": ("discovery.k8s.io", "v1", "slice skipped, others kept", is_dns1123_subdomain,
                      DNS1123_SUBDOMAIN_RULE),
}


def parse_documents(
    docs: Iterable[Any], origin: str, node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
) -> tuple[list[Service], list[EndpointSlice], list[Problem]]:
    """Parse already-loaded documents (dicts) from one origin (a file name, for messages).

    Objects of other kinds are ignored silently. Checks that need every object at once
    (duplicate objects, slices of unknown services) are done when the snapshot is built.
    """
    parsed = Parsed()
    for number, doc in enumerate(docs, start=1):
        parse_document(parsed, doc, origin, f"document {number}", node_port_range)
    return parsed.services, [s for rec in parsed.records for s in rec.slices], parsed.problems


def parse_document(parsed: Parsed, doc: Any, origin: str, position: str,
                   node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> None:
    """Dispatch one document by kind into ``parsed``; lists are unpacked, unknown kinds ignored."""
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
            parse_document(parsed, item, origin, f"{position} item {number}", node_port_range)
        return
    if kind not in _KINDS:
        return                           # Deployment, ConfigMap, Kustomization, ...: not ours
    _parse_object(parsed, doc, kind, origin, position, node_port_range)


def _parse_object(parsed: Parsed, doc: dict, kind: str, origin: str, position: str,
                  node_port_range: tuple[int, int]) -> None:
    """One Service, EndpointSlice or Endpoints: kept, or skipped with exactly one Problem."""
    group, version, consequence, name_ok, name_rule = _KINDS[kind]
    api = doc.get("apiVersion")
    api_group, api_version = _split_api_version(api)
    if api is not None and api_group != group:
        return                           # same kind name in another API group (Knative Service)
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name, namespace = meta.get("name"), meta.get("namespace")
    if name is None or name == "":
        parsed.problems.append(Problem(
            f"{kind} without name ({origin} {position})", f"metadata.name missing; {consequence}"))
        return
    if not isinstance(name, str):
        parsed.problems.append(Problem(
            f"{kind} without name ({origin} {position})",
            f"metadata.name {_show(name)} is not a string; {consequence}"))
        return
    if namespace is None or namespace == "":
        namespace = "default"
    obj = f"{kind} {namespace if isinstance(namespace, str) else _show(namespace)}/{name}"

    def report(message: str) -> None:
        parsed.problems.append(Problem(obj, with_origin(message, origin)))

    if api_version != version:
        wanted = f"{group}/{version}" if group else version
        shown = "missing" if api is None else f"{_show(api)} not supported"
        report(f"apiVersion {shown} (use {wanted}); {consequence}")
        return
    if not isinstance(namespace, str) or not is_dns1123_label(namespace):
        report(f"metadata.namespace {_show(namespace)} is not a valid namespace name "
               f"({DNS1123_LABEL_RULE}); {consequence}")
        return
    if not name_ok(name):
        report(f"metadata.name {_show(name)} is not a valid {kind} name ({name_rule}); {consequence}")
        return
    warnings: list[str] = []             # reported only if the object is kept after all
    try:
        if kind == "Service":
            parsed.services.append(_service(doc, namespace, name, origin, warnings.append, node_port_range))
        elif kind == "EndpointSlice":
            eps = _endpoint_slice(doc, namespace, name, origin, warnings.append)
            parsed.records.append(Record(obj, origin, eps.service_key, (eps,)))
        else:
            slices = _endpoints(doc, namespace, name, origin, warnings.append)
            if slices is not None:
                parsed.records.append(Record(obj, origin, f"{namespace}/{name}", slices))
    except Invalid as error:
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


def _labels(doc: dict) -> dict:
    meta = doc.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return labels if isinstance(labels, dict) else {}


# --- Service ---------------------------------------------------------------------------------


def _service(doc: dict, namespace: str, name: str, origin: str, warn: Callable[[str], None],
             node_port_range: tuple[int, int]) -> Service:
    spec = _mapping(doc.get("spec"), "spec")
    status = _mapping(doc.get("status"), "status")
    service_type = _choice(spec.get("type"), "type", SERVICE_TYPES, default="ClusterIP")
    affinity, timeout = _session_affinity(spec)
    if service_type == "ExternalName":
        _external_name(spec)
        cluster_ips: tuple[str, ...] = ()
        headless = False
    else:
        cluster_ips, headless = _cluster_ips(spec, service_type, warn)
    ports = _service_ports(spec.get("ports"), service_type, node_port_range)
    if not ports and not headless and service_type != "ExternalName":
        raise Invalid("spec.ports missing: a service needs at least one port (headless ones, with "
                      "clusterIP \"None\", and ExternalName ones excepted)")
    external_ips = tuple(
        _unicast(_ip(ip, f"externalIPs[{i}]"), f"externalIPs[{i}]")
        for i, ip in enumerate(_list(spec.get("externalIPs"), "externalIPs")))
    source_ranges = tuple(
        _cidr(cidr, f"loadBalancerSourceRanges[{i}]")
        for i, cidr in enumerate(_list(spec.get("loadBalancerSourceRanges"), "loadBalancerSourceRanges")))
    if source_ranges and service_type != "LoadBalancer":
        raise Invalid(f"loadBalancerSourceRanges may only be used when type is LoadBalancer, not {service_type}")
    external_policy = _choice(spec.get("externalTrafficPolicy"), "externalTrafficPolicy",
                              TRAFFIC_POLICIES, default="Cluster")
    externally_accessible = service_type in ("NodePort", "LoadBalancer") or (
        service_type == "ClusterIP" and bool(external_ips))
    if spec.get("externalTrafficPolicy") not in (None, "") and not externally_accessible:
        raise Invalid(f"externalTrafficPolicy {_show(spec['externalTrafficPolicy'])} may only be set for "
                      "externally-accessible services (type NodePort or LoadBalancer, or with externalIPs); "
                      "remove it")
    load_balancing, maglev_table_size = _load_balancing(doc, warn)
    health_check = _optional_node_port(spec.get("healthCheckNodePort"), "healthCheckNodePort", node_port_range)
    if health_check is not None and not (service_type == "LoadBalancer" and external_policy == "Local"):
        raise Invalid(f"healthCheckNodePort {health_check} may only be set when type is LoadBalancer and "
                      "externalTrafficPolicy is Local")
    return Service(
        namespace=namespace,
        name=name,
        type=service_type,
        cluster_ips=cluster_ips,
        ports=ports,
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        external_ips=external_ips,
        load_balancer_ips=_load_balancer_ips(status),
        load_balancer_source_ranges=source_ranges,
        external_traffic_policy=external_policy,
        internal_traffic_policy=_choice(
            spec.get("internalTrafficPolicy"), "internalTrafficPolicy", TRAFFIC_POLICIES, default="Cluster"),
        health_check_node_port=health_check,
        has_selector=bool(spec.get("selector")),   # empty or absent: endpoints managed by hand
        origin=origin,
        load_balancing=load_balancing,
        maglev_table_size=maglev_table_size,
    )


def _load_balancing(doc: dict, warn: Callable[[str], None]) -> tuple[str, int]:
    """(algorithm, Maglev table size or 0 for the node's default) from lbctl's annotations. A
    bad value is reported and the default used: a typo in an annotation should not take a
    service down, and random choice (or the default size) still serves it."""
    meta = doc.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    if not isinstance(annotations, dict):
        return "random", 0
    algorithm = annotations.get(LB_ALGORITHM_ANNOTATION, "random")
    if algorithm not in LB_ALGORITHMS:
        warn(f"annotation {LB_ALGORITHM_ANNOTATION} {_show(algorithm)} is not one of "
             f"{', '.join(LB_ALGORITHMS)}; using random")
        algorithm = "random"
    raw = annotations.get(MAGLEV_TABLE_SIZE_ANNOTATION)
    if raw is None:
        return algorithm, 0
    if algorithm != "maglev":
        warn(f"annotation {MAGLEV_TABLE_SIZE_ANNOTATION} is set but {LB_ALGORITHM_ANNOTATION} is not "
             "maglev; ignored")
        return algorithm, 0
    text = raw.strip() if isinstance(raw, str) else ""
    low, high = MAGLEV_TABLE_SIZES
    if text.isdigit() and low <= int(text) <= high and is_prime(int(text)):
        return algorithm, int(text)
    why = f"not a prime from {low} to {high}"
    if text.isdigit() and low <= int(text) <= high:
        near = [next(p for p in range(int(text), 1, -1) if is_prime(p)),
                next(p for p in range(int(text), 2 * high) if is_prime(p))]
        why = f"not prime (the nearest primes are {near[0]} and {near[1]})"
    warn(f"annotation {MAGLEV_TABLE_SIZE_ANNOTATION} {_show(raw)} is {why}; using the node's default "
         "Maglev table size (--maglev-table-size)")
    return algorithm, 0


def _external_name(spec: dict) -> None:
    """An ExternalName service is a DNS alias: no cluster IPs, a valid DNS name."""
    if spec.get("clusterIP") not in (None, "") or spec.get("clusterIPs"):
        raise Invalid("clusterIP may not be set for ExternalName services; remove it")
    for key in ("ipFamilies", "ipFamilyPolicy"):
        if spec.get(key) not in (None, "", []):
            raise Invalid(f"{key} may not be set for ExternalName services; remove it")
    external_name = spec.get("externalName")
    if external_name in (None, ""):
        raise Invalid("externalName missing (the DNS name the service is an alias of)")
    if not isinstance(external_name, str) or not is_dns1123_subdomain(external_name.removesuffix(".")):
        raise Invalid(f"externalName {_show(external_name)} is not a DNS name ({DNS1123_SUBDOMAIN_RULE})")


def _cluster_ips(spec: dict, service_type: str, warn: Callable[[str], None]) -> tuple[tuple[str, ...], bool]:
    """spec.clusterIP / spec.clusterIPs / ipFamilies / ipFamilyPolicy, checked as the API
    server does: (addresses, headless); () when headless or not set."""
    single = spec.get("clusterIP")
    listed = _list(spec.get("clusterIPs"), "clusterIPs")
    families = _ip_families(spec)
    if single in (None, ""):
        if listed:
            raise Invalid(f"clusterIPs {_show(listed)} set without clusterIP; set clusterIP to "
                          "clusterIPs[0] too (the API server requires both)")
        warn("spec.clusterIP missing: nothing allocates one when reading manifests; set it "
             "(as `kubectl get svc` shows it) or \"None\" for headless; service kept without a cluster IP")
        return (), False
    if listed and listed[0] != single:
        raise Invalid(f"clusterIPs[0] {_show(listed[0])} differs from clusterIP {_show(single)}")
    values = listed or [single]
    if "None" in values:
        if values != ["None"]:
            raise Invalid(f"clusterIPs {_show(values)}: \"None\" (headless) must be the only value")
        if service_type != "ClusterIP":
            raise Invalid(f"clusterIP \"None\" (headless) is only valid for type ClusterIP, not {service_type}")
        return (), True
    if len(values) > 2:
        raise Invalid(f"clusterIPs {_show(values)}: at most 2 values, one per IP family")
    name = "clusterIPs" if listed else "clusterIP"
    ips = []
    for i, value in enumerate(values):
        what = f"{name}[{i}]" if listed else name
        ips.append(_unicast(_ip(value, what), what))
    if len(ips) == 2 and _family(ips[0]) == _family(ips[1]):
        raise Invalid(f"clusterIPs {_show(list(ips))}: at most one address per IP family")
    for i, (ip, family) in enumerate(zip(ips, families)):
        if _family(ip) != family:
            what = f"{name}[{i}]" if listed else name
            raise Invalid(f"{what} {_show(values[i])} is not an {family} address, as ipFamilies[{i}] says")
    if spec.get("ipFamilyPolicy") == "SingleStack" and (len(ips) == 2 or len(families) == 2):
        raise Invalid("ipFamilyPolicy SingleStack with two IP families; use PreferDualStack or "
                      "RequireDualStack, or keep one family")
    return tuple(ips), False


def _ip_families(spec: dict) -> list[str]:
    policy = spec.get("ipFamilyPolicy")
    if policy not in (None, "") and policy not in IP_FAMILY_POLICIES:
        raise Invalid(f"ipFamilyPolicy {_show(policy)} unknown ({', '.join(IP_FAMILY_POLICIES)})")
    families = _list(spec.get("ipFamilies"), "ipFamilies")
    for i, family in enumerate(families):
        if family not in IP_FAMILIES:
            raise Invalid(f"ipFamilies[{i}] {_show(family)} unknown (IPv4 or IPv6)")
    if len(set(families)) != len(families):
        raise Invalid(f"ipFamilies {_show(families)}: each family at most once")
    return families


def _service_ports(raw: Any, service_type: str, node_port_range: tuple[int, int]) -> tuple[ServicePort, ...]:
    ports = tuple(_service_port(p, i, service_type, node_port_range) for i, p in enumerate(_list(raw, "ports")))
    _check_port_set(ports)
    return ports


def _service_port(raw: Any, index: int, service_type: str, node_port_range: tuple[int, int]) -> ServicePort:
    spec = _mapping(raw, f"ports[{index}]")
    name = _port_name(spec.get("name"))
    port = _port_number(spec.get("port"), "port")
    if service_type == "LoadBalancer" and port == KUBELET_PORT:
        raise Invalid(f"port {port} may not be exposed by a LoadBalancer service (it is the kubelet's port)")
    node_port = _optional_node_port(spec.get("nodePort"), "nodePort", node_port_range)
    if node_port is not None and service_type == "ClusterIP":
        raise Invalid(f"nodePort {node_port} may not be used when type is ClusterIP (only NodePort and "
                      "LoadBalancer services have node ports); remove it or change the type")
    return ServicePort(
        name=name,
        port=port,
        protocol=_protocol(spec.get("protocol")),
        target_port=_target_port(spec.get("targetPort"), port),
        node_port=node_port,
    )


def _check_port_set(ports: tuple[ServicePort, ...]) -> None:
    """Names must be unique and present when there are several ports; port/protocol and
    nodePort/protocol unique."""
    names: set[str] = set()
    numbers: set[tuple[int, Protocol]] = set()
    node_ports: set[tuple[int, Protocol]] = set()
    for port in ports:
        if len(ports) > 1 and not port.name:
            raise Invalid(f"port {port.port}/{port.protocol.value} has no name; "
                          f"every port needs a name when a service has several")
        if port.name in names:
            raise Invalid(f"duplicate port name \"{port.name}\"")
        if (port.port, port.protocol) in numbers:
            raise Invalid(f"duplicate port {port.port}/{port.protocol.value}")
        if port.node_port is not None and (port.node_port, port.protocol) in node_ports:
            raise Invalid(f"duplicate nodePort {port.node_port}/{port.protocol.value}")
        names.add(port.name)
        numbers.add((port.port, port.protocol))
        if port.node_port is not None:
            node_ports.add((port.node_port, port.protocol))


def _port_name(value: Any) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not is_dns1123_label(value):
        raise Invalid(f"port name {_show(value)} invalid (lowercase letters, digits and '-', at most 63)")
    return value


def _target_port(value: Any, port: int) -> int | str:
    """A number, or the name of a container port (an IANA service name); defaults to ``port``."""
    if value is None or value == "" or (_is_int(value) and value == 0):
        return port                      # the API server's defaulting: 0 and "" mean "same as port"
    if isinstance(value, str):
        if not _is_iana_svc_name(value):
            raise Invalid(f"targetPort {_show(value)} is not a valid port name (at most 15 characters: "
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
    """sessionAffinityConfig with affinity None is dropped by the API server's defaulting."""
    affinity = _choice(spec.get("sessionAffinity"), "sessionAffinity", SESSION_AFFINITIES, default="None")
    if affinity != "ClientIP":
        return affinity, DEFAULT_AFFINITY_TIMEOUT
    config = _mapping(spec.get("sessionAffinityConfig"), "sessionAffinityConfig")
    client_ip = _mapping(config.get("clientIP"), "sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return affinity, DEFAULT_AFFINITY_TIMEOUT
    if not _is_int(timeout) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise Invalid(f"sessionAffinityConfig.clientIP.timeoutSeconds {_show(timeout)} "
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
        raise Invalid(f"label {SERVICE_NAME_LABEL} missing, so no service uses it")
    address_type = doc.get("addressType")
    if address_type not in ADDRESS_TYPES:
        raise Invalid(f"addressType {_show(address_type)} unknown (IPv4, IPv6 or FQDN)")
    raw_ports = _list(doc.get("ports"), "ports")
    raw_endpoints = _list(doc.get("endpoints"), "endpoints")
    if len(raw_ports) > MAX_SLICE_PORTS:
        raise Invalid(f"{len(raw_ports)} ports, at most {MAX_SLICE_PORTS} per slice")
    if len(raw_endpoints) > MAX_SLICE_ENDPOINTS:
        raise Invalid(f"{len(raw_endpoints)} endpoints, at most {MAX_SLICE_ENDPOINTS} per slice")
    ports = []
    for i, raw in enumerate(raw_ports):
        try:
            ports.append(_endpoint_port(raw))
        except Invalid as error:
            warn(f"ports[{i}]: {error}; port dropped, rest of the slice kept")
    _unique_port_names(ports)
    endpoints = []
    for i, raw in enumerate(raw_endpoints):
        try:
            endpoints.append(_slice_endpoint(raw, address_type))
        except Invalid as error:
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
        raise Invalid(f"port name {_show(name)} is not a string")
    if name and not is_dns1123_label(name):
        raise Invalid(f"port name {_show(name)} invalid ({DNS1123_LABEL_RULE})")
    return EndpointPort(name=name, port=_port_number(spec.get("port"), "port"),
                        protocol=_protocol(spec.get("protocol")))


def _unique_port_names(ports: list[EndpointPort]) -> None:
    """Endpoints are matched to service ports by name: two ports of one name are ambiguous."""
    seen: set[str] = set()
    for port in ports:
        if port.name in seen:
            raise Invalid(f"duplicate port name {_show(port.name)}")
        seen.add(port.name)


def _slice_endpoint(raw: Any, address_type: str) -> Endpoint:
    spec = _mapping(raw, "endpoint")
    addresses = _list(spec.get("addresses"), "addresses")
    if not addresses:
        raise Invalid("no addresses")
    if len(addresses) > MAX_ENDPOINT_ADDRESSES:
        raise Invalid(f"{len(addresses)} addresses, at most {MAX_ENDPOINT_ADDRESSES}")
    conditions = _mapping(spec.get("conditions"), "conditions")
    return Endpoint(
        addresses=tuple(_endpoint_address(a, address_type) for a in addresses),
        # The v1 API's defaults, as kube-proxy applies them: nil ready and nil serving mean
        # true, nil terminating means false.
        ready=_condition(conditions, "ready", default=True),
        serving=_condition(conditions, "serving", default=True),
        terminating=_condition(conditions, "terminating", default=False),
        node_name=_node_name(spec.get("nodeName")),
        zone=_optional_str(spec.get("zone"), "zone"),
        hostname=_hostname(spec.get("hostname")),
    )


def _endpoint_address(value: Any, address_type: str) -> str:
    if address_type == "FQDN":
        if not isinstance(value, str) or not value:
            raise Invalid(f"address {_show(value)} is not a domain name")
        return value
    address = _unicast(_ip(value, "address"), "address")
    if _family(address) != address_type:
        raise Invalid(f"address {_show(value)} is not an {address_type} address")
    return address


def _condition(conditions: dict, name: str, default: bool) -> bool:
    value = conditions.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Invalid(f"conditions.{name} {_show(value)} is not true or false")
    return value


def _node_name(value: Any) -> str | None:
    node_name = _optional_str(value, "nodeName")
    if node_name is not None and not is_dns1123_subdomain(node_name):
        raise Invalid(f"nodeName {_show(node_name)} is not a valid node name ({DNS1123_SUBDOMAIN_RULE})")
    return node_name


def _hostname(value: Any) -> str | None:
    hostname = _optional_str(value, "hostname")
    if hostname is not None and not is_dns1123_label(hostname):
        raise Invalid(f"hostname {_show(hostname)} invalid ({DNS1123_LABEL_RULE})")
    return hostname


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
            except Invalid as error:
                warn(f"{error}; address dropped, the rest kept")
                continue
            by_family[_family(endpoint.addresses[0])].append(endpoint)
    return [(family, ports, tuple(endpoints)) for family, endpoints in by_family.items() if endpoints]


def _subset_ports(subset: dict, index: int, warn: Callable[[str], None]) -> tuple[EndpointPort, ...]:
    raw_ports = _list(subset.get("ports"), f"subsets[{index}].ports")
    ports = []
    for j, raw in enumerate(raw_ports):
        try:
            ports.append(_endpoint_port(raw))
        except Invalid as error:
            warn(f"subsets[{index}].ports[{j}]: {error}; port dropped, the rest kept")
    if len(raw_ports) > 1 and any(not p.name for p in ports):
        raise Invalid(f"subsets[{index}].ports: a port has no name; every port needs a name when a "
                      "subset has several")
    try:
        _unique_port_names(ports)
    except Invalid as error:
        raise Invalid(f"subsets[{index}].ports: {error}") from None
    return tuple(ports)


def _legacy_endpoint(raw: Any, ready: bool, where: str) -> Endpoint:
    spec = _mapping(raw, where)
    try:
        address = _unicast(_ip(spec.get("ip"), "ip"), "ip")
        node_name = _node_name(spec.get("nodeName"))
        hostname = _hostname(spec.get("hostname"))
    except Invalid as error:
        raise Invalid(f"{where}: {error}") from None
    return Endpoint(
        addresses=(address,),
        ready=ready,
        serving=ready,                   # Endpoints cannot say "terminating but serving"
        terminating=False,
        node_name=node_name,
        hostname=hostname,
    )


# --- field helpers ---------------------------------------------------------------------------


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"{what} is a {_type_name(value)}, not a mapping")
    return value


def _list(value: Any, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{what} is a {_type_name(value)}, not a list")
    return value


def _choice(value: Any, what: str, allowed: tuple[str, ...], default: str) -> str:
    if value in (None, ""):
        return default
    if value not in allowed:
        raise Invalid(f"{what} {_show(value)} unknown ({', '.join(allowed)})")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _port_number(value: Any, what: str) -> int:
    if value is None:
        raise Invalid(f"{what} missing")
    if not _is_int(value):
        raise Invalid(f"{what} {_show(value)} is not a number")
    if not 1 <= value <= 65535:
        raise Invalid(f"{what} {value} out of range (1-65535)")
    return value


def _optional_node_port(value: Any, what: str, node_port_range: tuple[int, int]) -> int | None:
    """nodePort and healthCheckNodePort: absent or 0 means "not set" (the API server allocates
    one); a value must lie in the API server's node port range, which its allocator enforces."""
    if value is None or (_is_int(value) and value == 0):
        return None
    if not _is_int(value):
        raise Invalid(f"{what} {_show(value)} is not a number")
    low, high = node_port_range
    if not low <= value <= high:
        raise Invalid(f"{what} {value} out of range ({low}-{high}, the API server's "
                      "--service-node-port-range)")
    return value


def _protocol(value: Any) -> Protocol:
    if value is None:
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise Invalid(f"protocol {_show(value)} not supported (TCP, UDP or SCTP)") from None


def _ip(value: Any, what: str) -> str:
    """A valid address (read as ParseIPSloppy reads it) in canonical form."""
    if not isinstance(value, str):
        raise Invalid(f"{what} {_show(value)} is not an IP address")
    address = parse_ip_sloppy(value)
    if address is None:
        raise Invalid(f"{what} {_show(value)} is not a valid IP address")
    return address


def _unicast(address: str, what: str) -> str:
    """The API server refuses these for service and endpoint addresses (ValidateNonSpecialIP;
    it lets multicast beyond 224.0.0.0/24 through, lbctl does not): a datapath given 0.0.0.0,
    127.0.0.1, a multicast or a link-local address (lbctl's hairpin address is one) would steer
    traffic nowhere or somewhere surprising."""
    ip = ipaddress.ip_address(address)
    for special, label in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                           (ip.is_multicast, "multicast"), (ip.is_link_local, "link-local")):
        if special:
            raise Invalid(f"{what} {address} is a {label} address")
    return address


def _cidr(value: Any, what: str) -> str:
    """A CIDR (ParseCIDRSloppy); surrounding spaces are allowed, as the API server allows them
    in loadBalancerSourceRanges."""
    if not isinstance(value, str):
        raise Invalid(f"{what} {_show(value)} is not a CIDR")
    cidr = parse_cidr_sloppy(value.strip())
    if cidr is None:
        raise Invalid(f"{what} {_show(value)} is not a valid CIDR (ADDRESS/BITS, e.g. 10.0.0.0/8)")
    return cidr


def _family(address: str) -> str:
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


def _optional_str(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid(f"{what} {_show(value)} is not a string")
    return value


def _show(value: Any) -> str:
    """A value as it would look in JSON, for messages: "ICMP", 70000, ["a", "b"]."""
    return json.dumps(value, default=str)


def _type_name(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)
