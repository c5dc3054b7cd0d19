"""`train(...)`: one training run on Ray Train, from the driver's side: the run's steps.

Steps (one function each): resolve the request (msprior.train.plan; the request itself is
msprior.train.request), open the latent
table (its index and layout; workers read their files through the node cache), check the cluster
can hold the request (fail fast, never a silent resource deadlock), create or continue the MLflow
run, run a `TorchTrainer` over `loop.train_loop_per_worker`, print the progress lines rank 0 sends,
and write `run.json`. A sweep opens the table once and hands the same `TableData` to every trial.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

from msprior import console, devices
from msprior.config import Config
from msprior.devices import Device
from msprior.errors import UserError
from msprior.redact import redact_uri
from msprior.runtime import ensure_ray
from msprior.train import run_lease
from msprior.train.plan import Plan, plan, request_record
from msprior.train.request import DEFAULT_CPUS_PER_WORKER, TrainContext, TrainError, TrainRequest

if TYPE_CHECKING:
    from msprior.train.inputs import LoopInputs

DATA_CPU = 0.25  # what Ray Data's read tasks need to make progress next to the train workers


# --- resources ----------------------------------------------------------------------------------


def check_resources(num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    trials: int = 1, driver_cpus: float = 0.0, what: str = "training") -> int:
    """How many runs of this shape fit the cluster at once (<= trials); raise if not even one.

    Ray waits forever for resources that will never exist: check the totals up front instead.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    per_cpu = num_workers * cpus_per_worker + driver_cpus
    per_gpu = num_workers * gpus_per_worker
    if gpus_per_worker > 0 and gpus < per_gpu - 1e-9:
        raise TrainError(
            f"{what} asks {per_gpu:g} GPU(s) ({num_workers} worker(s) x {gpus_per_worker:g}) but the Ray "
            f"cluster has {gpus:g}: lower --num_workers{' or --gpus_per_trial' if trials > 1 else ''}"
            f"{' or drop --gpu' if trials == 1 else ''}"
        )
    if cpus < per_cpu + DATA_CPU - 1e-9:
        raise TrainError(
            f"{what} asks {per_cpu + DATA_CPU:g} CPU(s) ({num_workers} worker(s) x {cpus_per_worker:g} + "
            f"{DATA_CPU:g} for data reads) but the Ray cluster has {cpus:g}: lower --num_workers or "
            "--cpus_per_worker"
        )
    fit = math.floor((cpus - DATA_CPU + 1e-9) / per_cpu) if per_cpu > 0 else trials
    if per_gpu > 0:
        fit = min(fit, math.floor(gpus / per_gpu + 1e-9))
    return max(1, min(trials, fit))


# --- checkpoints ---------------------------------------------------------------------------------


def _ckpt_uri(checkpoint) -> Optional[str]:
    from msprior import storage

    return None if checkpoint is None else storage.url_of(checkpoint.filesystem, checkpoint.path)


# --- progress on the console --------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


class Progress:
    """Shows what rank 0 puts on a Ray queue in the stage's progress display (`console.progress`):
    step of max_steps, train loss, tokens/s, last and best validation CE."""

    def __init__(self, name: str):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.name, self.best, self.train_txt, self.val_txt = name, math.inf, "", ""
        self.display = contextlib.ExitStack()
        self.bar = self.display.enter_context(console.progress("train", None, "steps"))
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _show(self, m: Dict[str, Any]) -> None:
        if m["kind"] == "resume":
            self.val_txt = f"resumed at step {m.get('step', 0)}"
        elif m["kind"] == "train":
            self.train_txt = f"loss {m['train_loss']:.3f}, {_fmt_rate(m['tokens_per_s'])} tok/s"
        else:
            self.best = min(self.best, m["best_val_loss"])
            self.val_txt = (f"val {m['val_loss']:.3f} (best {self.best:.3f})"
                            + (", early stop" if m.get("early_stopped") else ""))
        note = " | ".join(t for t in (self.train_txt, self.val_txt) if t)
        self.bar.update(m.get("step", 0), total=m.get("max_steps") or None, note=note)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                if self.done.is_set():
                    return
                continue
            except Exception:  # queue actor gone (Ray shut down)
                return
            self._show(item)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.display.close()
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:
            pass


# --- what each worker asks Ray for ---------------------------------------------------------------


def auto_cpus(workers: int, node_cpus: Sequence[float]) -> float:
    """CPUs per worker of a CPU training without --cpus_per_worker: what the nodes have left after
    the table's reads and fills (`cpu_reserve`), shared by the workers, in quarters, at least
    DEFAULT_CPUS_PER_WORKER. The worker's torch threads are this, rounded (devices.assigned_threads)."""
    from msprior.data.windows import FILLS_IN_FLIGHT, LOAD_CPU

    free = [c - DATA_CPU - FILLS_IN_FLIGHT * LOAD_CPU for c in node_cpus if c > 0]
    if not free:
        return DEFAULT_CPUS_PER_WORKER
    share = min(max(free), sum(free) / max(1, workers))
    return max(DEFAULT_CPUS_PER_WORKER, math.floor(share * 4) / 4)


def worker_cpus(req: TrainRequest, device: Optional[Device]) -> float:
    """--cpus_per_worker, else DEFAULT_CPUS_PER_WORKER on GPUs and `auto_cpus` of the cluster on the CPU."""
    if req.cpus_per_worker:
        return req.cpus_per_worker
    if device is None or device.gpu or device.kind == "mps":
        return DEFAULT_CPUS_PER_WORKER
    import ray

    return auto_cpus(req.num_workers, [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]])


def worker_resources(req: TrainRequest, device: Optional[Device]) -> Dict[str, float]:
    """What each Train worker asks Ray for: CPUs, its GPU share on GPUs, and --worker_resources (a pool's slot)."""
    on_gpu = device is not None and device.gpu
    return {"CPU": worker_cpus(req, device), **({"GPU": req.gpus(device)} if on_gpu else {}),
            **devices.parse_resources(req.worker_resources, "--worker_resources")}


def ray_machine(req: TrainRequest) -> devices.Machine:
    """The cluster's GPUs; with an explicit --gpu, after its autoscaler added the workers' GPU nodes."""
    want = {"GPU": req.gpus(None), **devices.parse_resources(req.worker_resources, "--worker_resources")}
    return devices.Machine.of_ray(want, req.num_workers if req.wants_gpus() else 0)


def _user_cause(e: BaseException) -> Optional[BaseException]:
    """The one-line user error (DataError, TrainError, ConfigError) behind a failed worker group."""
    for exc in (getattr(e, "worker_failures", None) or {}).values():
        for candidate in (exc, getattr(exc, "cause", None)):
            if isinstance(candidate, UserError):
                return candidate
    return None


# --- step 2: the table's layout, the fixed validation windows -----------------------------------


def load_data(p: Plan):
    """Open the table for training: where every chunk lies, each file's schema checked (Ray tasks
    read footers and small columns; no token is read here). Returns `msprior.data.layout.TableData`."""
    from msprior.data.layout import open_data
    from msprior.data.reader import ReadSpec

    return open_data(p.table, ReadSpec.of(p.table))


def validation_windows(p: Plan, data):
    """`train.val_batches` batches of `train.batch_size` windows, cut out by Ray tasks where the data
    is (only the row groups holding them are read), put in the object store."""
    import ray

    from msprior.data.layout import validation_windows as cut

    m, t = p.cfg.model, p.cfg.train
    return ray.put(cut(data, m.seq_len, t.val_batches, t.batch_size, seed=p.cfg.data.seed))


# --- step 3: MLflow -----------------------------------------------------------------------------


def start_tracking(req: TrainRequest, p: Plan, data) -> None:
    """Create the MLflow run (or continue it on --resume); fills `p.tracking`."""
    from msprior.config import scaled_lr
    from msprior.train import tracking

    uri = tracking.default_tracking_uri(req.tracking_uri)
    client = tracking.client(uri)
    exp_name = req.ctx.experiment or req.name
    run_id = tracking.find_run(client, exp_name, p.run_dir)
    if run_id and req.resume:
        client.update_run(run_id, status="RUNNING")
    else:
        if run_id and client.get_run(run_id).info.status == "RUNNING":  # a start killed before its checkpoint
            client.set_terminated(run_id, status="KILLED")
        cfg, manifest, t = p.cfg, p.table.manifest, p.table
        rave = manifest.get("rave", {})
        params = {**cfg.flat(), "data.db_path": t.db_path, "data.num_quantizers": rave.get("num_quantizers"),
                  "data.vocab_size": rave.get("vocab_size"), "data.continuous": rave.get("continuous"),
                  "data.rave_sha256": rave.get("sha256"), "data.train_files": len(t.sources) - len(t.val_sources),
                  "data.val_files": len(t.val_sources), "data.train_chunks": data.train_chunks,
                  "train.num_workers": req.num_workers, "train.device": p.device.describe() if p.device else None,
                  "train.global_batch": cfg.train.batch_size * req.num_workers,
                  "optim.lr_effective": scaled_lr(cfg.optim, req.num_workers)}
        tags = {tracking.RUN_DIR_TAG: p.run_dir, "msprior.config": cfg.name,
                "msprior.rave_sha256": str(rave.get("sha256")), "msprior.continuous": str(rave.get("continuous"))}
        run_id = tracking.start_run(client, exp_name, req.name, params, tags, parent_run_id=req.ctx.parent_run_id)
        tracking.log_dict(client, run_id, cfg.to_dict(), "config.yaml")
        tracking.log_dict(client, run_id, manifest, "manifest.json")
    p.tracking = {"uri": uri, "client": client, "run_id": run_id}


# --- step 4: the trainer ------------------------------------------------------------------------


def loop_inputs(req: TrainRequest, p: Plan, data, val_ref, printer) -> "LoopInputs":
    """What every worker is given (`msprior.train.inputs.LoopInputs`), built once here."""
    from msprior.train.inputs import Fault, LoopInputs

    return LoopInputs(
        config=p.cfg, manifest=p.table.manifest, codebooks=p.codebooks,
        train_data=data.for_workers(),  # index + read spec: each rank reads its files through the node cache
        val_batches=val_ref, tracking_uri=p.tracking["uri"], mlflow_run_id=p.tracking["run_id"],
        progress=printer.queue if printer else None,
        mps=p.device is not None and p.device.kind == "mps",  # else Ray Train places it (cuda or cpu)
        run_lease=run_lease.identity(p.run_dir),  # a run taken over writes no more checkpoints
        fault=Fault(**req.ctx.fault_injection) if req.ctx.fault_injection else None)


def make_trainer(req: TrainRequest, p: Plan, data, val_ref, printer):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from msprior import storage as st
    from msprior.train.loop import train_loop_per_worker

    callbacks = []
    if req.ctx.tune_report:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    on_gpu = p.device is not None and p.device.gpu
    resources = worker_resources(req, p.device)
    # Ray Train takes a pyarrow filesystem + a path inside it (S3 settings from our environment)
    st_path, st_fs = st.Location.of(p.runs_root).ray_storage()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_inputs(req, p, data, val_ref, printer),
        scaling_config=ScalingConfig(num_workers=req.num_workers, use_gpu=on_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=req.name,
            storage_path=st_path,
            storage_filesystem=st_fs,
            failure_config=FailureConfig(max_failures=req.max_failures),
            # keeps the best (lowest val_loss) checkpoint; Ray always keeps the latest too
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            callbacks=callbacks,
        ),
    )


# --- step 5: fit and record ---------------------------------------------------------------------


def fit(trainer, p: Plan, printer):
    client, run_id = p.tracking["client"], p.tracking["run_id"]
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException as e:
        client.set_terminated(run_id, status="FAILED")
        cause = _user_cause(e)
        if cause is not None:  # a worker hit a user error (e.g. a shard too small): say it in one line
            raise TrainError(str(cause).splitlines()[0]) from None
        raise
    finally:
        if printer:
            printer.close()
    return result, time.perf_counter() - t0


def finish(req: TrainRequest, p: Plan, result, wall: float) -> Dict[str, Any]:
    """run.json, the MLflow run's last artifacts and status; returns the run summary."""
    from msprior.train import tracking
    from msprior.checkpoint import write_run_json

    client, run_id = p.tracking["client"], p.tracking["run_id"]
    metrics = dict(result.metrics or {})
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
    info = {
        "name": req.name,
        "best_checkpoint": _ckpt_uri(best[0]) if best else _ckpt_uri(result.checkpoint),
        "last_checkpoint": _ckpt_uri(result.checkpoint),
        "best_val_loss": metrics.get("best_val_loss"),
        "step": metrics.get("step"),
        "early_stopped": bool(metrics.get("early_stopped")),  # train.patience validations without a new best
        "mlflow_run_id": run_id,
        "tracking_uri": redact_uri(p.tracking["uri"]),  # run.json travels; a password must not
        "db_path": p.table.db_path,
    }
    write_run_json(p.run_dir, info)
    client.set_tag(run_id, "msprior.best_checkpoint", str(info["best_checkpoint"]))
    client.log_metric(run_id, "train_wall_s", wall)
    tracking.log_loss_curve(client, run_id)
    tracking.log_dict(client, run_id, info, "run.json")
    client.set_terminated(run_id, status="FINISHED")
    if req.ctx.progress:
        best_txt = f"{info['best_val_loss']:.4f}" if info["best_val_loss"] is not None else "n/a"
        console.echo(f"[{req.name}] done: step {info['step']}, best val {best_txt}, "
                     f"{wall:.0f}s; run dir {p.run_dir}; MLflow run {run_id}")
    return {**info, "run_dir": p.run_dir, "metrics": metrics, "wall_s": wall}


# --- the run ------------------------------------------------------------------------------------


def train(config: Union[str, Config, Dict] = "decoder_only", db_path: str = "", name: str = "",
          **kw: Any) -> Dict[str, Any]:
    """Train a prior; returns the run summary (the content of run.json plus the final metrics).

    Keyword arguments are the fields of `TrainRequest` and of `TrainContext`.
    """
    names = {f.name for f in fields(TrainContext)}
    ctx = TrainContext(**{k: kw.pop(k) for k in list(kw) if k in names})
    return run_training(TrainRequest(config=config, db_path=db_path, name=name, ctx=ctx, **kw))


def run_training(req: TrainRequest) -> Dict[str, Any]:
    import ray

    from msprior.checkpoint import write_run_request
    from msprior.train import quality

    p = plan(req)
    writer = run_lease.start(p.run_dir, req.name, "" if req.ctx.data is not None else p.table.db_path)  # one writer per run
    devices.pin_local_gpu(req.gpu, req.num_workers)  # --gpu N: the only card a local Ray sees
    started_ray = ensure_ray()  # workers' output: into the log file during a command
    try:
        p.device = devices.choose(req.gpu, req.cpu, ray_machine(req), workers=req.num_workers)
        if req.ctx.progress:
            devices.announce(p.device, "train")
        check_resources(req.num_workers, worker_cpus(req, p.device), req.gpus(p.device))
        data = req.ctx.data if req.ctx.data is not None else load_data(p)
        val_ref = validation_windows(p, data)
        write_run_request(p.run_dir, request_record(p.cfg, p.table))
        start_tracking(req, p, data)
        quality.log_floor(p.tracking, data, val_ref)  # the unigram floor of these validation windows, once
        printer = Progress(req.name) if req.ctx.progress else None
        trainer = make_trainer(req, p, data, val_ref, printer)
        result, wall = fit(trainer, p, printer)
        return finish(req, p, result, wall)
    finally:
        writer.release()
        if started_ray:
            ray.shutdown()
