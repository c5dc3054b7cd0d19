"""A training whose run lease was taken over while it trains writes no more checkpoints.

The training (`msprior train` in its own process, with its own local Ray) is paused as a whole
driver (SIGSTOP: a long GC or VM pause) after its first checkpoint, so its lease heartbeat stops;
its Ray Train worker trains on without it. Once the lease is past its TTL (3 s, on the storage's
clock), this test takes it over (epoch 2), as a second training of the run would. The worker's next
checkpoint is refused by rank 0's fence (`run_lease.check_writer`): no checkpoint folder appears
after the takeover, although the worker validated past the last one; resumed (SIGCONT), the
training ends with an error line naming the takeover.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msprior.data.lease import Lease, LeaseHeld

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.cond_layers=1",
        "model.seq_len=16", "optim.warmup_steps=10", "optim.lr=0.003", "data.val_fraction=0.25"]
VAL_EVERY = 20


def checkpoints(run_dir: Path) -> dict:
    """{folder name: step} of the run's checkpoint folders."""
    if not run_dir.exists():
        return {}
    return {p.name: int(p.name.split("_")[1]) for p in run_dir.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name)}


def last_validation(db: Path) -> int:
    """The highest step rank 0 logged a val_loss at (the MLflow sqlite store, written by the worker)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
            row = c.execute("SELECT max(step) FROM metrics WHERE key = 'val_loss'").fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None or row[0] is None else int(row[0])


def wait_for(what: str, fn, timeout: float, proc: subprocess.Popen):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        assert proc.poll() is None or proc.returncode == -signal.SIGSTOP, f"training ended before {what}"
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout} s")


def take_over(run_dir: Path, timeout: float = 60) -> Lease:
    end = time.monotonic() + timeout
    while True:
        try:
            return Lease.acquire(str(run_dir), ttl_s=600, run_id="second", what="training")
        except LeaseHeld:  # not past its TTL yet (the storage's clock has 1 s steps)
            if time.monotonic() > end:
                raise
            time.sleep(1)


def test_a_training_whose_run_was_taken_over_writes_no_checkpoint(train_table, tmp_path):
    table, runs, db = tmp_path / "table", tmp_path / "runs", tmp_path / "mlflow.db"
    shutil.copytree(train_table, table)
    run_dir, log = runs / "r", tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), MSPRIOR_LEASE_TTL_S="3")
    argv = [sys.executable, "-m", "msprior.cli", "train", "--db_path", str(table), "--name", "r",
            "--storage_path", str(runs), "--tracking_uri", f"sqlite:///{db}", "--num_workers", "1",
            "--max_steps", "1000000", "--val_every", str(VAL_EVERY), "--max_failures", "0",
            *sum((["--override", o] for o in TINY), [])]
    with open(log, "w") as out:  # a file, not a pipe: a paused reader must not block the training
        a = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    second = None
    try:
        wait_for("first checkpoint", lambda: checkpoints(run_dir), 600, a)
        os.kill(a.pid, signal.SIGSTOP)  # the whole driver paused: its heartbeat stops, its worker trains on
        second = take_over(run_dir)
        assert second.epoch == 2 and second.took_over["pid"] == a.pid
        before = checkpoints(run_dir)
        last = max(before.values())
        # the worker reaches its next checkpoint: it validated past the last one kept ...
        wait_for(f"a validation after step {last}", lambda: last_validation(db) > last, 300, a)
        # ... and writes no checkpoint there (one would land within a second or two)
        end = time.monotonic() + 20
        # (an older one may go: Ray's retention deletes it when the last upload before the takeover
        # registers; the async upload's fence, checked right before the copy, is what keeps new ones out)
        while time.monotonic() < end:
            assert not set(checkpoints(run_dir)) - set(before), "a checkpoint was written after the takeover"
            time.sleep(0.5)
        os.kill(a.pid, signal.SIGCONT)
        a.wait(timeout=300)
        assert not set(checkpoints(run_dir)) - set(before)
        text = log.read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert a.returncode != 0 and errors, text[-3000:]
        assert all("took over" in e or "took this run over" in e for e in errors), errors
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.terminate()
            try:
                a.wait(timeout=60)
            except subprocess.TimeoutExpired:
                a.kill()
                a.wait()
        if second is not None:
            second.release()
