"""`train(...)`: one training run on Ray Train, from the driver's side.

Resolves the config, opens the latent table, checks the cluster can hold the request (fail fast,
never a silent resource deadlock), creates or continues the MLflow run, runs a `TorchTrainer` over
`loop.train_loop_per_worker`, prints progress lines sent by rank 0, and writes `run.json`.
"""

from __future__ import annotations

from msprior.errors import UserError
import math
import os
import re
import sys
import threading
import time
from typing import Any, Dict, Optional, Sequence, Union

from msprior import console
from msprior.config import Config, load_config
from msprior.redact import redact_uri
from msprior.runtime import ensure_ray

DATA_CPU = 0.25  # what Ray Data's read tasks need to make progress next to the train workers
DEFAULT_CPUS_PER_WORKER = 0.5  # logical: workers set their own torch threads from the node's cores


class TrainError(UserError):
    """A training request that cannot run as asked; a one-line message for the user."""


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


# --- paths --------------------------------------------------------------------------------------


def _storage(storage_path: Optional[str]) -> str:
    path = storage_path or os.environ.get("MSPRIOR_STORAGE") or "runs"
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if "://" in root else os.path.join(root, name)


def _has_checkpoints(run_dir: str) -> bool:
    from msprior import storage

    fs, p = storage.filesystem(run_dir)
    return fs.exists(p) and any(os.path.basename(x.rstrip("/")).startswith("checkpoint_") for x in fs.ls(p, detail=False))


def _ckpt_uri(checkpoint) -> Optional[str]:
    if checkpoint is None:
        return None
    proto = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if proto == "local" else f"{proto}://{checkpoint.path}"


# --- pretrained embedding -----------------------------------------------------------------------


def read_codebooks(rave_ts: str):
    """The RVQ codebooks (`encoder.rvq.layers.N._codebook.embed`, (V, d) each) of a discrete RAVE export."""
    import io

    import torch

    from msprior import storage

    if not storage.exists(rave_ts):
        raise TrainError(f"--pretrained_embedding {rave_ts}: file not found")
    try:  # local or s3:// (a latent table's copy of its RAVE model)
        module = torch.jit.load(io.BytesIO(storage.read_bytes(rave_ts)), map_location="cpu")
    except Exception as e:  # not TorchScript
        raise TrainError(f"--pretrained_embedding {rave_ts}: not a TorchScript RAVE export ({e.__class__.__name__})") from None
    pattern = re.compile(r"encoder\.rvq\.layers\.(\d+)\._codebook\.embed$")
    found = {int(m.group(1)): b.detach().float().clone()
             for n, b in module.named_buffers() if (m := pattern.search(n))}
    if not found:
        raise TrainError(
            f"--pretrained_embedding {rave_ts}: no RVQ codebooks (encoder.rvq.layers.N._codebook.embed); "
            "pretrained embeddings need a discrete RAVE model"
        )
    return torch.stack([found[i] for i in sorted(found)])  # [Q, V, d]


# --- progress on the console --------------------------------------------------------------------


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


class Progress:
    """Prints the lines rank 0 puts on a Ray queue, instead of Ray's raw log stream."""

    def __init__(self, name: str, stream=None):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.name, self.stream = name, stream or console.out()
        self.best = math.inf
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self, m: Dict[str, Any]) -> Optional[str]:
        step, total = m.get("step", 0), m.get("max_steps", 0)
        if m["kind"] == "resume":
            return f"[{self.name}] resumed from the checkpoint at step {step}"
        eta = (total - step) / m["steps_per_s"] if m.get("steps_per_s") else math.inf
        head = f"[{self.name}] step {step}/{total}"
        if m["kind"] == "train":
            return (f"{head} | loss {m['train_loss']:.4f} | lr {m['lr']:.2e} | "
                    f"{_fmt_rate(m['tokens_per_s'])} tok/s | ETA {_fmt_eta(eta)}")
        self.best = min(self.best, m["best_val_loss"])
        return (f"{head} | val {m['val_loss']:.4f} (best {self.best:.4f}) | top1 {m['val_top1']:.3f} | "
                f"ppl {m['val_ppl']:.2f}" + (" | early stop" if m.get("early_stopped") else ""))

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
            line = self._line(item)
            if line:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:
            pass


# --- the run ------------------------------------------------------------------------------------


def _user_cause(e: BaseException) -> Optional[BaseException]:
    """The one-line user error (DataError, TrainError, ConfigError) behind a failed worker group."""
    from msprior.config import ConfigError
    from msprior.train.data import DataError

    for exc in (getattr(e, "worker_failures", None) or {}).values():
        for candidate in (exc, getattr(exc, "cause", None)):
            if isinstance(candidate, (DataError, TrainError, ConfigError)):
                return candidate
    return None


def resolve_config(config: Union[str, Config, Dict], overrides: Sequence[str] = (), *, batch_size=None,
                   max_steps=None, val_every=None) -> Config:
    from msprior.config import apply_overrides

    flags = [f"train.{k}={v}" for k, v in
             (("batch_size", batch_size), ("max_steps", max_steps), ("val_every", val_every)) if v is not None]
    if isinstance(config, Config):
        return apply_overrides(config, list(overrides) + flags)
    if isinstance(config, dict):
        return apply_overrides(Config.from_dict(config), list(overrides) + flags)
    return load_config(config, list(overrides) + flags)


def _check_table_vs_config(cfg: Config, manifest: Dict, db_path: str) -> None:
    cond = manifest.get("conditioning") or {}
    if cfg.model.conditioning != "none":
        if not cond:
            raise TrainError(f"{db_path}: config {cfg.name} needs conditioning ({cfg.model.conditioning}) but the "
                             "table has none; preprocess with conditioning or use --config decoder_only")
        if int(cond.get("ratio", 0)) != cfg.model.cond_ratio:
            raise TrainError(f"{db_path}: the table's conditioning ratio is {cond.get('ratio')}, the config's "
                             f"model.cond_ratio is {cfg.model.cond_ratio}: pass --override model.cond_ratio="
                             f"{cond.get('ratio')}")


def train(
    config: Union[str, Config, Dict] = "decoder_only",
    db_path: str = "",
    name: str = "",
    *,
    overrides: Sequence[str] = (),
    pretrained_embedding: Optional[str] = None,
    num_workers: int = 1,
    gpu: bool = False,
    batch_size: Optional[int] = None,
    max_steps: Optional[int] = None,
    val_every: Optional[int] = None,
    resume: bool = False,
    tracking_uri: Optional[str] = None,
    storage_path: Optional[str] = None,
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER,
    gpus_per_worker: Optional[float] = None,
    max_failures: int = 3,
    progress: bool = True,
    experiment: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    tune_report: bool = False,
    fault_injection: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Train a prior; returns the run summary (the content of run.json plus the final metrics).

    `experiment` / `parent_run_id` / `tune_report` are for sweeps (nested MLflow runs, Tune reports);
    `fault_injection` = {"rank", "step", "marker"} raises once inside a worker (tests only).
    """
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from msprior.train import tracking
    from msprior.train.checkpoint import write_run_json
    from msprior.train.data import open_table
    from msprior.train.loop import train_loop_per_worker

    if not name or "/" in name:
        raise TrainError(f"--name {name!r}: give a run name without '/'")
    if not db_path:
        raise TrainError("--db_path: give the latent table written by `msprior preprocess`")
    from msprior import storage

    db_path = storage.absolute(db_path)
    if num_workers < 1:
        raise TrainError(f"--num_workers {num_workers}: must be >= 1")
    codebooks = None
    if pretrained_embedding:
        codebooks = read_codebooks(pretrained_embedding)
        overrides = list(overrides) + [f"model.pretrained_embedding_dim={int(codebooks.shape[2])}"]
    cfg = resolve_config(config, overrides, batch_size=batch_size, max_steps=max_steps, val_every=val_every)
    if cfg.train.batch_size < num_workers:
        raise TrainError(f"--batch_size {cfg.train.batch_size} is the global batch: give at least one window "
                         f"per worker (>= --num_workers {num_workers})")

    table = open_table(db_path, cfg.data.val_fraction, cfg.data.seed, cfg.model.conditioning)
    _check_table_vs_config(cfg, table.manifest, db_path)
    if codebooks is not None:
        q, v = table.manifest["rave"]["num_quantizers"], table.manifest["rave"]["vocab_size"]
        if codebooks.shape[0] != q or codebooks.shape[1] != v:
            raise TrainError(f"--pretrained_embedding {pretrained_embedding}: {codebooks.shape[0]} codebooks of "
                             f"{codebooks.shape[1]} entries, the table has {q} quantizers x {v}: use the "
                             "RAVE model that encoded the table")

    started_ray = ensure_ray(log_to_driver=not progress)
    try:
        gpw = (gpus_per_worker if gpus_per_worker is not None else 1.0) if gpu else 0.0
        check_resources(num_workers, cpus_per_worker, gpw)
        ray.data.DataContext.get_current().enable_progress_bars = False

        storage = _storage(storage_path)
        run_dir = _join(storage, name)
        exists = _has_checkpoints(run_dir)
        if exists and not resume:
            raise TrainError(f"run {name!r} already has checkpoints in {storage}: pass --resume to continue it "
                             "or choose another --name")
        if resume and not exists:
            raise TrainError(f"--resume: run {name!r} has no checkpoint in {storage} (check --name / --storage_path)")

        # MLflow: one run per training; a resumed run continues the same MLflow run.
        uri = tracking.default_tracking_uri(tracking_uri)
        client = tracking.client(uri)
        exp_name = experiment or name
        run_id = tracking.find_run(client, exp_name, run_dir) if resume else None
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            rave = table.manifest.get("rave", {})
            params = {**cfg.flat(), "data.db_path": db_path, "data.num_quantizers": rave.get("num_quantizers"),
                      "data.vocab_size": rave.get("vocab_size"), "data.continuous": rave.get("continuous"),
                      "data.rave_sha256": rave.get("sha256"), "data.train_files": len(table.sources) - len(table.val_sources),
                      "data.val_files": len(table.val_sources), "train.num_workers": num_workers,
                      "train.gpu": gpu}
            tags = {tracking.RUN_DIR_TAG: run_dir, "msprior.config": cfg.name,
                    "msprior.rave_sha256": str(rave.get("sha256")), "msprior.continuous": str(rave.get("continuous"))}
            run_id = tracking.start_run(client, exp_name, name, params, tags, parent_run_id=parent_run_id)
            tracking.log_dict(client, run_id, cfg.to_dict(), "config.yaml")
            tracking.log_dict(client, run_id, table.manifest, "manifest.json")

        from msprior.train.data import frames_from_arrow, read_split, train_dataset
        from msprior.train.loop import shard_kwargs

        datasets = {"train": train_dataset(table)}
        val_frames = frames_from_arrow(read_split(table, val=True), **shard_kwargs(cfg, table.manifest)) \
            if table.val_sources else None
        printer = Progress(name) if progress else None
        loop_cfg = {
            "config": cfg.to_dict(),
            "manifest": table.manifest,
            "codebooks": codebooks,
            "val_frames": val_frames,
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "progress": printer.queue if printer else None,
            "fault": fault_injection,
        }
        callbacks = []
        if tune_report:
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks.append(TuneReportCallback())
        resources = {"CPU": cpus_per_worker, **({"GPU": gpw} if gpu else {})}
        from msprior import storage as _st

        # Ray Train takes a pyarrow filesystem + a path inside it (S3 settings from our environment)
        st_fs, st_path = _st.pyarrow_filesystem(storage) if _st.is_s3(storage) else (None, storage)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name,
                storage_path=st_path,
                storage_filesystem=st_fs,
                failure_config=FailureConfig(max_failures=max_failures),
                # keeps the best (lowest val_loss) checkpoint; Ray always keeps the latest too
                checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                                   checkpoint_score_order="min"),
                callbacks=callbacks,
            ),
            datasets=datasets,
        )
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
        wall = time.perf_counter() - t0

        metrics = dict(result.metrics or {})
        best = min(result.best_checkpoints or [], key=lambda cm: cm[1].get("val_loss", math.inf), default=None)
        info = {
            "name": name,
            "best_checkpoint": _ckpt_uri(best[0]) if best else _ckpt_uri(result.checkpoint),
            "last_checkpoint": _ckpt_uri(result.checkpoint),
            "best_val_loss": metrics.get("best_val_loss"),
            "step": metrics.get("step"),
            "mlflow_run_id": run_id,
            "tracking_uri": redact_uri(uri),
            "db_path": db_path,
        }
        write_run_json(run_dir, info)
        client.set_tag(run_id, "msprior.best_checkpoint", str(info["best_checkpoint"]))
        client.log_metric(run_id, "train_wall_s", wall)
        tracking.log_loss_curve(client, run_id)
        tracking.log_dict(client, run_id, info, "run.json")
        client.set_terminated(run_id, status="FINISHED")
        if progress:
            best_txt = f"{info['best_val_loss']:.4f}" if info["best_val_loss"] is not None else "n/a"
            console.echo(f"[{name}] done: step {info['step']}, best val {best_txt}, "
                         f"{wall:.0f}s; run dir {run_dir}; MLflow run {run_id}")
        return {**info, "run_dir": run_dir, "metrics": metrics, "wall_s": wall}
    finally:
        if started_ray:
            ray.shutdown()
