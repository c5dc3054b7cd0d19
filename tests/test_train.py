"""End-to-end training on a real local Ray runtime (shared), sqlite MLflow, synthetic latent table."""

from __future__ import annotations

import math
import os

import pytest
import torch

from msprior.errors import UserError
from msprior.train import TrainError, load_run, train
from msprior.data.reader import frames_from_arrow, open_table, read_split, unigram_entropy
from tests.test_train_windows import TINY

pytestmark = [pytest.mark.slow]


def _val_entropy(table_dir: str) -> float:
    table = open_table(table_dir, 0.25, 0)
    return unigram_entropy(frames_from_arrow(read_split(table, val=True), num_quantizers=4))


def _train(config, table, dirs, name, **kw):
    storage, uri = dirs
    args = dict(overrides=TINY, num_workers=2, batch_size=16, max_steps=100, val_every=50,
                storage_path=storage, tracking_uri=uri)
    args.update(kw)
    return train(config, table, name, **args)


@pytest.mark.timeout(300)
def test_decoder_only_learns_logs_and_resumes(ray_session, train_table, train_dirs, tmp_path):
    from msprior.train import tracking

    h = _val_entropy(train_table)
    s = _train("decoder_only", train_table, train_dirs, "dec")
    assert s["step"] == 100
    assert s["best_val_loss"] < h - 0.5, (s["best_val_loss"], h)  # learnt the context, not just the marginals

    # run.json + checkpoints: best and last, weights_only
    ck = load_run(s["run_dir"], "best")
    assert ck["step"] in (50, 100) and ck["config"]["model"]["dim"] == 32 and ck["manifest"]["rave"]["vocab_size"] == 16
    assert torch.load(os.path.join(s["last_checkpoint"], "checkpoint.pt"), weights_only=True)["step"] == 100
    assert load_run(s["mlflow_run_id"], tracking_uri=train_dirs[1])["run"]["name"] == "dec"  # by MLflow id

    # MLflow: params (flattened config + facts), metrics (train + validation), artifacts
    c = tracking.client(train_dirs[1])
    run = c.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.dim"] == "32" and run.data.params["data.vocab_size"] == "16"
    for key in ("train_loss", "val_loss", "val_top1", "val_top10", "val_ppl", "lr", "tokens_per_s"):
        assert key in run.data.metrics, key
    assert len(c.get_metric_history(run.info.run_id, "val_loss")) == 2
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.json", "loss_curve.png", "run.json"} <= arts

    # a second run with the same name refuses to overwrite; --resume continues at the saved step
    with pytest.raises(TrainError, match="--resume"):
        _train("decoder_only", train_table, train_dirs, "dec")
    r = _train("decoder_only", train_table, train_dirs, "dec", resume=True, max_steps=120, val_every=10)
    assert r["metrics"]["start_step"] == 100 and r["step"] == 120
    assert r["mlflow_run_id"] == s["mlflow_run_id"]  # the same MLflow run goes on
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == [50, 100, 110, 120]

    # --resume refuses another model config or another table, in one line, before starting anything
    with pytest.raises(TrainError, match=r"model.dim=32.*48"):
        _train("decoder_only", train_table, train_dirs, "dec", resume=True, overrides=TINY + ["model.dim=48"])
    from tests._train_data import write_synthetic_table

    other = str(tmp_path / "other")
    write_synthetic_table(other, num_files=6)  # another corpus, same RAVE model
    with pytest.raises(TrainError, match="another table"):
        _train("decoder_only", other, train_dirs, "dec", resume=True, max_steps=130)
    renamed = str(tmp_path / "renamed")  # the same content, features named otherwise: another table
    write_synthetic_table(renamed, feature_names=["loudness", "centroid", "flatness"])
    with pytest.raises(UserError, match=r"conditioning names differs \(\[f0, f1, f2\] vs \[loudness, centroid, "
                                        r"flatness\]\); resume with its table") as e:
        _train("decoder_only", renamed, train_dirs, "dec", resume=True, max_steps=130)
    assert "\n" not in str(e.value)


@pytest.mark.timeout(240)
def test_recurrent_learns(ray_session, train_table, train_dirs):
    h = _val_entropy(train_table)
    s = _train("recurrent", train_table, train_dirs, "gru", overrides=TINY + ["optim.lr=0.01"])
    assert s["best_val_loss"] < h - 0.5, (s["best_val_loss"], h)


@pytest.mark.timeout(240)
def test_encoder_decoder_trains_with_ema_and_pretrained_embedding(ray_session, train_table, train_dirs, tmp_path):
    from msprior.codec import build_codec

    rave = str(tmp_path / "discrete.ts")  # a discrete RAVE-compatible export: 4 codebooks of 16 entries
    torch.jit.save(build_codec(discrete=True, num_quantizers=4, codebook_size=16), rave)
    s = _train("encoder_decoder", train_table, train_dirs, "seq2seq", num_workers=1, max_steps=40, val_every=20,
               overrides=TINY + ["train.ema=0.9"], pretrained_embedding=rave)
    assert s["step"] == 40 and math.isfinite(s["best_val_loss"])
    ck = load_run(s["run_dir"], "last")
    assert "raw_model" in ck and ck["config"]["model"]["conditioning"] == "tokens"
    assert ck["config"]["model"]["pretrained_embedding_dim"] > 0  # the resolved config rebuilds the same module


@pytest.mark.timeout(300)
def test_worker_failure_restarts_from_last_checkpoint(ray_session, train_table, train_dirs, tmp_path):
    """A worker process is SIGKILLed; the restarted group resumes from its checkpoint without reading
    the table again (it is deleted before the kill)."""
    import shutil

    table = str(tmp_path / "table")
    shutil.copytree(train_table, table)
    marker = str(tmp_path / "failed-once")
    s = _train("decoder_only", table, train_dirs, "crash", max_steps=30, val_every=10,
               fault_injection={"rank": 1, "step": 15, "marker": marker, "remove": table,
                                "kill": True, "delay_s": 5})
    assert os.path.exists(marker) and not os.path.exists(table)  # the failure did happen (once), table gone
    assert s["step"] == 30
    assert s["metrics"]["start_step"] == 10  # the restarted workers loaded the step-10 checkpoint


@pytest.mark.timeout(300)
def test_table_and_runs_on_s3(ray_session, train_table, s3_env, tmp_path):
    """Latent table read from s3://, checkpoints and run.json written to s3:// (real SeaweedFS)."""
    from msprior import storage

    for rel, _ in storage.list_files(train_table):
        with open(os.path.join(train_table, rel), "rb") as f:
            storage.write_bytes(f"s3://test-bucket/table/{rel}", f.read())
    s = train("decoder_only", "s3://test-bucket/table", "s3run", overrides=TINY, num_workers=1, batch_size=16,
              max_steps=20, val_every=10, storage_path="s3://test-bucket/runs",
              tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert s["run_dir"] == "s3://test-bucket/runs/s3run"
    assert s["best_checkpoint"].startswith("s3://test-bucket/runs/s3run/checkpoint_")
    ck = load_run("s3://test-bucket/runs/s3run", "last")
    assert ck["step"] == 20 and ck["run"]["db_path"] == "s3://test-bucket/table"


@pytest.mark.timeout(300)
def test_kill_during_a_checkpoint_upload_resumes_from_the_previous_one(ray_session, train_table, train_dirs, tmp_path):
    """The worker is SIGKILLed in the middle of uploading the step-20 checkpoint (half of its
    checkpoint.pt already in the run folder): the restarted worker resumes from step 10's
    checkpoint, and the run ends with complete checkpoints (the last one flushed before the end)."""
    marker = str(tmp_path / "killed-in-upload")
    s = _train("decoder_only", train_table, train_dirs, "upload-kill", num_workers=1, max_steps=30, val_every=10,
               fault_injection={"rank": 0, "step": 20, "marker": marker, "point": "upload", "kill": True,
                                "delay_s": 5})
    assert os.path.exists(marker)  # the kill did happen, inside the upload
    assert s["metrics"]["start_step"] == 10 and s["step"] == 30
    assert load_run(s["run_dir"], "last")["step"] == 30
    assert load_run(s["run_dir"], "best")["step"] in (10, 20, 30)


@pytest.mark.timeout(300)
def test_checkpoint_cadence_apart_from_validation(ray_session, train_table, train_dirs):
    """Validation every 10 steps, checkpoints every 20 (and at the end): 3 validations, checkpoints
    at 20 and 30 only; each checkpoint carries its own step's val_loss."""
    from msprior.train import tracking

    s = _train("decoder_only", train_table, train_dirs, "cadence", num_workers=1, max_steps=30, val_every=10,
               overrides=TINY + ["train.checkpoint_every=20"])
    c = tracking.client(train_dirs[1])
    assert [m.step for m in c.get_metric_history(s["mlflow_run_id"], "val_loss")] == [10, 20, 30]
    assert [m.step for m in c.get_metric_history(s["mlflow_run_id"], "checkpoint_s")] == [20, 30]
    last = load_run(s["run_dir"], "last")
    assert last["step"] == 30 and last["val_loss"] == pytest.approx(s["metrics"]["val_loss"])
