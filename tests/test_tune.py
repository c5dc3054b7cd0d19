"""A 2-trial Ray Tune sweep (driver-function pattern over Ray Train), nested MLflow runs."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from msprior.train import load_run, tracking
from msprior.train.sweep_file import load_sweep, param_space
from tests.test_train_windows import TINY

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
    assert set(param_space(load_sweep("configs/sweeps/default.yaml")["param_space"])) >= {"model.family", "optim.lr"}


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


@pytest.mark.parametrize("search,match", [
    ({"model.num_layer": {"choice": [1, 2]}}, "unknown key 'model.num_layer' \\(did you mean 'num_layers'\\?\\)"),
    ({"optim.lr": {"choice": [0.001, float("nan")]}}, "optim.lr must be a finite number"),
    ({"optim.lr": {"loguniform": [-1.0, 0.01]}}, "optim.lr must be > 0"),
    ({"data.val_fraction": [0.1, 0.2]}, "loads and splits the table once"),
])
def test_bad_search_fails_before_anything_starts(tmp_path, train_table, search, match):
    from msprior.train import TrainError
    from msprior.train.tune import tune

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({**SWEEP, "search": search}))
    with pytest.raises(TrainError, match=match) as e:
        tune(str(sweep), train_table, "sw", storage_path=str(tmp_path / "runs"), tracking_uri="sqlite:///x.db")
    assert "\n" not in str(e.value) and str(sweep) in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_sweep_trials_ask_for_their_pools_slot(tmp_path, train_table):
    """`resources: worker_resources` reaches every trial's Train workers; a typo or a bad value is one line."""
    from msprior.devices import DeviceError
    from msprior.train import TrainError
    from msprior.train.tune import SweepRequest, plan_sweep, trial_train_kw

    sweep = tmp_path / "s.yaml"
    res = {"num_workers": 1, "cpus_per_worker": 0.5, "worker_resources": "msprior_train=1"}
    sweep.write_text(yaml.safe_dump({**SWEEP, "resources": res}))
    p = plan_sweep(SweepRequest(sweep=str(sweep), db_path=train_table, name="sw", storage_path=str(tmp_path / "r")))
    assert trial_train_kw(p)["worker_resources"] == "msprior_train=1" and trial_train_kw(p)["cpus_per_worker"] == 0.5
    sweep.write_text(yaml.safe_dump({**SWEEP, "resources": {**res, "worker_resource": "x=1"}}))
    with pytest.raises(TrainError, match="unknown resources key.*worker_resource"):
        plan_sweep(SweepRequest(sweep=str(sweep), db_path=train_table, name="sw", storage_path=str(tmp_path / "r")))
    sweep.write_text(yaml.safe_dump({**SWEEP, "resources": {**res, "worker_resources": "msprior_train"}}))
    with pytest.raises(DeviceError, match="resources.worker_resources"):
        plan_sweep(SweepRequest(sweep=str(sweep), db_path=train_table, name="sw", storage_path=str(tmp_path / "r")))


def test_sweep_name_cannot_leave_the_storage_folder(tmp_path, train_table):
    from msprior.train import TrainError
    from msprior.train.tune import tune

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    for name in ("..", "../up", "a/b"):
        with pytest.raises(TrainError, match="--name"):
            tune(str(sweep), train_table, name, storage_path=str(tmp_path / "runs"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_killed_with_sigkill_resumes_with_tuner_restore(ray_session, train_table, train_dirs, tmp_path):
    """The sweep driver (a real `msprior tune` process) is SIGKILLed mid-sweep; `--resume` restores the
    Tune state: trials with a checkpoint continue from it and each trial keeps its one MLflow run."""
    from msprior.train import TrainError
    from msprior.train.tune import tune

    storage, uri = train_dirs
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({**SWEEP, "search": {"optim.lr": {"choice": [0.003, 0.01]}},
                                     "scheduler": {"grace_period": 10},
                                     "train": {"max_steps": 60, "val_every": 10, "batch_size": 8}}))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "msprior", "tune", "--sweep", str(sweep), "--db_path", train_table,
                             "--name", "pre", "--storage_path", storage, "--tracking_uri", uri],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, ckpts = time.monotonic() + 300, []
    # a checkpoint counts once Ray Train has recorded it (its manager snapshot), not when its folder
    # appears: a trial killed in between restarts from scratch, as Ray Train would
    snapshots = os.path.join(storage, "pre-*", "checkpoint_manager_snapshot.json")
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = glob.glob(snapshots)
        if ckpts and glob.glob(os.path.join(storage, "pre", "experiment_state-*.json")):
            break
        time.sleep(0.5)
    assert proc.poll() is None and ckpts, (tmp_path / "driver.log").read_text()[-3000:]
    time.sleep(2)  # one more Tune state save with the trials running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    had = {os.path.basename(os.path.dirname(p)) for p in glob.glob(snapshots)}

    with pytest.raises(TrainError, match="--resume"):  # a plain re-run would start every trial again
        tune(str(sweep), train_table, "pre", tracking_uri=uri, storage_path=storage, verbose=0)
    s = tune(str(sweep), train_table, "pre", resume=True, tracking_uri=uri, storage_path=storage, verbose=0)
    assert len(s["trials"]) == 2 and all(t["error"] is None and t["step"] == 60 for t in s["trials"]), s["trials"]
    resumed = [t for t in s["trials"] if f"pre-{t['trial_id']}" in had]
    assert resumed and all(t["start_step"] >= 10 for t in resumed), (had, s["trials"])

    c = tracking.client(uri)
    finished = [r for r in tracking.nested_runs(c, s["parent_run_id"]) if r.info.status == "FINISHED"]
    assert len(finished) == 2  # each trial's MLflow run went on (no second run for a resumed trial)
    exp = c.get_experiment_by_name("pre")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`msprior.sweep` = 'pre'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
