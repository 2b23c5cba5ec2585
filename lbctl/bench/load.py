"""The benchmarks' load: connload (tools/connload.c) as the client, nginx from Debian as the backends.

No Python in the measured path (issue 9): Python writes nginx's configuration, starts nginx and
connload in their network namespaces, waits, and reads what connload wrote afterwards. connload
is built by ``make bench-tools`` into ``build/connload``; it opens new TCP connections at a fixed
offered rate (open loop, ``rate > 0``) or as fast as ``concurrency`` connections in flight allow
(closed loop, ``rate == 0``), and reports per connection the connect time (connect() call to
established), the request time (connect() call to the end of nginx's answer) and the latency from
the connection's *scheduled* start, which a client waiting for a slow server cannot hide
(coordinated omission). Percentiles are exact, from every sample; :class:`LoadResult` keeps the
samples too, for the JSON report next to each plot.

wrk (Debian) measures the maximum rate of keep-alive or ``Connection: close`` requests, but has
no fixed offered rate and no connect latency; connload has both, and its closed loop is the
maximum rate of new connections. A caution measured with wrk -c 4 -t 2 -H 'Connection: close':
wrk closes some connections itself before nginx's FIN arrives (about 6% here), so TIME_WAIT
sockets pile up in the *client* namespace, ~14,000 after 30 s at 11,000/s. That fills the even
half of the ephemeral port range, which connect() searches first; for the next 60 s every
connect() from that namespace scans it (connload: 495/s and 2.4 ms connect p50 instead of
10,000/s and 0.09 ms; wrk: 1,232/s). connload in http mode reads to EOF before it closes and
leaves no TIME_WAIT in the client. Give wrk its own client namespace, or run it last, or wait
until `ss -tan state time-wait` is empty there.

nginx runs one worker (``worker_processes 1``), no access log unless asked, and answers every
request with ``return STATUS "BODY"`` and ``Connection: close``, so the server closes first and
the TIME_WAIT sockets stay on the backends, as with wrk and nginx in production: the client's
ports are free again at once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]          # the source tree holding tools/ and build/
CONNLOAD_BUILT = REPO_ROOT / "build" / "connload"
CONNLOAD_ENV = "LBCTL_CONNLOAD"                            # a connload binary elsewhere
OUTCOMES = ("ok", "refused", "timeout", "reset", "bad_response", "addrnotavail", "other")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


class LoadError(RuntimeError):
    """connload or nginx could not run, or said something other than what was expected; the
    message names the command and what it printed."""


def connload_path() -> Path:
    """The connload binary: $LBCTL_CONNLOAD, else build/connload of this source tree, else
    `connload` on PATH. Not built: LoadError naming the make target that builds it."""
    if os.environ.get(CONNLOAD_ENV):
        path = Path(os.environ[CONNLOAD_ENV])
        if not os.access(path, os.X_OK):
            raise LoadError(f"${CONNLOAD_ENV}={path} is not an executable file")
        return path
    if os.access(CONNLOAD_BUILT, os.X_OK):
        return CONNLOAD_BUILT
    found = shutil.which("connload")
    if found:
        return Path(found)
    raise LoadError(f"connload is not built: run `make bench-tools` in {REPO_ROOT} (builds "
                    f"{CONNLOAD_BUILT} from tools/connload.c), or set ${CONNLOAD_ENV}")


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySummary:
    """Exact percentiles (nearest rank) of one latency over every sample, in µs; n == 0: none."""
    n: int
    min: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    max: float = 0.0
    mean: float = 0.0

    @classmethod
    def from_json(cls, d: dict) -> LatencySummary:
        return cls(**{k: d[k] for k in ("n", "min", "p50", "p90", "p99", "p999", "max", "mean") if k in d})


def nearest_rank(sorted_values: Sequence[float], p: float) -> float:
    """The smallest value with at least p% of the values at or below it (connload's rule, with
    its arithmetic, so both sides agree on the same samples)."""
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values) - 1e-9))
    return sorted_values[rank - 1]


def summarize(values: Sequence[float]) -> LatencySummary:
    """LatencySummary of values (µs), computed as connload computes its own."""
    if not values:
        return LatencySummary(n=0)
    v = sorted(values)
    return LatencySummary(n=len(v), min=v[0], max=v[-1], mean=sum(v) / len(v),
                          **{name: nearest_rank(v, p) for name, p in PERCENTILES.items()})


@dataclass
class Samples:
    """Every connection of a run, in schedule order, one list per column (as connload's samples
    file has them). Times in µs: sched/start/end after the run's start, connect and request from
    the connect() call; None where the connection never got that far."""
    sched_us: list[float] = field(default_factory=list)
    start_us: list[float] = field(default_factory=list)
    connect_us: list[float | None] = field(default_factory=list)
    request_us: list[float | None] = field(default_factory=list)
    end_us: list[float] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)
    errno: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sched_us)

    @classmethod
    def parse(cls, text: str) -> Samples:
        s = cls()
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            sched, start, conn, req, end, target, outcome, err = line.split()
            s.sched_us.append(float(sched))
            s.start_us.append(float(start))
            s.connect_us.append(None if float(conn) < 0 else float(conn))
            s.request_us.append(None if float(req) < 0 else float(req))
            s.end_us.append(float(end))
            s.target.append(int(target))
            s.outcome.append(outcome)
            s.errno.append(int(err))
        return s

    def schedule_latency_us(self) -> list[float]:
        """For each successful connection: from its scheduled start to its end (established in
        connect mode, nginx's EOF in http mode), as connload's schedule_latency_us."""
        out = []
        for i, outcome in enumerate(self.outcome):
            done = self.request_us[i] if self.request_us[i] is not None else self.connect_us[i]
            if outcome == "ok" and done is not None:
                out.append(self.start_us[i] - self.sched_us[i] + done)
        return out


@dataclass
class LoadResult:
    """One connload run: its summary (as connload printed it) and, if asked for, every sample."""
    mode: str
    targets: list[str]
    threads: int
    concurrency: int
    timeout_ms: float
    offered_rate: float | None       # None: closed loop (as fast as `concurrency` allows)
    achieved_rate: float             # successful connections / elapsed_s
    elapsed_s: float                 # from the start to the end of the last successful connection
    wall_s: float                    # the whole run, waiting for the last ones included
    connections_ok: int
    errors: dict[str, int]           # refused, timeout, reset, bad_response, addrnotavail, other
    other_errno: dict[str, int]      # what "other" was, by errno name
    scheduled: int                   # open loop: due within the run; closed loop: started
    started: int
    unstarted: int                   # due, but no free slot before the end (open loop)
    capped: int                      # waited for a free slot (the concurrency cap) first
    cpu_user_s: float                # connload's own CPU
    cpu_sys_s: float
    connect_us: LatencySummary
    request_us: LatencySummary
    schedule_latency_us: LatencySummary
    samples: Samples | None = None
    argv: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict, samples: Samples | None = None, argv: Sequence[str] = ()) -> LoadResult:
        latencies = ("connect_us", "request_us", "schedule_latency_us")
        values: dict = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in latencies}
        values.update({k: LatencySummary.from_json(d[k]) for k in latencies})
        return cls(**values, samples=samples, argv=list(argv))

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_us_per_connection(self) -> float | None:
        """connload's CPU (user + system) per successful connection, µs."""
        if not self.connections_ok:
            return None
        return (self.cpu_user_s + self.cpu_sys_s) / self.connections_ok * 1e6

    def to_json(self) -> dict:
        """Everything, samples included, for the benchmark's JSON report."""
        return asdict(self)

    def summary_line(self) -> str:
        offered = f"{self.offered_rate:g}/s offered" if self.offered_rate else "closed loop"
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.items() if v) or "no errors"
        line = (f"{self.connections_ok} ok at {self.achieved_rate:.0f}/s ({offered}, {errors}); "
                f"connect p50 {self.connect_us.p50:.0f} p99 {self.connect_us.p99:.0f} us")
        if self.request_us.n:
            line += f"; request p50 {self.request_us.p50:.0f} p99 {self.request_us.p99:.0f} us"
        return line


def connload_argv(targets: Sequence[str | tuple[str, int]], *, duration: float, rate: float = 0.0,
                  concurrency: int = 64, threads: int = 1, mode: str = "http", timeout_ms: float = 2000,
                  max_connections: int | None = None, samples_path: Path | None = None) -> list[str]:
    """connload's command line (its own binary first) for these settings."""
    if mode not in ("http", "connect"):
        raise ValueError(f"mode is http or connect, not {mode!r}")
    if not targets:
        raise ValueError("connload needs at least one target")
    text = [t if isinstance(t, str) else _join(*t) for t in targets]
    argv = [str(connload_path()), "--target", ",".join(text), "--duration", f"{duration:g}",
            "--rate", f"{rate:g}", "--concurrency", str(concurrency), "--threads", str(threads),
            "--mode", mode, "--timeout", f"{timeout_ms:g}", "--json"]
    if max_connections is not None:
        argv += ["--max-connections", str(max_connections)]
    if samples_path is not None:
        argv += ["--samples", str(samples_path)]
    return argv


def _join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def run_connload(argv_prefix: Sequence[str], targets: Sequence[str | tuple[str, int]], *,
                 duration: float, rate: float = 0.0, concurrency: int = 64, threads: int = 1,
                 mode: str = "http", timeout_ms: float = 2000, max_connections: int | None = None,
                 samples: bool = True) -> LoadResult:
    """Run connload under argv_prefix (["nsenter", "--net=/run/netns/X", "--"] for a namespace,
    [] for here) against targets (round robin), wait for it and return its result, with every
    sample when `samples`. Python only starts it and reads its output when it has exited."""
    with tempfile.TemporaryDirectory(prefix="connload-") as tmp:
        samples_path = Path(tmp) / "samples.txt" if samples else None
        argv = [*argv_prefix, *connload_argv(
            targets, duration=duration, rate=rate, concurrency=concurrency, threads=threads, mode=mode,
            timeout_ms=timeout_ms, max_connections=max_connections, samples_path=samples_path)]
        # connload stops at `duration` and waits at most timeout_ms for the last ones; the rest is
        # a bound for a machine so loaded that it started late.
        limit = duration + 2 * timeout_ms / 1000 + 30
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            raise LoadError(f"`{' '.join(argv)}` did not end within {limit:.0f} s") from exc
        if proc.returncode != 0:
            raise LoadError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()}")
        try:
            summary = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise LoadError(f"`{' '.join(argv)}` printed no JSON summary: {proc.stdout[:200]!r}") from exc
        parsed = Samples.parse(samples_path.read_text()) if samples_path is not None else None
    return LoadResult.from_json(summary, parsed, argv)


# --- nginx, the backends ---------------------------------------------------------------------


def nginx_config(workdir: Path, address: str, port: int, body: str = "ok\n", *, status: int = 200,
                 access_log: Path | None = None, worker_connections: int = 4096) -> str:
    """nginx.conf for one backend: one worker in the foreground, every file (pid, error log, temp
    directories) in workdir, `return status "body"` on address:port; access log only if asked
    for (the tests count requests with it; a benchmark would measure the disk)."""
    quoted = body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    log = f"access_log {access_log};" if access_log else "access_log off;"
    temps = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# lbctl benchmark backend (lbctl.bench.load.nginx_config)
daemon off;
master_process on;
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'error.log'} warn;
worker_rlimit_nofile {2 * worker_connections + 64};
events {{
    worker_connections {worker_connections};
}}
http {{
    {log}
{temps}
    keepalive_timeout 0;
    server {{
        listen {listen} backlog=4096;
        location / {{
            default_type text/plain;
            return {status} "{quoted}";
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx (the master's pid, its own session) and the directory with its files."""
    pid: int
    workdir: Path
    address: str
    port: int
    process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return _join(self.address, self.port)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM (nginx's fast shutdown: the master stops its worker and exits), SIGKILL to the
        whole session after `grace` s. Idempotent."""
        if self.process is None:
            return
        try:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)    # a worker the master left behind, if any
            except ProcessLookupError:
                pass
            self.process.wait(timeout=5)
            self.process = None

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_nginx(ns_argv: Sequence[str], address: str, port: int, body: str = "ok\n", *,
                workdir: Path, status: int = 200, access_log: Path | None = None,
                ready_timeout: float = 10.0) -> Nginx:
    """Start nginx under ns_argv (e.g. ["nsenter", "--net=/run/netns/X", "--"]) serving body on
    address:port, its files in workdir (created). Returns once it listens: nginx writes its pid
    file after it has bound and listened on every socket. Cleanup: Nginx.stop() (or `with`)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise LoadError("nginx is not installed: `make setup` installs Debian's nginx-light")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, address, port, body, status=status, access_log=access_log))
    pidfile = workdir / "nginx.pid"
    pidfile.unlink(missing_ok=True)
    argv = [*ns_argv, nginx, "-c", str(conf), "-p", str(workdir)]
    with open(workdir / "stderr.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    server = Nginx(pid=proc.pid, workdir=workdir, address=address, port=port, process=proc)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            server.process = None
            raise LoadError(f"`{' '.join(argv)}` exited ({proc.returncode}): {_nginx_errors(workdir)}")
        if pidfile.exists() and pidfile.read_text().strip():
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise LoadError(f"`{' '.join(argv)}` wrote no pid file within {ready_timeout:g} s: "
                            f"{_nginx_errors(workdir)}")
        time.sleep(0.02)


def _nginx_errors(workdir: Path) -> str:
    text = ""
    for name in ("stderr.log", "error.log"):
        path = workdir / name
        if path.exists():
            text += path.read_text()
    return text.strip()[-500:] or "(nothing logged)"
