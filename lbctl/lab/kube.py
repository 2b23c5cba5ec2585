"""A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager.

The binaries are the upstream ones, built from Go modules by `make k8s-bins` (hack/build-k8s.sh)
into ~/.cache/lbctl/k8s-<version>/, or taken from $KUBEBUILDER_ASSETS (envtest's convention).
Everything listens on 127.0.0.1 on free ports; certificates (a CA, the API server's serving cert,
the service-account key pair, client certs and kubeconfigs) are generated into the work
directory. Nothing else on the machine is touched: `stop()` ends the three processes and removes
the work directory, so no process, port or file is left.

There are no kubelets. As kwok does, the lab registers its nodes as Node objects and its pods as
Pod objects bound to them (spec.nodeName), and sets each pod's status (phase Running, podIP,
the Ready condition) through the status subresource. The real EndpointSlice controller then
builds the slices for the Services created with kubectl or the client, exactly as on a cluster.
Because nothing heartbeats the nodes, the node-lifecycle controller is off: it would mark the
nodes unreachable after its grace period, set every pod NotReady and evict them.

The state of a running control plane (pids, ports, paths) is kept in <work_dir>/state.json, so
`lbctl lab down` in another process can stop what `lbctl lab up` started.
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lbctl.lab import netns

K8S_VERSION = "v1.37.2"         # hack/k8s/go.mod requires this k8s.io/kubernetes (a test checks)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
START_TIMEOUT = 180.0           # seconds: the API server's first start on 2 busy cores is slow
STOP_GRACE = 10.0               # seconds between SIGTERM and SIGKILL
SERVICE_CIDR = "10.96.0.0/16"   # the lab's service CIDR; the API server takes .1 for `kubernetes`
CONTROLLERS = "*,-node-lifecycle-controller"   # see the module docstring
LAB_IMAGE = "lbctl.local/labserver:lab"        # pods have no runtime; the image is a label


class ControlPlaneError(RuntimeError):
    """The control plane could not start, answer or stop; the message names the part and its log."""


# --- binaries --------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where hack/build-k8s.sh puts the binaries (it computes the same path)."""
    base = os.environ.get("LBCTL_K8S_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lbctl")
    return Path(base) / f"k8s-{K8S_VERSION}"


def binaries_dir() -> Path:
    """$KUBEBUILDER_ASSETS when it holds every binary we run, else the build cache."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and all(os.access(Path(assets) / b, os.X_OK) for b in BINARIES):
        return Path(assets)
    return cache_dir()


def require_binaries(bin_dir: Path | None = None) -> Path:
    bin_dir = bin_dir or binaries_dir()
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(
            f"no {', '.join(missing)} in {bin_dir}: build them with `make k8s-bins` (once per "
            f"machine, about 15 minutes on 2 cores) or point KUBEBUILDER_ASSETS at a directory "
            f"holding {', '.join(BINARIES)}")
    return bin_dir


# --- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Paths of the generated PKI, all in one directory."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca_crt(self) -> Path:
        return self.path("ca.crt")

    @property
    def ca_key(self) -> Path:
        return self.path("ca.key")


def _cert_libs() -> Any:
    # Imported on first use: the rest of the lab (and `lbctl --help`) does not need cryptography.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _new_key(path: Path) -> Any:
    """A P-256 key (fast to make, accepted everywhere in Kubernetes), written PEM to path."""
    _, _, serialization, ec, _, _ = _cert_libs()
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return key


def _load_key(path: Path) -> Any:
    _, _, serialization, _, _, _ = _cert_libs()
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _sign(pki: Pki, name: str, subject: list[tuple[Any, str]], *, ca: bool = False,
          server_names: tuple[str, ...] = (), client: bool = False) -> None:
    """Make <name>.key and <name>.crt, signed by the CA (self-signed when ca=True)."""
    x509, hashes, serialization, _, eku, _ = _cert_libs()
    key = _new_key(pki.path(f"{name}.key"))
    subject_name = x509.Name([x509.NameAttribute(oid, value) for oid, value in subject])
    if ca:
        issuer, signer = subject_name, key
    else:
        ca_cert = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
        issuer, signer = ca_cert.subject, _load_key(pki.ca_key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject_name).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usages = ([eku.SERVER_AUTH] if server_names else []) + ([eku.CLIENT_AUTH] if client else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        sans: list[Any] = []
        for san in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                sans.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    pki.path(f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(pki: Pki, service_cidr: str) -> None:
    """CA, API server serving cert, service-account key pair, admin and controller-manager certs."""
    _, _, serialization, _, _, oid = _cert_libs()
    pki.dir.mkdir(parents=True, exist_ok=True)
    _sign(pki, "ca", [(oid.COMMON_NAME, "lbctl-lab-ca")], ca=True)
    kubernetes_ip = str(next(ipaddress.ip_network(service_cidr).hosts()))
    _sign(pki, "apiserver", [(oid.COMMON_NAME, "kube-apiserver")],
          server_names=("127.0.0.1", "localhost", kubernetes_ip, "kubernetes",
                        "kubernetes.default", "kubernetes.default.svc",
                        "kubernetes.default.svc.cluster.local"))
    sa = _new_key(pki.path("sa.key"))
    pki.path("sa.pub").write_bytes(sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    client_cert(pki, "admin", "lbctl-admin", ("system:masters",))
    client_cert(pki, "kube-controller-manager", "system:kube-controller-manager")


def client_cert(pki: Pki, name: str, user: str, groups: tuple[str, ...] = ()) -> None:
    """<name>.crt/.key for user `user` in `groups` (O= in the subject, as Kubernetes reads it)."""
    _, _, _, _, _, oid = _cert_libs()
    subject = [(oid.ORGANIZATION_NAME, g) for g in groups] + [(oid.COMMON_NAME, user)]
    _sign(pki, name, subject, client=True)


def write_kubeconfig(path: Path, server: str, pki: Pki, cert: str) -> None:
    """A kubeconfig with everything embedded, so it can be copied or mounted on its own."""
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lbctl-lab",
        "clusters": [{"name": "lbctl-lab", "cluster": {
            "server": server, "certificate-authority-data": b64(pki.ca_crt)}}],
        "users": [{"name": cert, "user": {
            "client-certificate-data": b64(pki.path(f"{cert}.crt")),
            "client-key-data": b64(pki.path(f"{cert}.key"))}}],
        "contexts": [{"name": "lbctl-lab", "context": {"cluster": "lbctl-lab", "user": cert}}],
    }
    data = yaml.safe_dump(config, sort_keys=False).encode()
    _write_private(path, data)


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice, so parallel runs do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent exits (a killed test run leaves nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv: list[str], log: Path, tie_to_parent: bool, *, env: dict[str, str] | None = None,
          cgroup: Path | None = None) -> int:
    """Start argv in its own session with output to log; return its pid. Stop: netns.stop_process.

    tie_to_parent: SIGKILL when the thread that started it exits (PR_SET_PDEATHSIG follows the
    thread, not the process). cgroup: a cgroup v2 directory the process runs in from its first
    instruction (its pid written into cgroup.procs before exec)."""
    def before_exec() -> None:
        if tie_to_parent:
            _die_with_parent()
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True, env=env,
                                preexec_fn=before_exec if tie_to_parent or cgroup else None)
    # The pid is what we keep (another process may stop it); forget the Popen without a warning.
    proc.returncode = 0
    return proc.pid


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the control plane -----------------------------------------------------------------------


@dataclass
class ControlPlaneState:
    """What a running control plane is: enough for any process to reach it or stop it."""

    work_dir: str
    bin_dir: str
    service_cidr: str
    etcd_port: int = 0
    etcd_peer_port: int = 0
    apiserver_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)   # binary name -> pid


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager, started and stopped together.

        cp = ControlPlane(Path("/run/lbctl/lab-lbctl/kube")).start()
        cp.kubectl("get", "endpointslices", "-A")
        cp.stop()

    tie_to_parent: the processes die with the process that started them (tests); the lab leaves
    it off, so that `lbctl lab up` can exit and `lbctl lab down` stop them later.
    """

    def __init__(self, work_dir: Path, *, service_cidr: str = SERVICE_CIDR,
                 bin_dir: Path | None = None, tie_to_parent: bool = False,
                 apiserver_args: tuple[str, ...] = ()) -> None:
        self.state = ControlPlaneState(work_dir=str(work_dir), bin_dir=str(bin_dir or ""),
                                       service_cidr=service_cidr)
        self.tie_to_parent = tie_to_parent
        self.apiserver_args = apiserver_args
        self._api: Any = None

    # paths and addresses

    @property
    def work_dir(self) -> Path:
        return Path(self.state.work_dir)

    @property
    def pki(self) -> Pki:
        return Pki(self.work_dir / "pki")

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (system:masters)."""
        return self.work_dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.state.etcd_port}"

    def log(self, binary: str) -> Path:
        return self.work_dir / "logs" / f"{binary}.log"

    @property
    def state_file(self) -> Path:
        return self.work_dir / "state.json"

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def attach(cls, work_dir: Path) -> ControlPlane:
        """The control plane whose state is in work_dir (started by this or another process)."""
        cp = cls(work_dir)
        cp.state = ControlPlaneState(**json.loads(cp.state_file.read_text()))
        return cp

    # start and stop

    def start(self, timeout: float = START_TIMEOUT) -> ControlPlane:
        """Generate the PKI, start the three processes, wait until the API server is ready and
        the controller manager works. On failure everything is stopped and removed."""
        bin_dir = require_binaries(Path(self.state.bin_dir) if self.state.bin_dir else None)
        self.state.bin_dir = str(bin_dir)
        if self.state_file.exists():
            raise ControlPlaneError(f"a control plane already runs from {self.work_dir} "
                                    f"(see {self.state_file}); stop it first")
        try:
            (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.state.etcd_port, self.state.etcd_peer_port, self.state.apiserver_port = (
                free_port(), free_port(), free_port())
            self.save()
            make_pki(self.pki, self.state.service_cidr)
            write_kubeconfig(self.kubeconfig, self.server, self.pki, "admin")
            write_kubeconfig(self.work_dir / "kube-controller-manager.kubeconfig", self.server,
                             self.pki, "kube-controller-manager")
            deadline = time.monotonic() + timeout
            self._start("etcd")
            self._wait_etcd(deadline)
            self._start("kube-apiserver")
            self._wait_apiserver(deadline)
            self._start("kube-controller-manager")
            self._wait_controller_manager(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _argv(self, binary: str) -> list[str]:
        s, pki, wd = self.state, self.pki, self.work_dir
        path = str(Path(s.bin_dir) / binary)
        if binary == "etcd":
            peer = f"http://127.0.0.1:{s.etcd_peer_port}"
            return [path, "--name=lbctl", f"--data-dir={wd / 'etcd'}",
                    f"--listen-client-urls={self.etcd_url}",
                    f"--advertise-client-urls={self.etcd_url}",
                    f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=lbctl={peer}",
                    "--unsafe-no-fsync",        # a throwaway store: durability buys nothing here
                    "--log-level=warn"]
        if binary == "kube-apiserver":
            return [path, f"--etcd-servers={self.etcd_url}",
                    "--bind-address=127.0.0.1", f"--secure-port={s.apiserver_port}",
                    "--advertise-address=127.0.0.1",
                    # No EndpointSlice for the `kubernetes` Service: the reconciler refuses a
                    # loopback address, and clients here reach the API server directly.
                    "--endpoint-reconciler-type=none",
                    f"--tls-cert-file={pki.path('apiserver.crt')}",
                    f"--tls-private-key-file={pki.path('apiserver.key')}",
                    f"--client-ca-file={pki.ca_crt}",
                    f"--service-account-key-file={pki.path('sa.pub')}",
                    f"--service-account-signing-key-file={pki.path('sa.key')}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-cluster-ip-range={s.service_cidr}",
                    "--authorization-mode=Node,RBAC",
                    "--allow-privileged=true",  # the DaemonSet in deploy/ is privileged
                    f"--cert-dir={wd / 'apiserver-certs'}",
                    "--profiling=false", "--v=1", *self.apiserver_args]
        if binary == "kube-controller-manager":
            return [path, f"--kubeconfig={wd / 'kube-controller-manager.kubeconfig'}",
                    "--secure-port=0",          # no health port: readiness is seen in the API
                    "--leader-elect=false",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={pki.path('sa.key')}",
                    f"--root-ca-file={pki.ca_crt}",
                    f"--cluster-signing-cert-file={pki.ca_crt}",
                    f"--cluster-signing-key-file={pki.ca_key}",
                    f"--service-cluster-ip-range={s.service_cidr}",
                    f"--controllers={CONTROLLERS}", "--v=1"]
        raise ValueError(binary)

    def _start(self, binary: str) -> None:
        pid = spawn(self._argv(binary), self.log(binary), self.tie_to_parent)
        self.state.pids[binary] = pid
        self.save()

    def _check_alive(self, binary: str) -> None:
        if not netns.pid_alive(self.state.pids[binary]):
            raise ControlPlaneError(f"{binary} exited: {log_tail(self.log(binary))} "
                                    f"(log {self.log(binary)})")

    def _until(self, what: str, binary: str, deadline: float, probe) -> None:
        last = ""
        while True:
            self._check_alive(binary)
            try:
                if probe():
                    return
            except (OSError, ssl.SSLError, urllib.error.URLError) as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{what} not within the start timeout (last: {last}); "
                                        f"log {self.log(binary)}: {log_tail(self.log(binary))}")
            time.sleep(0.2)

    def _wait_etcd(self, deadline: float) -> None:
        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        self._until("etcd /health", "etcd", deadline, healthy)

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the lab CA and presents the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(self.pki.path("admin.crt"), self.pki.path("admin.key"))
        return ctx

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET path on the API server as admin: (status, body)."""
        try:
            with urllib.request.urlopen(self.server + path, timeout=timeout,
                                        context=self.ssl_context()) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _wait_apiserver(self, deadline: float) -> None:
        self._until("kube-apiserver /readyz", "kube-apiserver", deadline,
                    lambda: self.get("/readyz")[0] == 200)

    def _wait_controller_manager(self, deadline: float) -> None:
        # The serviceaccount controller makes default/default: proof that the controller manager
        # runs its controllers, and what pods need before they can be created.
        self._until("kube-controller-manager (serviceaccount default/default)",
                    "kube-controller-manager", deadline,
                    lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200)

    def ready(self) -> bool:
        try:
            return all(netns.pid_alive(pid) for pid in self.state.pids.values()) and \
                self.get("/readyz", timeout=2)[0] == 200
        except (OSError, ssl.SSLError):
            return False

    def stop(self) -> None:
        """Stop the processes (controller manager, API server, etcd) and remove the work dir.
        Idempotent; a pid that now belongs to another program is left alone."""
        for binary in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self.stop_process(binary)
        self._api = None
        if self.work_dir.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.work_dir)], check=True)

    def stop_process(self, binary: str) -> None:
        """Stop one of the three (the others keep running): restart tests use it."""
        pid = self.state.pids.pop(binary, None)
        if pid is None:
            return
        cmdline = netns.process_cmdline(pid)
        if cmdline and Path(cmdline[0]).name == binary:
            netns.stop_process(pid, grace=STOP_GRACE)
        if self.state_file.exists():
            self.save()

    def restart(self, binary: str, timeout: float = START_TIMEOUT) -> None:
        """Stop and start one process on the same ports and data (an API server restart, ...)."""
        self.stop_process(binary)
        deadline = time.monotonic() + timeout
        self._start(binary)
        {"etcd": self._wait_etcd, "kube-apiserver": self._wait_apiserver,
         "kube-controller-manager": self._wait_controller_manager}[binary](deadline)

    # etcd maintenance (watch tests: a compacted revision makes the API server answer 410 Gone)

    def etcd_compact(self) -> int:
        """Compact etcd up to its current revision, through etcd's JSON gateway; return it."""
        def call(path: str, body: dict) -> dict:
            req = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return dict(json.loads(r.read()))
        revision = int(call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
                       ["header"]["revision"])
        call("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    # clients

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["kubectl", f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                                    f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def api(self) -> Any:
        """A kubernetes.client.ApiClient (the official client) as admin."""
        if self._api is None:
            from kubernetes import client, config
            configuration = client.Configuration()
            config.load_kube_config(str(self.kubeconfig), client_configuration=configuration)
            self._api = client.ApiClient(configuration)
        return self._api

    def core(self) -> Any:
        """kubernetes.client.CoreV1Api as admin (typed Any: the lab reads a few fields only)."""
        from kubernetes import client
        return client.CoreV1Api(self.api())

    def user_kubeconfig(self, name: str, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for another identity (least-privilege tests), signed by the lab CA."""
        client_cert(self.pki, name, user, groups)
        path = self.work_dir / f"{name}.kubeconfig"
        write_kubeconfig(path, self.server, self.pki, name)
        return path

    def wait_for_endpoints(self, want: dict[tuple[str, str], tuple[str, ...]], deadline: float) -> None:
        """Until each (namespace, service)'s slices list exactly its pods, all ready."""
        from kubernetes import client
        discovery: Any = client.DiscoveryV1Api(self.api())
        for (namespace, service), pods in want.items():
            seen: dict[str, bool] = {}
            while seen != dict.fromkeys(pods, True):
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"{namespace}/{service}: EndpointSlices list {seen}, "
                                            f"not {sorted(pods)} all ready, within the timeout; "
                                            f"see {self.log('kube-controller-manager')}")
                time.sleep(0.1)
                slices = discovery.list_namespaced_endpoint_slice(
                    namespace, label_selector=f"kubernetes.io/service-name={service}").items
                seen = {ep.target_ref.name: bool(ep.conditions.ready)
                        for s in slices for ep in s.endpoints or () if ep.target_ref}

    # kwok-style nodes and pods

    def register_node(self, name: str, ip: str) -> None:
        """A Node object with the InternalIP `ip` and a Ready condition, as a kubelet reports."""
        core = self.core()
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                      "kubernetes.io/os": "linux",
                                                      "type": "lbctl-lab"}}}
        with _exists_ok():
            core.create_node(body)
        now = _now()
        core.patch_node_status(name, {"status": {
            "addresses": [{"type": "InternalIP", "address": ip},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "lbctl lab node", "lastHeartbeatTime": now,
                            "lastTransitionTime": now}]}})

    def create_pod(self, namespace: str, name: str, *, node: str, ip: str,
                   labels: dict[str, str], ports: tuple[tuple[str, int, str], ...] = (),
                   ready: bool = True) -> None:
        """A Pod bound to `node` (no scheduler runs) with status Running, podIP `ip` and the
        Ready condition `ready`, set through the status subresource as a kubelet would.
        ports: (name, containerPort, protocol), for Services with named target ports."""
        core = self.core()
        container = {"name": "server", "image": LAB_IMAGE,
                     "ports": [{"name": n, "containerPort": p, "protocol": proto}
                               for n, p, proto in ports]}
        with _exists_ok():
            core.create_namespaced_pod(namespace, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": {"nodeName": node, "containers": [container],
                         "automountServiceAccountToken": False,
                         "terminationGracePeriodSeconds": 0}})
        self.set_pod_status(namespace, name, ip=ip, ready=ready)

    def set_pod_status(self, namespace: str, name: str, *, ip: str, ready: bool) -> None:
        core = self.core()
        pod = core.read_namespaced_pod(name, namespace)
        host_ip = self._node_ip(pod.spec.node_name)
        now = _now()
        status = "True" if ready else "False"
        conditions = [{"type": t, "status": s, "lastTransitionTime": now}
                      for t, s in (("PodScheduled", "True"), ("Initialized", "True"),
                                   ("ContainersReady", status), ("Ready", status))]
        core.patch_namespaced_pod_status(name, namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "startTime": now,
            "conditions": conditions,
            "containerStatuses": [{"name": "server", "image": LAB_IMAGE, "imageID": "",
                                   "ready": ready, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": now}}}]}})

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> None:
        """Flip the Ready condition (a readiness probe that starts or stops passing)."""
        pod = self.core().read_namespaced_pod(name, namespace)
        self.set_pod_status(namespace, name, ip=pod.status.pod_ip, ready=ready)

    def _node_ip(self, node: str) -> str:
        for address in self.core().read_node(node).status.addresses or ():
            if address.type == "InternalIP":
                return str(address.address)
        raise ControlPlaneError(f"node {node} has no InternalIP")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _exists_ok() -> Iterator[None]:
    """Creating what already exists is fine (a retried lab up)."""
    from kubernetes.client.exceptions import ApiException
    try:
        yield
    except ApiException as exc:
        if exc.status != 409:
            raise


# --- the lab's control plane (`lbctl lab up --kubernetes`) ------------------------------------


@dataclass(frozen=True)
class LabPod:
    """A lab pod as the API server sees it."""

    namespace: str
    name: str
    ip: str
    node: str
    labels: dict[str, str]
    ports: tuple[tuple[str, int, str], ...]     # (name, containerPort, protocol)


SERVICE_LABEL = "lab.lbctl.io/service-"        # + service name: "true" on each of its backends


def lab_objects(state: Any) -> tuple[dict[str, str], list[LabPod], list[dict]]:
    """A lab's nodes (name -> InternalIP), pods and Service manifests, from its LabState.

    A backend carries one label per service it backs (the Services select on those), and
    `app: <its first service>` for Services made by hand. Pods that back no service (clients)
    are registered too, in "default".
    """
    from lbctl.lab import cluster
    nodes = ({n.name: n.ip for n in state.nodes.values()} if hasattr(state, "nodes")
             else {cluster.NODE_NAME: state.spec.gateway})
    backs: dict[str, list[Any]] = {}
    for svc in state.spec.services:
        for pod in svc.backends:
            backs.setdefault(pod, []).append(svc)
    pods = []
    for name, pod in state.pods.items():
        services = backs.get(name, [])
        labels = {f"{SERVICE_LABEL}{svc.name}": "true" for svc in services}
        if services:
            labels["app"] = services[0].name
        ports = {(p.name, p.target_port, p.protocol) for svc in services for p in svc.ports}
        pods.append(LabPod(namespace=services[0].namespace if services else "default", name=name,
                           ip=pod.ip, node=getattr(pod, "node", cluster.NODE_NAME),
                           labels=labels, ports=tuple(sorted(ports))))
    manifests = []
    for svc in state.spec.services:
        manifest = cluster.service_manifest(svc)
        manifest["spec"]["selector"] = {f"{SERVICE_LABEL}{svc.name}": "true"}
        manifests.append(manifest)
    return nodes, pods, manifests


def lab_up(state: Any, work_dir: Path, timeout: float = START_TIMEOUT) -> ControlPlane:
    """Start the lab's control plane, register its nodes and pods (Running, Ready), create its
    Services, and wait until the EndpointSlice controller lists every backend as ready: an
    agent started next sees the whole lab at its first list. On failure nothing is left."""
    nodes, pods, services = lab_objects(state)
    cp = ControlPlane(work_dir, service_cidr=state.spec.service_cidr).start(timeout)
    try:
        for name, ip in nodes.items():
            cp.register_node(name, ip)
        for namespace in sorted({p.namespace for p in pods} | {s["metadata"]["namespace"] for s in services}):
            if namespace != "default":
                cp.kubectl("create", "namespace", namespace, check=False)
        for pod in pods:
            cp.create_pod(pod.namespace, pod.name, node=pod.node, ip=pod.ip, labels=pod.labels,
                          ports=pod.ports)
        for manifest in services:
            cp.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        cp.wait_for_endpoints({(s["metadata"]["namespace"], s["metadata"]["name"]): svc.backends
                               for s, svc in zip(services, state.spec.services)},
                              time.monotonic() + timeout)
    except BaseException:
        cp.stop()
        raise
    return cp


def lab_down(work_dir: Path) -> bool:
    """Stop the control plane whose state is in work_dir (any process's); False if none runs."""
    cp = ControlPlane(work_dir)
    if not cp.state_file.exists():
        if work_dir.exists():
            cp.stop()           # a start that died before its first save: remove its files
        return False
    ControlPlane.attach(work_dir).stop()
    return True


def describe(work_dir: Path) -> str:
    """Where the lab's control plane is and how to talk to it."""
    cp = ControlPlane.attach(work_dir)
    return (f"control plane: kubernetes {K8S_VERSION} at {cp.server} (etcd {cp.etcd_url}); "
            f"logs {cp.work_dir / 'logs'}\n"
            f"  export KUBECONFIG={cp.kubeconfig}\n"
            f"  kubectl get nodes,pods,services,endpointslices -A -o wide")
