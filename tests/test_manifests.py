"""The manifest source: Kubernetes objects in, model objects and Problems out. No root needed."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
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
from lbctl.sources import manifests
from lbctl.sources.manifests import (
    ManifestSource,
    Source,
    SourceUnavailable,
    build_snapshot,
    load_manifests,
    parse_documents,
)

FIXTURES = Path(__file__).parent / "data" / "manifests"
ORIGIN = "test.yaml"


# --- builders --------------------------------------------------------------------------------


def service(name: str = "web", namespace: str | None = None, **spec) -> dict:
    """A valid v1 Service; keyword arguments replace spec fields."""
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]},
    }
    if namespace:
        doc["metadata"]["namespace"] = namespace
    doc["spec"].update(spec)
    return doc


def endpoint_slice(name: str = "web-abc", service_name: str | None = "web", *,
                   endpoints: list | None = None, ports: list | None = None,
                   address_type: str = "IPv4", namespace: str | None = None) -> dict:
    doc = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {}},
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints if endpoints is not None else [{"addresses": ["10.244.0.1"]}],
    }
    if service_name is not None:
        doc["metadata"]["labels"]["kubernetes.io/service-name"] = service_name
    if namespace:
        doc["metadata"]["namespace"] = namespace
    return doc


def legacy_endpoints(name: str = "web", subsets: list | None = None, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "labels": labels or {}},
        "subsets": subsets if subsets is not None else [],
    }


def parse(*docs):
    return parse_documents(docs, ORIGIN)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- Service ---------------------------------------------------------------------------------


def test_service_defaults():
    services, slices, problems = parse({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
        "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 5432}]},
    })
    assert problems == []
    assert slices == []
    assert services == [Service(
        namespace="default",
        name="db",
        type="ClusterIP",
        cluster_ips=("10.96.0.7",),
        ports=(ServicePort(name="", port=5432, protocol=Protocol.TCP, target_port=5432),),
        session_affinity="None",
        session_affinity_timeout=10800,
        has_selector=False,
        origin=ORIGIN,
    )]


def test_service_every_field():
    doc = service(
        "shop", "prod",
        type="LoadBalancer",
        clusterIP="10.96.5.5",
        clusterIPs=["10.96.5.5", "fd00::5"],
        selector={"app": "shop"},
        ports=[
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http-alt", "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            {"name": "sig", "port": 9000, "protocol": "SCTP"},
        ],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
        externalIPs=["192.0.2.1", "2001:DB8::1"],
        loadBalancerSourceRanges=["198.51.100.0/24", " 10.0.0.1/8"],
        externalTrafficPolicy="Local",
        internalTrafficPolicy="Local",
        healthCheckNodePort=32100,
    )
    doc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "x.example"}]}}
    (svc,), _, problems = parse(doc)
    assert problems == []
    assert svc == Service(
        namespace="prod",
        name="shop",
        type="LoadBalancer",
        cluster_ips=("10.96.5.5", "fd00::5"),
        ports=(
            ServicePort("http", 80, Protocol.TCP, "http-alt", 30080),
            ServicePort("dns", 53, Protocol.UDP, 5353),
            ServicePort("sig", 9000, Protocol.SCTP, 9000),
        ),
        session_affinity="ClientIP",
        session_affinity_timeout=300,
        external_ips=("192.0.2.1", "2001:db8::1"),          # canonical form
        load_balancer_ips=("203.0.113.9",),
        load_balancer_source_ranges=("198.51.100.0/24", "10.0.0.0/8"),
        external_traffic_policy="Local",
        internal_traffic_policy="Local",
        health_check_node_port=32100,
        has_selector=True,
        origin=ORIGIN,
    )
    assert svc.cluster_ip == "10.96.5.5"


@pytest.mark.parametrize("spec, expected", [
    ({"sessionAffinity": "ClientIP"}, ("ClientIP", 10800)),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}},
     ("ClientIP", 86400)),
    ({"sessionAffinity": "None", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}},
     ("None", 10800)),
    ({}, ("None", 10800)),
])
def test_session_affinity(spec, expected):
    (svc,), _, problems = parse(service(**spec))
    assert problems == []
    assert (svc.session_affinity, svc.session_affinity_timeout) == expected


@pytest.mark.parametrize("spec, has_selector", [
    ({"selector": {"app": "web"}}, True),
    ({"selector": {}}, False),          # the API: "if empty or not present", endpoints are external
    ({}, False),
])
def test_selector_presence(spec, has_selector):
    (svc,), _, _ = parse(service(**spec))
    assert svc.has_selector is has_selector


@pytest.mark.parametrize("spec", [
    {"clusterIP": "None"},
    {"clusterIP": "None", "clusterIPs": ["None"]},
])
def test_headless_service_is_kept_without_cluster_ips(spec):
    (svc,), _, problems = parse(service(**spec))
    assert problems == []
    assert svc.cluster_ips == ()
    assert svc.cluster_ip is None


def test_external_name_service_has_no_cluster_ip():
    (svc,), _, problems = parse(service(type="ExternalName", externalName="db.example.com", clusterIP=None))
    assert problems == []
    assert (svc.type, svc.cluster_ips) == ("ExternalName", ())


def test_ipv6_service_is_kept():
    (svc,), _, problems = parse(service(clusterIP="FD00::A"))
    assert problems == []
    assert svc.cluster_ips == ("fd00::a",)


@pytest.mark.parametrize("target_port, expected", [
    (None, 80), (0, 80), ("", 80), (8080, 8080), (65535, 65535),
    ("http", "http"), ("dns-tcp", "dns-tcp"), ("a1", "a1"), ("x" * 15, "x" * 15), ("1a-2b", "1a-2b"),
])
def test_target_port(target_port, expected):
    (svc,), _, problems = parse(service(ports=[{"port": 80, "targetPort": target_port}]))
    assert problems == []
    assert svc.ports[0].target_port == expected


def test_node_port_zero_means_unset():
    (svc,), _, problems = parse(service(type="NodePort", ports=[{"port": 80, "nodePort": 0}],
                                        healthCheckNodePort=0))
    assert problems == []
    assert svc.ports[0].node_port is None
    assert svc.health_check_node_port is None


def test_service_without_cluster_ip_is_kept_with_a_problem():
    """The seed's mysql-kevin manifest has no clusterIP: the API server would allocate one."""
    (svc,), _, problems = parse({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "mysql-kevin"},
        "spec": {"ports": [{"port": 3306}]},
    })
    assert svc.cluster_ips == ()
    assert [p.obj for p in problems] == ["Service default/mysql-kevin"]
    assert "spec.clusterIP missing" in problems[0].message
    assert "service kept" in problems[0].message


# Every way a Service can be refused: (id, spec changes, expected message start).
# The bad service sits between good objects, which must all survive.
BAD_SERVICES = [
    ("port-high", {"ports": [{"port": 70000}]}, "port 70000 out of range (1-65535)"),
    ("port-zero", {"ports": [{"port": 0}]}, "port 0 out of range (1-65535)"),
    ("port-missing", {"ports": [{"name": "x"}]}, "port missing"),
    ("port-string", {"ports": [{"port": "80"}]}, 'port "80" is not a number'),
    ("port-bool", {"ports": [{"port": True}]}, "port true is not a number"),
    ("target-port-high", {"ports": [{"port": 80, "targetPort": 70000}]},
     "targetPort 70000 out of range (1-65535)"),
    ("target-port-negative", {"ports": [{"port": 80, "targetPort": -1}]},
     "targetPort -1 out of range (1-65535)"),
    ("node-port-high", {"type": "NodePort", "ports": [{"port": 80, "nodePort": 70000}]},
     "nodePort 70000 out of range (30000-32767, the API server's --service-node-port-range)"),
    ("health-check-node-port", {"healthCheckNodePort": 65536}, "healthCheckNodePort 65536 out of range"),
    ("protocol-icmp", {"ports": [{"port": 80, "protocol": "ICMP"}]},
     'protocol "ICMP" not supported (TCP, UDP or SCTP)'),
    ("protocol-lowercase", {"ports": [{"port": 80, "protocol": "tcp"}]}, 'protocol "tcp" not supported'),
    ("target-port-too-long", {"ports": [{"port": 80, "targetPort": "x" * 16}]},
     f'targetPort "{"x" * 16}" is not a valid port name'),
    ("target-port-no-letter", {"ports": [{"port": 80, "targetPort": "8080"}]},
     'targetPort "8080" is not a valid port name'),
    ("target-port-uppercase", {"ports": [{"port": 80, "targetPort": "HTTP"}]},
     'targetPort "HTTP" is not a valid port name'),
    ("target-port-underscore", {"ports": [{"port": 80, "targetPort": "http_alt"}]},
     'targetPort "http_alt" is not a valid port name'),
    ("target-port-leading-dash", {"ports": [{"port": 80, "targetPort": "-http"}]},
     'targetPort "-http" is not a valid port name'),
    ("target-port-trailing-dash", {"ports": [{"port": 80, "targetPort": "http-"}]},
     'targetPort "http-" is not a valid port name'),
    ("target-port-double-dash", {"ports": [{"port": 80, "targetPort": "ht--tp"}]},
     'targetPort "ht--tp" is not a valid port name'),
    ("port-name-invalid", {"ports": [{"name": "Web_UI", "port": 80}]}, 'port name "Web_UI" invalid'),
    ("duplicate-port-name", {"ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]},
     'duplicate port name "http"'),
    ("duplicate-port-protocol", {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]},
     "duplicate port 80/TCP"),
    ("multiple-unnamed-ports", {"ports": [{"port": 80}, {"port": 443}]},
     "port 80/TCP has no name; every port needs a name when a service has several"),
    ("one-of-two-unnamed", {"ports": [{"name": "http", "port": 80}, {"port": 443}]},
     "port 443/TCP has no name"),
    ("cluster-ip-invalid", {"clusterIP": "10.96.0.300"}, 'clusterIP "10.96.0.300" is not a valid IP address'),
    ("cluster-ip-octet-too-big", {"clusterIP": "10.96.0.0256"}, 'clusterIP "10.96.0.0256" is not a valid IP'),
    ("cluster-ip-zone", {"clusterIP": "fd00::1%eth0"}, 'clusterIP "fd00::1%eth0" is not a valid IP'),
    ("cluster-ips-invalid", {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::zz"]},
     'clusterIPs[1] "fd00::zz" is not a valid IP address'),
    ("cluster-ips-mismatch", {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.2"]},
     'clusterIPs[0] "10.96.0.2" differs from clusterIP "10.96.0.1"'),
    ("cluster-ips-same-family", {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "10.96.0.2"]},
     'clusterIPs ["10.96.0.1", "10.96.0.2"]: at most one address per IP family'),
    ("headless-mixed", {"clusterIP": "None", "clusterIPs": ["None", "10.96.0.1"]},
     'clusterIPs ["None", "10.96.0.1"]: "None" (headless) must be the only value'),
    ("headless-node-port", {"type": "NodePort", "clusterIP": "None"},
     'clusterIP "None" (headless) is only valid for type ClusterIP'),
    ("external-ip-invalid", {"externalIPs": ["192.0.2.1", "example.com"]},
     'externalIPs[1] "example.com" is not a valid IP address'),
    ("source-range-invalid", {"loadBalancerSourceRanges": ["10.0.0.0/33"]},
     'loadBalancerSourceRanges[0] "10.0.0.0/33" is not a valid CIDR'),
    ("type-unknown", {"type": "Magic"}, 'type "Magic" unknown (ClusterIP, NodePort, LoadBalancer, ExternalName)'),
    ("affinity-unknown", {"sessionAffinity": "Cookie"}, 'sessionAffinity "Cookie" unknown (None, ClientIP)'),
    ("affinity-timeout-zero", {"sessionAffinity": "ClientIP",
                               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "sessionAffinityConfig.clientIP.timeoutSeconds 0 out of range (1-86400)"),
    ("affinity-timeout-high", {"sessionAffinity": "ClientIP",
                               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}},
     "sessionAffinityConfig.clientIP.timeoutSeconds 86401 out of range (1-86400)"),
    ("external-policy-unknown", {"externalTrafficPolicy": "Global"}, 'externalTrafficPolicy "Global" unknown'),
    ("internal-policy-unknown", {"internalTrafficPolicy": "Nearby"}, 'internalTrafficPolicy "Nearby" unknown'),
    ("ports-not-a-list", {"ports": {"port": 80}}, "ports is a dict, not a list"),
    ("port-not-a-mapping", {"ports": [80]}, "ports[0] is a number, not a mapping"),
]


@pytest.mark.parametrize("spec, message", [c[1:] for c in BAD_SERVICES], ids=[c[0] for c in BAD_SERVICES])
def test_bad_service_is_skipped_and_the_rest_kept(spec, message):
    bad = service("bad", "prod", **spec)
    docs = [service("good-a"), bad, service("good-b", clusterIP="10.96.0.2"),
            endpoint_slice("good-a-xyz", "good-a")]
    services, slices, problems = parse_documents(docs, ORIGIN)
    assert [p.obj for p in problems] == ["Service prod/bad"]
    assert problems[0].message.startswith(message), problems[0].message
    assert problems[0].message.endswith(f"; service skipped, others programmed ({ORIGIN})")
    assert [s.key for s in services] == ["default/good-a", "default/good-b"]
    assert [s.key for s in slices] == ["default/good-a-xyz"]


def test_problem_reads_like_the_style_guide_example():
    _, _, (problem,) = parse(service(ports=[{"port": 70000}]))
    assert problem == Problem("Service default/web",
                              f"port 70000 out of range (1-65535); service skipped, others programmed ({ORIGIN})")
    assert str(problem).startswith("Service default/web: port 70000 out of range")


def test_only_the_first_error_of_an_object_is_reported():
    _, _, problems = parse(service(clusterIP="bogus", ports=[{"port": 70000}]))
    assert len(problems) == 1


def test_missing_cluster_ip_warning_is_not_given_for_a_skipped_service():
    _, _, problems = parse(service(clusterIP=None, ports=[{"port": 70000}]))
    assert [p.message.split(";")[0] for p in problems] == ["port 70000 out of range (1-65535)"]


# --- documents -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, obj, message", [
    ({"apiVersion": "v1", "kind": "Service", "spec": {}},
     "Service without name (test.yaml document 2)", "metadata.name missing; service skipped, others programmed"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": ""}},
     "Service without name (test.yaml document 2)", "metadata.name missing"),
    ({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"namespace": "x"}},
     "EndpointSlice without name (test.yaml document 2)", "metadata.name missing; slice skipped"),
    ({"apiVersion": "v1", "kind": "Endpoints"},
     "Endpoints without name (test.yaml document 2)", "metadata.name missing; endpoints skipped"),
    (["a", "list"], "file test.yaml", "document 2 is a list, not a mapping; skipped, others kept"),
    ("just text", "file test.yaml", "document 2 is a string, not a mapping"),
    ({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "metadata": {"name": "old"}},
     "EndpointSlice default/old", 'apiVersion "discovery.k8s.io/v1beta1" not supported (use discovery.k8s.io/v1)'),
    ({"kind": "Service", "metadata": {"name": "noapi"}},
     "Service default/noapi", "apiVersion missing (use v1); service skipped"),
    ({"kind": "EndpointSlice", "metadata": {"name": "noapi"}},
     "EndpointSlice default/noapi", "apiVersion missing (use discovery.k8s.io/v1)"),
])
def test_bad_document(doc, obj, message):
    services, slices, problems = parse(service("good"), doc, endpoint_slice("good-1", "good"))
    assert [p.obj for p in problems] == [obj]
    assert message in problems[0].message
    assert [s.name for s in services] == ["good"]
    assert [s.name for s in slices] == ["good-1"]


def test_other_kinds_and_api_groups_are_ignored_silently():
    docs = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {}},
        {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "kn"}},
        {"some": "values.yaml without kind"},
        None,                                   # empty document ("---" twice)
        service(),
    ]
    services, slices, problems = parse(*docs)
    assert problems == []
    assert [s.key for s in services] == ["default/web"]


@pytest.mark.parametrize("list_kind", ["List", "ServiceList"])
def test_list_items_are_parsed(list_kind):
    doc = {"apiVersion": "v1", "kind": list_kind, "items": [
        service("a"), service("b", clusterIP="10.96.0.2"), endpoint_slice("a-1", "a"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {}},
        42,
    ]}
    services, slices, problems = parse(doc)
    assert [s.name for s in services] == ["a", "b"]
    assert [s.name for s in slices] == ["a-1"]
    assert [p.obj for p in problems] == ["Service without name (test.yaml document 1 item 4)", "file test.yaml"]
    assert problems[1].message.startswith("document 1 item 5 is a number, not a mapping")


# --- EndpointSlice ---------------------------------------------------------------------------


def test_endpoint_slice_every_field():
    doc = endpoint_slice(
        "web-abc", "web", namespace="prod",
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"},
               {"name": "dns", "port": 53}],
        endpoints=[{
            "addresses": ["10.244.1.2", "10.244.1.3"],
            "conditions": {"ready": False, "serving": True, "terminating": True},
            "nodeName": "worker-1", "zone": "zone-a", "hostname": "pod-0",
            "targetRef": {"kind": "Pod", "name": "web-0"},
        }],
    )
    _, (eps,), problems = parse(doc)
    assert problems == []          # whether prod/web exists is checked across all files, later
    assert eps == EndpointSlice(
        namespace="prod",
        name="web-abc",
        service_name="web",
        address_type="IPv4",
        ports=(EndpointPort("http", 8080, Protocol.TCP), EndpointPort("", 53, Protocol.UDP),
               EndpointPort("dns", 53, Protocol.TCP)),
        endpoints=(Endpoint(("10.244.1.2", "10.244.1.3"), ready=False, serving=True, terminating=True,
                            node_name="worker-1", zone="zone-a", hostname="pod-0"),),
        origin=ORIGIN,
    )
    assert eps.service_key == "prod/web"


# The v1 API as kube-proxy reads it: nil ready = true, nil serving = true, nil terminating = false.
@pytest.mark.parametrize("conditions, expected", [
    (None, (True, True, False)),
    ({}, (True, True, False)),
    ({"ready": True}, (True, True, False)),
    ({"ready": False}, (False, True, False)),
    ({"serving": False}, (True, False, False)),
    ({"terminating": True}, (True, True, True)),
    ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
    ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
    ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
])
def test_endpoint_condition_defaults(conditions, expected):
    endpoint = {"addresses": ["10.244.0.1"]}
    if conditions is not None:
        endpoint["conditions"] = conditions
    _, (eps,), _ = parse(endpoint_slice(endpoints=[endpoint]))
    e = eps.endpoints[0]
    assert (e.ready, e.serving, e.terminating) == expected


@pytest.mark.parametrize("address_type, address, expected", [
    ("IPv4", "10.0.0.1", "10.0.0.1"),
    ("IPv6", "FD00:0::1", "fd00::1"),
    ("FQDN", "db.example.com", "db.example.com"),
])
def test_endpoint_slice_address_types(address_type, address, expected):
    _, (eps,), problems = parse(endpoint_slice(address_type=address_type,
                                               endpoints=[{"addresses": [address]}]))
    assert problems == []
    assert eps.address_type == address_type
    assert eps.endpoints[0].addresses == (expected,)


def test_endpoint_port_defaults():
    _, (eps,), _ = parse(endpoint_slice(ports=[{"port": 80}]))
    assert eps.ports == (EndpointPort("", 80, Protocol.TCP),)


@pytest.mark.parametrize("endpoint, message", [
    ({"addresses": ["10.244.0.300"]}, 'endpoints[1]: address "10.244.0.300" is not a valid IP address'),
    ({"addresses": ["fd00::1"]}, 'endpoints[1]: address "fd00::1" is not an IPv4 address'),
    ({"addresses": ["10.244.0.2", "nope"]}, 'endpoints[1]: address "nope" is not a valid IP address'),
    ({"addresses": []}, "endpoints[1]: no addresses"),
    ({}, "endpoints[1]: no addresses"),
    ({"addresses": "10.244.0.2"}, "endpoints[1]: addresses is a string, not a list"),
    ({"addresses": ["10.244.0.2"], "conditions": {"ready": "yes please"}},
     'endpoints[1]: conditions.ready "yes please" is not true or false'),
    ("10.244.0.2", "endpoints[1]: endpoint is a string, not a mapping"),
    ({"addresses": ["10.244.0.2"], "nodeName": 7}, "endpoints[1]: nodeName 7 is not a string"),
])
def test_bad_endpoint_is_dropped_and_the_rest_of_the_slice_kept(endpoint, message):
    doc = endpoint_slice(endpoints=[{"addresses": ["10.244.0.1"]}, endpoint, {"addresses": ["10.244.0.3"]}])
    _, (eps,), problems = parse(service(), doc)
    assert problems == [Problem("EndpointSlice default/web-abc",
                                f"{message}; endpoint dropped, rest of the slice kept ({ORIGIN})")]
    assert [e.addresses for e in eps.endpoints] == [("10.244.0.1",), ("10.244.0.3",)]


@pytest.mark.parametrize("port, message", [
    ({"name": "http", "port": 70000}, "ports[0]: port 70000 out of range (1-65535)"),
    ({"name": "http", "port": 0}, "ports[0]: port 0 out of range (1-65535)"),
    ({"name": "http"}, "ports[0]: port missing"),
    ({"name": "http", "port": 80, "protocol": "ICMP"}, 'ports[0]: protocol "ICMP" not supported (TCP, UDP or SCTP)'),
    (8080, "ports[0]: port is a number, not a mapping"),
])
def test_bad_endpoint_port_is_dropped_and_the_rest_of_the_slice_kept(port, message):
    doc = endpoint_slice(ports=[port, {"name": "https", "port": 8443}])
    _, (eps,), problems = parse(service(), doc)
    assert problems == [Problem("EndpointSlice default/web-abc",
                                f"{message}; port dropped, rest of the slice kept ({ORIGIN})")]
    assert eps.ports == (EndpointPort("https", 8443, Protocol.TCP),)
    assert len(eps.endpoints) == 1


@pytest.mark.parametrize("doc, message", [
    (endpoint_slice(service_name=None), "label kubernetes.io/service-name missing, so no service uses it"),
    (endpoint_slice(address_type="IPv5"), 'addressType "IPv5" unknown (IPv4, IPv6 or FQDN)'),
    ({**endpoint_slice(), "addressType": None}, "addressType null unknown (IPv4, IPv6 or FQDN)"),
    ({**endpoint_slice(), "endpoints": {"a": 1}}, "endpoints is a dict, not a list"),
])
def test_bad_slice_is_skipped_and_the_rest_kept(doc, message):
    services, slices, problems = parse(service(), doc, endpoint_slice("web-good"))
    assert problems == [Problem("EndpointSlice default/web-abc",
                                f"{message}; slice skipped, others kept ({ORIGIN})")]
    assert [s.name for s in slices] == ["web-good"]
    assert [s.name for s in services] == ["web"]


def test_bad_port_warnings_are_not_reported_for_a_skipped_slice():
    doc = endpoint_slice(ports=[{"port": 70000}])
    doc["endpoints"] = "garbage"
    _, slices, problems = parse(doc)
    assert slices == []
    assert [p.message.split(";")[0] for p in problems] == ["endpoints is a string, not a list"]


# --- legacy Endpoints ------------------------------------------------------------------------


def test_seed_mysql_kevin_endpoints_become_a_slice():
    """The seed's selector-less Service with a hand-written Endpoints object."""
    snapshot = load_manifests(FIXTURES / "mysql")
    assert snapshot.problems == ()
    svc = snapshot.services["default/mysql-kevin"]
    assert (svc.has_selector, svc.cluster_ips) == (False, ("10.254.125.157",))
    assert svc.ports == (ServicePort("", 3306, Protocol.TCP, 3306),)
    (eps,) = snapshot.slices["default/mysql-kevin"]
    assert (eps.service_name, eps.address_type) == ("mysql-kevin", "IPv4")
    assert eps.ports == (EndpointPort("", 3306, Protocol.TCP),)
    assert eps.endpoints == (Endpoint(("172.16.60.55",), ready=True, serving=True, terminating=False),)


def test_endpoints_ready_and_not_ready_addresses_ports_and_families():
    doc = legacy_endpoints("db", subsets=[
        {
            "addresses": [{"ip": "10.0.0.1", "nodeName": "n1", "hostname": "db-0"}, {"ip": "fd00::1"}],
            "notReadyAddresses": [{"ip": "10.0.0.2"}],
            "ports": [{"name": "sql", "port": 3306, "protocol": "TCP"}, {"name": "x", "port": 33060}],
        },
        {"addresses": [{"ip": "10.0.0.9"}], "ports": [{"port": 9104, "protocol": "TCP"}]},
    ])
    _, slices, problems = parse(doc)
    assert problems == []
    sql_ports = (EndpointPort("sql", 3306, Protocol.TCP), EndpointPort("x", 33060, Protocol.TCP))
    assert slices == [
        EndpointSlice("default", "db-mirror-0", "db", "IPv4", sql_ports, (
            Endpoint(("10.0.0.1",), ready=True, serving=True, node_name="n1", hostname="db-0"),
            Endpoint(("10.0.0.2",), ready=False, serving=False),
        ), origin=ORIGIN),
        EndpointSlice("default", "db-mirror-1", "db", "IPv6", sql_ports, (
            Endpoint(("fd00::1",)),), origin=ORIGIN),
        EndpointSlice("default", "db-mirror-2", "db", "IPv4", (EndpointPort("", 9104, Protocol.TCP),), (
            Endpoint(("10.0.0.9",)),), origin=ORIGIN),
    ]


def test_endpoints_bad_address_and_port_drop_only_themselves():
    doc = legacy_endpoints("db", subsets=[{
        "addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.256"}],
        "notReadyAddresses": [{"hostname": "no-ip"}],
        "ports": [{"name": "sql", "port": 3306}, {"name": "bad", "port": 99999}],
    }])
    _, (eps,), problems = parse(service("db"), doc)
    assert [p.obj for p in problems] == ["Endpoints default/db"] * 3
    assert [p.message for p in problems] == [
        f"subsets[0].ports[1]: port 99999 out of range (1-65535); port dropped, the rest kept ({ORIGIN})",
        f'subsets[0].addresses[1]: ip "10.0.0.256" is not a valid IP address; address dropped, the rest kept ({ORIGIN})',
        f"subsets[0].notReadyAddresses[0]: ip null is not an IP address; address dropped, the rest kept ({ORIGIN})",
    ]
    assert eps.ports == (EndpointPort("sql", 3306, Protocol.TCP),)
    assert eps.endpoints == (Endpoint(("10.0.0.1",)),)


def test_endpoints_marked_skip_mirror_are_ignored():
    doc = legacy_endpoints("db", subsets=[{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 1}]}],
                           labels={"endpointslice.kubernetes.io/skip-mirror": "true"})
    assert parse(doc) == ([], [], [])


def test_endpoints_without_subsets_give_no_slices():
    assert parse(legacy_endpoints("db")) == ([], [], [])


# --- files and the whole snapshot ------------------------------------------------------------


def load_snapshot_of(directory: Path, *docs) -> tuple[ClusterSnapshot, str]:
    """Write documents to one YAML file and load the directory: cross-file checks included."""
    path = directory / ORIGIN
    path.write_text(yaml.safe_dump_all(docs))
    return load_manifests(directory), str(path)


def test_fixture_directory_loads_without_problems():
    snapshot = load_manifests(FIXTURES)
    assert snapshot.problems == ()
    assert list(snapshot.services) == ["default/mysql-kevin", "default/nginx", "kube-system/kube-dns", "shop/web"]
    assert {k: [s.name for s in v] for k, v in snapshot.slices.items()} == {
        "default/mysql-kevin": ["mysql-kevin-mirror-0"],
        "default/nginx": ["nginx-2cmxp"],
        "kube-system/kube-dns": ["kube-dns-7x2kq"],
        "shop/web": ["web-abcde"],
    }
    dns = snapshot.services["kube-system/kube-dns"]
    assert [(p.name, p.port, p.protocol) for p in dns.ports] == [
        ("dns", 53, Protocol.UDP), ("dns-tcp", 53, Protocol.TCP), ("metrics", 9153, Protocol.TCP)]
    nginx = snapshot.services["default/nginx"]
    assert (nginx.type, nginx.cluster_ips, nginx.ports[0].node_port) == ("NodePort", ("10.102.19.139",), 30601)
    assert snapshot.services["shop/web"].origin == str(FIXTURES / "web.json")


def test_load_reads_yaml_yml_json_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: dup}\n"
                               "spec: {clusterIP: 10.96.0.2, ports: [{port: 2}]}\n")
    write(tmp_path / "a" / "z.yml", "apiVersion: v1\nkind: Service\nmetadata: {name: dup}\n"
                                    "spec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}\n")
    write(tmp_path / "c.json", '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "json"},'
                               ' "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 3}]}}')
    write(tmp_path / "notes.txt", "kind: Service")
    write(tmp_path / ".git" / "x.yaml", "kind: Service\nmetadata: {name: hidden}")
    write(tmp_path / ".hidden.yaml", "kind: Service\nmetadata: {name: hidden}")
    snapshot = load_manifests(tmp_path)
    # a/z.yml sorts before b.yaml, so its copy of "dup" wins
    assert snapshot.services["default/dup"].cluster_ips == ("10.96.0.1",)
    assert sorted(snapshot.services) == ["default/dup", "default/json"]
    assert snapshot.problems == (Problem(
        "Service default/dup",
        f"defined twice, in {tmp_path / 'a' / 'z.yml'} and in {tmp_path / 'b.yaml'}; "
        f"the one in {tmp_path / 'a' / 'z.yml'} kept (it comes first), the other ignored; "
        "remove or rename one of them"),)


def test_load_accepts_a_string_path(tmp_path):
    write(tmp_path / "s.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
                               "spec: {clusterIP: 10.96.0.2, ports: [{port: 2}]}\n")
    assert list(load_manifests(str(tmp_path)).services) == ["default/s"]


def test_malformed_yaml_keeps_earlier_documents_and_other_files(tmp_path):
    bad = write(tmp_path / "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: first}\n"
                                     "spec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}\n"
                                     "---\n"
                                     "apiVersion: v1\nkind: Service\nmetadata: {name: [broken\n"
                                     "---\n"
                                     "apiVersion: v1\nkind: Service\nmetadata: {name: after}\n")
    write(tmp_path / "b.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: other}\n"
                               "spec: {clusterIP: 10.96.0.2, ports: [{port: 2}]}\n")
    snapshot = load_manifests(tmp_path)
    assert sorted(snapshot.services) == ["default/first", "default/other"]
    (problem,) = snapshot.problems
    assert problem.obj == f"file {bad}"
    assert problem.message.startswith("malformed YAML at line 9")
    assert problem.message.endswith("; 1 document(s) before it kept, rest of the file skipped")


def test_malformed_json_is_a_problem_with_a_line_number(tmp_path):
    bad = write(tmp_path / "a.json", '{\n  "kind": "Service",\n  "metadata": {"name": "x"\n}\n')
    write(tmp_path / "b.json", '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ok"},'
                               ' "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 3}]}}')
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/ok"]
    (problem,) = snapshot.problems
    assert problem.obj == f"file {bad}"
    assert problem.message.startswith("malformed JSON at line 5: Expecting ',' delimiter")
    assert problem.message.endswith("; file skipped, others loaded")


def test_unreadable_files_are_problems(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.symlink_to(tmp_path / "nowhere.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: Service\nmetadata: {name: \xff\xfe}\n")
    write(tmp_path / "ok.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n"
                                "spec: {clusterIP: 10.96.0.2, ports: [{port: 2}]}\n")
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/ok"]
    assert [p.obj for p in snapshot.problems] == [f"file {binary}", f"file {broken}"]
    assert snapshot.problems[0].message.startswith("not UTF-8")
    assert snapshot.problems[1].message == (f"is a broken symbolic link (to {tmp_path / 'nowhere.yaml'}: "
                                            "No such file or directory); file skipped, others loaded")


def test_a_yaml_document_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "x.yaml", "- just\n- a list\n")
    snapshot = load_manifests(tmp_path)
    assert snapshot.problems == (Problem(f"file {path}", "document 1 is a list, not a mapping; skipped, others kept"),)


def test_missing_directory_is_unavailable_not_empty(tmp_path):
    """A directory that cannot be read means "nothing known", never "no services"."""
    with pytest.raises(SourceUnavailable) as missing:
        load_manifests(tmp_path / "absent")
    assert str(missing.value) == f"manifests directory {tmp_path / 'absent'}: does not exist"
    assert missing.value.reason == "does not exist"
    write(tmp_path / "file.yaml", "")
    with pytest.raises(SourceUnavailable, match="is not a directory$"):
        load_manifests(tmp_path / "file.yaml")


def test_empty_files_and_documents(tmp_path):
    write(tmp_path / "empty.yaml", "")
    write(tmp_path / "separators.yaml", "---\n---\n# only a comment\n")
    assert load_manifests(tmp_path) == ClusterSnapshot()


def test_duplicate_service_in_one_file(tmp_path):
    snapshot, origin = load_snapshot_of(tmp_path, service("web"), service("web", clusterIP="10.96.0.99"))
    assert snapshot.services["default/web"].cluster_ips == ("10.96.0.1",)
    assert snapshot.problems == (Problem("Service default/web",
                                         f"defined twice in {origin}; the first kept, the second ignored; "
                                         "remove or rename one of them"),)


def test_same_name_in_two_namespaces_is_not_a_duplicate(tmp_path):
    snapshot, _ = load_snapshot_of(tmp_path, service("web"), service("web", "prod"))
    assert sorted(snapshot.services) == ["default/web", "prod/web"]
    assert snapshot.problems == ()


def test_duplicate_endpoint_slice_keeps_the_first(tmp_path):
    write(tmp_path / "1.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                               "spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
                               "---\n"
                               "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                               "metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n"
                               "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n")
    write(tmp_path / "2.yaml", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                               "metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n"
                               "addressType: IPv4\nendpoints: [{addresses: [10.0.0.2]}]\n")
    snapshot = load_manifests(tmp_path)
    (eps,) = snapshot.slices["default/web"]
    assert eps.endpoints[0].addresses == ("10.0.0.1",)
    assert [p.obj for p in snapshot.problems] == ["EndpointSlice default/web-1"]
    assert str(tmp_path / "1.yaml") in snapshot.problems[0].message
    assert str(tmp_path / "2.yaml") in snapshot.problems[0].message


def test_duplicate_endpoints_object(tmp_path):
    doc = legacy_endpoints("web", subsets=[{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}])
    snapshot, _ = load_snapshot_of(tmp_path, service(ports=[{"port": 80}]), doc, copy.deepcopy(doc))
    assert len(snapshot.slices["default/web"]) == 1
    assert [p.obj for p in snapshot.problems] == ["Endpoints default/web"]


def test_slice_of_a_missing_service_is_kept_with_a_problem(tmp_path):
    snapshot, origin = load_snapshot_of(tmp_path, service("web"), endpoint_slice("ghost-1", "ghost"),
                                        legacy_endpoints("phantom", [{"addresses": [{"ip": "10.0.0.1"}]}]))
    assert [s.name for s in snapshot.slices["default/ghost"]] == ["ghost-1"]
    assert [s.name for s in snapshot.slices["default/phantom"]] == ["phantom-mirror-0"]
    assert snapshot.problems == (
        Problem("EndpointSlice default/ghost-1",
                f"Service default/ghost not found; kept, used once the service appears ({origin})"),
        Problem("Endpoints default/phantom",
                f"Service default/phantom not found; kept, used once the service appears ({origin})"),
    )


def test_slice_of_a_skipped_service_is_kept_too(tmp_path):
    snapshot, _ = load_snapshot_of(tmp_path, service("web", ports=[{"port": 70000}]), endpoint_slice())
    assert [p.obj for p in snapshot.problems] == ["Service default/web", "EndpointSlice default/web-abc"]
    assert "default/web" in snapshot.slices


def test_snapshot_is_deterministic():
    assert load_manifests(FIXTURES) == load_manifests(FIXTURES)


def test_build_snapshot_applies_the_same_rules_to_other_sources():
    web = Service("default", "web", cluster_ips=("10.96.0.1",), origin="api")
    again = Service("default", "web", cluster_ips=("10.96.0.2",), origin="api")
    orphan = EndpointSlice("default", "db-1", "db", origin="api")
    snapshot = build_snapshot([web, again], [orphan], [Problem("x", "y")])
    assert snapshot.services == {"default/web": web}
    assert snapshot.slices == {"default/db": (orphan,)}
    assert [p.obj for p in snapshot.problems] == ["x", "Service default/web", "EndpointSlice default/db-1"]


# --- ManifestSource --------------------------------------------------------------------------


SVC = "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"


def age(path: Path, seconds: int = 3600) -> None:
    """Make a file look old, so that the racy-mtime re-read does not apply."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def age_all(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            age(path)


@pytest.fixture
def counting_reads(monkeypatch):
    """Counts files read, to prove that an unchanged directory costs stats only."""
    reads = []
    original = manifests._read_file

    def read(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(manifests, "_read_file", read)
    return reads


@pytest.fixture
def counting_parses(monkeypatch):
    """Counts files parsed, to prove that only changed files are parsed again."""
    parses = []
    original = manifests._parse_text

    def parse(path, text):
        parses.append(path)
        return original(path, text)

    monkeypatch.setattr(manifests, "_parse_text", parse)
    return parses


def test_source_protocol():
    assert isinstance(ManifestSource("/nonexistent"), Source)
    assert ManifestSource("/nonexistent").interval == 1.0
    assert ManifestSource("/nonexistent", interval=0.2).interval == 0.2


def test_poll_first_time_then_only_on_change(tmp_path, counting_reads):
    web = write(tmp_path / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    age_all(tmp_path)
    source = ManifestSource(tmp_path)
    first = source.poll()
    assert list(first.services) == ["default/web"]
    assert len(counting_reads) == 1
    assert source.poll() is None
    assert source.poll() is None
    assert len(counting_reads) == 1              # nothing re-read: stat only

    web.write_text(SVC.format(name="web", ip="10.96.0.22"))       # content and size change
    changed = source.poll()
    assert changed.services["default/web"].cluster_ips == ("10.96.0.22",)
    age_all(tmp_path)
    assert source.poll() is not None             # the mtime changed (aged): a new snapshot
    assert source.poll() is None


def test_poll_sees_added_and_removed_files(tmp_path):
    write(tmp_path / "a.yaml", SVC.format(name="a", ip="10.96.0.1"))
    age_all(tmp_path)
    source = ManifestSource(tmp_path)
    assert list(source.poll().services) == ["default/a"]
    b = write(tmp_path / "sub" / "b.yml", SVC.format(name="b", ip="10.96.0.2"))
    age(b)
    assert list(source.poll().services) == ["default/a", "default/b"]
    b.unlink()
    assert list(source.poll().services) == ["default/a"]
    assert source.poll() is None


def test_poll_sees_a_file_replaced_by_rename(tmp_path):
    """Editors and ConfigMap volumes swap files: same name, new inode, maybe same size and mtime."""
    a = write(tmp_path / "a.yaml", SVC.format(name="a", ip="10.96.0.1"))
    age(a)
    source = ManifestSource(tmp_path)
    assert source.poll().services["default/a"].cluster_ips == ("10.96.0.1",)
    new = write(tmp_path / ".a.yaml.tmp", SVC.format(name="a", ip="10.96.0.2"))
    st = a.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert new.stat().st_size == st.st_size
    new.rename(a)
    assert source.poll().services["default/a"].cluster_ips == ("10.96.0.2",)


def test_poll_rereads_young_files_and_reports_only_real_changes(tmp_path, counting_reads):
    """A rewrite within the same mtime tick and with the same size is still seen."""
    a = write(tmp_path / "a.yaml", SVC.format(name="a", ip="10.96.0.1"))
    source = ManifestSource(tmp_path)
    assert source.poll() is not None
    assert source.poll() is None                 # re-read (young file), but nothing new
    assert len(counting_reads) == 2
    st = a.stat()
    a.write_text(SVC.format(name="a", ip="10.96.0.2"))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))      # same mtime, same size, same inode
    assert a.stat().st_size == st.st_size
    assert source.poll().services["default/a"].cluster_ips == ("10.96.0.2",)


def test_poll_parses_only_changed_files(tmp_path, counting_reads, counting_parses):
    """One file changes: only it is parsed again; the others' objects are the very objects of
    the last snapshot (which the desired-state caches key on), and a file rewritten with the
    same content (a new mtime) is read and recognised by its digest, not parsed."""
    write(tmp_path / "a.yaml", SVC.format(name="a", ip="10.96.0.1"))
    b = write(tmp_path / "b.yaml", SVC.format(name="b", ip="10.96.0.2"))
    c = write(tmp_path / "c.yaml", SVC.format(name="c", ip="10.96.0.3"))
    age_all(tmp_path)
    source = ManifestSource(tmp_path)
    first = source.poll()
    assert sorted(p.name for p in counting_parses) == ["a.yaml", "b.yaml", "c.yaml"]
    counting_parses.clear()
    counting_reads.clear()
    b.write_text(SVC.format(name="b", ip="10.96.0.20"))
    age(b)
    c.write_text(c.read_text())
    age(c, seconds=20)
    second = source.poll()
    assert [p.name for p in counting_parses] == ["b.yaml"]
    assert sorted(p.name for p in counting_reads) == ["b.yaml", "c.yaml"]
    assert second.services["default/b"].cluster_ips == ("10.96.0.20",)
    assert second.services["default/a"] is first.services["default/a"]
    assert second.services["default/c"] is first.services["default/c"]
    assert second == load_manifests(tmp_path)


def test_poll_trusts_old_files(tmp_path, counting_reads):
    """The flip side of the racy-mtime rule: an old, unchanged stat is not re-read."""
    a = write(tmp_path / "a.yaml", SVC.format(name="a", ip="10.96.0.1"))
    age(a)
    source = ManifestSource(tmp_path)
    source.poll()
    st = a.stat()
    a.write_text(SVC.format(name="a", ip="10.96.0.2"))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source.poll() is None
    assert len(counting_reads) == 1


def test_poll_missing_directory_raises_until_created(tmp_path):
    directory = tmp_path / "manifests"
    source = ManifestSource(directory)
    for _ in range(2):
        with pytest.raises(SourceUnavailable, match="does not exist"):
            source.poll()
    write(directory / "a.yaml", SVC.format(name="a", ip="10.96.0.1"))
    assert list(source.poll().services) == ["default/a"]


def test_poll_with_a_bad_file_keeps_reporting_it(tmp_path):
    write(tmp_path / "bad.yaml", "kind: [\n")
    age_all(tmp_path)
    source = ManifestSource(tmp_path)
    snapshot = source.poll()
    assert [p.obj for p in snapshot.problems] == [f"file {tmp_path / 'bad.yaml'}"]
    assert source.poll() is None


def test_a_file_that_stops_parsing_keeps_its_last_good_objects(tmp_path):
    """A typo while editing must not delete the file's services (the API server would have
    refused the edit and kept the old object); the problem is reported until it is fixed."""
    web = write(tmp_path / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    write(tmp_path / "other.yaml", SVC.format(name="other", ip="10.96.0.2"))
    source = ManifestSource(tmp_path)
    assert sorted(source.poll().services) == ["default/other", "default/web"]
    web.write_text("kind: Service\nmetadata: [\n")
    broken = source.poll()
    assert sorted(broken.services) == ["default/other", "default/web"]
    assert [p.obj for p in broken.problems] == [f"file {web}"]
    assert "keeping the 1 document(s) it last held" in broken.problems[0].message
    web.write_text(SVC.format(name="web", ip="10.96.0.9"))
    fixed = source.poll()
    assert fixed.services["default/web"].cluster_ips == ("10.96.0.9",) and not fixed.problems
    # a file that was never good has nothing to keep; load_manifests (stateless) keeps nothing
    write(tmp_path / "new.yaml", "kind: Service\nmetadata: [\n")
    assert sorted(source.poll().services) == ["default/other", "default/web"]
    web.write_text("kind: Service\nmetadata: [\n")
    assert sorted(manifests.load_manifests(tmp_path).services) == ["default/other"]


@pytest.mark.parametrize("name,text,expected", [
    ("deep.yaml", "[" * 50000 + "]" * 50000, "nested 50000 levels deep"),
    ("deep.json", "[" * 5000 + "]" * 5000, "nested 5000 levels deep"),
    ("loop.yaml", "&a {kind: List, items: [*a]}\n", "List inside a List"),
])
def test_hostile_files_are_refused_without_crashing(tmp_path, name, text, expected):
    """Deep nesting would overflow libyaml's C stack (a segfault) or Python's; a List holding
    itself would recurse forever. Each is one Problem; the other files load."""
    write(tmp_path / name, text)
    write(tmp_path / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert [expected in p.message for p in snapshot.problems] == [True], snapshot.problems


@pytest.mark.parametrize("address,label", [
    ("0.0.0.0", "unspecified"), ("127.0.0.1", "loopback"), ("224.0.0.1", "multicast"),
    ("169.254.42.1", "link-local"),
])
def test_special_addresses_are_refused_as_service_and_endpoint_ips(tmp_path, address, label):
    write(tmp_path / "bad.yaml", SVC.format(name="bad", ip=address))
    write(tmp_path / "web.yaml", SVC.format(name="web", ip="10.96.0.1"))
    write(tmp_path / "eps.yaml", f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: ["{address}"]
- addresses: ["10.244.0.9"]
""")
    snapshot = load_manifests(tmp_path)
    assert list(snapshot.services) == ["default/web"]
    assert [e.addresses for s in snapshot.slices["default/web"] for e in s.endpoints] == [("10.244.0.9",)]
    messages = [str(p) for p in snapshot.problems]
    assert len(messages) == 2 and all(f"is a {label} address" in m for m in messages), messages
