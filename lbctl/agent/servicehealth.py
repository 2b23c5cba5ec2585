"""healthCheckNodePort servers, as kube-proxy's ServiceHealthServer (service_health.go).

A LoadBalancer Service with ``externalTrafficPolicy: Local`` gets a ``healthCheckNodePort``
from the API server; the cloud load balancer probes it on every node and sends traffic only to
nodes that answer 200, i.e. that have a ready endpoint of the service. Every datapath mode
needs this (the kube-proxy modes as much as eBPF), so it is fed by the agent from the same
``ServicePortInfo`` list the modes get, after each sync:

- one HTTP server per such service, on each node address that accepts NodePorts
  (``--nodeport-addresses``; every address, 0.0.0.0, when they are not restricted), opened when
  the service appears or its port changes and closed when it goes;
- the answer: 200 when the service has a ready endpoint on this node and the proxier is
  healthy (/healthz's rule, without the node's eligibility), else 503; the body is kube-proxy's
  JSON: ``{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": b}``,
  N counting distinct ready local endpoint IPs (one pod serving two ports is one endpoint);
- a port that cannot be bound (taken by another process) is reported once, naming the service,
  and tried again at the next sync, as kube-proxy does.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lbctl.agent.health import HttpServer, JsonHandler
from lbctl.datapath.kubeproxy import common
from lbctl.log import V
from lbctl.model.objects import ServicePortInfo

log = logging.getLogger("lbctl.agent.servicehealth")

FAMILY = 4      # the IP family lbctl programs


@dataclass(frozen=True)
class HealthCheck:
    namespace: str
    name: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def health_checks(ports: Iterable[ServicePortInfo], node_name: str) -> tuple[dict[str, HealthCheck], dict[str, int]]:
    """(service key -> its health check, service key -> ready local endpoint IPs), as kube-proxy's
    HealthCheckNodePorts and LocalReadyEndpoints compute them."""
    checks: dict[str, HealthCheck] = {}
    local_ips: dict[str, set[str]] = {}
    for info in ports:
        view = common.service_port_view(info, FAMILY)
        if view is None:
            continue
        if view.health_check_node_port:
            checks[view.service_key] = HealthCheck(view.namespace, view.name, view.health_check_node_port)
        for endpoint in common.endpoint_views(info, FAMILY, node_name):
            if endpoint.ready and endpoint.is_local:
                local_ips.setdefault(view.service_key, set()).add(endpoint.ip)
    return checks, {key: len(ips) for key, ips in local_ips.items()}


def body(namespace: str, name: str, local_endpoints: int, proxy_healthy: bool) -> bytes:
    """kube-proxy's answer (a dedented Go template: tab indents, no trailing newline)."""
    return (f'{{\n\t"service": {{\n\t\t"namespace": "{namespace}",\n\t\t"name": "{name}"\n\t}},\n'
            f'\t"localEndpoints": {local_endpoints},\n'
            f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n}}').encode()


def listen_addresses(nodeport_addresses: Sequence[str], node_ips: Sequence[str],
                     local_addresses: Callable[[], Sequence[str]]) -> list[str]:
    """Where the health check ports listen: "0.0.0.0" when NodePorts are accepted on every address,
    else each local address inside --nodeport-addresses (kube-proxy's GetNodeIPs; "primary"
    means the node IP). `local_addresses` lists the node's IPv4 addresses (read only if needed)."""
    node = common.node_view("", list(node_ips), FAMILY)
    accepted = common.nodeport_addresses(nodeport_addresses, node, node_ips)
    if accepted.match_all:
        return ["0.0.0.0"]
    found = []
    for text in local_addresses():
        ip = ipaddress.ip_address(text)
        if any(ip in cidr for cidr in accepted.cidrs):
            found.append(str(ip))
    if not found:
        log.error("no local address is inside --nodeport-addresses %s: health check ports listen on "
                  "every address", ",".join(nodeport_addresses))
        return ["0.0.0.0"]
    return sorted(set(found), key=ipaddress.ip_address)


def host_ipv4_addresses() -> list[str]:
    """Every IPv4 address on this network namespace's interfaces (net.InterfaceAddrs)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)]


class _Instance:
    def __init__(self, check: HealthCheck):
        self.check = check
        self.servers: list[HttpServer] = []
        self.local_endpoints = 0


class ServiceHealthServer:
    """The health check ports of this node. ``sync(ports)`` after every sync of the agent."""

    def __init__(self, node_name: str, addresses: Sequence[str], proxy_healthy: Callable[[], bool]):
        self.node_name = node_name
        self.addresses = list(addresses)
        self.proxy_healthy = proxy_healthy
        self.services: dict[str, _Instance] = {}
        self._lock = threading.Lock()              # services: written by the agent, read by handlers
        self._failed: dict[str, int] = {}          # service -> port whose bind failure was reported

    def sync(self, ports: Iterable[ServicePortInfo]) -> None:
        checks, local = health_checks(ports, self.node_name)
        self.sync_services(checks)
        with self._lock:
            for key, instance in self.services.items():
                count = local.get(key, 0)
                if count != instance.local_endpoints:
                    log.log(V(3), "health check of Service %s: %d local endpoint(s)", key, count)
                instance.local_endpoints = count

    def sync_services(self, checks: dict[str, HealthCheck]) -> None:
        for key in [k for k, inst in self.services.items() if checks.get(k) != inst.check]:
            with self._lock:
                instance = self.services.pop(key)
            log.log(V(2), "closing health check of Service %s on port %d", key, instance.check.port)
            self._close(instance)
        for key in [k for k in self._failed if k not in checks or checks[k].port != self._failed[k]]:
            del self._failed[key]
            log.info("resolved: the health check of Service %s no longer needs its port", key)
        for key, check in sorted(checks.items()):
            if key in self.services:
                continue
            instance = _Instance(check)
            try:
                for address in self.addresses:
                    instance.servers.append(HttpServer((address, check.port), self._handler(key),
                                                       f"healthcheck {key}").start())
            except OSError as exc:
                self._close(instance)
                if self._failed.get(key) != check.port:
                    log.error("Service %s: cannot serve its healthCheckNodePort %d on node %s (%s): %s; "
                              "trying again at every sync", key, check.port, self.node_name or "?",
                              ",".join(self.addresses), exc.strerror or exc)
                    self._failed[key] = check.port
                continue
            if self._failed.pop(key, None) is not None:
                log.info("resolved: Service %s: healthCheckNodePort %d served", key, check.port)
            else:
                log.log(V(2), "opening health check of Service %s on port %d", key, check.port)
            with self._lock:
                self.services[key] = instance

    def answer(self, key: str) -> tuple[int, bytes] | None:
        with self._lock:
            instance = self.services.get(key)
            count = instance.local_endpoints if instance is not None else 0
        if instance is None:
            return None
        healthy = self.proxy_healthy()
        code = 200 if count and healthy else 503
        return code, body(instance.check.namespace, instance.check.name, count, healthy)

    def _handler(self, key: str):
        owner = self

        class Handler(JsonHandler):
            def answer(self):
                found = owner.answer(key)
                if found is None:       # closed meanwhile: kube-proxy writes nothing (200, empty)
                    return 200, b"", "text/plain; charset=utf-8"
                return found[0], found[1], "application/json"
        return Handler

    @staticmethod
    def _close(instance: _Instance) -> None:
        for server in instance.servers:
            server.stop()
        instance.servers.clear()

    def stop(self) -> None:
        with self._lock:
            instances = list(self.services.values())
            self.services.clear()
        for instance in instances:
            self._close(instance)
