"""One writer per folder, outside preprocess: a training's run folder, `pipeline --force`, training
on a table being written, names that would reach outside `--out`. Real processes hold the leases
(tests/_table_writer.py --hold, or msprior.train.run_lease in a child); the CLI is run as users do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from msprior import storage

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.cond_layers=1",
        "model.seq_len=16", "data.val_fraction=0.25"]  # a training that would start runs in seconds
HOLD_RUN = ("import sys, time\nfrom msprior.train import run_lease\n"
            "run_lease.start(sys.argv[1], 'x', ttl_s=30)\nprint('held', flush=True)\ntime.sleep(600)\n")


def hold(cmd) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline(), p.stderr.read()
    return p


def hold_table(table: str) -> subprocess.Popen:
    return hold([sys.executable, str(ROOT / "tests" / "_table_writer.py"), table, "a", "--ttl", "30", "--hold"])


def cli(argv, capsys) -> tuple:
    from msprior.cli import main

    try:
        main(argv)
        rc = 0
    except SystemExit as e:
        rc = e.code or 0
    out = capsys.readouterr()
    return rc, out.out, [line for line in out.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def table(train_table, tmp_path):
    t = tmp_path / "table"
    shutil.copytree(train_table, t)
    return str(t)


def test_a_second_training_of_a_live_run_is_refused(table, train_dirs, capsys):
    runs, uri = train_dirs
    holder = hold([sys.executable, "-c", HOLD_RUN, os.path.join(runs, "r1")])
    try:
        rc, _, errors = cli(["train", "--db_path", table, "--name", "r1", "--storage_path", runs,
                             "--tracking_uri", uri, "--max_steps", "2"], capsys)
        assert rc == 2 and len(errors) == 1 and "run 'r1' is being written by another training" in errors[0]
        assert f"pid {holder.pid}" in errors[0]
        assert not any(p.name.startswith("checkpoint_") for p in Path(runs, "r1").iterdir())
    finally:
        holder.kill()
        holder.wait()


def test_training_refuses_a_table_a_preprocess_is_writing(table, train_dirs, capsys):
    runs, uri = train_dirs
    holder = hold_table(table)
    try:
        rc, _, errors = cli(["train", "--db_path", table, "--name", "r2", "--storage_path", runs,
                             "--tracking_uri", uri, "--max_steps", "2", "--val_every", "2",
                             *sum((["--override", o] for o in TINY), [])], capsys)  # without the guard: trains
        assert rc == 2 and len(errors) == 1 and "a preprocess is writing this table" in errors[0], errors
    finally:
        holder.kill()
        holder.wait()


def _pipeline_out(tmp_path) -> tuple:
    from msprior.codec import save_codec
    from msprior.data.synthetic import write_corpus

    write_corpus(str(tmp_path / "audio"), n_files=1, seconds=2.0, seed=0)
    rave = save_codec(str(tmp_path / "rave.ts"), discrete=True)
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "intent.json").write_text("{}")
    return ["pipeline", "--audio", str(tmp_path / "audio"), "--rave", rave, "--out", str(out)], out


def test_force_preprocess_refuses_a_table_another_run_writes(tmp_path, capsys):
    argv, out = _pipeline_out(tmp_path)
    holder = hold_table(str(out / "data"))
    try:
        rc, _, errors = cli(argv + ["--force", "preprocess"], capsys)
        assert rc == 2 and len(errors) == 1 and "another preprocess holds this table" in errors[0], errors
        assert (out / "data" / "intent.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_name_never_reaches_outside_out(tmp_path, capsys):
    argv, out = _pipeline_out(tmp_path)
    (tmp_path / "keep.txt").write_text("not the pipeline's")
    rc, _, errors = cli(argv + ["--name", "../..", "--force", "train"], capsys)
    assert rc == 2 and len(errors) == 1 and "--name '../..'" in errors[0]
    assert (tmp_path / "keep.txt").exists() and (out / "data" / "intent.json").exists()
    from msprior.stages import PipelineError, remove_output

    with pytest.raises(PipelineError, match="not inside --out"):
        remove_output(str(out / "runs" / ".." / ".."), str(out))
    with pytest.raises(PipelineError, match="not inside --out"):
        remove_output("s3://bucket/out/runs/../..", "s3://bucket/out")
    assert (tmp_path / "keep.txt").exists()


def test_registry_corpus_is_the_committed_content(tmp_path):
    """The same committed content at two paths is one corpus; a table rewritten at the same path
    with other content is another (the manifest's content_sha256, as preprocess writes it)."""
    import pyarrow as pa

    from msprior.data.table import content_digest, write_index
    from msprior.registry import corpus_tags

    def table(path, sources):
        write_index(str(path), pa.table({"source": sources, "file": [f"latents/{path.name}.parquet"] * len(sources),
                                         "chunks": [1] * len(sources), "frames": [10] * len(sources)}))
        (path / "manifest.json").write_text(json.dumps({"content_sha256": content_digest(str(path))}))
        return {"rave_sha256": "aa" * 32, "db_path": str(path)}

    a, b = table(tmp_path / "a", ["x.wav", "y.wav"]), table(tmp_path / "b", ["y.wav", "x.wav"])
    assert corpus_tags(a)["corpus"] == corpus_tags(b)["corpus"]
    before = corpus_tags(a)["corpus"]
    table(tmp_path / "a", ["x.wav"])  # rewritten in place
    assert corpus_tags(a)["corpus"] != before
    assert corpus_tags({**a, "rave_sha256": "bb" * 32})["corpus"] != corpus_tags(a)["corpus"]


@pytest.fixture
def full_tmp(tmp_path):
    """A real 64 KiB tmpfs: writes past it fail with ENOSPC (needs root; else skipped)."""
    d = tmp_path / "tiny"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield str(d)
    subprocess.run(["umount", "-l", str(d)])


def test_a_full_disk_is_a_storage_error_not_a_bad_file(full_tmp, s3_env, monkeypatch, tmp_path):
    """An S3 audio file downloaded into a full temp folder: ENOSPC for real. The file is not
    "bad" (skipped for good) but retried, and the run stops with one line saying so."""
    import tempfile

    import numpy as np
    import soundfile as sf

    from msprior.data.decode import file_events
    from msprior.data.finish import stop_if_storage_full
    from msprior.data.request import PreprocessError, Settings

    sf.write(str(tmp_path / "long.wav"), np.zeros(44100 * 3, np.float32) + 0.1, 44100)
    storage.write_bytes("s3://test-bucket/enospc/long.wav", (tmp_path / "long.wav").read_bytes())
    monkeypatch.setattr(tempfile, "tempdir", full_tmp)
    s = Settings(audio_root="s3://test-bucket/enospc", out_path="", run_id="", sr=44100, ratio=1024,
                 chunk_samples=44100, min_frames=1, resolution=64, batch_size=1, condition_ratio=0, centroids=None,
                 scale=None)
    (ev,) = list(file_events("long.wav", "test-bucket/enospc/long.wav", s))
    assert ev[0] == "error" and ev[3] is True and ev[2].startswith(storage.STORAGE_FULL), ev
    with pytest.raises(PreprocessError, match=r"1 file\(s\) not encoded: storage full .* run the same command again"):
        stop_if_storage_full({"skipped": [{"source": "long.wav", "reason": ev[2] + " (transient: retried on resume)"}]},
                              "/out")
