"""Faults injected for real into `msprior preprocess` (a real subprocess on a real Ray head):
SIGKILL at named points of the write path then resume, the S3 server stopped for 10 s mid-run, two runs racing for
one table. Each ends with a table equal to an uninterrupted run's (logical content: see `logical`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from msprior.codec import save_codec
from msprior.data import load_manifest, load_report, read_index, read_table
from msprior.data.synthetic import write_bad_files, write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TTL = 8  # lease TTL of these runs (s): a killed run's lease expires quickly
FLAGS = ["--num_secs", "4", "--min_frames", "32", "--batch_size", "8", "--condition_tokens", "8",
         "--files_per_task", "2", "--target_file_mb", "0.01"]
BAD = {"bad/empty.wav", "bad/notes.wav", "bad/garbage.flac", "bad/corrupt.wav", "bad/tiny.wav",
       "bad/silent.wav", "bad/README.txt"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    from msprior.devstack import RayHead

    head = RayHead(str(tmp_path_factory.mktemp("rayhead")), num_cpus=4, object_store_memory=512 << 20).start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_corpus(str(root / "corpus"), n_files=16, seconds=5.0, seed=1)
    write_bad_files(str(root / "corpus" / "bad"))
    return root, save_codec(str(root / "codec.ts"), discrete=False)


def start(head, work, out: str, extra_env=None, log="run") -> subprocess.Popen:
    root, rave = work
    env = {**os.environ, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(head.token_path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "MSPRIOR_LEASE_TTL_S": str(TTL), **(extra_env or {})}
    msprior = str(Path(sys.executable).parent / "msprior")
    logs = root / f"{log}-{time.time_ns()}"
    with open(f"{logs}.out", "w") as o, open(f"{logs}.err", "w") as e:
        p = subprocess.Popen([msprior, "preprocess", "--audio", str(root / "corpus"), "--out_path", out,
                              "--rave", rave, *FLAGS], env=env, stdout=o, stderr=e)
    p.logs = logs
    return p


def finish(p: subprocess.Popen, timeout=600) -> tuple:
    rc = p.wait(timeout=timeout)
    return rc, Path(f"{p.logs}.out").read_text(), Path(f"{p.logs}.err").read_text()


@pytest.fixture(scope="module")
def reference(ray_head, work):
    out = str(work[0] / "reference")
    rc, out_text, err = finish(start(ray_head, work, out, log="reference"))
    assert rc == 0, err[-2000:]
    return out


def logical(table: str, s3=None) -> dict:
    """What 'the same table' means: the same rows (every column, sorted by source and chunk), the same
    index (source, chunks, frames), the same centroids bytes and manifest counts, features mean/std
    equal to float64 rounding. Which data file holds a source may differ (bundles form as tasks
    finish), so file names and groupings are not compared."""
    t = read_table(table).sort_by([("source", "ascending"), ("chunk", "ascending")])
    idx = read_index(table).drop_columns(["file"]).sort_by("source")
    m = load_manifest(table)
    from msprior import storage

    return {"rows": t.to_pydict(), "index": idx.to_pydict(), "counts": m["counts"],
            "centroids": storage.read_bytes(storage.join(table, "centroids.npy")),
            "features": np.round(np.asarray(m["conditioning"]["features"]["mean"]
                                            + m["conditioning"]["features"]["std"]), 9).tolist()}


def leftovers(table: str) -> dict:
    p = Path(table)
    return {k: sorted(x.name for x in p.glob(g)) for k, g in
            (("latents", "latents/*"), ("ledger", "ledger/*"), ("top", "*"))}


# named points of the real run (msprior.data.faults): in a Ray write task (the task kills the
# driver, then itself: the whole run dies at that step), in the driver's dedup and finish
KILL_POINTS = [("commit.after_data", {}), ("commit.after_record", {}),
               ("dedup.after_record", {"MSPRIOR_FAULT_DUPLICATE": "1"}), ("finish.after_index", {})]


@pytest.mark.parametrize("point,extra", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_sigkill_at_a_named_point_then_resume(ray_head, work, reference, point, extra):
    """`msprior preprocess` SIGKILLed at a named step (not at a moment taken from the clock): the
    kill is certain (exit -9, the point recorded), and a resume started at once (the dead holder is
    on this host: no TTL to wait) gives the uninterrupted run's table."""
    out, mark = str(work[0] / f"killed-{point}"), work[0] / f"mark-{point}"
    env = {"MSPRIOR_FAULT_KILL": point, "MSPRIOR_FAULT_MARK": str(mark), "MSPRIOR_LEASE_TTL_S": "60", **extra}
    p = start(ray_head, work, out, extra_env=env, log="killed")
    rc, _, err = finish(p)
    assert rc == -signal.SIGKILL and mark.read_text().split()[0] == point, err[-2000:]
    print(f"{point}: left behind {json.dumps(leftovers(out))}")
    rc, text, err = finish(start(ray_head, work, out, log="resumed"))
    assert rc == 0, err[-2000:]
    assert logical(out) == logical(reference)
    committed = {e for e in leftovers(out)["ledger"] if e.startswith("part-")}
    assert {f[:-len(".parquet")] for f in leftovers(out)["latents"]} == {f[:-len(".json")] for f in committed}
    assert json.loads((Path(out) / "lease.json").read_text())["state"] == "released"


def test_two_runs_on_one_table_one_refuses_naming_the_owner(ray_head, work, reference):
    out = str(work[0] / "raced")
    first = start(ray_head, work, out, log="first")
    deadline = time.monotonic() + 60
    while not (Path(out) / "lease.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = start(ray_head, work, out, log="second")
    rc2, _, err2 = finish(second)
    rc1, _, err1 = finish(first)
    errors = [line for line in err2.splitlines() if line.startswith("error:")]
    assert rc2 == 2 and len(errors) == 1, err2[-2000:]
    assert "another preprocess holds this table" in errors[0] and f"pid {first.pid}," in errors[0]
    assert rc1 == 0, err1[-2000:]
    assert logical(out) == logical(reference)


class _SamePortsS3:
    """A SeaweedFS server that restarts on the same ports and data (an outage, not a new server)."""

    def __init__(self, data_dir: str):
        from msprior.devstack import SeaweedS3

        self.server = SeaweedS3(data_dir=data_dir)
        ports = self.server._ports()
        self.server._ports = lambda: ports

    def start(self):
        self.server.start()
        return self.server


def test_s3_server_stopped_for_10s_mid_run(ray_head, work, reference, tmp_path):
    import boto3

    s3 = _SamePortsS3(str(tmp_path / "seaweed"))
    server = s3.start()
    try:
        server.create_bucket("faults")
        env = {**server.env(), "MSPRIOR_RETRY_S": "120"}
        out = "s3://faults/table"
        client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                              aws_secret_access_key=server.secret_key, region_name="us-east-1")
        p = start(ray_head, work, out, env, log="s3-outage")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if client.list_objects_v2(Bucket="faults", Prefix="table/ledger/").get("KeyCount", 0):
                break
            time.sleep(0.2)
        assert p.poll() is None, "the run ended before the outage"
        server.stop()
        time.sleep(10)
        s3.start()
        rc, text, err = finish(p)
        print(f"S3 outage: rc={rc}; {text.strip().splitlines()[-1] if text.strip() else ''}")
        assert rc == 0, err[-2000:]  # the run itself rides out the outage (no resume needed)
        os.environ.update(server.env())
        try:
            report = load_report(out)
            assert {s["source"] for s in report["skipped"]} == BAD  # no good file lost to the report
            assert report["counts"]["files_retry"] == 0
            assert logical(out) == logical(reference)
        finally:
            for k in server.env():
                os.environ.pop(k, None)
    finally:
        server.stop()


def _worker_pids(head, stage: str) -> list:
    pids = []
    for pid in head.processes():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"MapBatches({stage})" in cmd:
            pids.append(pid)
    return pids


@pytest.mark.parametrize("stage", ["ChunkEncoder", "decode_task"])
def test_encoder_worker_killed_mid_run(ray_head, work, reference, stage):
    """What the kernel's OOM killer does to a decode or encode worker: SIGKILL. The actor restarts
    (or the decode task is retried), its task is retried, the run completes with the same table."""
    out = str(work[0] / f"worker-killed-{stage}")
    p = start(ray_head, work, out, log="worker-killed")
    deadline, victims = time.monotonic() + 120, []
    while time.monotonic() < deadline and p.poll() is None and not victims:
        if stage == "decode_task" or list(Path(out).glob("ledger/*.json")):  # decode runs ahead: no waiting
            victims = _worker_pids(ray_head, stage)
        time.sleep(0.05)
    assert victims, f"no {stage} worker seen while the run was going"
    os.kill(victims[0], signal.SIGKILL)
    rc, text, err = finish(p)
    print(f"{stage} worker {victims[0]} killed: rc={rc}; {text.strip().splitlines()[-1] if text.strip() else ''}")
    assert rc == 0, err[-2000:]
    assert load_report(out)["counts"]["files_retry"] == 0
    assert logical(out) == logical(reference)
