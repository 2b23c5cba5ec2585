"""The agent against the real API server (etcd, kube-apiserver, kube-controller-manager from
tests/kubeapi.py): Services and Pods created through the API, EndpointSlices made by the real
EndpointSlice controller, the lab's pods answering real TCP and UDP through the ClusterIPs.

Between the agent and the API server sits a TCP proxy that can cut every connection. After each
disturbance (an API server restart, connections cut for a while, 410 Gone after etcd
compaction and a restart) the maps must equal the desired state computed from a fresh list of
the API server, with no stale backend. The eBPF mode and the iptables mode are driven."""
from __future__ import annotations

import os
import threading

import pytest
from conftest import TEST_PIN_DIR, config_for_tests
from nsutil import forget_conntrack, strict_node, wait_for

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf import dump
from lbctl.datapath.ebpf.mode import EbpfMode
from lbctl.datapath.kubeproxy import iptables_mode
from lbctl.datapath.kubeproxy.proxier import ProxierOptions
from lbctl.lab import cluster as lab
from lbctl.lab.client import request_spread
from lbctl.model.desired import desired_state, service_ports
from lbctl.sources.kubernetes import KubernetesSource, api_client
from lbctl.testing.kubefake import TcpProxy

pytestmark = [pytest.mark.root, pytest.mark.netns]

PREFIX = f"lbk{os.getpid() % 1000}"
PIN_DIR = TEST_PIN_DIR + "-k8s"
POD_CIDR, GATEWAY = "10.244.210.0/24", "10.244.210.1"
WEB_IP, DNS_IP = "10.96.210.10", "10.96.210.53"
CONVERGE = 60.0          # seconds for the agent to converge: a safety net, never the assertion

SERVICES = (
    lab.ServiceSpec("default", "web", WEB_IP, (lab.PortSpec("http", 80, "TCP", 8080),),
                    ("web-0", "web-1", "web-2")),
    lab.ServiceSpec("default", "dns", DNS_IP, (lab.PortSpec("dns", 53, "UDP", 5353),
                                               lab.PortSpec("dns-tcp", 53, "TCP", 5353)), ("dns-0", "dns-1")),
)


def service_yaml(namespace: str, svc: lab.ServiceSpec, **labels: str) -> str:
    ports = ", ".join(f"{{name: {p.name}, port: {p.port}, targetPort: {p.target_port}, protocol: {p.protocol}}}"
                      for p in svc.ports)
    label_text = ", ".join(f"{k}: {v!r}" for k, v in labels.items())
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {svc.name}, namespace: {namespace}, "
            f"labels: {{{label_text}}}}}\nspec: {{clusterIP: {svc.cluster_ip}, selector: {{app: {svc.name}}}, "
            f"ports: [{ports}]}}\n")


class K8sLab:
    """The lab's pods as Pods of a namespace in the real API server, its services as Services."""

    def __init__(self, cp, state: lab.LabState, namespace: str, node: str):
        self.cp, self.state, self.namespace, self.node = cp, state, namespace, node

    def create(self) -> None:
        for svc in SERVICES:
            for pod in svc.backends:
                ports = tuple((p.name, p.target_port, p.protocol) for p in svc.ports)
                self.cp.create_pod(self.namespace, pod, node=self.node, ip=self.state.pods[pod].ip,
                                   labels={"app": svc.name}, ports=ports)
            self.cp.kubectl("apply", "-f", "-", input=service_yaml(self.namespace, svc))

    def client(self) -> str:
        return self.state.pods[self.state.clients[0]].ns

    def ip(self, pod: str) -> str:
        return self.state.pods[pod].ip


@pytest.fixture(scope="module")
def k8s_lab(kube_control_plane, kube_node, tmp_path_factory):
    spec = lab.LabSpec(prefix=PREFIX, pod_cidr=POD_CIDR, gateway=GATEWAY, services=SERVICES)
    state = lab.lab_up(spec, tmp_path_factory.mktemp("k8s-lab-manifests"))
    namespace = f"lbk-{os.getpid()}"
    try:
        kube_control_plane.kubectl("create", "namespace", namespace)
        wait_for(lambda: kube_control_plane.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] == 200,
                 CONVERGE, what="the namespace's default serviceaccount")
        k8s = K8sLab(kube_control_plane, state, namespace, kube_node)
        k8s.create()
        with strict_node(PREFIX, state.host_links(), POD_CIDR):
            yield k8s
    finally:
        kube_control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        lab.lab_down(state.prefix)


class RunningAgent:
    """`lbctl run --source kubernetes` in a thread, reaching the API server through a TCP proxy."""

    def __init__(self, k8s: K8sLab, mode=None):
        self.k8s = k8s
        self.proxy = TcpProxy(("127.0.0.1", int(k8s.cp.server.rsplit(":", 1)[1])))
        self.cfg = config_for_tests(pin_dir=PIN_DIR, devices=(f"veth{PREFIX}*",), node_name=k8s.node)
        self.mode = mode
        self.source = KubernetesSource(api_client(str(k8s.cp.kubeconfig), f"https://127.0.0.1:{self.proxy.port}"),
                                       k8s.node, initial_backoff=0.05, max_backoff=0.5)
        self.agent = Agent(self.source, self.cfg, AgentOptions(interval=0.5, link_rescan=0.5), mode=mode)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop_event,),
                                       kwargs={"max_seconds": 900}, daemon=True)
        self.thread.start()
        assert self.agent.synced.wait(CONVERGE), "the agent did not sync"

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        self.source.stop()
        self.proxy.close()

    def teardown(self) -> None:
        if self.thread.is_alive():
            self.stop()
        EbpfMode.cleanup(self.cfg)   # filters, pins, names and the mark rules' nft table


@pytest.fixture(scope="module")
def agent(k8s_lab):
    running = RunningAgent(k8s_lab)
    try:
        yield running
    finally:
        running.teardown()


# --- what the maps hold against what the API server says ---------------------------------------


def programmed(pin_dir: str) -> dict[str, list[str]]:
    """Frontend -> the backends in its slots, read from the pinned maps."""
    return {s["frontend"]: sorted(b["address"] for b in s["backends"]) for s in dump.collect(pin_dir)["services"]}


def wanted(cp, node: str) -> dict[str, list[str]]:
    """The desired state from a fresh list of the API server (its own source, no proxy)."""
    source = KubernetesSource(cp.api(), node, ready_timeout=CONVERGE)
    try:
        snapshot = source.poll()
    finally:
        source.stop()
    desired, _ = desired_state(service_ports(snapshot), node)
    return {str(fe): sorted(str(b) for b in entry.backends) for fe, entry in desired.services.items()}


def converged(k8s: K8sLab, pin_dir: str = PIN_DIR) -> dict[str, list[str]]:
    """Waits until the maps equal the desired state (and stay equal to it across one more
    read), then returns it."""
    def equal():
        now = wanted(k8s.cp, k8s.node)
        return now if programmed(pin_dir) == now else None
    return wait_for(equal, CONVERGE, interval=0.2, what="the maps to equal the desired state")


def restored(k8s: K8sLab) -> dict[str, list[str]]:
    """After a test put its pods and services back: waits until the API server's own slices say
    so (the EndpointSlice controller acts on a pod's readiness a little later, and maps equal to
    a list taken before that are equal but stale), then until the maps equal it."""
    full = {f"{WEB_IP}:80/TCP": web(k8s, ("web-0", "web-1", "web-2")),
            f"{DNS_IP}:53/UDP": sorted(f"{k8s.ip(p)}:5353/UDP" for p in ("dns-0", "dns-1"))}
    wait_for(lambda: all(wanted(k8s.cp, k8s.node).get(fe) == backends for fe, backends in full.items()),
             CONVERGE, interval=0.2, what="the API server's slices to hold every pod again")
    return converged(k8s)


def web(k8s: K8sLab, pods) -> list[str]:
    return sorted(f"{k8s.ip(p)}:8080/TCP" for p in pods)


def answers(k8s: K8sLab, proto: str, target: str, count: int = 60) -> set[str]:
    report = request_spread(k8s.client(), proto, target, count)
    assert sum(report["answers"].values()) == count, report
    return set(report["answers"])


# --- the tests --------------------------------------------------------------------------------


def test_services_created_through_the_api_answer_through_the_datapath(k8s_lab, agent):
    state = converged(k8s_lab)
    assert state[f"{WEB_IP}:80/TCP"] == web(k8s_lab, ("web-0", "web-1", "web-2"))
    assert state[f"{DNS_IP}:53/UDP"] == sorted(f"{k8s_lab.ip(p)}:5353/UDP" for p in ("dns-0", "dns-1"))
    assert answers(k8s_lab, "tcp", f"{WEB_IP}:80") == {"web-0", "web-1", "web-2"}
    assert answers(k8s_lab, "udp", f"{DNS_IP}:53") == {"dns-0", "dns-1"}


def test_a_pod_that_stops_being_ready_leaves_the_datapath(k8s_lab, agent):
    k8s_lab.cp.set_pod_ready(k8s_lab.namespace, "web-2", False)
    try:
        wait_for(lambda: programmed(PIN_DIR).get(f"{WEB_IP}:80/TCP") == web(k8s_lab, ("web-0", "web-1")),
                 CONVERGE, what="web-2 out of the slots")
        converged(k8s_lab)
        assert answers(k8s_lab, "tcp", f"{WEB_IP}:80") == {"web-0", "web-1"}
    finally:
        k8s_lab.cp.set_pod_ready(k8s_lab.namespace, "web-2", True)
    wait_for(lambda: programmed(PIN_DIR).get(f"{WEB_IP}:80/TCP") == web(k8s_lab, ("web-0", "web-1", "web-2")),
             CONVERGE, what="web-2 back")


def test_a_service_for_another_proxy_is_left_alone(k8s_lab, agent):
    """kube-proxy's label selector: service.kubernetes.io/service-proxy-name set means another
    proxy implements it; its frontend never reaches the maps."""
    other = lab.ServiceSpec("default", "other", "10.96.210.77", (lab.PortSpec("http", 80, "TCP", 8080),), ())
    k8s_lab.cp.kubectl("apply", "-f", "-", input=service_yaml(
        k8s_lab.namespace, other, **{"service.kubernetes.io/service-proxy-name": "someone-else"}))
    try:
        state = converged(k8s_lab)
        assert "10.96.210.77:80/TCP" not in state and "10.96.210.77:80/TCP" not in programmed(PIN_DIR)
    finally:
        k8s_lab.cp.kubectl("-n", k8s_lab.namespace, "delete", "service", "other")


def test_connections_cut_for_a_while(k8s_lab, agent):
    """The proxy drops every connection and refuses new ones; meanwhile a pod stops being
    ready and a service goes. The datapath keeps serving what it had; once the API server is
    reachable again, the agent catches up from its resourceVersion: the maps equal the desired
    state, no stale backend."""
    cp, ns = k8s_lab.cp, k8s_lab.namespace
    errors_before = dict(agent.source._errors)
    agent.proxy.cut()
    try:
        cp.set_pod_ready(ns, "web-0", False)
        cp.kubectl("-n", ns, "delete", "service", "dns")
        wait_for(lambda: agent.source._errors != errors_before, CONVERGE, what="the source to notice the cut")
        assert answers(k8s_lab, "udp", f"{DNS_IP}:53", 20) == {"dns-0", "dns-1"}, "kept serving meanwhile"
    finally:
        agent.proxy.restore()
    try:
        state = converged(k8s_lab)
        assert f"{DNS_IP}:53/UDP" not in state and f"{DNS_IP}:53/UDP" not in programmed(PIN_DIR)
        assert programmed(PIN_DIR)[f"{WEB_IP}:80/TCP"] == web(k8s_lab, ("web-1", "web-2"))
    finally:
        cp.set_pod_ready(ns, "web-0", True)
        cp.kubectl("apply", "-f", "-", input=service_yaml(ns, SERVICES[1]))
    restored(k8s_lab)


def test_api_server_restarted(k8s_lab, agent):
    cp, ns = k8s_lab.cp, k8s_lab.namespace
    cp.restart("kube-apiserver")
    cp.set_pod_ready(ns, "web-1", False)
    try:
        wait_for(lambda: programmed(PIN_DIR).get(f"{WEB_IP}:80/TCP") == web(k8s_lab, ("web-0", "web-2")),
                 CONVERGE, what="a change after the restart")
        converged(k8s_lab)
    finally:
        cp.set_pod_ready(ns, "web-1", True)
    restored(k8s_lab)


def test_gone_after_etcd_compaction_relists_without_stale_backends(k8s_lab, agent):
    """Cut off, the agent misses a pod leaving and a service going; etcd is compacted and the
    API server restarted (its watch cache starts at the compacted revision), so the agent's
    watch from its old resourceVersion gets 410 Gone: it lists again, and the relist replaces
    its store. The maps then equal the desired state: the removed backend and the deleted
    service are gone, everything else was never touched."""
    cp, ns = k8s_lab.cp, k8s_lab.namespace
    relists = agent.source.relists
    syncs_before = agent.agent.syncs
    agent.proxy.cut()
    try:
        cp.set_pod_ready(ns, "web-2", False)
        cp.kubectl("-n", ns, "delete", "service", "dns")
        cp.etcd_compact()
        cp.restart("kube-apiserver")
    finally:
        agent.proxy.restore()
    try:
        wait_for(lambda: agent.source.relists > relists, CONVERGE, what="a relist after 410 Gone")
        state = converged(k8s_lab)
        assert f"{DNS_IP}:53/UDP" not in programmed(PIN_DIR) and f"{DNS_IP}:53/UDP" not in state
        assert programmed(PIN_DIR)[f"{WEB_IP}:80/TCP"] == web(k8s_lab, ("web-0", "web-1"))
        assert agent.agent.syncs > syncs_before
        assert answers(k8s_lab, "tcp", f"{WEB_IP}:80") == {"web-0", "web-1"}
    finally:
        cp.set_pod_ready(ns, "web-2", True)
        cp.kubectl("apply", "-f", "-", input=service_yaml(ns, SERVICES[1]))
    restored(k8s_lab)


def test_iptables_mode_follows_the_api_server(k8s_lab, agent):
    """A kube-proxy mode on the same source: kube-proxy's iptables rules for what the API
    server holds (the eBPF agent is stopped first: its tc programs would answer first)."""
    agent.teardown()
    forget_conntrack(POD_CIDR)   # the eBPF flows' entries would clash with iptables' DNATed ones
    mode = iptables_mode.IptablesMode(
        iptables_mode.config_from(node_name=k8s_lab.node, node_ips=(GATEWAY,), cluster_cidr=POD_CIDR,
                                  tcp_be_liberal=False),
        ProxierOptions(full_sync_every=4, ebpf_pin_dir=PIN_DIR))
    running = RunningAgent(k8s_lab, mode=mode)
    try:
        assert answers(k8s_lab, "tcp", f"{WEB_IP}:80") == {"web-0", "web-1", "web-2"}
        k8s_lab.cp.set_pod_ready(k8s_lab.namespace, "web-0", False)
        wait_for(lambda: answers(k8s_lab, "tcp", f"{WEB_IP}:80", 40) == {"web-1", "web-2"},
                 CONVERGE, interval=0.5, what="web-0 out of the iptables rules")
    finally:
        k8s_lab.cp.set_pod_ready(k8s_lab.namespace, "web-0", True)
        running.stop()
        iptables_mode.IptablesMode.cleanup()
        forget_conntrack(POD_CIDR)
