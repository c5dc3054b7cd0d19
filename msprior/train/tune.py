"""`tune(...)`: a Ray Tune sweep over training runs (ASHA on validation cross-entropy).

Train V2 pattern: each Tune trial is a small driver function that calls `msprior.train.train`,
whose `TorchTrainer` reports to Tune through `TuneReportCallback`. Every trial is an MLflow run
nested under the sweep's parent run; the parent records the best trial and its checkpoint.

The sweep driver checks the search keys, then opens and splits the latent table ONCE and hands
every trial the same `msprior.data.layout.TableData` (index, layout, read spec); every trial's
workers read their data files through the node cache, decoded once per node and shared by every
trial there (the search may not change what is read: `data.*`, `model.conditioning`,
`model.cond_ratio`). A preempted sweep continues with `--resume`
(`Tuner.restore`): finished trials are kept, unfinished ones continue from their own checkpoints.

Sweep file (YAML):

    base: decoder_only            # config name or path
    overrides: []                 # section.key=value applied to every trial
    search:                       # section.key: {choice|uniform|loguniform|randint: ...} or a constant
      model.family: {choice: [transformer, gru]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    scheduler: {grace_period: 2, reduction_factor: 2}   # ASHA, in validations
    num_samples: 8
    resources: {num_workers: 1, cpus_per_worker: 0.5, gpus_per_trial: 0}
    train: {max_steps: 20000, val_every: 1000, batch_size: 64}   # batch_size: per worker
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from msprior.redact import RedactedError, install_log_redaction, redact_text, redact_uri
from msprior.runtime import ensure_ray
from msprior.flags import flag, like
from msprior.train.run import DEFAULT_CPUS_PER_WORKER, TrainError, TrainRequest, _has_checkpoints, _join, _runs_root, check_name, \
    check_resources

TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its TorchTrainer
SAMPLERS = ("choice", "uniform", "loguniform", "randint", "quniform")
SWEEP_KEYS = {"base", "overrides", "search", "scheduler", "num_samples", "resources", "train"}
LOADED_ONCE = ("model.conditioning", "model.cond_ratio")  # with data.*: what the shared table depends on
SWEEP_DIR_TAG = "msprior.sweep_dir"
OWNER_TAG = "msprior.tuner_sha256"  # the owner record: digest of the tuner.pkl this sweep's run wrote


def _absolute(path: str) -> str:
    from msprior import storage as st

    return st.absolute(path)  # trials run in their own working directories


def load_sweep(path: str) -> Dict[str, Any]:
    """A sweep file, checked: known keys, sampler specs (`plan_sweep` resolves a shipped name first)."""
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


def _values(spec: Any) -> List[Any]:
    """The values of a search spec worth checking: every choice, or a range's bounds."""
    if isinstance(spec, list):
        return list(spec)
    if isinstance(spec, dict):
        (kind, args), = spec.items()
        if kind == "choice":
            return list(args)
        if not isinstance(args, list) or len(args) < 2:
            return [args]  # refused below as not a number
        return [args[0], args[1] - 1] if kind == "randint" else [args[0], args[1]]
    return [spec]


def check_search(path: str, base_cfg, search: Dict[str, Any]) -> None:
    """Every search key exists (did-you-mean) and every value it can take passes config validation."""
    from msprior.config import ConfigError, apply_overrides, check_key

    for key, spec in (search or {}).items():
        try:
            section, _ = check_key(key, f"{path}: search.{key}")
        except ConfigError as e:
            raise TrainError(str(e)) from None
        if section == "data" or key in LOADED_ONCE:
            raise TrainError(f"{path}: search.{key}: the sweep loads and splits the table once for all trials; "
                             "set it in overrides instead")
        for value in _values(spec):
            try:
                apply_overrides(base_cfg, [f"{key}={json.dumps(value)}"], where=f"{path}: search.{key}={value!r}")
            except ConfigError as e:
                raise TrainError(str(e).splitlines()[0]) from None


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


def _trial(space: Dict[str, Any], *, base: str, overrides: Sequence[str], data, sweep_name: str,
           train_kw: Dict[str, Any], parent_run_id: str, runs_root: str) -> None:
    """One Tune trial: a driver function that runs one Ray Train training and returns.

    `data` is the sweep's table in the object store. A trial restored with its sweep continues
    from its own checkpoints (the run folder `<runs_root>/<sweep>-<trial id>`).
    """
    from ray import tune

    from msprior.train.run import train

    install_log_redaction()
    name = f"{sweep_name}-{tune.get_context().get_trial_id()}"
    trial_overrides = list(overrides) + [f"{k}={json.dumps(v)}" for k, v in space.items()]
    try:
        train(base, data.table.db_path, name, overrides=trial_overrides, experiment=sweep_name, data=data,
              parent_run_id=parent_run_id, tune_report=True, progress=False, storage_path=runs_root,
              resume=_has_checkpoints(_join(runs_root, name)), **train_kw)
    except Exception as e:  # Tune writes it to error.txt/error.pkl, its results and the driver's log
        raise RedactedError.of(e) from None


# --- the request and its plan -------------------------------------------------------------------


@dataclass
class SweepRequest:
    """One sweep as asked: the flags of `msprior tune` (they win over the sweep file's values)."""

    sweep: str = flag("default", "Shipped sweep name (msprior/configs/sweeps/) or a sweep YAML path.")
    db_path: str = like(TrainRequest, "db_path")
    name: str = like(TrainRequest, "name", help="Sweep name: the MLflow experiment (a parent run, one nested run "
                                                "per trial) and the prefix of its trials' run folders.")
    num_samples: Optional[int] = flag(None, "Trials; default: the sweep file's.")
    gpus_per_trial: Optional[float] = flag(None, "GPU fraction per trial (0.5: two trials per GPU); default: the "
                                                 "sweep file's.")
    num_workers: Optional[int] = flag(None, "Ray Train workers per trial; default: the sweep file's.")
    max_steps: Optional[int] = flag(None, "Steps per trial; default: the sweep file's.")
    val_every: Optional[int] = flag(None, "Steps between validations (ASHA's time unit); default: the sweep file's.")
    batch_size: Optional[int] = flag(None, "Windows per worker per step; default: the sweep file's, else the config's.")
    overrides: Sequence[str] = like(TrainRequest, "overrides", help="section.key=value for every trial, repeatable.")
    tracking_uri: Optional[str] = like(TrainRequest, "tracking_uri")
    storage_path: Optional[str] = like(TrainRequest, "storage_path")
    resume: bool = flag(False, "Continue the preempted sweep NAME (finished trials are kept).")
    verbose: int = 1


@dataclass
class SweepPlan:
    req: SweepRequest
    spec: Dict[str, Any]
    base: str
    base_cfg: Any
    overrides: List[str]
    n: int
    workers: int
    gpt: float
    cpw: float
    steps: int
    every: int
    bs: Optional[int]
    runs_root: str  # the folder (or s3:// prefix) that holds one folder per run
    sweep_dir: str
    parent: Optional[str] = None
    tracking: Dict[str, Any] = field(default_factory=dict)


def plan_sweep(req: SweepRequest) -> SweepPlan:
    """Everything that can be refused before Ray starts: file, name, keys, values, resume state."""
    from msprior.train.run import resolve_config

    from msprior.config import resolve_sweep_path

    check_name(req.name)
    req = dataclasses.replace(req, sweep=resolve_sweep_path(req.sweep))  # a shipped name -> its file
    spec = load_sweep(req.sweep)
    res, tr = spec.get("resources") or {}, spec.get("train") or {}
    base = spec.get("base", "decoder_only")
    p = SweepPlan(
        req=req, spec=spec, base=base, base_cfg=None,
        overrides=list(spec.get("overrides") or []) + list(req.overrides),
        n=int(req.num_samples or spec.get("num_samples", 4)),
        workers=int(req.num_workers or res.get("num_workers", 1)),
        gpt=float(req.gpus_per_trial if req.gpus_per_trial is not None else res.get("gpus_per_trial", 0) or 0),
        cpw=float(res.get("cpus_per_worker", DEFAULT_CPUS_PER_WORKER)),
        steps=int(req.max_steps or tr.get("max_steps", 20000)),
        every=int(req.val_every or tr.get("val_every", 1000)),
        bs=req.batch_size or tr.get("batch_size"),
        runs_root=_runs_root(req.storage_path), sweep_dir="")
    p.sweep_dir = _join(p.runs_root, req.name)
    # a bad base config / override / search key fails here, not late inside every trial
    p.base_cfg = resolve_config(base, p.overrides, batch_size=p.bs, max_steps=p.steps, val_every=p.every)
    check_search(req.sweep, p.base_cfg, spec.get("search") or {})
    started = sweep_exists(p.sweep_dir)
    if started and not req.resume:
        raise TrainError(f"sweep {req.name!r} already exists in {p.runs_root}: pass --resume to continue it or "
                         "choose another --name")
    if req.resume and not started:
        raise TrainError(f"--resume: no sweep {req.name!r} in {p.runs_root} (check --name / --storage_path)")
    return p


def _tuner_digest(sweep_dir: str) -> Optional[str]:
    from msprior import storage as st

    path = st.join(sweep_dir, "tuner.pkl")
    return hashlib.sha256(st.read_bytes(path)).hexdigest() if st.exists(path) else None


def record_owner(p: SweepPlan) -> None:
    """The owner record: the digest of the tuner.pkl this run's Tuner just wrote, as a tag of the
    sweep's MLflow parent run (outside the bucket that holds the pickle)."""
    p.tracking["client"].set_tag(p.parent, OWNER_TAG, _tuner_digest(p.sweep_dir))


def check_owner(p: SweepPlan) -> None:
    """Before `--resume` unpickles tuner.pkl (write access to the bucket must not become code
    execution on the driver): its digest must be the one this sweep's parent run recorded."""
    from msprior.train import tracking

    client = tracking.client(tracking.default_tracking_uri(p.req.tracking_uri))
    parent = tracking.find_run(client, p.req.name, p.sweep_dir, tag=SWEEP_DIR_TAG)
    recorded = client.get_run(parent).data.tags.get(OWNER_TAG) if parent else None
    if recorded is None or recorded != _tuner_digest(p.sweep_dir):
        raise TrainError(f"--resume: {p.sweep_dir}/tuner.pkl is not the one sweep {p.req.name!r} wrote (no owner "
                         "record in its MLflow run, or another digest); not loading it: start a new sweep with "
                         "another --name")


def sweep_exists(sweep_dir: str) -> bool:
    """Whether Tune saved a sweep's state there (what `--resume` continues)."""
    from msprior import storage as st

    return st.exists(st.join(sweep_dir, "tuner.pkl"))


# --- steps --------------------------------------------------------------------------------------


def load_shared(p: SweepPlan):
    """Open and split the table once, for every trial."""
    from msprior import storage as st
    from msprior.data.reader import ReadSpec, open_table
    from msprior.train.run import _check_table_vs_config

    cfg = p.base_cfg
    table = open_table(st.absolute(p.req.db_path), cfg.data.val_fraction, cfg.data.seed, cfg.model.conditioning)
    _check_table_vs_config(cfg, table.manifest, table.db_path)
    return table, ReadSpec.of(table, cfg.model.conditioning, cfg.model.cond_ratio)


def start_parent(p: SweepPlan) -> None:
    """The sweep's MLflow parent run (continued on --resume)."""
    from msprior.train import tracking

    uri = tracking.default_tracking_uri(p.req.tracking_uri)
    client = tracking.client(uri)
    parent = tracking.find_run(client, p.req.name, p.sweep_dir, tag=SWEEP_DIR_TAG) if p.req.resume else None
    if parent:
        client.update_run(parent, status="RUNNING")
    else:
        parent = tracking.start_run(
            client, p.req.name, f"{p.req.name}-sweep",
            params={"sweep.file": os.path.basename(p.req.sweep), "sweep.base": p.base, "sweep.num_samples": p.n,
                    "sweep.num_workers": p.workers, "sweep.gpus_per_trial": p.gpt, "sweep.max_steps": p.steps,
                    "sweep.val_every": p.every, "sweep.search": p.spec.get("search") or {}},
            tags={"msprior.sweep": p.req.name, SWEEP_DIR_TAG: p.sweep_dir})
    p.parent, p.tracking = parent, {"uri": uri, "client": client}


def make_tuner(p: SweepPlan, data, concurrent: int):
    """A new Tuner, or the preempted one restored from its folder (`--resume`)."""
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    sched = p.spec.get("scheduler") or {}
    # Tune iterations = validations; one more than a trial reports, so a trial that is not stopped
    # early ends by itself (writing its run.json) instead of being stopped at max_t
    max_t = max(1, math.ceil(p.steps / p.every)) + 1
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                              grace_period=min(max_t, int(sched.get("grace_period", 1))),
                              reduction_factor=float(sched.get("reduction_factor", 2)))
    train_kw = dict(num_workers=p.workers, gpu=p.gpt > 0, gpus_per_worker=p.gpt / p.workers if p.gpt else None,
                    cpus_per_worker=p.cpw, max_steps=p.steps, val_every=p.every, batch_size=p.bs,
                    tracking_uri=p.tracking["uri"])
    trainable = rtune.with_resources(rtune.with_parameters(
        _trial, base=p.base, overrides=p.overrides, data=data, sweep_name=p.req.name, train_kw=train_kw,
        parent_run_id=p.parent, runs_root=p.runs_root), {"CPU": TRIAL_DRIVER_CPU})
    space = search_space(p.spec.get("search") or {})
    if p.req.resume:
        return rtune.Tuner.restore(p.sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space)
    return rtune.Tuner(
        trainable,
        param_space=space,
        tune_config=rtune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, num_samples=p.n,
                                     max_concurrent_trials=concurrent),
        run_config=rtune.RunConfig(name=p.req.name, storage_path=p.runs_root, verbose=p.req.verbose,
                                   callbacks=[_sweep_progress(p.req.name, p.n)]),
    )


def _sweep_progress(name: str, total: int):
    """A Tune callback (it runs on the driver): one console line whenever a trial reports or ends,
    at most every ~10 s: trials done and running, best validation so far, elapsed time and ETA."""
    import time

    from ray.tune import Callback

    from msprior import console

    class SweepProgress(Callback):
        def __init__(self):
            self.t0, self.last, self.best, self.done = time.monotonic(), 0.0, None, set()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            loss = result.get("val_loss")
            if loss is not None and (self.best is None or loss < self.best[0]):
                self.best = (float(loss), trial.trial_id)
            self._line(trials, force=False)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done.add(trial.trial_id)
            self._line(trials, force=True)

        def _line(self, trials, force: bool) -> None:
            now = time.monotonic()
            if not force and now - self.last < 10.0:
                return
            self.last, el = now, now - self.t0
            n = len(self.done)
            running = sum(1 for t in trials if t.status == "RUNNING")
            eta = f"{int(el / n * (total - n) // 60)}m" if n else "--"
            best = f"best val {self.best[0]:.4f} ({self.best[1]})" if self.best else "no validation yet"
            console.echo(f"[{name}] trials {n}/{total} done, {running} running | {best} | "
                         f"{el:.0f} s, ETA {eta}")

    return SweepProgress()


def summarise(p: SweepPlan, grid) -> Dict[str, Any]:
    """Best trial -> parent run params/tags, sweep.json; returns the sweep summary."""
    from mlflow.entities import Param

    from msprior.train import tracking
    from msprior.checkpoint import read_run_json

    client, parent, name, uri = p.tracking["client"], p.parent, p.req.name, p.tracking["uri"]
    db_path = _absolute(p.req.db_path)
    trials = [_trial_summary(r, name, p.runs_root, db_path, uri, client) for r in grid]
    ok = [t for t in trials if t["val_loss"] is not None]
    if not ok:
        client.set_terminated(parent, status="FAILED")
        first = next((t["error"] for t in trials if t["error"]), "none")
        last_line = [ln for ln in str(first).splitlines() if ln.strip()][-1:] or ["none"]
        raise TrainError(f"sweep {name}: no trial reported a validation; first error: {last_line[0].strip()}")
    best = min(ok, key=lambda t: t["val_loss"])
    run_dir = best["run_dir"]
    info = read_run_json(run_dir) or {}
    client.log_batch(parent, params=[Param(f"best.{k}", tracking._param_value(v)) for k, v in best["config"].items()])
    client.log_metric(parent, "best_val_loss", best["val_loss"])
    for q, ce in enumerate(best.get("val_ce_q") or []):  # the best trial's best validation, per quantizer
        client.log_metric(parent, f"best_val_ce_q{q}", ce)
    client.set_tag(parent, "msprior.best_trial", best["trial_id"])
    client.set_tag(parent, "msprior.best_run_dir", run_dir)
    if info.get("best_checkpoint"):
        client.set_tag(parent, "msprior.best_checkpoint", info["best_checkpoint"])
    if info.get("mlflow_run_id"):
        client.set_tag(parent, "msprior.best_run_id", info["mlflow_run_id"])
    summary = {"name": name, "best_trial": best["trial_id"], "best_config": best["config"],
               "best_val_loss": best["val_loss"], "best_checkpoint": info.get("best_checkpoint"),
               "best_run_dir": run_dir, "run_dir": run_dir, "best_run_id": info.get("mlflow_run_id"),
               "parent_run_id": parent, "tracking_uri": redact_uri(uri), "trials": trials}
    tracking.log_dict(client, parent, summary, "sweep.json")
    client.set_terminated(parent, status="FINISHED")
    return summary


def tune(sweep: str, db_path: str, name: str, **kw: Any) -> Dict[str, Any]:
    """Run (or, with resume=True, continue) the sweep; keyword arguments are `SweepRequest`'s fields.

    Returns {"best_trial", "best_config", "best_val_loss", "best_checkpoint", "best_run_dir",
    "parent_run_id", "trials": [...]}."""
    return run_sweep(SweepRequest(sweep=sweep, db_path=db_path, name=name, **kw))


def run_sweep(req: SweepRequest) -> Dict[str, Any]:
    import ray

    from msprior.data.layout import open_data, validation_windows
    from msprior.train import quality

    p = plan_sweep(req)
    if req.resume:
        check_owner(p)
    table, spec = load_shared(p)
    started_ray = ensure_ray(log_to_driver=req.verbose > 1)
    try:
        concurrent = check_resources(p.workers, p.cpw, p.gpt / p.workers if p.gpt else 0.0, trials=p.n,
                                     driver_cpus=TRIAL_DRIVER_CPU, what="each sweep trial")
        data = open_data(table, spec)  # once, for every trial (and every restart of one)
        cfg = p.base_cfg  # trials with the base settings get these from data.memo: read once, here
        validation_windows(data, cfg.model.seq_len, cfg.train.val_batches, cfg.train.batch_size, seed=cfg.data.seed)
        quality.train_counts(data)
        start_parent(p)
        tuner = make_tuner(p, data, concurrent)
        if not req.resume:
            record_owner(p)
        try:
            grid = tuner.fit()
        except BaseException:
            p.tracking["client"].set_terminated(p.parent, status="FAILED")
            raise
        return summarise(p, grid)
    finally:
        if started_ray:
            ray.shutdown()


def _best_quantizer_ce(result) -> Optional[List[float]]:
    """Per-quantizer validation CE (`val_ce_q<i>`) of the trial's best validation, from its Tune results."""
    import re

    df = result.metrics_dataframe
    if df is None or "val_loss" not in df:
        return None
    cols = sorted((c for c in df.columns if re.fullmatch(r"val_ce_q\d+", c)), key=lambda c: int(c[len("val_ce_q"):]))
    rows = df.dropna(subset=["val_loss"])
    if rows.empty or not cols:
        return None
    best = rows.loc[rows["val_loss"].idxmin()]
    return [float(best[c]) for c in cols]


def _trial_summary(result, sweep_name: str, runs_root: str, db_path: str, uri: str, client) -> Dict[str, Any]:
    """One trial's outcome from its Tune results; completes run.json / MLflow for stopped trials.

    A trial stopped by ASHA is killed mid-training: its own run.json and MLflow close never ran.
    Every Tune result carries the checkpoint path of that validation (TuneReportCallback), so the
    trial's best and last checkpoints are known here and the run stays exportable.
    """
    from msprior import storage as st
    from msprior.train import tracking
    from msprior.checkpoint import read_run_json, write_run_json

    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    out = {"trial_id": trial_id, "config": result.config, "error": redact_text(str(result.error)) if result.error else None,
           "val_loss": metrics.get("best_val_loss"), "val_ce_q": _best_quantizer_ce(result), "step": metrics.get("step"),
           "start_step": metrics.get("start_step"), "run_dir": None}
    if not trial_id or out["val_loss"] is None:
        return out
    run_dir = out["run_dir"] = st.join(runs_root, f"{sweep_name}-{trial_id}")
    if read_run_json(run_dir) is not None:
        return out
    df = result.metrics_dataframe
    root = st.Location.of(runs_root)  # Tune reports checkpoint paths inside the runs' filesystem
    rows = df.dropna(subset=["val_loss", "checkpoint_path"]) if df is not None else None
    if rows is None or rows.empty:
        return out
    best_row = rows.loc[rows["val_loss"].idxmin()]
    run_id = tracking.find_run(client, sweep_name, run_dir)
    write_run_json(run_dir, {
        "name": f"{sweep_name}-{trial_id}", "best_checkpoint": root.at(best_row["checkpoint_path"]).url,
        "last_checkpoint": root.at(rows.iloc[-1]["checkpoint_path"]).url, "best_val_loss": float(rows["val_loss"].min()),
        "step": int(rows.iloc[-1]["step"]), "mlflow_run_id": run_id, "tracking_uri": redact_uri(uri), "db_path": db_path,
        "stopped_early_by": "ASHA"})
    if run_id:
        client.set_tag(run_id, "msprior.stopped_by", "ASHA")
    return out
