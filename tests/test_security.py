"""Secrets and privilege (issue 20, items 10-16): what leaves the machine, what listens, what is kept.

Each test here is the one a guard of docs/RELIABILITY.md "Secrets and privilege" is checked by.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SECRET = "hunter2-Sup3rSecret"


# --- listening sockets, read from /proc (what `ss -ltnp` shows, without needing ss) -------------


def _addr(hexaddr: str):
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)


def listeners(pids) -> list:
    """(pid, ip, port) of every TCP socket in LISTEN held by one of `pids`."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            pass
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in owner:  # 0A: LISTEN
                    out.add((owner[parts[9]],) + _addr(parts[1]))
    return sorted(out)


def descendants(root: int) -> list:
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

_PROBE = textwrap.dedent("""
    import json, os, sys, time
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import ray  # imported first, as the CLI does: settings must still reach the processes
    from msprior.runtime import ensure_ray
    from test_security import descendants, listeners
    assert ensure_ray(log_to_driver=False)
    ray.get(ray.remote(lambda: 1).options(num_cpus=0.1).remote())  # a worker process too
    time.sleep(3)  # the dashboard agent and metrics servers come up after init returns
    socks = listeners(descendants(os.getpid()))
    names = {p: open(f"/proc/{p}/comm").read().strip() for p, _, _ in socks}
    print(json.dumps([[names[p], ip, port] for p, ip, port in socks]))
    ray.shutdown()
""")


@pytest.mark.timeout(300)
def test_local_ray_listens_on_loopback_only(tmp_path):
    """The Ray that ensure_ray() starts (no RAY_ADDRESS) has every TCP listener on 127.0.0.1:
    GCS, raylet, workers, dashboard, its agents and both metrics servers."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AUTOSCALER_METRIC", "DASHBOARD_METRIC"))}
    r = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), str(ROOT / "tests")], env=env,
                       capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    socks = json.loads(r.stdout.strip().splitlines()[-1])
    print("\n".join(f"{n:24} {ip}:{port}" for n, ip, port in socks))  # the `ss -ltnp` summary
    names = {n for n, _, _ in socks}
    assert {"gcs_server", "raylet"} <= names, socks  # the probe saw Ray's own processes
    assert len(socks) >= 8, socks
    exposed = [s for s in socks if s[1] not in LOOPBACK]
    assert not exposed, exposed


# --- item 11: the package `ray job submit --working-dir .` uploads -----------------------------

PLANTED = [".env", ".env.production", ".aws/credentials", ".ssh/id_ed25519", ".ray/auth_token",
           "deploy/server.pem", "tls.key", "id_rsa", ".netrc", ".pypirc", ".git-credentials",
           "gcp-credentials.json", "mlflow.db", "sub/dir/mlflow.db", "store.sqlite", "mlruns/0/meta.yaml",
           "mlartifacts/1/a.bin", "runs/r1/checkpoint.pt", "out/runs/r2/run.json", ".venv/bin/python",
           "venv/lib/x.py", ".git/config", "jobs/.env"]


def test_working_dir_package_excludes_secrets(tmp_path):
    """Ray's own packer (what `ray job submit --working-dir .` uploads) with the excludes of
    cluster/runtime_env.yaml, over a tree with secrets and local state planted in it and NO
    .gitignore (a copy of the repository, the image's /home/ray/msprior): none of them is shipped."""
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "tree"
    for rel in ("msprior/__init__.py", "jobs/pipeline.py", "configs/decoder_only.yaml"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tree / rel)
    for rel in PLANTED:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(SECRET)
    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(pkg) as z:
        names = set(z.namelist())
        shipped = [n for n in names if not n.endswith("/") and SECRET.encode() in z.read(n)]
    assert {"msprior/__init__.py", "jobs/pipeline.py", "configs/decoder_only.yaml"} <= names, names
    assert shipped == [], shipped


# --- item 10: `cluster/local.sh runtime-env` forwards settings, never credentials --------------


def test_runtime_env_prints_no_password():
    """A tracking URI (and an S3 endpoint) with credentials in the submitting shell: the runtime env
    printed for `ray job submit --runtime-env-json` names the servers without user-info or secret
    query parameters (the dashboard and job logs show runtime envs)."""
    from ray.runtime_env import RuntimeEnv

    env = {**os.environ, "PYTHON": sys.executable,
           "MLFLOW_TRACKING_URI": f"https://alice:{SECRET}@mlflow.example.org:5000/?token={SECRET}&x=1",
           "AWS_ENDPOINT_URL": f"http://key:{SECRET}@minio:9000",
           "MLFLOW_S3_ENDPOINT_URL": f"http://minio:9000/?X-Amz-Signature={SECRET}",
           "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET}
    r = subprocess.run([str(CLUSTER / "local.sh"), "runtime-env"], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout and "alice" not in r.stdout, r.stdout
    out = json.loads(r.stdout)
    RuntimeEnv(**out)
    assert out["env_vars"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.org:5000/?x=1"
    assert out["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert out["env_vars"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000/"
