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

from tests.test_train_windows import TINY

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
    for attempt in range(3):  # a loaded machine: Ray gives its raylet a fixed 30 s to register
        try:
            assert ensure_ray(log_to_driver=False)
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
            for pid in descendants(os.getpid())[1:]:  # what the failed start left: ours only
                os.kill(pid, 9)
            time.sleep(2)
    ray.get(ray.remote(lambda: 1).options(num_cpus=0.1).remote())  # a worker process too
    time.sleep(3)  # the dashboard agent and metrics servers come up after init returns
    socks = listeners(descendants(os.getpid()))
    names = {p: open(f"/proc/{p}/comm").read().strip() for p, _, _ in socks}
    metrics = [int(os.environ[v]) for v in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")]
    print(json.dumps({"metrics": metrics, "socks": [[names[p], ip, port] for p, ip, port in socks]}))
    ray.shutdown()
""")


@pytest.mark.timeout(600)
def test_local_ray_listens_on_loopback_only(tmp_path):
    """The Ray that ensure_ray() starts (no RAY_ADDRESS) has every TCP listener on 127.0.0.1:
    GCS, raylet, workers, dashboard, its agents and both metrics servers (on free ports: the
    fixed defaults may be another Ray's). The printed list is the `ss -ltnp` summary."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AUTOSCALER_METRIC", "DASHBOARD_METRIC"))}
    env["RAY_DASHBOARD_STARTUP_TIMEOUT_S"] = "300"  # a loaded machine (Ray's default: 60 s)
    r = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), str(ROOT / "tests")], env=env,
                       capture_output=True, text=True, timeout=560, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    socks = seen["socks"]
    print("\n".join(f"{n:24} {ip}:{port}" for n, ip, port in socks))  # the `ss -ltnp` summary
    names = {n for n, _, _ in socks}
    assert {"gcs_server", "raylet"} <= names, socks  # the probe saw Ray's own processes
    assert len(socks) >= 8, socks
    exposed = [s for s in socks if s[1] not in LOOPBACK]
    assert not exposed, exposed
    # both metrics servers (they answer without the token) run, on ports of their own, on loopback
    assert all(any(port == m for _, _, port in socks) for m in seen["metrics"]), seen


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


# --- item 12: a trial's error reaches Tune's files and sweep.json redacted ---------------------

TINY_SWEEP = {"base": "decoder_only", "overrides": TINY, "search": {"optim.lr": {"choice": [0.003]}},
              "num_samples": 1, "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
              "train": {"max_steps": 4, "val_every": 2, "batch_size": 4}}


def _sweep_plan(tmp_path, name: str, **kw):
    from msprior.train.tune import SweepRequest, plan_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(TINY_SWEEP))
    return plan_sweep(SweepRequest(sweep=str(sweep), db_path=kw.pop("db_path", str(tmp_path / "table")), name=name,
                                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   storage_path=str(tmp_path / "runs"), verbose=0, **kw))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failed_trial_error_is_redacted_in_tune_files_and_results(ray_session, train_table, tmp_path, capfd):
    """A real Tune trial (msprior's trial function, in a Ray worker) fails with a message that
    carries a credential: Tune's error.txt / error.pkl / experiment state, the result's error,
    the sweep's summary and error line, and the driver's output hold it redacted."""
    from msprior.train import TrainError
    from msprior.train.sweep_summary import summarise, trial_summary
    from msprior.train.tune import load_shared, make_tuner, start_parent
    from msprior.data.layout import open_data

    p = _sweep_plan(tmp_path, "leaky", db_path=train_table)
    # a value only the trial sees (the driver checked the rest): its error names the credential
    p.overrides.append(f'optim.grad_clip="http://alice:{SECRET}@mlflow.example.org:5000"')
    start_parent(p)
    data = open_data(*load_shared(p))
    grid = make_tuner(p, data, concurrent=1).fit()
    assert len(grid) == 1 and grid[0].error is not None
    text = str(grid[0].error)
    assert "optim.grad_clip must be a number" in text and "http://mlflow.example.org:5000" in text, text
    summary = trial_summary(grid[0], p.req.name, p.storage_path, p.req.db_path, p.tracking["uri"], p.tracking["client"])
    assert summary["error"] and SECRET not in summary["error"]
    with pytest.raises(TrainError, match="no trial reported a validation") as e:
        summarise(p, grid)
    assert SECRET not in str(e.value)
    files = [f for f in Path(p.experiment_path).rglob("*") if f.is_file()]
    assert any(f.name == "error.txt" for f in files), files
    leaked = [str(f) for f in files if SECRET.encode() in f.read_bytes()]
    assert leaked == [], leaked
    out, err = capfd.readouterr()
    assert SECRET not in out + err


def test_trial_summary_redacts_the_error(monkeypatch):
    """sweep.json's trial errors are redacted on the driver too (a Tune-level error never passes
    through the trial function)."""
    from types import SimpleNamespace

    from msprior.train.sweep_summary import trial_summary

    result = SimpleNamespace(metrics={}, config={}, metrics_dataframe=None,
                             error=RuntimeError(f"GET http://u:{SECRET}@h:1/x failed"))
    out = trial_summary(result, "s", "/runs", "/table", "sqlite:///x.db", client=None)
    assert out["error"] == "GET http://h:1/x failed"


# --- item 13: --resume unpickles only the tuner.pkl the sweep's own run wrote ------------------


class _Payload:
    """Unpickling it runs code: it creates the marker folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant_sweep(tmp_path) -> tuple:
    import pickle

    sweep_dir = tmp_path / "runs" / "owned"
    sweep_dir.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (sweep_dir / "tuner.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
    return sweep_dir, marker


def _parent_run(tmp_path, sweep_dir, digest=None) -> str:
    from msprior.train import tracking
    from msprior.train.tune import OWNER_TAG, SWEEP_DIR_TAG

    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags = {SWEEP_DIR_TAG: str(sweep_dir), **({OWNER_TAG: digest} if digest else {})}
    return tracking.start_run(c, "owned", "owned-sweep", params={}, tags=tags)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("record", ["none", "other digest", "no parent run"])
def test_resume_refuses_a_tuner_pkl_the_sweep_did_not_write(record, ray_session, train_table, tmp_path):
    """Someone with write access to the runs bucket plants tuner.pkl (a pickle that runs code when
    loaded) under a sweep's name: `--resume` refuses in one line and never unpickles it."""
    from msprior.train import TrainError
    from msprior.train.tune import SweepRequest, run_sweep

    sweep_dir, marker = _plant_sweep(tmp_path)
    if record != "no parent run":
        _parent_run(tmp_path, sweep_dir, digest="0" * 64 if record == "other digest" else None)
    p = _sweep_plan(tmp_path, "owned", db_path=train_table, resume=True)
    with pytest.raises(TrainError, match="is not the one sweep 'owned' wrote") as e:
        run_sweep(p.req)
    assert len(str(e.value).splitlines()) == 1
    assert not marker.exists()  # the pickle was never loaded


def test_resume_accepts_the_tuner_pkl_its_owner_record_names(tmp_path):
    import hashlib

    from msprior.train.tune import check_owner

    sweep_dir, marker = _plant_sweep(tmp_path)
    _parent_run(tmp_path, sweep_dir, digest=hashlib.sha256((sweep_dir / "tuner.pkl").read_bytes()).hexdigest())
    check_owner(_sweep_plan(tmp_path, "owned", resume=True))  # no error: the recorded digest matches
    assert not marker.exists()
