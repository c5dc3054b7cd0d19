"""Quality on every run: the warm-up rule, and per-quantizer validation CE, the unigram floor and the
generation check in MLflow for a training (real Ray Train, sqlite MLflow) and for a sweep trial."""

from __future__ import annotations

import math

import pytest
import yaml

from msprior.train.schedule import lr_factor, make_optimizer, make_scheduler, warmup_for
from tests.test_train_windows import TINY

Q = 4  # the session's train_table: 4 quantizers x 16 tokens
PER_Q = [f"val_ce_q{q}" for q in range(Q)]
FLOOR = ["unigram_ce"] + [f"unigram_ce_q{q}" for q in range(Q)]
GEN = ["gen_kl", "gen_kl_ref", "gen_repeat"]


def test_warmup_follows_short_runs_and_keeps_long_ones():
    assert warmup_for(10_000, 300) == 30  # the demo's 300 steps: a tenth of the run
    assert warmup_for(10_000, 100_000) == 10_000  # >= 10 x warm-up: the original's schedule exactly
    assert warmup_for(10_000, 1_000_000) == 10_000
    assert warmup_for(50, 300) == 30 and warmup_for(20, 300) == 20
    assert warmup_for(10_000, 5) == 0 and warmup_for(10_000, None) == 10_000
    assert lr_factor(0, 0, 0.01, 0.9) == 1.0  # no warm-up: the peak from the first step


def test_scheduler_of_a_short_run_reaches_the_peak_lr():
    import torch

    from msprior.config import load_config

    cfg = load_config("decoder_only", ["optim.warmup_steps=10000"]).optim
    p = [torch.nn.Parameter(torch.zeros(1))]
    short = make_scheduler(make_optimizer(p, cfg), cfg, max_steps=300)
    long = make_scheduler(make_optimizer(p, cfg), cfg, max_steps=200_000)
    for _ in range(30):
        short.optimizer.step(), short.step(), long.optimizer.step(), long.step()
    assert short.get_last_lr()[0] == pytest.approx(cfg.lr)  # warm-up over at 10% of 300 steps
    assert long.get_last_lr()[0] == pytest.approx(cfg.lr * lr_factor(30, 10_000, cfg.warmup_start, cfg.decay))


def _metrics(c, run_id):
    run = c.get_run(run_id)
    return run.data.metrics


def _check_quality(c, run_id, val_steps):
    m = _metrics(c, run_id)
    missing = [k for k in PER_Q + FLOOR + GEN + ["val_repeat"] if k not in m]
    assert not missing, missing
    # the mean CE is the mean of the per-quantizer ones, and every validation logs them
    assert m["val_loss"] == pytest.approx(sum(m[k] for k in PER_Q) / Q, abs=1e-6)
    assert [x.step for x in c.get_metric_history(run_id, "val_ce_q3")] == val_steps
    assert [x.step for x in c.get_metric_history(run_id, "gen_kl")] == val_steps
    # synthetic tokens: ~uniform marginals (floor ~ log 16), a context the prior can learn
    assert m["unigram_ce"] == pytest.approx(math.log(16), abs=0.15)
    assert m["unigram_ce"] == pytest.approx(sum(m[k] for k in FLOOR[1:]) / Q, abs=1e-6)
    assert 0.0 <= m["gen_repeat"] <= 1.0 and m["gen_kl"] >= 0.0 and m["gen_kl_ref"] >= 0.0
    return m


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_training_logs_quality_and_the_floor_once(ray_session, train_table, train_dirs):
    from msprior.train import train, tracking

    storage, uri = train_dirs
    kw = dict(overrides=TINY + ["optim.warmup_steps=1000"], num_workers=1, batch_size=16, val_every=30,
              storage_path=storage, tracking_uri=uri)
    s = train("decoder_only", train_table, "q", max_steps=60, **kw)
    c = tracking.client(uri)
    m = _check_quality(c, s["mlflow_run_id"], [30, 60])
    assert m["lr_warmup_steps"] == 6  # min(1000, 10% of 60): the run reaches its peak lr
    assert m["torch_threads"] == 3  # the CPUs Ray assigned (4 logical - 0.75 for reads and fills), not the 2 cores
    assert m["val_loss"] < m["unigram_ce"] - 0.3, m  # it learnt more than the marginals
    r = train("decoder_only", train_table, "q", max_steps=70, resume=True, **kw)
    assert r["mlflow_run_id"] == s["mlflow_run_id"]
    assert len(c.get_metric_history(s["mlflow_run_id"], "unigram_ce")) == 1  # once per run, not per resume
    assert [x.step for x in c.get_metric_history(s["mlflow_run_id"], "val_ce_q0")] == [30, 60, 70]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_trial_logs_quality(ray_session, train_table, train_dirs, tmp_path):
    from msprior.train import tracking
    from msprior.train.tune import tune

    storage, uri = train_dirs
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": "decoder_only", "overrides": TINY, "search": {"optim.lr": {"choice": [0.003]}},
        "num_samples": 1, "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "train": {"max_steps": 20, "val_every": 10, "batch_size": 8}}))
    s = tune(str(sweep), train_table, "qs", tracking_uri=uri, storage_path=storage, verbose=0)
    c = tracking.client(uri)
    (child,) = tracking.nested_runs(c, s["parent_run_id"])
    _check_quality(c, child.info.run_id, [10, 20])
    (trial,) = s["trials"]  # Tune's results carry them too: the best validation's, per quantizer
    assert len(trial["val_ce_q"]) == Q and sum(trial["val_ce_q"]) / Q == pytest.approx(trial["val_loss"], abs=1e-6)
    parent = _metrics(c, s["parent_run_id"])
    assert [parent[f"best_val_ce_q{q}"] for q in range(Q)] == pytest.approx(trial["val_ce_q"])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_training_stops_after_patience_validations_without_a_new_best(ray_session, train_table, train_dirs):
    """`train.patience` (the demo's stop): an lr far below fp32's resolution leaves the weights as
    they are, so every validation after the first is no new best; with patience 2 and val_every 10
    the run stops at step 30 of 100 and says so in its summary (run.json)."""
    from msprior.train import train, tracking

    storage, uri = train_dirs
    s = train("decoder_only", train_table, "stop", max_steps=100, num_workers=1, batch_size=8, val_every=10,
              overrides=TINY + ["optim.lr=1e-30", "train.patience=2"], storage_path=storage, tracking_uri=uri)
    hist = tracking.client(uri).get_metric_history(s["mlflow_run_id"], "val_loss")
    assert sorted(m.step for m in hist) == [10, 20, 30], hist
    assert len({m.value for m in hist}) == 1  # no weight moved: the same loss at every validation
    assert s["step"] == 30 and s["early_stopped"] is True  # run.json says why it ended before max_steps
