"""`lbctl lab`: a small Kubernetes-like cluster in network namespaces on this machine.

A lab is N nodes (``--nodes``, default 1) wired as kind wires its containers:

* a bridge in the root namespace (``br<prefix>``) plays the docker network; every node has an
  address on it (``172.18.<X>.2`` and up, X the third octet of the first pod CIDR);
* with one node, the root namespace is the node (as before: cheap, and every tool on this
  machine sees it), with its node address on the bridge itself; with several, each node is a
  namespace ``<prefix>-node<i>`` with ``eth0`` on the bridge, its own pod CIDR (the i-th /24
  after the first), kindnet's routes to the other nodes' pod CIDRs via their node addresses, a
  default route to the bridge's ``.1`` (the root namespace: a silent sink, as the internet
  behind docker), and kind's sysctls (ip_forward=1, rp_filter=1, IPv6 off) and conntrack;
* every pod is a namespace joined to its node by a veth pair, wired like the ptp CNI plugin
  (see lbctl.lab.netns); pods are spread over the nodes: the k-th client and the k-th backend
  of every service on node k mod N (``LabSpec.placement`` overrides);
* an outside client namespace ``<prefix>-outside`` on the bridge plays the host behind kind's
  ``extraPortMappings``: it reaches the nodes at their node addresses (NodePorts) only.

Backend pods run lbctl.lab.server, which answers with its pod name and the client address it
saw. The lab writes the Services and EndpointSlices that describe it as Kubernetes manifests
(endpoints with their pod's nodeName), for the agents to read: one agent per node, each with
its node name, pin directory and cgroup (``describe`` prints the command line of each). No load
balancer is part of the lab: until one is attached to the host veths (links named ``veth*``),
ClusterIPs answer with ICMP unreachable.

Default lab (prefix "lbctl", one node: the root namespace):

    pod        ip           netns            host link
    client-0   10.244.0.2   lbctl-client-0   vethlbctl0
    client-1   10.244.0.3   lbctl-client-1   vethlbctl1
    web-0..2   .4 .5 .6     lbctl-web-0 ...  vethlbctl2..4   serve TCP 8080
    dns-0..1   .7 .8        lbctl-dns-0 ...  vethlbctl5..6   serve TCP and UDP 5353

    default/web  10.96.0.10  http 80/TCP -> 8080                        web-0 web-1 web-2
    default/dns  10.96.0.53  dns 53/UDP -> 5353, dns-tcp 53/TCP -> 5353   dns-0 dns-1

What the lab changes in the root namespace, each undone by lab_down:
  * the bridge, its ports (``<prefix>n<i>``, ``<prefix>o``) and, with several nodes, an ip rule
    sending what the nodes route to the bridge's ``.1`` into a blackhole (table LAB_SINK_TABLE);
  * with the root namespace as the node: net.ipv4.ip_forward=1 (the previous value is restored
    when the last lab goes down); "unreachable" routes for the pod CIDR and the service CIDR, so
    that a packet to a ClusterIP that no load balancer rewrote, or to an unused pod IP, is
    answered with ICMP host unreachable instead of leaving through the node's default route
    (removed with the last lab using them); per pod a veth pair, the gateway /32 on the host
    end, a route to the pod IP/32; IPv6 off on both ends of the veth;
  * a cgroup per node under /sys/fs/cgroup/unified/lbctl-lab-<prefix>/ (never the root cgroup):
    where the node's host processes run, and where its agent attaches socket programs;
  * with ``kubernetes`` and several nodes, one relay process per node namespace
    (lbctl.lab.relay): the API server's 127.0.0.1:PORT inside the node forwarded to the root
    namespace's, so the admin kubeconfig works in every node as on the host.

State lives in /run/lbctl/lab-<prefix>.json, so `lbctl lab down` in another process undoes exactly
what `lbctl lab up` made. lab_up on a prefix whose lab is already up tears that lab down first.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from lbctl.lab import kube, netns
from lbctl.lab.client import Outcome, tcp_request, udp_request
from lbctl.lab.relay import Relay

RUN_DIR = Path("/run/lbctl")
NODE_NAME = "lab-node"                 # the first node's name (the only one's, by default)
READY_TIMEOUT = 15.0                   # seconds for all backends to answer after start
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*$")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")   # the cgroup v2 mount (never attach to it itself)
BPFFS = "/sys/fs/bpf"
DEFAULT_PIN_DIR = f"{BPFFS}/lbctl"     # lbctl run's default (lbctl.datapath.base)
LAB_SINK_TABLE = 4242                  # routing table: blackhole default (nodes' off-lab traffic)
OUTSIDE_HOST = 254                     # the outside client's host number on the lab network
# kind's node sysctls (and IPv6 off, as for the pods: no router solicitations in the datapath)
NODE_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "1",
                "net.ipv4.conf.default.rp_filter": "1", "net.ipv4.conf.all.route_localnet": "1",
                **netns.IPV6_OFF}
# kindnet's ip-masq-agent chain: what leaves the pod network is masqueraded; it also makes
# conntrack (and NAT) track every flow in the node, as on a kind node
KIND_MASQ = """*nat
:KIND-MASQ-AGENT - [0:0]
-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment "kind-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom KIND-MASQ-AGENT chain" -j KIND-MASQ-AGENT
-A KIND-MASQ-AGENT -d {cluster_cidr} -m comment --comment "kind-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
-A KIND-MASQ-AGENT -m comment --comment "kind-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE
COMMIT
"""


class LabError(RuntimeError):
    """The lab could not be brought up or torn down; the message says what and how to fix it."""


# --- what the lab should be ------------------------------------------------------------------


@dataclass(frozen=True)
class PortSpec:
    """A service port: `port`/`protocol` on the ClusterIP, served on `target_port` by backends."""

    name: str
    port: int
    protocol: str                # "TCP" | "UDP"
    target_port: int


@dataclass(frozen=True)
class ServiceSpec:
    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[PortSpec, ...]
    backends: tuple[str, ...]    # pod names

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


DEFAULT_SERVICES = (
    ServiceSpec("default", "web", "10.96.0.10",
                (PortSpec("http", 80, "TCP", 8080),),
                ("web-0", "web-1", "web-2")),
    ServiceSpec("default", "dns", "10.96.0.53",
                (PortSpec("dns", 53, "UDP", 5353), PortSpec("dns-tcp", 53, "TCP", 5353)),
                ("dns-0", "dns-1")),
)


@dataclass(frozen=True)
class LabSpec:
    prefix: str = "lbctl"
    pod_cidr: str = "10.244.0.0/24"      # the first node's; node i has the i-th one after it
    gateway: str = "10.244.0.1"          # the first node's pod gateway; node i's is shifted alike
    service_cidr: str = "10.96.0.0/16"
    clients: tuple[str, ...] = ("client-0", "client-1")
    services: tuple[ServiceSpec, ...] = DEFAULT_SERVICES
    server_max_seconds: float = 3600.0   # backends exit by themselves after this long
    kubernetes: bool = False             # a real control plane too (lbctl.lab.kube)
    nodes: int = 1
    node_cidr: str | None = None         # the lab network (kind: the docker network); None:
                                         # 172.18.X.0/24, X the third octet of pod_cidr
    placement: tuple[tuple[str, int], ...] = ()   # (pod, node index) overrides
    cluster_cidr: str = "10.244.0.0/16"  # every node's pod CIDR lies in it (kind's podSubnet)

    def pod_names(self) -> list[str]:
        """Clients first, then every backend once, in service order: the order of pod IPs."""
        names = list(self.clients)
        for svc in self.services:
            names += [b for b in svc.backends if b not in names]
        return names

    @property
    def root_node(self) -> bool:
        """One node: the root namespace is the node (as before multi-node labs: cheap, and
        every tool on this machine sees it). Several: each node a namespace of its own."""
        return self.nodes == 1

    def lab_network(self) -> ipaddress.IPv4Network:
        if self.node_cidr:
            return ipaddress.IPv4Network(self.node_cidr)
        third = ipaddress.IPv4Network(self.pod_cidr).network_address.packed[2]
        return ipaddress.IPv4Network(f"172.18.{third}.0/24")

    def node_pod_cidr(self, index: int) -> ipaddress.IPv4Network:
        first = ipaddress.IPv4Network(self.pod_cidr)
        return ipaddress.IPv4Network((int(first.network_address) + index * first.num_addresses,
                                      first.prefixlen))

    def node_of(self, pod: str) -> int:
        """The node index of pod: placement, else the k-th client and the k-th backend of its
        (first) service on node k mod N."""
        explicit = dict(self.placement)
        if pod in explicit:
            return explicit[pod]
        if pod in self.clients:
            return self.clients.index(pod) % self.nodes
        for svc in self.services:
            if pod in svc.backends:
                return svc.backends.index(pod) % self.nodes
        raise KeyError(pod)

    def validate(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r}: use lower-case letters and digits, "
                             "starting with a letter")
        if not 1 <= self.nodes <= 16:
            raise ValueError(f"--nodes {self.nodes}: a lab has 1 to 16 nodes")
        longest = max([host_link_name(self.prefix, len(self.pod_names()) - 1),
                       bridge_name(self.prefix), node_port_name(self.prefix, self.nodes - 1)],
                      key=len)
        if len(longest) > netns.IFNAMSIZ:
            raise ValueError(f"lab prefix {self.prefix!r} too long: link {longest!r} exceeds "
                             f"{netns.IFNAMSIZ} characters; use a shorter --prefix")
        pods = ipaddress.ip_network(self.pod_cidr)
        if ipaddress.ip_address(self.gateway) not in pods:
            raise ValueError(f"gateway {self.gateway} is not in pod CIDR {self.pod_cidr}")
        names = self.pod_names()
        for index in range(self.nodes):
            on_node = [n for n in names if self.node_of(n) == index]
            if len(on_node) > pods.num_addresses - 3:
                raise ValueError(f"pod CIDR {self.node_pod_cidr(index)} too small for "
                                 f"{len(on_node)} pods")
        cluster = ipaddress.ip_network(self.cluster_cidr)
        last = self.node_pod_cidr(self.nodes - 1)
        if not (pods.subnet_of(cluster) and last.subnet_of(cluster)):   # type: ignore[arg-type]
            raise ValueError(f"the nodes' pod CIDRs ({self.pod_cidr} to {last}) do not fit in "
                             f"cluster CIDR {self.cluster_cidr}")
        for pod, index in self.placement:
            if pod not in names or not 0 <= index < self.nodes:
                raise ValueError(f"placement of {pod!r} on node {index}: no such pod or node")
        if self.lab_network().num_addresses < OUTSIDE_HOST + 2:
            raise ValueError(f"lab network {self.lab_network()} too small: use a /24")
        services = ipaddress.ip_network(self.service_cidr)
        for svc in self.services:
            if ipaddress.ip_address(svc.cluster_ip) not in services:
                raise ValueError(f"{svc.key}: clusterIP {svc.cluster_ip} is not in service CIDR "
                                 f"{self.service_cidr}")


def default_spec(prefix: str = "lbctl", nodes: int = 1) -> LabSpec:
    return LabSpec(prefix=prefix, nodes=nodes)


def host_link_name(prefix: str, index: int) -> str:
    return f"veth{prefix}{index}"


def bridge_name(prefix: str) -> str:
    return f"br{prefix}"


def node_port_name(prefix: str, index: int) -> str:
    """The bridge port of node index (the root end of its eth0): not ``veth*``, so that no
    agent's default --devices takes the lab network for pod links."""
    return f"{prefix}n{index}"


def outside_port_name(prefix: str) -> str:
    return f"{prefix}o"


def node_name(index: int) -> str:
    return NODE_NAME if index == 0 else f"{NODE_NAME}-{index}"


@dataclass(frozen=True)
class Node:
    """A node: where its pods' host veths are and what its agent is given.

    ``ns`` None: the root namespace is the node, its uplink the bridge. Else the node's own
    namespace, its uplink ``eth0``. ``pin_dir``, ``cgroup``: its agent's (`lbctl run --pin-dir`,
    the cgroup its socket programs attach to and its host processes run in)."""

    name: str
    index: int
    ns: str | None
    ip: str
    uplink: str
    pod_cidr: str
    gateway: str
    pin_dir: str
    cgroup: str

    def enter(self) -> list[str]:
        """argv prefix running a command on this node (`nsenter --net`: bpffs stays)."""
        return netns.enter_argv(self.ns)

    def host_argv(self, argv: list[str]) -> list[str]:
        """argv as a host process of this node: in its namespace and in its cgroup."""
        return [*self.enter(), "sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"',
                self.cgroup, *argv]

    def addresses(self) -> set[str]:
        """The node's own IPv4 addresses that pods and the lab network see."""
        return {self.ip, self.gateway}


def plan_nodes(spec: LabSpec) -> dict[str, Node]:
    net = spec.lab_network()
    shift = int(ipaddress.IPv4Address(spec.gateway)) - int(ipaddress.IPv4Network(spec.pod_cidr).network_address)
    nodes = {}
    for i in range(spec.nodes):
        cidr = spec.node_pod_cidr(i)
        name = node_name(i)
        root = spec.root_node
        nodes[name] = Node(
            name=name, index=i, ns=None if root else f"{spec.prefix}-node{i}",
            ip=str(net.network_address + 2 + i),
            uplink=bridge_name(spec.prefix) if root else "eth0",
            pod_cidr=str(cidr), gateway=str(cidr.network_address + shift),
            pin_dir=DEFAULT_PIN_DIR if root else f"{BPFFS}/lbctl-{spec.prefix}-{name}",
            cgroup=str(CGROUP_ROOT / f"lbctl-lab-{spec.prefix}" / name))
    return nodes


def pod_ips(node: Node) -> Iterator[str]:
    """The addresses node gives its pods: its pod CIDR's hosts in order, but the gateway."""
    return (str(a) for a in ipaddress.ip_network(node.pod_cidr).hosts() if str(a) != node.gateway)


def plan_pods(spec: LabSpec) -> dict[str, netns.Pod]:
    """Pod name -> Pod, with IPs from its node's pod CIDR in order, skipping the gateway."""
    nodes = list(plan_nodes(spec).values())
    ips = {n.index: pod_ips(n) for n in nodes}
    pods = {}
    for i, name in enumerate(spec.pod_names()):
        node = nodes[spec.node_of(name)]
        pods[name] = netns.Pod(name=name, ns=f"{spec.prefix}-{name}", ip=next(ips[node.index]),
                               host_link=host_link_name(spec.prefix, i), gateway=node.gateway,
                               node=node.name, node_ns=node.ns)
    return pods


def served_ports(spec: LabSpec, pod: str) -> dict[str, list[int]]:
    """{"tcp": [...], "udp": [...]}: the target ports backend `pod` must listen on."""
    ports: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for svc in spec.services:
        if pod in svc.backends:
            for p in svc.ports:
                ports[p.protocol.lower()].add(p.target_port)
    return {proto: sorted(nums) for proto, nums in ports.items()}


# --- what the lab is (and made) --------------------------------------------------------------


@dataclass
class Made:
    """Everything lab_up made in the node; lab_down undoes exactly this.

    Each object is recorded (and the state saved) before it is made, so a lab_up killed at any
    point leaves a state file that covers it; teardown tolerates objects that never came to be.
    Servers are recorded just after they start; any process the record misses is still found
    and stopped through its namespace (`ip netns pids`).
    """

    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    ip_forward_prev: str | None = None     # the value before any lab was up
    routes: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)            # ip rules (root namespace)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)            # in the root namespace
    cgroups: list[str] = field(default_factory=list)          # made in this order
    servers: dict[str, int] = field(default_factory=dict)   # pod -> labserver pid
    kube_dir: str | None = None            # the control plane's work dir (lbctl.lab.kube)
    relays: dict[str, int] = field(default_factory=dict)    # node netns -> API server relay pid


@dataclass
class LabState:
    spec: LabSpec
    pods: dict[str, netns.Pod]            # every pod: name -> ip, ns, host_link, node
    manifests_dir: str
    made: Made = field(default_factory=Made)
    nodes: dict[str, Node] = field(default_factory=dict)    # name -> Node, in index order

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = plan_nodes(self.spec)

    @property
    def prefix(self) -> str:
        return self.spec.prefix

    @property
    def clients(self) -> list[str]:
        return list(self.spec.clients)

    @property
    def services(self) -> dict[str, ServiceSpec]:
        """Service key ("default/web") -> cluster_ip, ports, backends (pod names)."""
        return {svc.key: svc for svc in self.spec.services}

    def host_links(self, node: str | None = None) -> list[str]:
        """The host ends of the pod veths (of one node, or all): where a load balancer attaches.
        With several nodes they live in their nodes' namespaces."""
        return [pod.host_link for pod in self.pods.values() if node in (None, pod.node)]

    def namespaces(self) -> list[str]:
        return [pod.ns for pod in self.pods.values()]

    def node_list(self) -> list[Node]:
        return list(self.nodes.values())

    def node(self, index: int = 0) -> Node:
        return self.node_list()[index]

    def node_of(self, pod: str) -> Node:
        return self.nodes[self.pods[pod].node]

    def pods_on(self, node: str) -> list[str]:
        return [name for name, pod in self.pods.items() if pod.node == node]

    @property
    def outside_ns(self) -> str:
        """The outside client's namespace (kind: the host behind extraPortMappings)."""
        return f"{self.prefix}-outside"

    @property
    def outside_ip(self) -> str:
        return str(self.spec.lab_network().network_address + OUTSIDE_HOST)

    @property
    def bridge(self) -> str:
        return bridge_name(self.prefix)

    def backend_ips(self, service: str) -> list[str]:
        return [self.pods[name].ip for name in self.services[service].backends]

    @property
    def path(self) -> Path:
        return state_path(self.prefix)

    def save(self) -> None:
        """Write the state atomically, so a reader never sees half a file."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(self.path)

    @classmethod
    def load(cls, prefix: str) -> LabState:
        data = json.loads(state_path(prefix).read_text())
        spec = data["spec"]
        services = tuple(
            ServiceSpec(s["namespace"], s["name"], s["cluster_ip"],
                        tuple(PortSpec(**p) for p in s["ports"]), tuple(s["backends"]))
            for s in spec.pop("services"))
        placement = tuple((pod, index) for pod, index in spec.pop("placement", ()))
        return cls(spec=LabSpec(**{**spec, "clients": tuple(spec["clients"]),
                                   "services": services, "placement": placement}),
                   pods={name: netns.Pod(**p) for name, p in data["pods"].items()},
                   manifests_dir=data["manifests_dir"], made=Made(**data["made"]),
                   nodes={name: Node(**n) for name, n in data.get("nodes", {}).items()})


def state_path(prefix: str) -> Path:
    return RUN_DIR / f"lab-{prefix}.json"


def work_dir(prefix: str) -> Path:
    """Server logs and the default manifests directory."""
    return RUN_DIR / f"lab-{prefix}"


def other_labs(prefix: str) -> list[LabState]:
    return [LabState.load(p.name[len("lab-"):-len(".json")])
            for p in sorted(RUN_DIR.glob("lab-*.json")) if p != state_path(prefix)]


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """One lab_up/lab_down at a time on this machine (they share ip_forward and routes)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(RUN_DIR, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- up --------------------------------------------------------------------------------------


def lab_up(spec: LabSpec, manifests_dir: Path | None = None) -> LabState:
    """Build the lab described by spec and return its state.

    manifests_dir defaults to /run/lbctl/lab-<prefix>/manifests. A lab already up under the same
    prefix is torn down first. On any failure everything made so far is removed and LabError
    (or KeyboardInterrupt) is raised.
    """
    spec.validate()
    with lab_lock():
        if state_path(spec.prefix).exists():
            teardown(LabState.load(spec.prefix))
        check_conflicts(spec)
        state = LabState(spec=spec, pods=plan_pods(spec),
                         manifests_dir=str(manifests_dir or work_dir(spec.prefix) / "manifests"))
        try:
            build(state)
        except BaseException as exc:
            cleanup_note = ""
            try:
                teardown(state)
            except LabError as cleanup_exc:
                cleanup_note = f"; cleanup incomplete too: {cleanup_exc}"
            if not isinstance(exc, Exception):
                raise
            raise LabError(f"lab {spec.prefix!r} did not come up: {exc}; what it had made was "
                           f"removed{cleanup_note}") from exc
    return state


def check_conflicts(spec: LabSpec) -> None:
    """Refuse to touch objects no lab state accounts for, and labs that would share addresses."""
    nodes = plan_nodes(spec).values()
    pods = plan_pods(spec).values()
    namespaces = [n.ns for n in nodes if n.ns] + [f"{spec.prefix}-outside"] + [p.ns for p in pods]
    for ns in namespaces:
        if netns.netns_exists(ns):
            raise LabError(f"netns {ns} exists but no lab state owns it; remove it with "
                           f"`ip netns del {ns}` or use another --prefix")
    for link in root_links(spec):
        if netns.link_exists(link):
            raise LabError(f"link {link} exists but no lab state owns it; remove it "
                           f"with `ip link del {link}` or use another --prefix")
    ours = [ipaddress.ip_network(n.pod_cidr) for n in nodes]
    for other in other_labs(spec.prefix):
        theirs = [ipaddress.ip_network(n.pod_cidr) for n in other.nodes.values()]
        if any(a.overlaps(b) for a in ours for b in theirs):
            raise LabError(f"lab {other.prefix!r} already uses pod CIDR {other.spec.pod_cidr}"
                           f"{' and the next ones' if len(theirs) > 1 else ''}; take it down "
                           f"(`lbctl lab down --prefix {other.prefix}`) or give this lab "
                           f"another pod CIDR")
        if spec.lab_network().overlaps(other.spec.lab_network()):
            raise LabError(f"lab {other.prefix!r} already uses lab network "
                           f"{other.spec.lab_network()}; give this lab another --node-cidr")


def root_links(spec: LabSpec) -> list[str]:
    """The links the lab makes in the root namespace."""
    links = [bridge_name(spec.prefix), outside_port_name(spec.prefix)]
    if spec.root_node:
        links += [p.host_link for p in plan_pods(spec).values()]
    else:
        links += [node_port_name(spec.prefix, i) for i in range(spec.nodes)]
    return links


def build(state: LabState) -> None:
    """Make the lab, recording each object in state.made (and saving) before making it."""
    spec, made = state.spec, state.made

    def make_dir(path: Path) -> None:
        if not path.exists():
            made.dirs.append(str(path))
            state.save()
            path.mkdir(parents=True)

    make_dir(work_dir(spec.prefix))
    make_dir(work_dir(spec.prefix) / "logs")
    make_dir(Path(state.manifests_dir))

    if spec.root_node:
        root_node_setup(state)
    build_network(state)
    for node in state.node_list():
        make_cgroup(state, Path(node.cgroup))

    for pod in state.pods.values():
        made.namespaces.append(pod.ns)
        if pod.node_ns is None:
            made.links.append(pod.host_link)
        state.save()
        netns.add_pod(pod)

    for name in spec.pod_names():
        if name not in spec.clients:
            made.servers[name] = start_server(state, name)
            state.save()
    wait_until_serving(state)

    for filename, manifest in render_manifests(state).items():
        path = Path(state.manifests_dir) / filename
        made.files.append(str(path))
        state.save()
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))

    if spec.kubernetes:
        made.kube_dir = str(work_dir(spec.prefix) / "kube")
        state.save()
        cp = kube.lab_up(state, Path(made.kube_dir))
        start_relays(state, cp.state.apiserver_port)


def start_relays(state: LabState, port: int) -> None:
    """In each node namespace, 127.0.0.1:port relayed to the API server on the root namespace's
    loopback (lbctl.lab.relay): the admin kubeconfig then works unchanged inside the nodes (a
    real kube-proxy, an agent --source kubernetes), as a kind node's reaches its API server.
    Like the control plane, the relays outlive `lbctl lab up`; teardown stops them."""
    for node in state.node_list():
        if node.ns:
            relay = Relay(node.ns, port, log=work_dir(state.prefix) / "logs" / f"relay-{node.name}.log",
                          tie_to_parent=False).start()
            assert relay.pid is not None
            state.made.relays[node.ns] = relay.pid
            state.save()


def root_node_setup(state: LabState) -> None:
    """The root namespace as the node: ip_forward, and "unreachable" routes for the pod and the
    service CIDR (see the module docstring)."""
    spec, made = state.spec, state.made
    others = [o for o in other_labs(spec.prefix) if o.made.ip_forward_prev is not None]
    made.ip_forward_prev = (others[0].made.ip_forward_prev if others
                            else netns.IP_FORWARD.read_text().strip())
    state.save()
    netns.set_ip_forward("1")
    for cidr in (spec.pod_cidr, spec.service_cidr):
        route = f"unreachable {cidr}"
        made.routes.append(route)
        state.save()
        netns.add_route(route)


def build_network(state: LabState) -> None:
    """The lab network: node namespaces (kind's sysctls, eth0, kindnet's routes, conntrack),
    the bridge with every node and the outside client on it."""
    spec, made = state.spec, state.made
    nodes = state.node_list()
    net = spec.lab_network()
    made_here = [n.ns for n in nodes if n.ns] + [state.outside_ns]
    made.namespaces += made_here
    made.links += [link for link in root_links(spec) if link not in made.links]
    state.save()
    netns.ip_batch(f"netns add {ns}" for ns in made_here)
    for node in nodes:
        if node.ns:
            netns.set_sysctls(node.ns, NODE_SYSCTLS)
    netns.set_sysctls(state.outside_ns, netns.IPV6_OFF)

    bridge = state.bridge
    bridge_ip = nodes[0].ip if spec.root_node else str(net.network_address + 1)
    lines = [f"link add {bridge} type bridge", f"addr add {bridge_ip}/{net.prefixlen} dev {bridge}"]
    ports = [(outside_port_name(spec.prefix), state.outside_ns)]
    ports += [(node_port_name(spec.prefix, n.index), n.ns) for n in nodes if n.ns]
    lines += [f"link add {port} type veth peer name eth0 netns {ns}" for port, ns in ports]
    netns.ip_batch(lines)
    for link in [bridge] + [port for port, _ in ports]:
        netns.set_sysctl(Path("/proc/sys/net/ipv6/conf", link, "disable_ipv6"), "1")
    netns.ip_batch([f"link set {port} master {bridge} up" for port, _ in ports]
                   + [f"link set {bridge} up"])

    netns.ip_batch(["link set lo up", f"addr add {state.outside_ip}/{net.prefixlen} dev eth0",
                    "link set eth0 up"], ns=state.outside_ns)
    for node in nodes:
        if node.ns:
            netns.ip_batch(node_lines(node, nodes, str(net.network_address + 1), net.prefixlen),
                           ns=node.ns)
            netns.run([*node.enter(), "iptables-restore", "--noflush", "-w"],
                      input=KIND_MASQ.format(cluster_cidr=spec.cluster_cidr))
    if not spec.root_node:
        route = f"blackhole default table {LAB_SINK_TABLE}"
        rule = f"iif {bridge} table {LAB_SINK_TABLE} priority {LAB_SINK_TABLE}"
        made.routes.append(route)
        made.rules.append(rule)
        state.save()
        netns.add_route(route)
        netns.add_rule(rule)


def node_lines(node: Node, nodes: list[Node], host_ip: str, prefixlen: int) -> list[str]:
    """One node namespace's ip commands: eth0 on the lab network, a default route to the host
    (a sink), kindnet's routes to the other nodes' pod CIDRs, unused own pod IPs unreachable."""
    lines = ["link set lo up", f"addr add {node.ip}/{prefixlen} dev eth0", "link set eth0 up",
             f"route add default via {host_ip} dev eth0",
             f"route add unreachable {node.pod_cidr}"]
    lines += [f"route add {other.pod_cidr} via {other.ip} dev eth0"
              for other in nodes if other.name != node.name]
    return lines


def make_cgroup(state: LabState, path: Path) -> None:
    """A cgroup v2 directory for a node (and its parent), below the cgroup2 mount, never it."""
    for directory in (path.parent, path):
        if not directory.exists():
            state.made.cgroups.append(str(directory))
            state.save()
            directory.mkdir()


def server_log(state: LabState, pod: str) -> Path:
    return work_dir(state.prefix) / "logs" / f"{pod}.log"


def start_server(state: LabState, pod: str) -> int:
    ports = served_ports(state.spec, pod)
    argv = netns.python_argv("lbctl.lab.server", "--name", pod,
                             "--max-seconds", str(state.spec.server_max_seconds))
    for proto in ("tcp", "udp"):
        if ports[proto]:
            argv += [f"--{proto}", ",".join(map(str, ports[proto]))]
    return netns.spawn_in(state.pods[pod].ns, argv, server_log(state, pod), netns.python_env())


def wait_until_serving(state: LabState, timeout: float = READY_TIMEOUT) -> None:
    """Probe every backend on every port it serves, from its node, until each names itself."""
    deadline = time.monotonic() + timeout
    probes = {"tcp": tcp_request, "udp": udp_request}
    for pod, pid in state.made.servers.items():
        for proto, ports in served_ports(state.spec, pod).items():
            for port in ports:
                outcome = Outcome()
                while outcome.pod != pod:
                    if not netns.pid_alive(pid):
                        raise LabError(f"labserver of pod {pod} exited: "
                                       f"{log_tail(server_log(state, pod))}")
                    if time.monotonic() > deadline:
                        raise LabError(f"pod {pod} did not answer on {proto} {port} within "
                                       f"{timeout:.0f}s (last: {outcome.error}); see "
                                       f"{server_log(state, pod)}")
                    outcome = netns.in_netns(state.pods[pod].node_ns, probes[proto],
                                             (state.pods[pod].ip, port), 0.2)
                    if outcome.pod != pod:
                        time.sleep(0.02)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


# --- manifests -------------------------------------------------------------------------------


def service_manifest(svc: ServiceSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc.name, "namespace": svc.namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": svc.cluster_ip,
            "clusterIPs": [svc.cluster_ip],
            "ipFamilies": ["IPv4"],
            "selector": {"app": svc.name},
            "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol,
                       "targetPort": p.target_port} for p in svc.ports],
        },
    }


def endpointslice_manifest(svc: ServiceSpec, pods: dict[str, netns.Pod]) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc.name}-lab",
            "namespace": svc.namespace,
            "labels": {"kubernetes.io/service-name": svc.name,
                       "endpointslice.kubernetes.io/managed-by": "lbctl-lab"},
        },
        "addressType": "IPv4",
        "ports": [{"name": p.name, "port": p.target_port, "protocol": p.protocol}
                  for p in svc.ports],
        "endpoints": [{
            "addresses": [pods[name].ip],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": pods[name].node,
            "targetRef": {"kind": "Pod", "namespace": svc.namespace, "name": name},
        } for name in svc.backends],
    }


def render_manifests(state: LabState) -> dict[str, dict]:
    """File name -> manifest: one Service and one EndpointSlice per service."""
    files = {}
    for svc in state.spec.services:
        base = f"{svc.namespace}-{svc.name}"
        files[f"{base}.service.yaml"] = service_manifest(svc)
        files[f"{base}.endpointslice.yaml"] = endpointslice_manifest(svc, state.pods)
    return files


# --- down ------------------------------------------------------------------------------------


def lab_down(prefix: str = "lbctl") -> bool:
    """Tear down the lab `prefix` from its state file, in this or any other process.

    Idempotent: returns False when there was no such lab. Raises LabError (keeping the state file,
    so that a retry can finish) when something could not be removed.
    """
    with lab_lock():
        if not state_path(prefix).exists():
            return False
        teardown(LabState.load(prefix))
        return True


def teardown(state: LabState) -> None:
    """Undo state.made in reverse order, going on past errors; then remove the state file."""
    made, errors = state.made, []

    def attempt(what: str, undo, *args) -> None:
        try:
            undo(*args)
        except (OSError, netns.NetnsError, kube.ControlPlaneError) as exc:
            errors.append(f"{what}: {exc}")

    for ns, pid in made.relays.items():
        if any("lbctl.lab.relay" in arg for arg in netns.process_cmdline(pid)):
            attempt(f"stop the API server relay of {ns} (pid {pid})", netns.stop_process, pid)
    if made.kube_dir:
        attempt("stop the control plane", kube.lab_down, Path(made.kube_dir))
    for pod, pid in made.servers.items():
        if any("lbctl.lab.server" in arg for arg in netns.process_cmdline(pid)):
            attempt(f"stop labserver of {pod} (pid {pid})", netns.stop_process, pid)
    for ns in made.namespaces:
        for pid in netns.netns_pids(ns):
            attempt(f"stop pid {pid} in netns {ns}", netns.stop_process, pid)
    for path in made.cgroups:
        for pid in cgroup_pids(path):
            attempt(f"stop pid {pid} in cgroup {path}", netns.stop_process, pid)
    for link in made.links:
        attempt(f"delete link {link}", netns.del_link, link)
    for ns in made.namespaces:
        attempt(f"delete netns {ns}", netns.del_netns, ns)
    for path in reversed(made.cgroups):
        attempt(f"remove cgroup {path}", remove_cgroup, path)

    others = other_labs(state.prefix)
    for rule in made.rules:
        attempt(f"delete rule {rule}", netns.del_rule, rule)
    for route in made.routes:
        if not any(route in other.made.routes for other in others):
            attempt(f"delete route {route}", netns.del_route, route)
    if made.ip_forward_prev is not None and not any(o.made.ip_forward_prev is not None
                                                    for o in others):
        attempt("restore net.ipv4.ip_forward", netns.set_ip_forward, made.ip_forward_prev)

    for path in made.files:
        attempt(f"remove {path}", Path(path).unlink, True)
    for path in reversed(made.dirs):
        attempt(f"remove {path}", remove_dir, path)

    if errors:
        state.save()
        raise LabError(f"lab {state.prefix!r}: teardown incomplete ({'; '.join(errors)}); "
                       f"fix and run `lbctl lab down --prefix {state.prefix}` again")
    state.path.unlink(missing_ok=True)
    state.path.with_suffix(".tmp").unlink(missing_ok=True)


def cgroup_pids(path: str) -> list[int]:
    try:
        return [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
    except OSError:
        return []


def remove_cgroup(path: str) -> None:
    """rmdir a cgroup (its processes stopped first); one that is gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def remove_dir(path: str) -> None:
    if Path(path).exists():
        shutil.rmtree(path)


# --- CLI -------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `lab up` and `lab down` to the CLI; each sets `func` to its cmd_* function."""
    lab = subparsers.add_parser("lab", help="a Kubernetes-like cluster in network namespaces")
    sub = lab.add_subparsers(dest="lab_command", metavar="{up,down}", required=True)
    up = sub.add_parser("up", help="create pods, start backends, write Service/EndpointSlice "
                                   "manifests")
    up.add_argument("--prefix", default="lbctl", help="names: netns <prefix>-<pod>, links "
                                                      "veth<prefix><n> (default lbctl)")
    up.add_argument("--manifests", type=Path, default=None,
                    help="directory for the manifests (default /run/lbctl/lab-<prefix>/manifests)")
    up.add_argument("--nodes", type=int, default=1,
                    help="nodes (default 1: the root namespace is the node; more: each node a "
                         "namespace on a bridge, as kind's containers)")
    up.add_argument("--json", action="store_true", help="print the lab state as JSON")
    up.add_argument("--kubernetes", action="store_true",
                    help="also run a real control plane (etcd, kube-apiserver, "
                         "kube-controller-manager; `make k8s-bins`) holding the lab's nodes, pods "
                         "and services")
    up.set_defaults(func=cmd_lab_up)
    down = sub.add_parser("down", help="remove everything `lab up` made")
    down.add_argument("--prefix", default="lbctl")
    down.set_defaults(func=cmd_lab_down)


def cmd_lab_up(args: argparse.Namespace) -> int:
    replacing = state_path(args.prefix).exists()
    start = time.monotonic()
    try:
        spec = replace(default_spec(args.prefix, args.nodes), kubernetes=args.kubernetes)
        state = lab_up(spec, args.manifests)
    except (LabError, ValueError, kube.ControlPlaneError) as exc:
        print(f"lbctl lab up: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(state), indent=2))
        return 0
    if replacing:
        print(f"lab {args.prefix!r} was up: torn down and rebuilt")
    print(describe(state))
    print(f"\nup in {time.monotonic() - start:.2f}s; state {state.path}; "
          f"manifests {state.manifests_dir}")
    if state.made.kube_dir:
        print(kube.describe(Path(state.made.kube_dir)))
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    try:
        removed = lab_down(args.prefix)
    except LabError as exc:
        print(f"lbctl lab down: {exc}", file=sys.stderr)
        return 1
    print(f"lab {args.prefix!r} " + ("down" if removed else "was not up: nothing to do"))
    return 0


def describe(state: LabState) -> str:
    """Nodes, pods and services as tables, like `kubectl get nodes,pods,svc -o wide`, and the
    command that runs each node's agent."""
    rows = [f"{'NODE':<12} {'IP':<15} {'NETNS':<20} {'UPLINK':<12} {'POD CIDR':<18} PIN DIR"]
    for node in state.node_list():
        rows.append(f"{node.name:<12} {node.ip:<15} {node.ns or '(root)':<20} {node.uplink:<12} "
                    f"{node.pod_cidr:<18} {node.pin_dir}")
    rows.append(f"{'(outside)':<12} {state.outside_ip:<15} {state.outside_ns:<20} "
                f"{'eth0':<12} -")
    rows.append("")
    rows.append(f"{'POD':<10} {'IP':<15} {'NODE':<12} {'NETNS':<20} {'HOST LINK':<16} SERVES")
    for name, pod in state.pods.items():
        ports = served_ports(state.spec, name)
        serves = " ".join(f"{proto}/{port}" for proto in ports for port in ports[proto]) or "-"
        rows.append(f"{name:<10} {pod.ip:<15} {pod.node:<12} {pod.ns:<20} {pod.host_link:<16} "
                    f"{serves}")
    rows.append("")
    rows.append(f"{'SERVICE':<14} {'CLUSTER-IP':<15} {'PORTS':<40} BACKENDS")
    for key, svc in state.services.items():
        listed = ", ".join(f"{p.name} {p.port}/{p.protocol}->{p.target_port}" for p in svc.ports)
        rows.append(f"{key:<14} {svc.cluster_ip:<15} {listed:<40} {' '.join(svc.backends)}")
    rows.append("")
    rows.append("agents (one per node):")
    rows += [f"  {' '.join(agent_argv(state, node))}" for node in state.node_list()]
    return "\n".join(rows)


def agent_argv(state: LabState, node: Node) -> list[str]:
    """`lbctl run` for node: its namespace, manifests, node name, pin dir and pod links."""
    argv = [*node.enter(), "lbctl", "run", "--manifests", state.manifests_dir,
            "--node-name", node.name, "--devices", f"'veth{state.prefix}*'"]
    if node.pin_dir != DEFAULT_PIN_DIR:
        argv += ["--pin-dir", node.pin_dir]
    return argv
