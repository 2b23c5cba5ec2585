"""Kubernetes objects and desired datapath state, as pure data.

Data flows one way: a source (manifests, later the API server) yields ``Service`` and
``EndpointSlice`` objects; ``lbctl.model.desired`` joins them into ``ServicePortInfo`` (what every
datapath mode consumes: eBPF, iptables, nftables, IPVS) and, for the eBPF datapath, into a
``DesiredState`` of frontends and backends. Nothing here touches the kernel.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Protocol(str, enum.Enum):
    """Service protocols Kubernetes knows; ``number`` is the IP protocol number."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]

    @classmethod
    def from_number(cls, number: int) -> Protocol:
        return {6: cls.TCP, 17: cls.UDP, 132: cls.SCTP}[number]


# --- Kubernetes objects (only the fields a service proxy reads) -------------------------------


@dataclass(frozen=True)
class ServicePort:
    name: str                      # "" when the service has a single unnamed port
    port: int
    protocol: Protocol
    target_port: int | str         # number, or the name of a container port
    node_port: int | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    type: str = "ClusterIP"                       # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[str, ...] = ()             # () for headless ("None") and ExternalName
    ports: tuple[ServicePort, ...] = ()
    session_affinity: str = "None"                # None | ClientIP
    session_affinity_timeout: int = 10800         # seconds, for ClientIP
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()       # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_traffic_policy: str = "Cluster"      # Cluster | Local
    internal_traffic_policy: str = "Cluster"      # Cluster | Local
    health_check_node_port: int | None = None
    has_selector: bool = False
    origin: str = ""                              # where it came from (file name), for messages
    # Annotations lbctl.io/lb-algorithm (random | maglev) and lbctl.io/maglev-table-size:
    # Maglev consistent hashing with a table of this many slots (a prime); 0: the node's
    # default size (--maglev-table-size). Only the eBPF datapath reads them.
    load_balancing: str = "random"
    maglev_table_size: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def cluster_ip(self) -> str | None:
        return self.cluster_ips[0] if self.cluster_ips else None


@dataclass(frozen=True)
class EndpointPort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    hostname: str | None = None


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str              # label kubernetes.io/service-name
    address_type: str = "IPv4"
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    origin: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service_name}"


@dataclass(frozen=True)
class Problem:
    """One piece of bad input: the object it names, what is wrong, what was done about it."""

    obj: str                       # "Service default/web", "file manifests/bad.yaml", ...
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.message}"


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything a source knows at one moment: valid objects, plus the problems it skipped."""

    services: Mapping[str, Service] = field(default_factory=dict)              # by "ns/name"
    slices: Mapping[str, tuple[EndpointSlice, ...]] = field(default_factory=dict)  # by service key
    problems: tuple[Problem, ...] = ()
    # When the changes since the source's previous snapshot were made (wall clock, seconds):
    # EndpointSlices' endpoints.kubernetes.io/last-change-trigger-time, each once (the
    # network programming latency, measured from them once they are programmed)
    trigger_times: tuple[float, ...] = ()


# --- What every datapath mode consumes -------------------------------------------------------


@dataclass(frozen=True)
class EndpointInfo:
    address: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None


@dataclass(frozen=True)
class ServicePortInfo:
    """One service port joined with its endpoints (kube-proxy's ServicePort + []Endpoint)."""

    service: Service
    port: ServicePort
    endpoints: tuple[EndpointInfo, ...] = ()

    @property
    def name(self) -> str:
        """kube-proxy's ServicePortName: "ns/name:port" ("ns/name" for an unnamed port)."""
        if self.port.name:
            return f"{self.service.key}:{self.port.name}"
        return self.service.key


# --- Desired eBPF datapath state --------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Frontend:
    """A service address as the datapath matches it: VIP, port, protocol."""

    address: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol.value}"


@dataclass(frozen=True, order=True)
class Backend:
    address: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol.value}"


class FrontendKind(str, enum.Enum):
    """Which address of a service a frontend is: kube-proxy treats each kind differently
    (externalTrafficPolicy and masquerade apply to all but ClusterIP, source ranges to
    LoadBalancer only)."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"                 # a node address that accepts NodePorts : nodePort
    EXTERNAL_IP = "ExternalIP"             # spec.externalIPs : port
    LOAD_BALANCER = "LoadBalancer"         # status.loadBalancer.ingress[].ip : port

    @property
    def external(self) -> bool:
        """Reached from outside the cluster: kube-proxy's external traffic (KUBE-EXT chains)."""
        return self is not FrontendKind.CLUSTER_IP


@dataclass(frozen=True)
class ServiceEntry:
    frontend: Frontend
    name: str                              # "ns/name:port", as kube-proxy names service ports
    backends: tuple[Backend, ...]          # sorted; empty means "reject" (no endpoints). For an
                                           # external frontend with eTP Local: this node's only
    # Endpoints still in the slices but not chosen for new flows (terminating, not ready):
    # their established TCP flows keep going, as with kube-proxy's conntrack. Never UDP.
    draining: tuple[Backend, ...] = ()
    affinity_timeout: int = 0              # sessionAffinity ClientIP timeout (s); 0: none
    drop_without_backends: bool = False    # no backends: drop (a Local policy, endpoints
                                           # elsewhere only) instead of reject
    kind: FrontendKind = FrontendKind.CLUSTER_IP
    # externalTrafficPolicy Local (external kinds): `backends` are this node's endpoints, for
    # traffic from outside; traffic from inside the cluster (pods, the node) uses every
    # endpoint, `internal_backends` (a second slot set, scope internal). None: one slot set.
    internal_backends: tuple[Backend, ...] | None = None
    # loadBalancerSourceRanges (LoadBalancer kind, with endpoints): the only sources accepted,
    # as CIDRs; empty: every source.
    source_ranges: tuple[str, ...] = ()
    # Maglev consistent hashing over a table of this many slots (a prime), in each scope;
    # 0: uniform random choice.
    maglev_table_size: int = 0

    @property
    def external_local(self) -> bool:
        return self.internal_backends is not None


@dataclass(frozen=True)
class DesiredState:
    services: Mapping[Frontend, ServiceEntry] = field(default_factory=dict)

    @property
    def backends(self) -> frozenset[Backend]:
        return frozenset(b for s in self.services.values() for b in (*s.backends, *(s.internal_backends or ())))


MAGLEV_DEFAULT_TABLE_SIZE = 16381   # Cilium's default M (bpf/include/lbctl_shared.h says it too)


def is_prime(n: int) -> bool:
    """Maglev table sizes must be prime (every skip then visits every slot): trial division,
    enough for sizes up to 131071."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, int(n ** 0.5) + 1, 2))
