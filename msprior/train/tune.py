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

The sweep file is read in Ray Tune's vocabulary by msprior.train.sweep_file (`param_space:` with
`{tune.choice: [...]}`, `{tune.loguniform: [lower, upper]}`, ...); the outcome (best trial, run.json
of stopped trials, sweep.json) is msprior.train.sweep_summary's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from msprior.devices import parse_resources
from msprior.redact import RedactedError, install_log_redaction
from msprior.runtime import ensure_ray
from msprior.flags import flag, like
from msprior.train.request import DEFAULT_CPUS_PER_WORKER, TrainError, TrainRequest, check_name, has_checkpoints, \
    in_root, runs_root
from msprior.train.run import check_resources
from msprior.train.sweep_file import check_space, load_sweep, param_space
from msprior.train.sweep_summary import summarise

TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its TorchTrainer
SWEEP_DIR_TAG = "msprior.sweep_dir"
OWNER_TAG = "msprior.tuner_sha256"  # the owner record: digest of the tuner.pkl this sweep's run wrote


def _absolute(path: str) -> str:
    from msprior import storage as st

    return st.absolute(path)  # trials run in their own working directories


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
              resume=has_checkpoints(in_root(runs_root, name)), **train_kw)
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
    sweep: Dict[str, Any]  # the sweep file, checked (`param_space`: search spaces and constants)
    base: str
    base_cfg: Any
    overrides: List[str]
    num_samples: int  # TuneConfig(num_samples=...)
    num_workers: int  # Ray Train workers per trial
    gpus_per_trial: float
    cpus_per_worker: float
    worker_resources: Optional[str]  # each Train worker's custom resources ("msprior_train=1"), checked
    max_steps: int
    val_every: int  # ASHA's time unit
    batch_size: Optional[int]
    storage_path: str  # RunConfig(storage_path=...): the folder (or s3:// prefix) with one folder per run
    experiment_path: str  # <storage_path>/<name>: Tune's state of this sweep (what Tuner.restore reads)
    parent_run_id: Optional[str] = None  # the sweep's MLflow parent run
    tracking: Dict[str, Any] = field(default_factory=dict)


def plan_sweep(req: SweepRequest) -> SweepPlan:
    """Everything that can be refused before Ray starts: file, name, keys, values, resume state."""
    from msprior.train.plan import resolve_config

    from msprior.config import resolve_sweep_path

    check_name(req.name)
    req = dataclasses.replace(req, sweep=resolve_sweep_path(req.sweep))  # a shipped name -> its file
    spec = load_sweep(req.sweep)
    res, tr = spec.get("resources") or {}, spec.get("train") or {}
    base = spec.get("base", "decoder_only")
    p = SweepPlan(
        req=req, sweep=spec, base=base, base_cfg=None,
        overrides=list(spec.get("overrides") or []) + list(req.overrides),
        num_samples=int(req.num_samples or spec.get("num_samples", 4)),
        num_workers=int(req.num_workers or res.get("num_workers", 1)),
        gpus_per_trial=float(req.gpus_per_trial if req.gpus_per_trial is not None else res.get("gpus_per_trial", 0) or 0),
        cpus_per_worker=float(res.get("cpus_per_worker", DEFAULT_CPUS_PER_WORKER)),
        worker_resources=res.get("worker_resources"),
        max_steps=int(req.max_steps or tr.get("max_steps", 20000)),
        val_every=int(req.val_every or tr.get("val_every", 1000)),
        batch_size=req.batch_size or tr.get("batch_size"),
        storage_path=runs_root(req.storage_path), experiment_path="")
    p.experiment_path = in_root(p.storage_path, req.name)
    # a bad base config / override / search key fails here, not late inside every trial
    p.base_cfg = resolve_config(base, p.overrides, batch_size=p.batch_size, max_steps=p.max_steps, val_every=p.val_every)
    check_space(req.sweep, p.base_cfg, spec["param_space"])
    parse_resources(p.worker_resources, f"{req.sweep}: resources.worker_resources")  # one line, before Ray
    started = sweep_exists(p.experiment_path)
    if started and not req.resume:
        raise TrainError(f"sweep {req.name!r} already exists in {p.storage_path}: pass --resume to continue it or "
                         "choose another --name")
    if req.resume and not started:
        raise TrainError(f"--resume: no sweep {req.name!r} in {p.storage_path} (check --name / --storage_path)")
    return p


def _tuner_digest(sweep_dir: str) -> Optional[str]:
    from msprior import storage as st

    path = st.join(sweep_dir, "tuner.pkl")
    return hashlib.sha256(st.read_bytes(path)).hexdigest() if st.exists(path) else None


def record_owner(p: SweepPlan) -> None:
    """The owner record: the digest of the tuner.pkl this run's Tuner just wrote, as a tag of the
    sweep's MLflow parent run (outside the bucket that holds the pickle)."""
    p.tracking["client"].set_tag(p.parent_run_id, OWNER_TAG, _tuner_digest(p.experiment_path))


def check_owner(p: SweepPlan) -> None:
    """Before `--resume` unpickles tuner.pkl (write access to the bucket must not become code
    execution on the driver): its digest must be the one this sweep's parent run recorded."""
    from msprior.train import tracking

    client = tracking.client(tracking.default_tracking_uri(p.req.tracking_uri))
    parent = tracking.find_run(client, p.req.name, p.experiment_path, tag=SWEEP_DIR_TAG)
    recorded = client.get_run(parent).data.tags.get(OWNER_TAG) if parent else None
    if recorded is None or recorded != _tuner_digest(p.experiment_path):
        raise TrainError(f"--resume: {p.experiment_path}/tuner.pkl is not the one sweep {p.req.name!r} wrote (no owner "
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
    from msprior.train.plan import check_table_vs_config

    cfg = p.base_cfg
    table = open_table(st.absolute(p.req.db_path), cfg.data.val_fraction, cfg.data.seed, cfg.model.conditioning)
    check_table_vs_config(cfg, table.manifest, table.db_path)
    return table, ReadSpec.of(table)


def start_parent(p: SweepPlan) -> None:
    """The sweep's MLflow parent run (continued on --resume)."""
    from msprior.train import tracking

    uri = tracking.default_tracking_uri(p.req.tracking_uri)
    client = tracking.client(uri)
    parent = tracking.find_run(client, p.req.name, p.experiment_path, tag=SWEEP_DIR_TAG) if p.req.resume else None
    if parent:
        client.update_run(parent, status="RUNNING")
    else:
        parent = tracking.start_run(
            client, p.req.name, f"{p.req.name}-sweep",
            params={"sweep.file": os.path.basename(p.req.sweep), "sweep.base": p.base, "sweep.num_samples": p.num_samples,
                    "sweep.num_workers": p.num_workers, "sweep.gpus_per_trial": p.gpus_per_trial, "sweep.max_steps": p.max_steps,
                    "sweep.val_every": p.val_every, "sweep.param_space": {k: str(v) for k, v in p.sweep["param_space"].items()}},
            tags={"msprior.sweep": p.req.name, SWEEP_DIR_TAG: p.experiment_path})
    p.parent_run_id, p.tracking = parent, {"uri": uri, "client": client}


def trial_train_kw(p: SweepPlan) -> Dict[str, Any]:
    """What every trial's `msprior.train.run.train` call is given besides its config."""
    return dict(num_workers=p.num_workers, gpu=p.gpus_per_trial > 0,
                gpus_per_worker=p.gpus_per_trial / p.num_workers if p.gpus_per_trial else None,
                cpus_per_worker=p.cpus_per_worker, worker_resources=p.worker_resources, max_steps=p.max_steps,
                val_every=p.val_every, batch_size=p.batch_size, tracking_uri=p.tracking.get("uri"))


def make_tuner(p: SweepPlan, data, concurrent: int):
    """A new Tuner, or the preempted one restored from its folder (`--resume`)."""
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    sched = p.sweep.get("scheduler") or {}
    # Tune iterations = validations; one more than a trial reports, so a trial that is not stopped
    # early ends by itself (writing its run.json) instead of being stopped at max_t
    max_t = max(1, math.ceil(p.max_steps / p.val_every)) + 1
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                              grace_period=min(max_t, int(sched.get("grace_period", 1))),
                              reduction_factor=float(sched.get("reduction_factor", 2)))
    train_kw = trial_train_kw(p)
    trainable = rtune.with_resources(rtune.with_parameters(
        _trial, base=p.base, overrides=p.overrides, data=data, sweep_name=p.req.name, train_kw=train_kw,
        parent_run_id=p.parent_run_id, runs_root=p.storage_path), {"CPU": TRIAL_DRIVER_CPU})
    space = param_space(p.sweep["param_space"])
    if p.req.resume:
        return rtune.Tuner.restore(p.experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space)
    return rtune.Tuner(
        trainable,
        param_space=space,
        tune_config=rtune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, num_samples=p.num_samples,
                                     max_concurrent_trials=concurrent),
        run_config=rtune.RunConfig(name=p.req.name, storage_path=p.storage_path, verbose=p.req.verbose,
                                   callbacks=[_sweep_progress(p.req.name, p.num_samples)]),
    )


def _sweep_progress(name: str, total: int):
    """A Tune callback (it runs on the driver): the sweep's progress display (`console.progress`),
    updated whenever a trial reports or ends: trials done and running, best validation so far."""
    import contextlib

    from ray.tune import Callback

    from msprior import console

    class SweepProgress(Callback):
        def setup(self, **info):  # on the driver, after the Tuner's state is pickled
            self.best, self.done = None, set()
            self.display = contextlib.ExitStack()
            self.bar = self.display.enter_context(console.progress("tune", total, "trials"))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            loss = result.get("val_loss")
            if loss is not None and (self.best is None or loss < self.best[0]):
                self.best = (float(loss), trial.trial_id)
            self._show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done.add(trial.trial_id)
            self._show(trials)

        def on_experiment_end(self, trials, **info):
            self.display.close()

        def _show(self, trials) -> None:
            running = sum(1 for t in trials if t.status == "RUNNING")
            best = f"best val {self.best[0]:.4f} ({self.best[1]})" if self.best else "no validation yet"
            self.bar.update(len(self.done), note=f"{running} running | {best}")

    return SweepProgress()


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
        concurrent = check_resources(p.num_workers, p.cpus_per_worker, p.gpus_per_trial / p.num_workers if p.gpus_per_trial else 0.0, trials=p.num_samples,
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
            p.tracking["client"].set_terminated(p.parent_run_id, status="FAILED")
            raise
        return summarise(p, grid)
    finally:
        if started_ray:
            ray.shutdown()


