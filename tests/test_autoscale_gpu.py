"""An explicit --gpu on a cluster that idles at 0 GPU nodes (issue 21): the command asks the autoscaler
for the workers' GPUs (with their pool's slot, e.g. `msprior_train`) and waits for them, instead of
failing at once because `cluster_resources()` counts only the nodes that are up.

A real Ray head on 127.0.0.1 that this test starts (as a Ray job's RAY_ADDRESS names one). What
cannot be shown on one machine: a second node joining during the wait (Ray refuses a multi-node
cluster whose listeners stay on 127.0.0.1; see FIELD_NOTES). So: the request reaches the cluster
(read back from Ray's own autoscaler request channel), the wait ends at once when the resources are
there, gives up in one line when they never come, and nothing waits without an explicit --gpu.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from msprior import devices
from msprior.devices import DeviceError, Machine, choose

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(tmp_path, monkeypatch, gpus: int = 0, resources: str = "{}"):
    """A one-CPU Ray head (`ray start --head --block`) on 127.0.0.1; returns (process, address)."""
    import tempfile

    port = _port()
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every listener on 127.0.0.1 (FIELD_NOTES)
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    temp = tempfile.mkdtemp(prefix="msp-ray-", dir="/tmp")  # short: unix socket names <= 107 bytes
    head = subprocess.Popen([*RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=1", f"--num-gpus={gpus}", f"--resources={resources}",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env={**os.environ, **env}, stdout=open(tmp_path / "head.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    return head, address


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def head(tmp_path, monkeypatch):
    """start(gpus, resources) -> address of a head this test owns; stopped at the end."""
    started = []

    def start(gpus: int = 0, resources: str = "{}"):
        proc, address = _start_head(tmp_path, monkeypatch, gpus, resources)
        started.append(proc)
        return address
    yield start
    for p in started:
        _stop(p)


# Run in a child process: this test process may hold the suite's own local Ray (one per process).
PROBE = """
import json, sys, time
import ray
from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get
from msprior.devices import DeviceError, Machine, choose
deadline = time.monotonic() + 120
while True:  # the head may still be starting
    try:
        ray.init(address=sys.argv[1], log_to_driver=False)
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
want, count = json.loads(sys.argv[2]), int(sys.argv[3])
t0, out = time.monotonic(), {}
try:
    m = Machine.of_ray(want, count)
    out.update(cuda=m.cuda, kind=choose(gpu=0 if count else None, machine=m, workers=max(1, count)).kind)
except DeviceError as e:
    out.update(error=str(e))
raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
out.update(waited=time.monotonic() - t0, requested=json.loads(raw) if raw else None)
print("RESULT " + json.dumps(out))
"""


def _probe(address: str, want: dict, count: int, wait_s: int) -> dict:
    import json

    env = {**os.environ, "MSPRIOR_GPU_WAIT_S": str(wait_s)}
    r = subprocess.run([sys.executable, "-c", PROBE, address, json.dumps(want), str(count)], env=env,
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_explicit_gpu_asks_the_autoscaler_and_gives_up_in_one_line(head):
    address = head(gpus=0)
    out = _probe(address, {"GPU": 1.0, "msprior_train": 1.0}, count=2, wait_s=3)
    assert out["waited"] >= 3  # it waited for the nodes before giving up
    msg = out["error"]
    assert "\n" not in msg and "after waiting 3 s" in msg and "MSPRIOR_GPU_WAIT_S" in msg and address in msg
    assert out["requested"] == [{"GPU": 1.0, "msprior_train": 1.0}] * 2  # what the autoscaler was asked for


def test_explicit_gpu_does_not_wait_for_what_is_there(head):
    address = head(gpus=1, resources='{"msprior_train": 1}')
    out = _probe(address, {"GPU": 1.0, "msprior_train": 1.0}, count=1, wait_s=120)
    assert out["cuda"] == 1 and out["kind"] == "cuda" and out["waited"] < 10 and out["requested"] is None


def test_without_an_explicit_gpu_nothing_waits(head):
    address = head(gpus=0)
    out = _probe(address, {"GPU": 0.0}, count=0, wait_s=60)
    assert out["cuda"] == 0 and out["kind"] == "cpu" and out["waited"] < 10 and out["requested"] is None


def test_custom_resources_parse_and_typos_are_one_line():
    assert devices.parse_resources("msprior_train=1, x=0.5", "--worker_resources") == {"msprior_train": 1.0, "x": 0.5}
    assert devices.parse_resources(None, "--worker_resources") == {}
    for bad in ("msprior_train", "msprior_train=zero", "GPU=1", "a=-1"):
        with pytest.raises(DeviceError, match="--worker_resources"):
            devices.parse_resources(bad, "--worker_resources")


def test_train_workers_ask_for_their_pools_slot():
    from msprior.devices import Device
    from msprior.train import run

    req = run.TrainRequest(db_path="t", name="n", gpu=0, cpus_per_worker=8, worker_resources="msprior_train=1")
    assert run.worker_resources(req, Device("cuda")) == {"CPU": 8, "GPU": 1.0, "msprior_train": 1.0}
    assert run.worker_resources(req, Device("cpu")) == {"CPU": 8, "msprior_train": 1.0}
    plain = run.TrainRequest(db_path="t", name="n")
    assert run.worker_resources(plain, Device("cuda")) == {"CPU": 0.5, "GPU": 1.0}


def test_cpu_workers_take_the_nodes_cpus_left_after_the_reads():
    from msprior.train.run import auto_cpus

    assert auto_cpus(1, [2.0]) == 1.25  # 2 cores: 0.25 for reads + 2 fills x 0.25 stay free
    assert auto_cpus(1, [8.0]) == 7.25 and auto_cpus(2, [8.0]) == 3.5  # shared by the workers, in quarters
    assert auto_cpus(4, [8.0, 8.0]) == 3.5  # spread over the nodes
    assert auto_cpus(1, [4.0, 4.0]) == 3.25  # never more than one node has free: a worker is one process
    assert auto_cpus(8, [2.0]) == 0.5 and auto_cpus(1, []) == 0.5  # at least the GPU default
