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
    codebooks = storage.join(table, "rave.ts") if pretrained_embedding else None
    if summary:
        _skip(echo, "train", f"{run_dir}/run.json exists (best val CE {summary.get('best_val_loss')})")
    elif tune:
        from msprior.train.tune import tune as run_tune

        echo(f"[tune] sweep {sweep or 'configs/sweeps/default.yaml'} over {table}")
        result = run_tune(sweep=sweep, db_path=table, name=name, num_samples=num_samples,
                          gpus_per_trial=gpus_per_trial, tracking_uri=tracking_uri, storage_path=runs,
                          max_steps=max_steps, overrides=overrides)
        run_dir = result["run_dir"]
        summary = read_run_json(run_dir) or result
        echo(f"[tune] best trial {result.get('best_trial')} val CE {result.get('best_val_loss')}")
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

        # 4. register ----------------------------------------------------------------------------
        registered = register_once(local_model, registered_name, tracking_uri, table, preview_secs, echo)
    echo(f"[pipeline] finished in {time.monotonic() - t_all:.0f} s")
    return {"table": table, "run_dir": run_dir, "model": model_path, "registered": registered}


def register_once(ts_path: str, name: Optional[str], tracking_uri: Optional[str], table: str,
                  preview_secs: float, echo: Callable) -> Dict[str, Any]:
    """Register `ts_path` unless a version with the same sha256 is already in the registry."""
    from mlflow.tracking import MlflowClient

    from msprior.export.run import read_metadata, sha256_file
    from msprior.registry import model_name, register_export

    meta = read_metadata(ts_path)
    uri = tracking_uri or meta.get("tracking_uri")
    name = name or model_name(meta.get("run_name") or "prior")
    digest = sha256_file(ts_path)
    client = MlflowClient(tracking_uri=uri)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # no such registered model yet
        versions = []
    for v in versions:
        if v.tags.get("sha256") == digest:
            _skip(echo, "register", f"{name} version {v.version} already holds this model (sha256 {digest[:12]})")
            return {"name": name, "version": str(v.version), "champion": None, "sha256": digest,
                    "tracking_uri": uri}
    previews = []
    if preview_secs > 0:
        wav = _preview(ts_path, table, preview_secs, echo)
        previews = [wav] if wav else []
    info = register_export(ts_path, name=name, tracking_uri=uri, previews=previews)
    info["tracking_uri"] = uri
    echo(f"[register] {info['name']} version {info['version']}"
         + (" is the new champion" if info["champion"] else " (champion unchanged: not better)"))
    return info


def _preview(ts_path: str, table: str, seconds: float, echo: Callable) -> Optional[str]:
    """A WAV preview: generate `seconds` with the model, decode with the table's RAVE copy."""
    from msprior.export.preview import render_preview

    rave = storage.join(table, "rave.ts")
    local = os.path.splitext(ts_path)[0] + ".rave.ts"
    try:
        if storage.is_s3(rave):
            with open(local, "wb") as f:
                f.write(storage.read_bytes(rave))
            rave = local
        if not os.path.exists(rave):
            echo(f"[register] no preview: {rave} not found")
            return None
        wav = render_preview(ts_path, rave, os.path.splitext(ts_path)[0] + ".preview.wav", seconds=seconds)
    except Exception as e:  # a preview is a nicety: never fail the pipeline for it
        echo(f"[register] no preview: {type(e).__name__}: {e}")
        return None
    return wav
