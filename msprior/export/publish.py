"""After an export: measure int8's effect, render an audio preview, register the model in MLflow.

One function, `publish`, shared by `msprior export` and the pipeline. Registration is idempotent:
a file whose sha256 is already a version of the registered model is not registered twice (a
re-run of the pipeline must not add versions); a version without a sha256 tag (from an interrupted
registration) is never taken for a duplicate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from msprior import console, storage
from msprior.flags import flag
from msprior.redact import redact_uri, with_credentials

PREVIEW_SECS = 8.0  # seconds of generated audio logged with a registered version


@dataclass
class ExportRequest:
    """What `msprior export` is asked: one nn~ file from a run, then (by default) its registration."""

    run: str = flag(help="Run directory (local or s3://), MLflow run id, or a checkpoint dir/file.")
    out: Optional[str] = flag(None, "Output TorchScript file for nn~ (local). Default: RUN/<run name>.ts, as the "
                                    "original (an s3:// run: in its prefix).")
    checkpoint: str = flag("best", "best | last checkpoint of the run.")
    batch_size: int = flag(1, "Parallel streams (nn~ mc channels); any training batch size.")
    continuous: bool = flag(False, "Latents in/out (continuous RAVE); the manifest decides anyway.")
    quantize: Optional[str] = flag(None, "int8: dynamic int8 Linear weights (a realtime option).")
    name: Optional[str] = flag(None, "Registered model name (default msprior-<run name>).")
    register: bool = flag(True, "Register a version in MLflow.", names="--register/--no-register")
    tracking_uri: Optional[str] = flag(None, "MLflow tracking URI (default: the run's).")
    preview_secs: float = flag(PREVIEW_SECS, "Seconds of generated audio logged with the registered version (0: none).")
    ema_weights: Optional[bool] = flag(None, "The original's flag: the EMA weights if the run kept them (msprior's "
                                             "default too); --no-ema_weights: the raw weights.",
                                       names="--ema_weights/--no-ema_weights")
    temporal_ratio: Optional[int] = flag(None, "The original's flag (RAVE's samples per frame): read from the latent "
                                               "table here; a value given must agree with it.")
    vae_path: Optional[str] = flag(None, "The original's semantic VAE: not supported (one-line error naming the "
                                         "replacement).")


def export_and_publish(req: ExportRequest, echo: Callable[[str], Any] = print) -> Optional[Dict[str, Any]]:
    """`msprior export`: write the nn~ file; register it unless asked not to (registration's dict)."""
    import tempfile

    from msprior.export.run import ExportError, default_out, export_run, sha256_file

    if req.vae_path:
        raise ExportError(f"--vae_path {req.vae_path}: msprior has no semantic-VAE conditioning; its seq2seq "
                          "configs condition on audio features (encoder_decoder_continuous) or their k-means "
                          "tokens (encoder_decoder), computed by `msprior preprocess`")
    out = req.out or default_out(req.run, req.tracking_uri)
    where = storage.Location.of(out)
    with tempfile.TemporaryDirectory(prefix="msprior-export-") as tmp:
        local = where.local_path(tmp)  # the file itself, or a copy uploaded once written
        export_run(req.run, local, checkpoint=req.checkpoint, batch_size=req.batch_size,
                   continuous=True if req.continuous else None, quantize=req.quantize,
                   tracking_uri=req.tracking_uri, ema_weights=req.ema_weights,
                   temporal_ratio=req.temporal_ratio)
        where.upload_from(local)
        echo(f"exported {where} (sha256 {sha256_file(local)[:12]})")
        if not req.register:
            return None
        return publish(local, run=req.run, checkpoint=req.checkpoint, name=req.name, tracking_uri=req.tracking_uri,
                       preview_secs=req.preview_secs, measure_int8=req.quantize == "int8", echo=echo)


def publish(ts_path: str, *, run: Optional[str] = None, checkpoint: str = "best", name: Optional[str] = None,
            run_name: Optional[str] = None, tracking_uri: Optional[str] = None, preview_secs: float = PREVIEW_SECS,
            measure_int8: bool = False, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Register `ts_path` (with a WAV preview and, for int8 exports, the CE change) unless the
    registry already holds these exact bytes. `name` None: `msprior-<run_name or the export's run>`,
    suffixed with the corpus id when that name holds another corpus. Returns register_export's
    dict + "tracking_uri" (redacted: safe to print or write)."""
    from msprior.export.run import read_metadata, sha256_file
    from msprior import registry

    meta = read_metadata(ts_path)
    uri = tracking_uri or with_credentials(meta.get("tracking_uri"))
    digest = sha256_file(ts_path)
    c = registry.registry_client(uri)
    name = name or registry.default_name(c, run_name or meta.get("run_name") or "prior", registry.corpus_tags(meta))
    try:
        versions = registry.all_versions(c, name)
    except Exception:  # no such registered model yet
        versions = []
    for v in versions:
        if (v.tags or {}).get("sha256") == digest:
            # an earlier registration may have stopped before settling the alias: settle it now
            champion = registry.settle_champion(c, name)
            echo(f"[register] skipped: {name} version {v.version} already holds this model (sha256 {digest[:12]})")
            return {"name": name, "version": str(v.version), "champion": champion == str(v.version),
                    "champion_version": champion, "sha256": digest, "tracking_uri": redact_uri(uri)}

    with console.progress("register", 3, "steps") as bar:  # the stage's one progress display
        bar.update(0, note="int8 effect")
        tags = int8_effect_tags(run, checkpoint, tracking_uri, meta, echo) if (measure_int8 and run) else {}
        bar.update(1, note="audio preview")
        wav = preview(ts_path, meta.get("db_path"), preview_secs, echo) if preview_secs > 0 else None
        bar.update(2, note="registering")
        info = registry.register_export(ts_path, name=name, tracking_uri=uri, previews=[wav] if wav else [],
                                        extra_tags=tags)
        bar.update(3, note=f"version {info['version']}")
    info["tracking_uri"] = redact_uri(uri)
    echo(f"[register] {info['name']} version {info['version']}"
         + (" is the new champion" if info["champion"] else f" (champion stays version {info['champion_version']}: "
            "not better)"))
    return info


def int8_effect_tags(run: str, checkpoint: str, tracking_uri: Optional[str], meta: dict,
                     echo: Callable[[str], Any] = print) -> Dict[str, str]:
    """Validation cross-entropy fp32 vs int8 on the run's validation windows, as registry tags."""
    if not meta.get("db_path"):
        echo("int8 effect not measured: the run does not record its latent table (db_path)")
        return {}
    from msprior.export.evaluate import int8_effect
    from msprior.export.run import conditioning_of, load_trained

    loaded = load_trained(run, checkpoint, tracking_uri)
    try:
        effect = int8_effect(loaded.prior, loaded.config, meta["db_path"], trained=conditioning_of(loaded))
    except (ValueError, OSError) as e:  # unreachable / changed table: the export itself is fine
        echo(f"int8 effect not measured: {str(e).splitlines()[0]}")
        return {}
    echo(f"validation CE fp32 {effect['val_ce_fp32']:.4f} -> int8 {effect['val_ce_int8']:.4f} nats "
         f"({effect['val_ce_int8_delta']:+.4f})")
    return {k: f"{v:.6f}" for k, v in effect.items()}


def preview(ts_path: str, table: Optional[str], seconds: float, echo: Callable[[str], Any] = print) -> Optional[str]:
    """A WAV beside `ts_path`: `seconds` generated by the model, decoded by the table's RAVE copy."""
    from msprior.export.preview import render_preview

    if not table:
        echo("no preview: the run does not record its latent table (db_path)")
        return None
    where = storage.Location.of(table).join("rave.ts")
    try:
        if not where.exists():
            echo(f"no preview: {where} not found")
            return None
        with where.local_copy() as rave:  # the table's own copy, or a download of it
            wav = render_preview(ts_path, rave, os.path.splitext(ts_path)[0] + ".preview.wav", seconds=seconds)
    except Exception as e:  # a preview is a nicety: never fail a publish for it
        echo(f"no preview: {type(e).__name__}: {e}")
        return None
    echo(f"[register] audio preview {wav}")
    return wav
