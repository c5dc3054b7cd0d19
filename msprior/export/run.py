"""From a training run (or one checkpoint) to an nn~ TorchScript file.

Every fact about the data (RAVE ratio and rate, quantizers, vocabulary, continuous resolution,
conditioning) comes from the dataset manifest stored in the checkpoint: nothing the user could
get wrong is a flag. The export batch size is independent of the training batch size: streaming
caches are allocated here, never loaded from the checkpoint.
"""

from __future__ import annotations

from msprior.errors import UserError
import copy
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from msprior import storage
from msprior.conditioning import ConditioningSpec
from msprior.config import Config
from msprior.storage import sha256_file  # noqa: F401  (re-exported for the CLI and registry)
from msprior.export.metadata import METADATA_FILE, read_metadata  # noqa: F401 (re-export)
from msprior.export.scripted import ScriptedPrior
from msprior.model import DatasetFacts, Prior, build_prior, input_major_linears, int8_predictor
from msprior.redact import redact_uri

QUANTIZE_CHOICES = ("int8",)


class ExportError(UserError):
    """A run or an option that cannot be exported; a one-line message for the user."""


@dataclass
class LoadedRun:
    prior: Prior
    config: Config
    manifest: Dict[str, Any]
    state: Dict[str, Any]  # the checkpoint dict (with "run": run.json when loaded from a run)


def load_trained(run: str, checkpoint: str = "best", tracking_uri: Optional[str] = None,
                 ema_weights: Optional[bool] = None) -> LoadedRun:
    """The prior of a run directory / MLflow run id (`checkpoint` = best | last), or of one
    checkpoint directory or checkpoint.pt file. `ema_weights`: None = the EMA weights when the run
    kept them (the checkpoint's `model`), True = the same (the original's `--ema_weights`: "if
    available"), False = the raw weights (`raw_model`, the original's default)."""
    from msprior import checkpoint as ckpt

    try:
        state = ckpt.load_trained_state(run, checkpoint, tracking_uri)
    except ckpt.RunNotFound as e:
        raise ExportError(str(e)) from None
    raw = ema_weights is False and "raw_model" in state
    state["weights"] = "raw" if raw or "raw_model" not in state else "ema"
    config = Config.from_dict(state["config"], where=f"{run} (checkpoint config)")
    prior = build_prior(config.model, DatasetFacts.from_manifest(state["manifest"]))
    prior.load_state_dict(state["raw_model" if raw else "model"])
    return LoadedRun(prior.eval(), config, state["manifest"], state)


def default_out(run: str, tracking_uri: Optional[str] = None) -> str:
    """Where the original wrote an export: `RUN/<run name>.ts` (an s3:// run: in its prefix); a
    single checkpoint: `<checkpoint dir>/<its name>.ts`."""
    from msprior import checkpoint as ckpt

    if ckpt.is_checkpoint(run):
        folder = os.path.dirname(os.path.abspath(run)) if str(run).endswith(".pt") else os.path.abspath(run)
        return os.path.join(folder, os.path.basename(folder) + ".ts")
    try:
        run_dir = ckpt.resolve_run_dir(run, tracking_uri)
    except ckpt.RunNotFound as e:
        raise ExportError(str(e)) from None
    info = ckpt.read_run_json(run_dir) or {}
    name = info.get("name") or os.path.basename(str(run_dir).rstrip("/"))
    return storage.join(run_dir, f"{name}.ts")  # a local folder made absolute


def conditioning_of(loaded: LoadedRun) -> ConditioningSpec:
    """The prior's conditioning: its table's spec (the checkpoint's manifest) narrowed to the kind it reads."""
    return ConditioningSpec.from_manifest(loaded.manifest).use(loaded.config.model.conditioning,
                                                               "the run's checkpoint (manifest vs config)")


def check_temporal_ratio(loaded: LoadedRun, temporal_ratio: Optional[int]) -> None:
    """The original's `--temporal_ratio` (RAVE's samples per latent frame, default 1024): msprior reads
    it from the latent table; a value given must agree with it."""
    ratio = int(loaded.manifest["rave"]["ratio"])
    if temporal_ratio is not None and temporal_ratio != ratio:
        raise ExportError(f"--temporal_ratio {temporal_ratio}: this run's RAVE has {ratio} samples per latent frame "
                          "(manifest rave.ratio), which the export uses; leave --temporal_ratio out")


def quantize_int8(prior: Prior) -> Prior:
    """Dynamic int8 weights for the Linear layers (activations stay float), on a copy.

    `torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao, but its modules
    script and load in libtorch 2.5 (nn~ 1.6); torchao's tensor subclasses do not script. The
    predictor's per-quantizer matrices become Linear heads first (`int8_predictor`); the
    embedding rows the sampler gathers are precomputed in float first.
    """
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    prior = copy.deepcopy(prior).eval()
    prior.prepare_stream()
    prior.predictor = int8_predictor(prior.predictor)
    names = {name: default_dynamic_qconfig for name, m in prior.named_modules() if isinstance(m, nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of torch.ao.quantization
        return quantize_dynamic(prior, names, dtype=torch.qint8, inplace=True)


def build_scripted(loaded: LoadedRun, batch_size: int = 1, continuous: Optional[bool] = None,
                   quantize: Optional[str] = None) -> torch.jit.ScriptModule:
    """The scripted nn~ module, self-tested the way nn~ registers a method, with fresh state."""
    rave = loaded.manifest["rave"]
    data_continuous = bool(rave.get("continuous"))
    if continuous is None:
        continuous = data_continuous
    if continuous and not data_continuous:
        raise ExportError("--continuous: this run's latent table was made from a discrete RAVE "
                          "(manifest rave.continuous=false); export without --continuous")
    if batch_size < 1:
        raise ExportError(f"--batch_size must be >= 1, got {batch_size}")
    if quantize not in (None,) + QUANTIZE_CHOICES:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    resolution = int(rave.get("resolution") or rave["vocab_size"])
    if continuous and resolution != loaded.prior.vocab_size:
        raise ExportError(f"manifest rave.resolution={resolution} but the prior has {loaded.prior.vocab_size} "
                          "tokens per quantizer: the checkpoint and its manifest disagree")
    cond = conditioning_of(loaded)  # the nn~ conditioning inlets and attributes come from it

    prior = copy.deepcopy(loaded.prior).eval()
    if quantize == "int8":
        prior = quantize_int8(prior)
    else:
        prior.prepare_stream()  # the sampler's lookup tables, from the float weights (int8: done above)
        input_major_linears(prior)  # batch-1 matrix-vector products read weights ~1.6x faster
    for p in prior.parameters():
        p.requires_grad_(False)
    module = ScriptedPrior(prior, ratio=int(rave["ratio"]), sr=int(rave["sr"]), batch_size=batch_size,
                           continuous=continuous, resolution=resolution, cond=cond,
                           latent_loc=rave.get("latent_loc"), latent_scale=rave.get("latent_scale"))
    scripted = torch.jit.script(module.eval())
    _self_test(scripted, batch_size)
    return scripted


def _self_test(m: torch.jit.ScriptModule, batch_size: int, test_buffer: int = 8192) -> None:
    """What nn~'s `register_method` checks: B=1 and B=batch_size, exact output length, float."""
    in_ch, in_ratio, out_ch, out_ratio = [int(v) for v in m.forward_params]
    n = max(test_buffer, in_ratio)
    with torch.inference_mode():
        for listen in ("true", "false"):
            m.set_listen(listen)
            for b in sorted({1, batch_size}):
                y = m(torch.zeros(b, in_ch, n // in_ratio))
                if tuple(y.shape) != (b, out_ch, n // out_ratio) or y.dtype != torch.float32:
                    raise ExportError(f"self-test: forward returned {tuple(y.shape)} {y.dtype}, expected "
                                      f"{(b, out_ch, n // out_ratio)} float32")
        y = m.generate(torch.zeros(1, max(int(m.cond_channels), 1), n // in_ratio))
        if tuple(y.shape) != (1, int(m.num_quantizers), n // in_ratio):
            raise ExportError(f"self-test: generate returned {tuple(y.shape)}")
    m.set_listen("true")  # a fresh export listens, as the original's (initial_listen=True)
    m.reset_stream()


def metadata(loaded: LoadedRun, scripted: torch.jit.ScriptModule, quantize: Optional[str],
             checkpoint: str) -> Dict[str, Any]:
    rave = loaded.manifest["rave"]
    run = loaded.state.get("run") or {}
    return {
        "format_version": 1,
        "run_name": run.get("name") or loaded.config.name,
        "config_name": loaded.config.name,
        "checkpoint": checkpoint,
        "weights": loaded.state.get("weights", "ema"),
        "step": loaded.state.get("step"),
        "val_loss": loaded.state.get("val_loss"),
        "best_val_loss": loaded.state.get("best_val_loss"),
        "mlflow_run_id": run.get("mlflow_run_id"),
        "tracking_uri": redact_uri(run.get("tracking_uri")),
        "db_path": run.get("db_path"),
        # the committed content the prior was trained on (the table's manifest as training read it):
        # the registry's corpus, whatever the table at db_path holds by the time it registers
        "table_sha256": loaded.manifest.get("content_sha256"),
        "rave_sha256": rave.get("sha256"),
        "rave_file": rave.get("original_name") or rave.get("file"),
        "sr": int(rave["sr"]),
        "ratio": int(rave["ratio"]),
        "num_quantizers": int(scripted.num_quantizers),
        # the RAVE the table was encoded with: `msprior combine` refuses a RAVE that differs
        "rave": {k: rave.get(k) for k in ("sr", "ratio", "latent_size", "num_quantizers", "vocab_size",
                                          "continuous", "resolution", "version")},
        "continuous": bool(scripted.continuous),
        "resolution": int(scripted.resolution),
        "conditioning": loaded.config.model.conditioning,  # the kind, as export format 1 wrote it
        "conditioning_spec": conditioning_of(loaded).to_manifest(),  # ConditioningSpec.from_dict reads it
        "batch_size": int(scripted.batch_size),
        "quantize": quantize or "none",
        "torch_version": torch.__version__.split("+")[0],
        "config": loaded.config.to_dict(),
    }


def save_scripted(scripted: torch.jit.ScriptModule, out: str, meta: Dict[str, Any]) -> str:
    """Atomic write (temp name in the same directory, then rename)."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ts", dir=os.path.dirname(out))
    os.close(fd)
    try:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(meta, indent=1)})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def export_run(run: str, out: Optional[str] = None, checkpoint: str = "best", batch_size: int = 1,
               continuous: Optional[bool] = None, quantize: Optional[str] = None,
               tracking_uri: Optional[str] = None, ema_weights: Optional[bool] = None,
               temporal_ratio: Optional[int] = None) -> str:
    """Export `run` (run directory, s3:// URI, MLflow run id, or a checkpoint) to `out` (a local
    file; None: `default_out`, which is local for a local run); returns the path."""
    loaded = load_trained(run, checkpoint, tracking_uri, ema_weights)
    check_temporal_ratio(loaded, temporal_ratio)
    scripted = build_scripted(loaded, batch_size=batch_size, continuous=continuous, quantize=quantize)
    return save_scripted(scripted, out or default_out(run, tracking_uri), metadata(loaded, scripted, quantize, checkpoint))
