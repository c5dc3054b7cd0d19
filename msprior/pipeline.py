"""The whole service: preprocess -> train (or tune) -> export -> register, one function per stage.

Each stage is skipped when its output already exists, so re-running after a failure (or
re-submitting the Ray job) continues where it stopped:

    <out>/data/manifest.json        latent table (msprior.data.preprocess; it also resumes per file)
    <out>/runs/<name>/run.json      training run (msprior.train.train; resumes from its checkpoints)
    <out>/export/<name>.ts          nn~ model (msprior.export.export_run)
    registry version tagged with the .ts sha256   (msprior.registry.register_export)

Before a stage runs, the arguments that determine its output are written to
`<out>/stages/preprocess.json`, `train.<name>.json`, `export.<name>.json` (with a digest of the
previous stage's record). A re-run whose arguments differ
is refused in one line naming the stage and the argument, unless `--force STAGE` asks to redo it:
then that stage's output and every later stage's are removed first, so a crash during the redo
cannot leave an old output under a record of the new arguments.

`<out>` may be a local folder or an s3:// prefix; `audio` and `rave` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from msprior import storage
from msprior.data.preprocess import PreprocessRequest
from msprior.export.publish import ExportRequest
from msprior.flags import flag, like
from msprior.train.request import TrainRequest, check_name
from msprior.train.tune import SweepRequest
from msprior.redact import redact_uri
from msprior.stages import STAGES, PipelineError, guard, invalidate

FORCE_ALIASES = {"tune": "train"}


@dataclass
class PipelineRequest:
    """Everything `msprior pipeline` (and jobs/pipeline.py) was asked. A flag that a stage also has is
    that stage's field (`like`): one default and one help text for both."""

    audio: str = like(PreprocessRequest, "audio")
    rave: str = like(PreprocessRequest, "rave")
    out: str = flag(help="Output folder or s3:// prefix (data/, runs/, export/ below it).")
    config: str = like(TrainRequest, "config")
    name: Optional[str] = flag(None, "Run name; default <config>-<id of the RAVE model and table>.")
    overrides: Sequence[str] = like(TrainRequest, "overrides")
    tune: bool = flag(False, "Sweep configs with Ray Tune instead of one training.")
    sweep: Optional[str] = like(SweepRequest, "sweep", default=None,
                                help="With --tune: shipped sweep name or a sweep YAML path; default: default.")
    num_samples: Optional[int] = like(SweepRequest, "num_samples")
    gpus_per_trial: Optional[float] = like(SweepRequest, "gpus_per_trial")
    num_workers: int = flag(1, "Ray workers for encoding and for training.")
    gpu: Optional[int] = like(TrainRequest, "gpu")
    batch_size: Optional[int] = like(TrainRequest, "batch_size", help="Windows per worker per step; default: the "
                                                                      "config's (with --tune: the sweep file's).")
    max_steps: Optional[int] = like(TrainRequest, "max_steps", help="Training steps; default: the config's (with "
                                                                    "--tune: the sweep file's).")
    val_every: Optional[int] = like(TrainRequest, "val_every", help="Steps between validations and checkpoints; "
                                                                    "default: the config's (with --tune: the sweep file's).")
    pretrained_embedding: bool = flag(False, "Start from the RAVE model's codebooks (discrete RAVE).")
    num_secs: float = like(PreprocessRequest, "num_secs")
    resolution: int = like(PreprocessRequest, "resolution")
    condition_ratio: int = like(PreprocessRequest, "condition_ratio")
    min_frames: Optional[int] = like(PreprocessRequest, "min_frames", default=None,
                                     help="Skip files shorter than this many frames; default seq_len + 1.")
    # how preprocess spreads its work (never what the table holds): preprocess's own flags
    encode_workers: Optional[int] = like(PreprocessRequest, "num_workers", default=None, names="--encode_workers",
                                         help="Encoder actors; default --num_workers.")
    encode_batch_size: int = like(PreprocessRequest, "batch_size", names="--encode_batch_size")
    encoder_cpus: float = like(PreprocessRequest, "cpus_per_worker", names="--encoder_cpus")
    encoder_resources: Optional[str] = like(PreprocessRequest, "encoder_resources")
    worker_resources: Optional[str] = like(TrainRequest, "worker_resources")
    task_mb: float = like(PreprocessRequest, "task_mb")
    files_per_task: int = like(PreprocessRequest, "files_per_task")
    target_file_mb: float = like(PreprocessRequest, "target_file_mb")
    decode_cpus: float = like(PreprocessRequest, "decode_cpus")
    decode_concurrency: Optional[int] = like(PreprocessRequest, "decode_concurrency")
    decode_in_encoder: bool = like(PreprocessRequest, "decode_in_encoder")
    decode_threads: int = like(PreprocessRequest, "decode_threads")
    shuffle_seed: int = like(PreprocessRequest, "shuffle_seed")
    tracking_uri: Optional[str] = like(TrainRequest, "tracking_uri")
    registered_name: Optional[str] = like(ExportRequest, "name", names="--registered_name")
    quantize: Optional[str] = like(ExportRequest, "quantize")
    export_batch_size: int = like(ExportRequest, "batch_size", names="--export_batch_size")
    preview_secs: float = like(ExportRequest, "preview_secs")
    force: Sequence[str] = flag((), "Redo STAGE (preprocess|train|tune|export) and the stages after it, e.g. "
                                    "after changing its arguments; repeatable.")


@dataclass
class Plan:
    """The request resolved once: absolute paths, the validated config, names, the RAVE sha256."""

    req: PipelineRequest
    cfg: Any
    name: str
    rave_sha256: str
    table: str
    runs: str
    run_dir: str
    model_path: str
    forced: List[str] = field(default_factory=list)
    echo: Callable[[str], Any] = print

    def record_path(self, stage: str) -> str:
        """`<out>/stages/preprocess.json`; train and export per run name (`train.<name>.json`)."""
        base = stage if stage == "preprocess" else f"{stage}.{self.name}"
        return storage.join(self.req.out, "stages", f"{base}.json")


def plan(req: PipelineRequest, echo: Callable[[str], Any] = print) -> Plan:
    from msprior.config import load_config
    from msprior.registry import corpus_id

    cfg = load_config(req.config, list(req.overrides))  # fail on config typos before any work
    audio, rave, out = storage.absolute(req.audio), storage.absolute(req.rave), storage.absolute(req.out)
    req = dataclasses.replace(req, audio=audio, rave=rave, out=out)
    rave_sha256 = hashlib.sha256(storage.read_bytes(rave)).hexdigest()
    table = storage.join(out, "data")
    # a default run name that differs per corpus (RAVE model + table), so registered names never collide
    name = req.name or f"{os.path.splitext(os.path.basename(req.config))[0]}-{corpus_id(rave_sha256, table)[:8]}"
    check_name(name, "--name")  # one folder under <out>/runs: `--name ../..` never reaches outside --out
    runs = storage.join(out, "runs")
    forced = _forced_stages(req.force)
    if req.tune:  # the sweep file, resolved once: a bad --sweep fails here, not after preprocessing
        from msprior.config import resolve_sweep_path

        req = dataclasses.replace(req, sweep=resolve_sweep_path(req.sweep or "default"))
    return Plan(req, cfg, name, rave_sha256, table, runs, storage.join(runs, name),
                storage.join(out, "export", f"{name}.ts"), forced, echo)


def _forced_stages(force: Sequence[str]) -> List[str]:
    """`--force STAGE` redoes STAGE and every stage after it."""
    first = len(STAGES)
    for s in force:
        s = FORCE_ALIASES.get(s, s)
        if s not in STAGES:
            raise PipelineError(f"--force {s}: not a stage; one of {', '.join(STAGES)} (or tune)")
        first = min(first, STAGES.index(s))
    return list(STAGES[first:])


# --- the stages --------------------------------------------------------------------------------


def stage_preprocess(p: Plan) -> None:
    req = p.req
    min_frames = req.min_frames if req.min_frames is not None else p.cfg.model.seq_len + 1
    done = storage.exists(storage.join(p.table, "manifest.json"))
    retry = _files_to_retry(p.table) if done else 0
    guard(p, "preprocess", {"audio": req.audio, "rave_sha256": p.rave_sha256, "num_secs": req.num_secs,
                            "resolution": req.resolution, "condition_ratio": req.condition_ratio,
                            "min_frames": min_frames}, done)
    if retry and storage.exists(p.run_dir):  # a resumed training refuses a table that changed under it
        raise PipelineError(f"[preprocess] {retry} file(s) failed for a transient cause and are not in {p.table}, "
                            f"and run {p.name} already started on it: pass --force train to retry them and train again")
    if done and not retry:
        p.echo(f"[preprocess] skipped: {p.table}/manifest.json exists")
        return
    from msprior.data import preprocess

    t0 = time.monotonic()
    p.echo(f"[preprocess] resuming {p.table}: {retry} file(s) failed for a transient cause last time"
           if retry else f"[preprocess] {req.audio} -> {p.table}")
    args = preprocess_request(p, min_frames)
    preprocess(dataclasses.replace(args), echo=p.echo)
    if _files_to_retry(p.table):  # one more pass over only those files: a passing cause may have passed
        p.echo(f"[preprocess] retrying {_files_to_retry(p.table)} file(s) that failed for a transient cause")
        preprocess(dataclasses.replace(args), echo=p.echo)
    left = _files_to_retry(p.table)
    if left:  # never train on part of the corpus without saying so
        raise PipelineError(f"[preprocess] {left} file(s) failed for a transient cause twice and are not in "
                            f"{p.table} (see its report.json): re-run the same command to retry them; "
                            "training does not start on part of the corpus")
    p.echo(f"[preprocess] done in {time.monotonic() - t0:.0f} s")


def preprocess_request(p: Plan, min_frames: int) -> PreprocessRequest:
    """The preprocess stage's request: the table's settings and every knob of how the work is spread."""
    req = p.req
    # a file shorter than one training window (seq_len + 1 frames) cannot train: skip and report it
    return PreprocessRequest(req.audio, p.table, req.rave, num_secs=req.num_secs, resolution=req.resolution,
                             num_workers=req.encode_workers or req.num_workers, gpu=req.gpu,
                             condition_ratio=req.condition_ratio, min_frames=min_frames,
                             batch_size=req.encode_batch_size, cpus_per_worker=req.encoder_cpus,
                             task_mb=req.task_mb, files_per_task=req.files_per_task,
                             target_file_mb=req.target_file_mb, decode_cpus=req.decode_cpus,
                             decode_concurrency=req.decode_concurrency, decode_in_encoder=req.decode_in_encoder,
                             decode_threads=req.decode_threads, shuffle_seed=req.shuffle_seed,
                             encoder_resources=req.encoder_resources)


def _files_to_retry(table: str) -> int:
    """Files of a finished table that failed for a transient cause (S3 trouble, out of memory): a
    re-run of the pipeline gives them another try (preprocess resumes: only they are read)."""
    from msprior.data import load_report

    try:
        return int(load_report(table)["counts"].get("files_retry") or 0)
    except (OSError, KeyError, ValueError):  # no report (a table of an older version): nothing known
        return 0


def _train_inputs(p: Plan) -> Dict[str, Any]:
    req = p.req
    inputs = {"config": p.cfg.name, **{k: v for k, v in p.cfg.flat().items() if k != "name"},
              "tune": req.tune, "max_steps": req.max_steps, "batch_size": req.batch_size,
              "val_every": req.val_every, "pretrained_embedding": req.pretrained_embedding}
    if req.tune:
        inputs.update(sweep=req.sweep, sweep_sha256=hashlib.sha256(open(req.sweep, "rb").read()).hexdigest(),
                      num_samples=req.num_samples)
    return inputs


def stage_train(p: Plan) -> str:
    """Train (or sweep); returns the run directory to export."""
    from msprior.checkpoint import read_run_json

    req = p.req
    sweep_record = storage.join(p.runs, f"{p.name}.sweep.json")  # which trial won, for re-runs
    summary = None if req.tune else read_run_json(p.run_dir)
    guard(p, "train", _train_inputs(p), storage.exists(sweep_record) if req.tune else bool(summary))
    t0 = time.monotonic()
    if req.tune and storage.exists(sweep_record):
        result = json.loads(storage.read_bytes(sweep_record))
        p.echo(f"[tune] skipped: {sweep_record} exists (best trial {result.get('best_trial')})")
        return result["best_run_dir"]
    if req.tune:
        from msprior.train.tune import tune as run_tune

        from msprior.train.tune import sweep_exists

        p.echo(f"[tune] sweep {req.sweep} over {p.table}")
        result = run_tune(req.sweep, p.table, p.name, num_samples=req.num_samples,
                          gpus_per_trial=req.gpus_per_trial, num_workers=req.num_workers, max_steps=req.max_steps,
                          val_every=req.val_every, batch_size=req.batch_size, overrides=list(req.overrides),
                          tracking_uri=req.tracking_uri, storage_path=p.runs,
                          resume=sweep_exists(storage.join(p.runs, p.name)))  # a preempted sweep goes on
        result = {**result, "tracking_uri": redact_uri(result.get("tracking_uri"))}
        storage.write_bytes(sweep_record, json.dumps(result, indent=1, default=str).encode())
        p.echo(f"[tune] done in {time.monotonic() - t0:.0f} s: best trial {result.get('best_trial')} "
               f"val CE {result.get('best_val_loss')}")
        return result["best_run_dir"]
    if summary:
        p.echo(f"[train] skipped: {p.run_dir}/run.json exists (best val CE {summary.get('best_val_loss')})")
        return p.run_dir
    from msprior.train.request import has_checkpoints
    from msprior.train.run import run_training

    resume = has_checkpoints(p.run_dir)  # an interrupted training continues from its last checkpoint
    p.echo(f"[train] {req.config} on {p.table} -> {p.run_dir}" + (" (resuming)" if resume else ""))
    summary = run_training(train_request(p, resume))
    p.echo(f"[train] done in {time.monotonic() - t0:.0f} s: best val CE {summary.get('best_val_loss')}")
    return p.run_dir


def train_request(p: Plan, resume: bool) -> TrainRequest:
    """The train stage's request: the pipeline's training flags, its resolved config, table and run folder."""
    req = p.req
    codebooks = storage.join(p.table, "rave.ts") if req.pretrained_embedding else None
    return TrainRequest(config=p.cfg, db_path=p.table, name=p.name, num_workers=req.num_workers, gpu=req.gpu,
                        batch_size=req.batch_size, max_steps=req.max_steps, val_every=req.val_every, resume=resume,
                        tracking_uri=req.tracking_uri, storage_path=p.runs, pretrained_embedding=codebooks,
                        worker_resources=req.worker_resources)


def stage_export(p: Plan, run_dir: str, tmp: str) -> str:
    """Export the run's best checkpoint to `<out>/export/<name>.ts`; returns a local copy's path."""
    from msprior.export.run import export_run

    req = p.req
    model = storage.Location.of(p.model_path)
    local = model.local_path(tmp)  # the model itself, or a copy in tmp the register stage reads
    done = model.exists()
    guard(p, "export", {"run_dir": run_dir, "checkpoint": "best", "quantize": req.quantize or "none",
                        "export_batch_size": req.export_batch_size}, done)
    if done:
        p.echo(f"[export] skipped: {p.model_path} exists")
        model.download_to(local)
        return local
    t0 = time.monotonic()
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    export_run(run_dir, local, checkpoint="best", batch_size=req.export_batch_size, quantize=req.quantize,
               tracking_uri=req.tracking_uri)
    model.upload_from(local)
    p.echo(f"[export] {p.model_path} in {time.monotonic() - t0:.0f} s")
    return local


def stage_register(p: Plan, run_dir: str, local_model: str) -> Dict[str, Any]:
    """Register the export (skipped when the registry already holds these bytes)."""
    from msprior.export.publish import publish

    req = p.req
    # msprior-<name>, also after a sweep (whose winning run is named after its trial)
    return publish(local_model, run=run_dir, name=req.registered_name, run_name=p.name,
                   tracking_uri=req.tracking_uri, preview_secs=req.preview_secs,
                   measure_int8=req.quantize == "int8", echo=p.echo)


def run_pipeline(req: PipelineRequest, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run (or resume) every stage; returns {"table", "run_dir", "model", "registered": {...}}."""
    t_all = time.monotonic()
    p = plan(req, echo)
    invalidate(p)
    stage_preprocess(p)
    run_dir = stage_train(p)
    with tempfile.TemporaryDirectory() as tmp:
        local_model = stage_export(p, run_dir, tmp)
        registered = stage_register(p, run_dir, local_model)
    echo(f"[pipeline] finished in {time.monotonic() - t_all:.0f} s")
    return {"table": p.table, "run_dir": run_dir, "model": p.model_path, "registered": registered}
