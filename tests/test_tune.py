"""A 2-trial Ray Tune sweep (driver-function pattern over Ray Train), nested MLflow runs."""

from __future__ import annotations

import os

import pytest
import yaml

from msprior.train import load_run, tracking
from msprior.train.tune import load_sweep, search_space
from tests.test_train_data import TINY

SWEEP = {
    "base": "decoder_only",
    "overrides": TINY,
    "search": {"model.family": {"choice": ["transformer", "gru"]}, "optim.lr": {"loguniform": [0.001, 0.01]}},
    "scheduler": {"grace_period": 1, "reduction_factor": 2},
    "num_samples": 2,
    "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
    "train": {"max_steps": 40, "val_every": 20, "batch_size": 16},
}


def test_sweep_file_errors_are_one_line(tmp_path):
    from msprior.train import TrainError

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**SWEEP, "serach": {}}))
    with pytest.raises(TrainError, match="unknown key"):
        load_sweep(str(p))
    p.write_text(yaml.safe_dump({**SWEEP, "search": {"model.dim": {"pick": [1, 2]}}}))
    with pytest.raises(TrainError, match="choice"):
        load_sweep(str(p))
    assert set(search_space(load_sweep("configs/sweeps/default.yaml")["search"])) >= {"model.family", "optim.lr"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_trial_sweep_nests_runs_and_names_the_best(ray_session, train_table, train_dirs, tmp_path):
    from msprior.train.tune import tune

    storage, uri = train_dirs
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    s = tune(str(sweep), train_table, "sw", tracking_uri=uri, storage_path=storage, verbose=0)

    assert len(s["trials"]) == 2 and all(t["error"] is None for t in s["trials"])
    assert s["best_val_loss"] == min(t["val_loss"] for t in s["trials"])
    assert s["best_trial"] and s["best_run_dir"].endswith(f"sw-{s['best_trial']}")
    assert os.path.isdir(s["best_checkpoint"])
    assert load_run(s["best_run_dir"])["config"]["model"]["family"] == s["best_config"]["model.family"]

    c = tracking.client(uri)
    parent = c.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["msprior.best_trial"] == s["best_trial"]
    assert parent.data.tags["msprior.best_checkpoint"] == s["best_checkpoint"]
    assert parent.data.metrics["best_val_loss"] == pytest.approx(s["best_val_loss"])
    children = tracking.nested_runs(c, s["parent_run_id"])
    assert len(children) == 2
    assert {r.info.run_id for r in children} >= {s["best_run_id"]}
    assert all("val_loss" in r.data.metrics for r in children)
