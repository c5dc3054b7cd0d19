"""`tune(...)`: a Ray Tune sweep over training runs (ASHA on validation cross-entropy).

Train V2 pattern: each Tune trial is a small driver function that calls `msprior.train.train`,
whose `TorchTrainer` reports to Tune through `TuneReportCallback`. Every trial is an MLflow run
nested under the sweep's parent run; the parent records the best trial and its checkpoint.

Sweep file (YAML):

    base: decoder_only            # config name or path
    overrides: []                 # section.key=value applied to every trial
    search:                       # section.key: {choice|uniform|loguniform|randint: ...} or a constant
      model.family: {choice: [transformer, gru]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    scheduler: {grace_period: 2, reduction_factor: 2}   # ASHA, in validations
    num_samples: 8
    resources: {num_workers: 1, cpus_per_worker: 0.5, gpus_per_trial: 0}
    train: {max_steps: 20000, val_every: 1000, batch_size: 64}
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from msprior.redact import redact_uri
from msprior.runtime import ensure_ray
from msprior.train.run import DEFAULT_CPUS_PER_WORKER, TrainError, _storage, check_resources

TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its TorchTrainer
SAMPLERS = ("choice", "uniform", "loguniform", "randint", "quniform")
SWEEP_KEYS = {"base", "overrides", "search", "scheduler", "num_samples", "resources", "train"}


def load_sweep(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--sweep {path}: file not found")
    try:
        sweep = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise TrainError(f"{path}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(SWEEP_KEYS))})")
    for key, spec in (sweep.get("search") or {}).items():
        if "." not in key:
            raise TrainError(f"{path}: search key {key!r} must be section.key, e.g. model.dim")
        if isinstance(spec, dict) and (len(spec) != 1 or next(iter(spec)) not in SAMPLERS):
            raise TrainError(f"{path}: search.{key} must be one of {{{'|'.join(SAMPLERS)}: ...}}, got {spec}")
    return sweep


def search_space(search: Dict[str, Any]) -> Dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in (search or {}).items():
        if isinstance(spec, dict):
            (kind, args), = spec.items()
            if kind == "choice":
                space[key] = tune.choice(list(args))
            else:
                space[key] = getattr(tune, kind)(*args)
        elif isinstance(spec, list):
            space[key] = tune.choice(spec)
        else:
            space[key] = spec
    return space


def _trial(space: Dict[str, Any], *, base: str, overrides: Sequence[str], db_path: str, sweep_name: str,
           train_kw: Dict[str, Any], parent_run_id: str, storage: str) -> None:
    """One Tune trial: a driver function that runs one Ray Train training and returns."""
    from ray import tune

    from msprior.train.run import train

    trial_id = tune.get_context().get_trial_id()
    trial_overrides = list(overrides) + [f"{k}={v}" for k, v in space.items()]
    train(base, db_path, f"{sweep_name}-{trial_id}", overrides=trial_overrides, experiment=sweep_name,
          parent_run_id=parent_run_id, tune_report=True, progress=False, storage_path=storage, **train_kw)


def tune(
    sweep: str,
    db_path: str,
    name: str,
    *,
    num_samples: Optional[int] = None,
    gpus_per_trial: Optional[float] = None,
    num_workers: Optional[int] = None,
    max_steps: Optional[int] = None,
    val_every: Optional[int] = None,
    batch_size: Optional[int] = None,
    overrides: Sequence[str] = (),
    tracking_uri: Optional[str] = None,
    storage_path: Optional[str] = None,
    verbose: int = 1,
) -> Dict[str, Any]:
    """Run the sweep; returns {"best_trial", "best_config", "best_val_loss", "best_checkpoint",
    "best_run_dir", "parent_run_id", "trials": [...]}."""
    import ray
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    from msprior.train import tracking
    from msprior.train.checkpoint import read_run_json
    from msprior.train.run import resolve_config

    from msprior import storage as _storage_paths

    db_path = _storage_paths.absolute(db_path)  # trials run in their own working directories
    spec = load_sweep(sweep)
    base = spec.get("base", "decoder_only")
    res = spec.get("resources") or {}
    tr = spec.get("train") or {}
    n = int(num_samples or spec.get("num_samples", 4))
    workers = int(num_workers or res.get("num_workers", 1))
    gpt = float(gpus_per_trial if gpus_per_trial is not None else res.get("gpus_per_trial", 0) or 0)
    cpw = float(res.get("cpus_per_worker", DEFAULT_CPUS_PER_WORKER))
    steps = int(max_steps or tr.get("max_steps", 20000))
    every = int(val_every or tr.get("val_every", 1000))
    bs = batch_size or tr.get("batch_size")
    all_overrides = list(spec.get("overrides") or []) + list(overrides)
    # fail on a bad base config / override before starting anything
    resolve_config(base, all_overrides, batch_size=bs, max_steps=steps, val_every=every)
    space = search_space(spec.get("search") or {})

    started_ray = ensure_ray(log_to_driver=verbose > 1)
    try:
        concurrent = check_resources(workers, cpw, gpt / workers if gpt else 0.0, trials=n,
                                     driver_cpus=TRIAL_DRIVER_CPU, what="each sweep trial")
        storage = _storage(storage_path)
        uri = tracking.default_tracking_uri(tracking_uri)
        client = tracking.client(uri)
        parent = tracking.start_run(
            client, name, f"{name}-sweep",
            params={"sweep.file": os.path.basename(sweep), "sweep.base": base, "sweep.num_samples": n,
                    "sweep.num_workers": workers, "sweep.gpus_per_trial": gpt, "sweep.max_steps": steps,
                    "sweep.val_every": every, "sweep.search": spec.get("search") or {}},
            tags={"msprior.sweep": name})
        sched = spec.get("scheduler") or {}
        # Tune iterations = validations; one more than a trial reports, so a trial that is not stopped
        # early ends by itself (writing its run.json) instead of being stopped at max_t
        max_t = max(1, math.ceil(steps / every)) + 1
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=min(max_t, int(sched.get("grace_period", 1))),
                                  reduction_factor=float(sched.get("reduction_factor", 2)))
        train_kw = dict(num_workers=workers, gpu=gpt > 0, gpus_per_worker=gpt / workers if gpt else None,
                        cpus_per_worker=cpw, max_steps=steps, val_every=every, batch_size=bs,
                        tracking_uri=uri)
        trainable = rtune.with_parameters(
            _trial, base=base, overrides=all_overrides, db_path=db_path, sweep_name=name, train_kw=train_kw,
            parent_run_id=parent, storage=storage)
        tuner = rtune.Tuner(
            rtune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU}),
            param_space=space,
            tune_config=rtune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, num_samples=n,
                                         max_concurrent_trials=concurrent),
            run_config=rtune.RunConfig(name=name, storage_path=storage, verbose=verbose),
        )
        try:
            grid = tuner.fit()
        except BaseException:
            client.set_terminated(parent, status="FAILED")
            raise

        trials = []
        for r in grid:
            trials.append(_trial_summary(r, name, storage, db_path, uri, client))
        ok = [t for t in trials if t["val_loss"] is not None]
        if not ok:
            client.set_terminated(parent, status="FAILED")
            first = next((t["error"] for t in trials if t["error"]), "none")
            last_line = [ln for ln in str(first).splitlines() if ln.strip()][-1:] or ["none"]
            raise TrainError(f"sweep {name}: no trial reported a validation; first error: {last_line[0].strip()}")
        best = min(ok, key=lambda t: t["val_loss"])
        run_dir = best["run_dir"]
        info = read_run_json(run_dir) or {}
        from mlflow.entities import Param

        client.log_batch(parent, params=[Param(f"best.{k}", tracking._param_value(v)) for k, v in best["config"].items()])
        client.log_metric(parent, "best_val_loss", best["val_loss"])
        client.set_tag(parent, "msprior.best_trial", best["trial_id"])
        client.set_tag(parent, "msprior.best_run_dir", run_dir)
        if info.get("best_checkpoint"):
            client.set_tag(parent, "msprior.best_checkpoint", info["best_checkpoint"])
        if info.get("mlflow_run_id"):
            client.set_tag(parent, "msprior.best_run_id", info["mlflow_run_id"])
        summary = {"name": name, "best_trial": best["trial_id"], "best_config": best["config"],
                   "best_val_loss": best["val_loss"], "best_checkpoint": info.get("best_checkpoint"),
                   "best_run_dir": run_dir, "run_dir": run_dir, "best_run_id": info.get("mlflow_run_id"), "parent_run_id": parent,
                   "tracking_uri": redact_uri(uri), "trials": trials}
        tracking.log_dict(client, parent, summary, "sweep.json")
        client.set_terminated(parent, status="FINISHED")
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _trial_summary(result, sweep_name: str, storage: str, db_path: str, uri: str, client) -> Dict[str, Any]:
    """One trial's outcome from its Tune results; completes run.json / MLflow for stopped trials.

    A trial stopped by ASHA is killed mid-training: its own run.json and MLflow close never ran.
    Every Tune result carries the checkpoint path of that validation (TuneReportCallback), so the
    trial's best and last checkpoints are known here and the run stays exportable.
    """
    from msprior import storage as st
    from msprior.train import tracking
    from msprior.train.checkpoint import read_run_json, write_run_json

    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    out = {"trial_id": trial_id, "config": result.config, "error": str(result.error) if result.error else None,
           "val_loss": metrics.get("best_val_loss"), "step": metrics.get("step"), "run_dir": None}
    if not trial_id or out["val_loss"] is None:
        return out
    run_dir = out["run_dir"] = st.join(storage, f"{sweep_name}-{trial_id}")
    if read_run_json(run_dir) is not None:
        return out
    df = result.metrics_dataframe
    uri_of = (lambda p: f"s3://{p}") if st.is_s3(storage) else (lambda p: p)
    rows = df.dropna(subset=["val_loss", "checkpoint_path"]) if df is not None else None
    if rows is None or rows.empty:
        return out
    best_row = rows.loc[rows["val_loss"].idxmin()]
    run_id = tracking.find_run(client, sweep_name, run_dir)
    write_run_json(run_dir, {
        "name": f"{sweep_name}-{trial_id}", "best_checkpoint": uri_of(best_row["checkpoint_path"]),
        "last_checkpoint": uri_of(rows.iloc[-1]["checkpoint_path"]), "best_val_loss": float(rows["val_loss"].min()),
        "step": int(rows.iloc[-1]["step"]), "mlflow_run_id": run_id, "tracking_uri": redact_uri(uri), "db_path": db_path,
        "stopped_early_by": "ASHA"})
    if run_id:
        client.set_tag(run_id, "msprior.stopped_by", "ASHA")
    return out
