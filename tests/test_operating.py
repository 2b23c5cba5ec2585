"""`lbctl run` operated like kube-proxy, in each mode, as a real process in a network namespace
of its own: kube-proxy's configuration file, /healthz and /livez on :10256, /metrics on
127.0.0.1:10249, the healthCheckNodePort of a LoadBalancer eTP Local service as its endpoints
move, `lbctl status` while it runs and after it stopped, root-only files. IPVS mode (this kernel
has no IPVS) runs in-process on the fake IPVS kernel."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TEST_PIN_DIR
from nsutil import socket_in, wait_for
from test_health import HEALTHZ_BODY, LIVEZ_BODY

from lbctl.agent import status

NODE, NODE_IP, HC_PORT = "node-a", "192.0.2.2", 31234
EXE = str(Path(sys.executable).with_name("lbctl"))

SERVICE = f"""\
apiVersion: v1
kind: Service
metadata: {{name: web-lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  selector: {{app: web}}
  externalTrafficPolicy: Local
  healthCheckNodePort: {HC_PORT}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}]
"""


def endpoint_slice(node: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: web-lb-1
          namespace: default
          labels: {{kubernetes.io/service-name: web-lb}}
        addressType: IPv4
        ports: [{{name: http, port: 8080, protocol: TCP}}]
        endpoints:
        - addresses: [10.244.0.5]
          conditions: {{ready: true}}
          nodeName: {node}
        """)


def config(mode: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: {mode}
        hostnameOverride: {NODE}
        bindAddress: {NODE_IP}
        clusterCIDR: 10.244.0.0/16
        nodePortAddresses: [192.0.2.0/24]
        iptables: {{syncPeriod: 30s, minSyncPeriod: 1s}}
        nftables: {{syncPeriod: 30s}}
        conntrack: {{maxPerCore: 0}}
        oomScoreAdj: -999
        """)


def http_in(ns: str, address: str, port: int, path: str = "/") -> tuple[int, str]:
    """GET from inside `ns`: (status code, body)."""
    sock = socket_in(ns, kind=socket.SOCK_STREAM)
    with sock:
        sock.settimeout(10)
        sock.connect((address, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def refused(ns: str, address: str, port: int) -> bool:
    try:
        http_in(ns, address, port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:     # accepted while the listener was being closed: not yet
        return False
    return False


def lbctl_in(ns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", EXE, *argv], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def node_ns():
    name = f"lbop{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # the node's uplink: a veth pair inside the namespace (this kernel has no dummy links)
        for argv in (["link", "set", "lo", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                     ["addr", "add", f"{NODE_IP}/24", "dev", "eth0"], ["link", "set", "eth0p", "up"],
                     ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def last_status(pin_dir: str) -> dict:
    try:
        return json.loads(Path(status.status_file(pin_dir)).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.parametrize("mode", ["ebpf", "iptables", "nftables"])
def test_lbctl_run_operated_like_kube_proxy(node_ns, tmp_path, mode):
    ns, pin_dir = node_ns, f"{TEST_PIN_DIR}-op-{mode}"
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "web-lb.yaml").write_text(SERVICE)
    (manifests / "web-lb-slice.yaml").write_text(endpoint_slice(NODE))
    (tmp_path / "kube-proxy.yaml").write_text(config(mode))
    argv = ["nsenter", f"--net=/run/netns/{ns}", EXE, "run", "--config", str(tmp_path / "kube-proxy.yaml"),
            "--manifests", str(manifests), "--pin-dir", pin_dir, "--interval", "0.1", "--devices", "vethlbop*",
            "-v", "2", "--max-seconds", "300"]
    agent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (last_status(pin_dir).get("last_sync") or {}).get("result") == "ok" or
                 agent.poll() is not None, 120, what="the agent's first sync")
        assert agent.poll() is None, agent.communicate()[1]

        # /healthz and /livez where kube-proxy has them, on every address (0.0.0.0:10256)
        for address in ("127.0.0.1", NODE_IP):
            code, body = http_in(ns, address, 10256, "/healthz")
            assert code == 200 and HEALTHZ_BODY.fullmatch(body), body
        code, body = http_in(ns, "127.0.0.1", 10256, "/livez")
        assert code == 200 and LIVEZ_BODY.fullmatch(body), body

        # /metrics on 127.0.0.1:10249 only
        code, text = http_in(ns, "127.0.0.1", 10249, "/metrics")
        assert code == 200 and 'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}' in text
        assert http_in(ns, "127.0.0.1", 10249, "/proxyMode") == (200, mode)
        assert ('lbctl_map_entries{map="lb4_services"}' in text) == (mode == "ebpf"), "maps: eBPF mode's"
        assert refused(ns, NODE_IP, 10249)

        # the health check port: on the nodeport addresses (192.0.2.0/24), 200 with a local endpoint
        code, body = http_in(ns, NODE_IP, HC_PORT)
        assert code == 200 and json.loads(body) == {"service": {"namespace": "default", "name": "web-lb"},
                                                    "localEndpoints": 1, "serviceProxyHealthy": True}
        assert refused(ns, "127.0.0.1", HC_PORT), "not on addresses outside --nodeport-addresses"
        syncs = last_status(pin_dir)["syncs"]["change"]
        (manifests / "web-lb-slice.yaml").write_text(endpoint_slice("node-b"))
        wait_for(lambda: last_status(pin_dir)["syncs"]["change"] > syncs, 30, what="the endpoint move synced")
        code, body = http_in(ns, NODE_IP, HC_PORT)
        assert code == 503 and json.loads(body)["localEndpoints"] == 0

        done = lbctl_in(ns, "status", "--pin-dir", pin_dir)
        assert done.returncode == 0, done.stderr
        assert f"running (pid {agent.pid})" in done.stdout and f"mode:       {mode}" in done.stdout
        assert f"node: {NODE}" in done.stdout and f"manifests {manifests}" in done.stdout
        assert "1 service(s), 1 service port(s), 2 frontend(s), 1 backend(s)" in done.stdout

        # root-only files: the status file, the lock, the agent's state; eBPF: the pins too
        run_dir = os.environ["LBCTL_RUN_DIR"]
        assert mode_of(run_dir) == 0o700
        for name in os.listdir(run_dir):
            if not os.path.isdir(os.path.join(run_dir, name)):
                assert mode_of(os.path.join(run_dir, name)) == 0o600, name
        assert mode_of(status.status_file(pin_dir)) == 0o600
        if mode == "ebpf":
            assert mode_of(pin_dir) == 0o700
            pins = os.listdir(pin_dir)
            assert "lb4_services" in pins
            for root, dirs, files in os.walk(pin_dir):   # programs-<digest>/: the adopted programs
                assert all(mode_of(os.path.join(root, d)) == 0o700 for d in dirs), dirs
                assert all(mode_of(os.path.join(root, f)) == 0o600 for f in files), (root, files)

        (manifests / "web-lb.yaml").unlink()
        (manifests / "web-lb-slice.yaml").unlink()
        wait_for(lambda: refused(ns, NODE_IP, HC_PORT), 30, what="the health check port closed")
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=60)
        cleanup = lbctl_in(ns, "cleanup", "--pin-dir", pin_dir, "--keep-labs")
    assert agent.returncode == 0, err
    assert "oomScoreAdj is not applied" in err, "what the file asks and lbctl does not do is said"
    assert "sync (" in err, "-v 2 from the command line: a line per sync"
    assert cleanup.returncode == 0, cleanup.stderr
    done = lbctl_in(ns, "status", "--pin-dir", pin_dir)
    assert done.returncode == 1 and "NOT RUNNING" in done.stdout or "no lbctl agent" in done.stderr
    assert not os.path.exists(pin_dir)


def test_ipvs_mode_serves_health_check_ports():
    """IPVS mode on the fake IPVS kernel (this machine's has none): the agent feeds the same
    ServicePortInfo list to the health check server, whatever the mode."""
    from kubeproxy_cases import port, service
    from test_servicehealth import free_port, get

    from lbctl.agent.health import ProxyHealth
    from lbctl.agent.loop import Agent
    from lbctl.agent.servicehealth import ServiceHealthServer
    from lbctl.datapath.kubeproxy.ipvs import IpvsConfig, IpvsMode
    from lbctl.model.objects import ClusterSnapshot, Endpoint, EndpointPort, EndpointSlice, Protocol
    from lbctl.testing.ipvs_kernel import FakeKernel

    hc = free_port()
    svc = service("default", "web-lb", "10.96.0.11", port("http", 80, node_port=30080, target_port=8080),
                  type="LoadBalancer", external_traffic_policy="Local", health_check_node_port=hc)
    endpoints = EndpointSlice("default", "web-lb-1", "web-lb", ports=(EndpointPort("http", 8080, Protocol.TCP),),
                              endpoints=(Endpoint(("10.244.0.5",), node_name=NODE),))
    snapshot = ClusterSnapshot(services={svc.key: svc}, slices={svc.key: (endpoints,)})
    proxy = ProxyHealth(60)
    ops = status.Operations(mode="ipvs", source="test", pin_dir=f"{TEST_PIN_DIR}-op-ipvs", node_name=NODE,
                            health=proxy, service_health=ServiceHealthServer(NODE, ["127.0.0.1"], proxy.is_healthy),
                            write_status=False)
    agent = Agent(None, mode=IpvsMode(IpvsConfig(node_name=NODE), kernel=FakeKernel(("192.168.0.2",))),
                  observer=ops)
    try:
        agent.turn(first=snapshot)
        assert ops.last_sync["result"] == "ok" and ops.counts["services"] == 1
        code, _, body = get(hc)
        assert code == 200 and body["localEndpoints"] == 1
    finally:
        ops.stop()
