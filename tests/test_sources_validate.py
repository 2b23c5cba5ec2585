"""API-server style validation (lbctl.sources.validate): what the API server refuses is refused,
what it stored and kube-proxy reads (leading zeros in IPv4) is read the same way. Plain dicts in,
no files. No root needed."""
from __future__ import annotations

import pytest

from lbctl.model.objects import Problem
from lbctl.sources import validate
from lbctl.sources.manifests import ManifestSource, load_manifests
from lbctl.sources.validate import (
    parse_cidr_sloppy,
    parse_documents,
    parse_ip_sloppy,
    parse_port_range,
)

ORIGIN = "test.yaml"
SKIPPED = "; service skipped, others programmed (test.yaml)"


def service(name: str = "web", namespace: str | None = None, **spec) -> dict:
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]}}
    if namespace is not None:
        doc["metadata"]["namespace"] = namespace
    doc["spec"].update(spec)
    return doc


def endpoint_slice(name: str = "web-abc", namespace: str | None = None, ports=None, endpoints=None) -> dict:
    doc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4",
           "ports": ports if ports is not None else [{"name": "http", "port": 8080}],
           "endpoints": endpoints if endpoints is not None else [{"addresses": ["10.244.0.1"]}]}
    if namespace is not None:
        doc["metadata"]["namespace"] = namespace
    return doc


def legacy_endpoints(name: str = "web", subsets=None) -> dict:
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name}, "subsets": subsets or []}


def parse(*docs, **kwargs):
    return parse_documents(docs, ORIGIN, **kwargs)


def only_problem(*docs, **kwargs) -> Problem:
    _, _, problems = parse(*docs, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Bad_Name", "web.prod", "1web", "web-", "-web", "x" * 64, "wéb"])
def test_service_names_are_dns_1035_labels(name):
    problem = only_problem(service(name))
    assert problem.obj == f"Service default/{name}"
    assert problem.message == (
        f'metadata.name {validate._show(name)} is not a valid Service name (a DNS-1035 label: at most 63 '
        "characters, lowercase letters, digits and '-', starting with a letter and ending with a letter "
        f"or digit){SKIPPED}")


@pytest.mark.parametrize("name", ["web", "w", "web-2", "x" * 63])
def test_valid_service_names(name):
    services, _, problems = parse(service(name))
    assert problems == [] and [s.name for s in services] == [name]


@pytest.mark.parametrize("namespace", ["Prod", "prod_1", "prod.x", "-x", "x" * 64, 7])
def test_namespaces_are_dns_1123_labels(namespace):
    problem = only_problem(service("web", namespace))
    assert problem.message.startswith(f"metadata.namespace {validate._show(namespace)} is not a valid "
                                      "namespace name (a DNS-1123 label")
    assert problem.message.endswith(SKIPPED)


def test_a_name_that_is_not_a_string():
    problem = only_problem(service(123))
    assert problem == Problem("Service without name (test.yaml document 1)",
                              "metadata.name 123 is not a string; service skipped, others programmed")


@pytest.mark.parametrize("name, valid", [
    ("web-abc", True), ("web.abc.1", True), ("1-web", True), ("x" * 253, True),
    ("Web-abc", False), ("web_abc", False), ("web..abc", False), ("web-", False), ("x" * 254, False),
])
def test_endpoint_slice_and_endpoints_names_are_dns_1123_subdomains(name, valid):
    for doc, kind, consequence in ((endpoint_slice(name), "EndpointSlice", "slice skipped, others kept"),
                                   (legacy_endpoints(name), "Endpoints", "endpoints skipped, others kept")):
        _, _, problems = parse(doc)
        if valid:
            assert problems == []
        else:
            assert problems == [Problem(f"{kind} default/{name}", (
                f"metadata.name {validate._show(name)} is not a valid {kind} name (a DNS-1123 subdomain: at "
                "most 253 characters, lowercase letters, digits, '-' and '.', starting and ending with a "
                f"letter or digit); {consequence} (test.yaml)"))]


# --- node ports ------------------------------------------------------------------------------


@pytest.mark.parametrize("node_port", [3001, 29999, 32768, 65535])
def test_node_ports_outside_the_range_are_refused(node_port):
    problem = only_problem(service(type="NodePort", ports=[{"port": 80, "nodePort": node_port}]))
    assert problem.message == (f"nodePort {node_port} out of range (30000-32767, the API server's "
                               f"--service-node-port-range){SKIPPED}")


@pytest.mark.parametrize("node_port", [30000, 30080, 32767])
def test_node_ports_inside_the_range(node_port):
    (svc,), _, problems = parse(service(type="NodePort", ports=[{"port": 80, "nodePort": node_port}]))
    assert problems == [] and svc.ports[0].node_port == node_port


def test_the_node_port_range_is_a_parameter_of_the_source(tmp_path):
    (tmp_path / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 8080}]}\n")
    assert load_manifests(tmp_path).services == {}
    assert list(load_manifests(tmp_path, node_port_range=(8000, 8999)).services) == ["default/web"]
    assert list(ManifestSource(tmp_path, node_port_range=(8000, 8999)).poll().services) == ["default/web"]
    assert ManifestSource(tmp_path).poll().services == {}
    _, _, problems = parse(service(type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
                           node_port_range=(8000, 8999))
    assert problems[0].message.startswith("nodePort 30080 out of range (8000-8999, ")


@pytest.mark.parametrize("text, expected", [
    ("30000-32767", (30000, 32767)), (" 8000-8999 ", (8000, 8999)), ("30000+2767", (30000, 32767)),
    ("30080", (30080, 30080)),
])
def test_parse_port_range(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "a-b", "32767-30000", "0-100", "30000-70000", "30000-"])
def test_parse_port_range_refuses(text):
    with pytest.raises(ValueError):
        parse_port_range(text)


# --- other things the API server refuses -----------------------------------------------------


REFUSED = [
    ("health-check-out-of-range", {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                   "healthCheckNodePort": 1234},
     "healthCheckNodePort 1234 out of range (30000-32767"),
    ("health-check-without-local", {"type": "LoadBalancer", "healthCheckNodePort": 32000},
     "healthCheckNodePort 32000 may only be set when type is LoadBalancer and externalTrafficPolicy is Local"),
    ("node-port-on-cluster-ip", {"ports": [{"port": 80, "nodePort": 30080}]},
     "nodePort 30080 may not be used when type is ClusterIP"),
    ("duplicate-node-port", {"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                                                            {"name": "b", "port": 81, "nodePort": 30080}]},
     "duplicate nodePort 30080/TCP"),
    ("kubelet-port-on-load-balancer", {"type": "LoadBalancer", "ports": [{"port": 10250}]},
     "port 10250 may not be exposed by a LoadBalancer service (it is the kubelet's port)"),
    ("etp-on-cluster-ip", {"externalTrafficPolicy": "Local"},
     'externalTrafficPolicy "Local" may only be set for externally-accessible services'),
    ("source-ranges-on-node-port", {"type": "NodePort", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
     "loadBalancerSourceRanges may only be used when type is LoadBalancer, not NodePort"),
    ("no-ports", {"ports": []}, "spec.ports missing: a service needs at least one port"),
    ("ports-absent", {"ports": None}, "spec.ports missing"),
    ("cluster-ips-without-cluster-ip", {"clusterIP": None, "clusterIPs": ["10.96.0.1"]},
     'clusterIPs ["10.96.0.1"] set without clusterIP; set clusterIP to clusterIPs[0] too'),
    ("headless-in-cluster-ips-only", {"clusterIP": None, "clusterIPs": ["None"]},
     'clusterIPs ["None"] set without clusterIP'),
    ("three-cluster-ips", {"clusterIPs": ["10.96.0.1", "fd00::1", "10.96.0.2"]},
     "clusterIPs [\"10.96.0.1\", \"fd00::1\", \"10.96.0.2\"]: at most 2 values"),
    ("ip-family-unknown", {"ipFamilies": ["IPv5"]}, 'ipFamilies[0] "IPv5" unknown (IPv4 or IPv6)'),
    ("ip-family-twice", {"ipFamilies": ["IPv4", "IPv4"]}, 'ipFamilies ["IPv4", "IPv4"]: each family at most once'),
    ("ip-family-mismatch", {"ipFamilies": ["IPv6"]},
     'clusterIP "10.96.0.1" is not an IPv6 address, as ipFamilies[0] says'),
    ("ip-family-policy-unknown", {"ipFamilyPolicy": "DualStack"},
     'ipFamilyPolicy "DualStack" unknown (SingleStack, PreferDualStack, RequireDualStack)'),
    ("single-stack-two-ips", {"clusterIPs": ["10.96.0.1", "fd00::1"], "ipFamilyPolicy": "SingleStack"},
     "ipFamilyPolicy SingleStack with two IP families"),
    ("external-ip-loopback", {"externalIPs": ["127.0.0.1"]}, "externalIPs[0] 127.0.0.1 is a loopback address"),
    ("external-ip-link-local", {"externalIPs": ["169.254.1.1"]}, "externalIPs[0] 169.254.1.1 is a link-local"),
    ("external-name-with-cluster-ip", {"type": "ExternalName", "externalName": "db.example.com"},
     "clusterIP may not be set for ExternalName services; remove it"),
    ("external-name-missing", {"type": "ExternalName", "clusterIP": None},
     "externalName missing (the DNS name the service is an alias of)"),
    ("external-name-invalid", {"type": "ExternalName", "clusterIP": None, "externalName": "db_1.example.com"},
     'externalName "db_1.example.com" is not a DNS name'),
    ("external-name-with-families", {"type": "ExternalName", "clusterIP": None, "externalName": "db.example.com",
                                     "ipFamilies": ["IPv4"]},
     "ipFamilies may not be set for ExternalName services"),
    ("cidr-netmask", {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/255.0.0.0"]},
     'loadBalancerSourceRanges[0] "10.0.0.0/255.0.0.0" is not a valid CIDR'),
    ("cidr-bare-address", {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.1"]},
     'loadBalancerSourceRanges[0] "10.0.0.1" is not a valid CIDR'),
]


@pytest.mark.parametrize("spec, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_what_the_api_server_refuses_is_refused(spec, message):
    problem = only_problem(service("bad", **spec), service("good", clusterIP="10.96.0.2"))
    assert problem.obj == "Service default/bad"
    assert problem.message.startswith(message), problem.message
    assert problem.message.endswith(SKIPPED)


ACCEPTED = [
    ("etp-with-external-ips", {"externalIPs": ["192.0.2.1"], "externalTrafficPolicy": "Local"}),
    ("etp-on-node-port", {"type": "NodePort", "externalTrafficPolicy": "Local"}),
    ("health-check-lb-local", {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                               "healthCheckNodePort": 32000}),
    ("headless-without-ports", {"clusterIP": "None", "ports": []}),
    ("external-name-trailing-dot", {"type": "ExternalName", "clusterIP": None, "externalName": "db.example.com.",
                                    "ports": []}),
    ("dual-stack", {"clusterIPs": ["10.96.0.1", "fd00::1"], "ipFamilies": ["IPv4", "IPv6"],
                    "ipFamilyPolicy": "RequireDualStack"}),
    ("affinity-config-with-none", {"sessionAffinity": "None",       # the API server's defaulting drops it
                                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}),
    ("kubelet-port-on-cluster-ip", {"ports": [{"port": 10250}]}),
]


@pytest.mark.parametrize("spec", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_what_the_api_server_accepts_is_accepted(spec):
    services, _, problems = parse(service(**spec))
    assert problems == [] and len(services) == 1


# --- EndpointSlices and Endpoints ------------------------------------------------------------


@pytest.mark.parametrize("endpoint, message", [
    ({"addresses": ["10.244.0.2"], "nodeName": "Node_1"}, 'nodeName "Node_1" is not a valid node name'),
    ({"addresses": ["10.244.0.2"], "hostname": "web.0"}, 'hostname "web.0" invalid (a DNS-1123 label'),
    ({"addresses": ["10.244.0.2"] * 101}, "101 addresses, at most 100"),
])
def test_bad_endpoint_fields_drop_the_endpoint(endpoint, message):
    _, (eps,), problems = parse(endpoint_slice(endpoints=[{"addresses": ["10.244.0.1"]}, endpoint]))
    assert [e.addresses for e in eps.endpoints] == [("10.244.0.1",)]
    (problem,) = problems
    assert problem.message.startswith(f"endpoints[1]: {message}")
    assert problem.message.endswith("; endpoint dropped, rest of the slice kept (test.yaml)")


def test_a_slice_port_name_must_be_a_dns_label():
    _, (eps,), problems = parse(endpoint_slice(ports=[{"name": "Http", "port": 80}, {"name": "dns", "port": 53}]))
    assert [p.name for p in eps.ports] == ["dns"]
    assert problems[0].message.startswith('ports[0]: port name "Http" invalid (a DNS-1123 label')


def test_a_slice_with_two_ports_of_one_name_is_skipped():
    _, slices, problems = parse(endpoint_slice(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]))
    assert slices == []
    assert problems == [Problem("EndpointSlice default/web-abc",
                                'duplicate port name "http"; slice skipped, others kept (test.yaml)')]


def test_a_slice_with_too_many_endpoints_is_skipped():
    _, slices, problems = parse(endpoint_slice(endpoints=[{"addresses": ["10.244.0.1"]}] * 1001))
    assert slices == []
    assert problems[0].message.startswith("1001 endpoints, at most 1000 per slice; slice skipped")


@pytest.mark.parametrize("ports, message", [
    ([{"port": 80}, {"port": 81}], "subsets[0].ports: a port has no name; every port needs a name"),
    ([{"name": "a", "port": 80}, {"name": "a", "port": 81}], 'subsets[0].ports: duplicate port name "a"'),
])
def test_endpoints_with_ambiguous_ports_are_skipped(ports, message):
    _, slices, problems = parse(legacy_endpoints(subsets=[{"addresses": [{"ip": "10.0.0.1"}], "ports": ports}]))
    assert slices == []
    assert problems[0].message.startswith(message)
    assert problems[0].message.endswith("; endpoints skipped, others kept (test.yaml)")


def test_endpoints_address_node_name_and_hostname_are_checked():
    doc = legacy_endpoints(subsets=[{"addresses": [{"ip": "10.0.0.1", "nodeName": "Bad_Node"},
                                                   {"ip": "10.0.0.2", "hostname": "db-0"}],
                                     "ports": [{"port": 80}]}])
    _, (eps,), problems = parse(doc)
    assert [e.addresses for e in eps.endpoints] == [("10.0.0.2",)]
    assert problems[0].message.startswith('subsets[0].addresses[0]: nodeName "Bad_Node" is not a valid node name')


# --- addresses as ParseIPSloppy reads them ---------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.10", "10.0.0.10"),
    ("10.0.0.010", "10.0.0.10"),                 # decimal, not octal: Go's pre-1.17 net.ParseIP
    ("010.000.000.001", "10.0.0.1"),
    ("10.0.0.00000000010", "10.0.0.10"),
    ("10.0.0.0255", "10.0.0.255"),
    ("::ffff:10.0.0.010", "::ffff:a00:a"),
    ("FD00::0A", "fd00::a"),
    ("10.0.0.256", None), ("10.0.0.0256", None), ("10.0.0", None), ("10.0.0.1.", None), ("10..0.1", None),
    ("10.0.0.+1", None), ("10.0.0.1 ", None), ("10.0.0.١", None), ("fe80::1%eth0", None), ("", None),
    ("localhost", None), ("0x0a.0.0.1", None), (None, None), (167772161, None),
])
def test_parse_ip_sloppy(text, expected):
    assert parse_ip_sloppy(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.0.0.1/8", "10.0.0.0/8"),                # host bits masked, as ParseCIDR returns the network
    ("010.001.0.0/016", "10.1.0.0/16"),
    ("FD00::1/64", "fd00::/64"),
    ("10.0.0.0/33", None), ("10.0.0.0/255.0.0.0", None), ("10.0.0.1", None), ("10.0.0.0/", None),
    ("10.0.0.0/-1", None), ("fd00::/129", None), ("10.0.0.0/0008", "10.0.0.0/8"), ("10.0.0.0/ 8", None),
])
def test_parse_cidr_sloppy(text, expected):
    assert parse_cidr_sloppy(text) == expected


def test_leading_zeros_are_read_and_normalised_everywhere():
    """Objects an old API server stored are read as kube-proxy reads them, in canonical form."""
    svc_doc = service(clusterIP="10.96.0.010", clusterIPs=["10.96.0.010", "fd00::0010"],
                      type="LoadBalancer", externalIPs=["192.0.2.01"],
                      loadBalancerSourceRanges=["198.51.100.000/024", " 10.0.0.1/08 "])
    svc_doc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.009"}]}}
    slice_doc = endpoint_slice(endpoints=[{"addresses": ["10.244.0.007"]}])
    legacy = legacy_endpoints(subsets=[{"addresses": [{"ip": "10.244.1.010"}], "ports": [{"port": 8080}]}])
    (svc,), slices, problems = parse(svc_doc, slice_doc, legacy)
    assert problems == []
    assert svc.cluster_ips == ("10.96.0.10", "fd00::10")
    assert svc.external_ips == ("192.0.2.1",)
    assert svc.load_balancer_ips == ("203.0.113.9",)
    assert svc.load_balancer_source_ranges == ("198.51.100.0/24", "10.0.0.0/8")
    assert [e.addresses for s in slices for e in s.endpoints] == [("10.244.0.7",), ("10.244.1.10",)]


def test_clusterip_and_clusterips_are_compared_as_written():
    """The API server compares the strings: 10.96.0.010 and 10.96.0.10 differ."""
    problem = only_problem(service(clusterIP="10.96.0.010", clusterIPs=["10.96.0.10"]))
    assert problem.message.startswith('clusterIPs[0] "10.96.0.10" differs from clusterIP "10.96.0.010"')


def test_validate_has_no_file_or_yaml_dependency():
    """A Kubernetes API source will call the same functions: no files, no YAML in there."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(validate.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"yaml", "os", "pathlib", "io", "shutil"}
    from_sources = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lbctl.sources")}
    assert from_sources == {"lbctl.sources.base"}
