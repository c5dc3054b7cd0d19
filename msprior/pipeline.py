"""The whole service in one function: preprocess -> train (or tune) -> export -> register.

Each stage is skipped when its output already exists, so re-running after a failure (or
re-submitting the Ray job) continues where it stopped:

    <out>/data/manifest.json        latent table (msprior.data.preprocess; it also resumes per file)
    <out>/runs/<name>/run.json      training run (msprior.train.train; resumes from its checkpoints)
    <out>/export/<name>.ts          nn~ model (msprior.export.export_run)
    registry version tagged with the .ts sha256   (msprior.registry.register_export)

`<out>` may be a local folder or an s3:// prefix; `audio` and `rave` too.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence

from msprior import storage


def _skip(echo: Callable, stage: str, why: str) -> None:
    echo(f"[{stage}] skipped: {why}")


def run_pipeline(
    audio: str,
    rave: str,
    out: str,
    *,
    config: str = "decoder_only",
    name: Optional[str] = None,
    overrides: Sequence[str] = (),
    tune: bool = False,
    sweep: Optional[str] = None,
    num_samples: int = 4,
    gpus_per_trial: float = 0.0,
    num_workers: int = 1,
    gpu: bool = False,
    batch_size: Optional[int] = None,
    max_steps: Optional[int] = None,
    val_every: Optional[int] = None,
    pretrained_embedding: bool = False,
    num_secs: float = 16.0,
    resolution: int = 64,
    condition_ratio: int = 4,
    min_frames: Optional[int] = None,
    tracking_uri: Optional[str] = None,
    registered_name: Optional[str] = None,
    quantize: Optional[str] = None,
    export_batch_size: int = 1,
    preview_secs: float = 4.0,
    echo: Callable[[str], Any] = print,
) -> Dict[str, Any]:
    """Run (or resume) every stage; returns {"table", "run_dir", "model", "registered": {...}}."""
    from msprior.config import load_config

    name = name or os.path.splitext(os.path.basename(config))[0]
    audio, rave, out = storage.absolute(audio), storage.absolute(rave), storage.absolute(out)
    table = storage.join(out, "data")
    runs = storage.join(out, "runs")
    run_dir = storage.join(runs, name)
    model_path = storage.join(out, "export", f"{name}.ts")
    cfg = load_config(config, overrides)  # fail on config typos before any work
    t_all = time.monotonic()

    # 1. preprocess ------------------------------------------------------------------------------
    t0 = time.monotonic()
    if storage.exists(storage.join(table, "manifest.json")):
        _skip(echo, "preprocess", f"{table}/manifest.json exists")
    else:
        from msprior.data import preprocess

        echo(f"[preprocess] {audio} -> {table}")
        # a file shorter than one training window (seq_len + 1 frames) cannot train: skip and report it
        preprocess(audio, table, rave, num_secs=num_secs, resolution=resolution, num_workers=num_workers,
                   gpu=gpu, condition_ratio=condition_ratio, echo=echo,
                   min_frames=min_frames if min_frames is not None else cfg.model.seq_len + 1)
        echo(f"[preprocess] done in {time.monotonic() - t0:.0f} s")

    # 2. train or tune ---------------------------------------------------------------------------
    from msprior.train.checkpoint import read_run_json

    t0 = time.monotonic()
    summary = read_run_json(run_dir)
    sweep_record = storage.join(runs, f"{name}.sweep.json")  # which trial won, for re-runs
    codebooks = storage.join(table, "rave.ts") if pretrained_embedding else None
    if tune and storage.exists(sweep_record):
        result = json.loads(storage.read_bytes(sweep_record))
        run_dir = result["best_run_dir"]
        _skip(echo, "tune", f"{sweep_record} exists (best trial {result.get('best_trial')})")
    elif tune:
        from msprior.config import config_dir
        from msprior.train.tune import tune as run_tune

        sweep = sweep or str(config_dir() / "sweeps" / "default.yaml")
        echo(f"[tune] sweep {sweep} over {table}")
        from msprior.train.tune import sweep_exists

        result = run_tune(sweep, table, name, num_samples=num_samples, gpus_per_trial=gpus_per_trial,
                          num_workers=num_workers, max_steps=max_steps, val_every=val_every,
                          batch_size=batch_size, overrides=overrides, tracking_uri=tracking_uri,
                          storage_path=runs, resume=sweep_exists(storage.join(runs, name)))  # a preempted sweep goes on
        run_dir = result["best_run_dir"]
        storage.write_bytes(sweep_record, json.dumps(result, indent=1, default=str).encode())
        echo(f"[tune] done in {time.monotonic() - t0:.0f} s: best trial {result.get('best_trial')} "
             f"val CE {result.get('best_val_loss')}")
    elif summary:
        _skip(echo, "train", f"{run_dir}/run.json exists (best val CE {summary.get('best_val_loss')})")
    else:
        from msprior.train import train
        from msprior.train.run import _has_checkpoints

        resume = _has_checkpoints(run_dir)  # an interrupted training continues from its last checkpoint
        echo(f"[train] {config} on {table} -> {run_dir}" + (" (resuming)" if resume else ""))
        summary = train(cfg, table, name, num_workers=num_workers, gpu=gpu, batch_size=batch_size,
                        max_steps=max_steps, val_every=val_every, resume=resume, tracking_uri=tracking_uri,
                        storage_path=runs, pretrained_embedding=codebooks)
        echo(f"[train] done in {time.monotonic() - t0:.0f} s: best val CE {summary.get('best_val_loss')}")

    # 3. export ----------------------------------------------------------------------------------
    from msprior.export.run import export_run

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        local_model = model_path if not storage.is_s3(model_path) else os.path.join(tmp, f"{name}.ts")
        if storage.exists(model_path):
            _skip(echo, "export", f"{model_path} exists")
            if storage.is_s3(model_path):
                with open(local_model, "wb") as f:
                    f.write(storage.read_bytes(model_path))
        else:
            os.makedirs(os.path.dirname(local_model) or ".", exist_ok=True)
            export_run(run_dir, local_model, checkpoint="best", batch_size=export_batch_size,
                       quantize=quantize, tracking_uri=tracking_uri)
            if storage.is_s3(model_path):
                with open(local_model, "rb") as f:
                    storage.write_bytes(model_path, f.read())
            echo(f"[export] {model_path} in {time.monotonic() - t0:.0f} s")

        # 4. register (skipped when the registry already holds these bytes) --------------------
        from msprior.export.publish import publish
        from msprior.registry import model_name

        # msprior-<name>, also after a sweep (whose winning run is named after its trial)
        registered = publish(local_model, run=run_dir, name=registered_name or model_name(name),
                             tracking_uri=tracking_uri, preview_secs=preview_secs,
                             measure_int8=quantize == "int8", echo=echo)
    echo(f"[pipeline] finished in {time.monotonic() - t_all:.0f} s")
    return {"table": table, "run_dir": run_dir, "model": model_path, "registered": registered}
