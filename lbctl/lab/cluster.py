"""`lbctl lab`: a small Kubernetes-like cluster in network namespaces on this machine.

The root namespace is the node; every pod is a namespace joined to it by a veth pair, wired like
the ptp CNI plugin (see lbctl.lab.netns). Backend pods run lbctl.lab.server, which answers with its pod
name and the client address it saw. The lab writes the Services and EndpointSlices that describe
it as Kubernetes manifests, for the agent to read. No load balancer is part of the lab: until one
is attached to the host veths (links named ``veth*``), ClusterIPs answer with ICMP unreachable.

Default lab (prefix "lbctl"):

    pod        ip           netns            host link
    client-0   10.244.0.2   lbctl-client-0   vethlbctl0
    client-1   10.244.0.3   lbctl-client-1   vethlbctl1
    web-0..2   .4 .5 .6     lbctl-web-0 ...  vethlbctl2..4   serve TCP 8080
    dns-0..1   .7 .8        lbctl-dns-0 ...  vethlbctl5..6   serve TCP and UDP 5353

    default/web  10.96.0.10  http 80/TCP -> 8080                        web-0 web-1 web-2
    default/dns  10.96.0.53  dns 53/UDP -> 5353, dns-tcp 53/TCP -> 5353   dns-0 dns-1

What the lab changes in the node, each undone by lab_down:
  * net.ipv4.ip_forward=1 (the previous value is restored when the last lab goes down);
  * "unreachable" routes for the pod CIDR and the service CIDR, so that a packet to a ClusterIP
    that no load balancer rewrote, or to an unused pod IP, is answered with ICMP host unreachable
    instead of leaving through the node's default route (removed with the last lab using them);
  * per pod: a namespace, a veth pair, the gateway /32 on the host end, a route to the pod IP/32;
    IPv6 is off on both ends of the veth (no link-local, RS or MLD packets in the datapath).

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

RUN_DIR = Path("/run/lbctl")
NODE_NAME = "lab-node"                 # nodeName of every endpoint
READY_TIMEOUT = 15.0                   # seconds for all backends to answer after start
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*$")


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
    pod_cidr: str = "10.244.0.0/24"
    gateway: str = "10.244.0.1"
    service_cidr: str = "10.96.0.0/16"
    clients: tuple[str, ...] = ("client-0", "client-1")
    services: tuple[ServiceSpec, ...] = DEFAULT_SERVICES
    server_max_seconds: float = 3600.0   # backends exit by themselves after this long
    kubernetes: bool = False             # a real control plane too (lbctl.lab.kube)

    def pod_names(self) -> list[str]:
        """Clients first, then every backend once, in service order: the order of pod IPs."""
        names = list(self.clients)
        for svc in self.services:
            names += [b for b in svc.backends if b not in names]
        return names

    def validate(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r}: use lower-case letters and digits, "
                             "starting with a letter")
        longest = host_link_name(self.prefix, len(self.pod_names()) - 1)
        if len(longest) > netns.IFNAMSIZ:
            raise ValueError(f"lab prefix {self.prefix!r} too long: host veth {longest!r} exceeds "
                             f"{netns.IFNAMSIZ} characters; use a shorter --prefix")
        pods = ipaddress.ip_network(self.pod_cidr)
        if ipaddress.ip_address(self.gateway) not in pods:
            raise ValueError(f"gateway {self.gateway} is not in pod CIDR {self.pod_cidr}")
        if len(self.pod_names()) > pods.num_addresses - 3:
            raise ValueError(f"pod CIDR {self.pod_cidr} too small for {len(self.pod_names())} pods")
        services = ipaddress.ip_network(self.service_cidr)
        for svc in self.services:
            if ipaddress.ip_address(svc.cluster_ip) not in services:
                raise ValueError(f"{svc.key}: clusterIP {svc.cluster_ip} is not in service CIDR "
                                 f"{self.service_cidr}")


def default_spec(prefix: str = "lbctl") -> LabSpec:
    return LabSpec(prefix=prefix)


def host_link_name(prefix: str, index: int) -> str:
    return f"veth{prefix}{index}"


def plan_pods(spec: LabSpec) -> dict[str, netns.Pod]:
    """Pod name -> Pod, with IPs from the pod CIDR in order, skipping the gateway."""
    ips = (str(a) for a in ipaddress.ip_network(spec.pod_cidr).hosts() if str(a) != spec.gateway)
    return {name: netns.Pod(name=name, ns=f"{spec.prefix}-{name}", ip=next(ips),
                            host_link=host_link_name(spec.prefix, i), gateway=spec.gateway)
            for i, name in enumerate(spec.pod_names())}


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
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    servers: dict[str, int] = field(default_factory=dict)   # pod -> labserver pid
    kube_dir: str | None = None            # the control plane's work dir (lbctl.lab.kube)


@dataclass
class LabState:
    spec: LabSpec
    pods: dict[str, netns.Pod]            # every pod: name -> ip, ns, host_link
    manifests_dir: str
    made: Made = field(default_factory=Made)

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

    def host_links(self) -> list[str]:
        """The host ends of the pod veths: where a load balancer attaches."""
        return [pod.host_link for pod in self.pods.values()]

    def namespaces(self) -> list[str]:
        return [pod.ns for pod in self.pods.values()]

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
        return cls(spec=LabSpec(**{**spec, "clients": tuple(spec["clients"]),
                                   "services": services}),
                   pods={name: netns.Pod(**p) for name, p in data["pods"].items()},
                   manifests_dir=data["manifests_dir"], made=Made(**data["made"]))


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
    """Refuse to touch objects no lab state accounts for, and labs that would share pod IPs."""
    for pod in plan_pods(spec).values():
        if netns.netns_exists(pod.ns):
            raise LabError(f"netns {pod.ns} exists but no lab state owns it; remove it with "
                           f"`ip netns del {pod.ns}` or use another --prefix")
        if netns.link_exists(pod.host_link):
            raise LabError(f"link {pod.host_link} exists but no lab state owns it; remove it "
                           f"with `ip link del {pod.host_link}` or use another --prefix")
    ours = ipaddress.ip_network(spec.pod_cidr)
    for other in other_labs(spec.prefix):
        if ours.overlaps(ipaddress.ip_network(other.spec.pod_cidr)):
            raise LabError(f"lab {other.prefix!r} already uses pod CIDR {other.spec.pod_cidr}; "
                           f"take it down (`lbctl lab down --prefix {other.prefix}`) or give "
                           f"this lab another pod CIDR")


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

    others = other_labs(spec.prefix)
    made.ip_forward_prev = (others[0].made.ip_forward_prev if others
                            else netns.IP_FORWARD.read_text().strip())
    state.save()
    netns.set_ip_forward("1")

    for cidr in (spec.pod_cidr, spec.service_cidr):
        route = f"unreachable {cidr}"
        made.routes.append(route)
        state.save()
        netns.add_route(route)

    for pod in state.pods.values():
        made.namespaces.append(pod.ns)
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
        kube.lab_up(state, Path(made.kube_dir))


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
    """Probe every backend on every port it serves, from the node, until each names itself."""
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
                    outcome = probes[proto]((state.pods[pod].ip, port), 0.2)
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
            "nodeName": NODE_NAME,
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

    if made.kube_dir:
        attempt("stop the control plane", kube.lab_down, Path(made.kube_dir))
    for pod, pid in made.servers.items():
        if any("lbctl.lab.server" in arg for arg in netns.process_cmdline(pid)):
            attempt(f"stop labserver of {pod} (pid {pid})", netns.stop_process, pid)
    for ns in made.namespaces:
        for pid in netns.netns_pids(ns):
            attempt(f"stop pid {pid} in netns {ns}", netns.stop_process, pid)
    for link in made.links:
        attempt(f"delete link {link}", netns.del_link, link)
    for ns in made.namespaces:
        attempt(f"delete netns {ns}", netns.del_netns, ns)

    others = other_labs(state.prefix)
    for route in made.routes:
        if not any(route in other.made.routes for other in others):
            attempt(f"delete route {route}", netns.del_route, route)
    if made.ip_forward_prev is not None and not others:
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
        spec = replace(default_spec(args.prefix), kubernetes=args.kubernetes)
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
    """Pods and services as two tables, like `kubectl get pods,svc -o wide`."""
    rows = [f"{'POD':<10} {'IP':<15} {'NETNS':<20} {'HOST LINK':<16} SERVES"]
    for name, pod in state.pods.items():
        ports = served_ports(state.spec, name)
        serves = " ".join(f"{proto}/{port}" for proto in ports for port in ports[proto]) or "-"
        rows.append(f"{name:<10} {pod.ip:<15} {pod.ns:<20} {pod.host_link:<16} {serves}")
    rows.append("")
    rows.append(f"{'SERVICE':<14} {'CLUSTER-IP':<15} {'PORTS':<40} BACKENDS")
    for key, svc in state.services.items():
        listed = ", ".join(f"{p.name} {p.port}/{p.protocol}->{p.target_port}" for p in svc.ports)
        rows.append(f"{key:<14} {svc.cluster_ip:<15} {listed:<40} {' '.join(svc.backends)}")
    return "\n".join(rows)
