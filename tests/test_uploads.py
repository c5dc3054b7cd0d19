"""Checkpoint uploads (msprior.train.uploads) without Ray: reports return before the upload ends
(asynchronous), at most one upload is in flight, and the upload fault point leaves a partial copy."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs
import ray.train  # noqa: F401  imported before the timings (Uploads.report imports it)
import pytest

from msprior.train.inputs import Fault
from msprior.train.uploads import Uploads

UPLOAD_S = 0.6


class SlowStorage:
    """Ray's StorageContext as Uploads uses it; each upload takes UPLOAD_S and is counted."""

    def __init__(self, root: str):
        self.root, self.lock = root, threading.Lock()
        self.storage_filesystem = pyarrow.fs.LocalFileSystem()
        self.active = self.most = 0
        self.done_at: list = []

    def build_checkpoint_path_from_name(self, name: str) -> str:
        return os.path.join(self.root, name)

    def persist_current_checkpoint(self, checkpoint, name: str):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(UPLOAD_S)
        shutil.copytree(checkpoint.path, self.build_checkpoint_path_from_name(name))
        with self.lock:
            self.active -= 1
            self.done_at.append(time.monotonic())
        return name


def _folder(tmp_path, name: str, size: int = 1000) -> str:
    d = tmp_path / "local" / name
    d.mkdir(parents=True)
    (d / "checkpoint.pt").write_bytes(os.urandom(size))
    return str(d)


def _uploads(tmp_path, fault=None):
    """Uploads over a 4-thread pool (more than Ray's one), so any bound must come from Uploads."""
    pool = ThreadPoolExecutor(max_workers=4)
    futures = []

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_mode=None,
               checkpoint_upload_fn=None):
        if checkpoint_upload_fn is not None:
            futures.append(pool.submit(checkpoint_upload_fn, checkpoint, checkpoint_dir_name))

    storage = SlowStorage(str(tmp_path / "run"))
    os.makedirs(storage.root)
    return Uploads(0, fault, report=report, storage=storage), storage, futures


def test_report_returns_before_the_upload_and_one_upload_at_a_time(tmp_path):
    u, storage, futures = _uploads(tmp_path)
    t0 = time.monotonic()
    u.report({"val_loss": 1.0}, _folder(tmp_path, "a"), "checkpoint_00000010", 10)
    first = time.monotonic() - t0
    u.report({"val_loss": 0.9})  # a validation without a checkpoint never waits
    u.report({"val_loss": 0.8}, _folder(tmp_path, "b"), "checkpoint_00000020", 20)
    second_returned = time.monotonic()
    for f in futures:
        assert f.result(timeout=10) in ("checkpoint_00000010", "checkpoint_00000020")
    assert first < UPLOAD_S / 2  # training goes on while the checkpoint uploads
    assert storage.most == 1  # never two uploads at once
    assert second_returned >= storage.done_at[0]  # the second waited for the first
    assert sorted(os.listdir(storage.root)) == ["checkpoint_00000010", "checkpoint_00000020"]


def test_upload_fault_point_leaves_a_partial_copy_and_frees_the_slot(tmp_path):
    fault = Fault(rank=0, step=20, marker=str(tmp_path / "marker"), point="upload")
    u, storage, futures = _uploads(tmp_path, fault)
    u.report({}, _folder(tmp_path, "a", 1000), "checkpoint_00000010", 10)
    u.report({}, _folder(tmp_path, "b", 1000), "checkpoint_00000020", 20)
    assert futures[0].result(timeout=10) == "checkpoint_00000010"
    with pytest.raises(RuntimeError, match="injected failure on rank 0 at step 20 \\(upload"):
        futures[1].result(timeout=10)
    assert os.path.getsize(os.path.join(storage.root, "checkpoint_00000020", "checkpoint.pt")) == 500
    assert os.path.getsize(os.path.join(storage.root, "checkpoint_00000010", "checkpoint.pt")) == 1000
    assert u.idle.is_set()  # a failed upload does not block the next report
