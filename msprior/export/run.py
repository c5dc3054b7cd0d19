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

from msprior.config import Config
from msprior.storage import sha256_file  # noqa: F401  (re-exported for the CLI and registry)
from msprior.export.metadata import METADATA_FILE, read_metadata  # noqa: F401 (re-export)
from msprior.export.scripted import ScriptedPrior
from msprior.model import DatasetFacts, Int8SkipPredictor, Prior, build_prior, input_major_linears
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


def load_trained(run: str, checkpoint: str = "best", tracking_uri: Optional[str] = None) -> LoadedRun:
    """The prior of a run directory / MLflow run id (`checkpoint` = best | last), or of one
    checkpoint directory or checkpoint.pt file."""
    from msprior import checkpoint as ckpt

    if checkpoint not in ("best", "last"):
        raise ExportError(f"--checkpoint must be 'best' or 'last', got {checkpoint!r}")
    is_checkpoint = str(run).endswith(".pt") or os.path.isfile(os.path.join(str(run), ckpt.CHECKPOINT_FILE))
    try:
        state = ckpt.load_checkpoint(run) if is_checkpoint else ckpt.load_run(run, checkpoint, tracking_uri)
    except ckpt.RunNotFound as e:
        raise ExportError(str(e)) from None
    for key in ("model", "config", "manifest"):
        if key not in state:
            raise ExportError(f"{run}: checkpoint has no {key!r} entry; not an msprior checkpoint")
    config = Config.from_dict(state["config"], where=f"{run} (checkpoint config)")
    prior = build_prior(config.model, DatasetFacts.from_manifest(state["manifest"]))
    prior.load_state_dict(state["model"])
    return LoadedRun(prior.eval(), config, state["manifest"], state)


def quantize_int8(prior: Prior) -> Prior:
    """Dynamic int8 weights for the Linear layers (activations stay float), on a copy.

    `torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao, but its modules
    script and load in libtorch 2.5 (nn~ 1.6); torchao's tensor subclasses do not script. The
    predictor's output projection becomes Q Linear heads first (Int8SkipPredictor). The FiLM
    tables are precomputed in float first; `film` itself stays float (streaming reads its rows).
    """
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    prior = copy.deepcopy(prior).eval()
    prior.prepare_stream()
    prior.predictor = Int8SkipPredictor(prior.predictor)
    names = {name: default_dynamic_qconfig for name, m in prior.named_modules()
             if isinstance(m, nn.Linear) and name != "predictor.film"}
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
    facts = DatasetFacts.from_manifest(loaded.manifest)
    cond = loaded.config.model.conditioning
    cond_channels = {"none": 0, "tokens": 1, "features": facts.cond_features}[cond]

    prior = copy.deepcopy(loaded.prior).eval()
    if quantize == "int8":
        prior = quantize_int8(prior)
    else:
        input_major_linears(prior)  # batch-1 matrix-vector products read weights ~1.6x faster
    for p in prior.parameters():
        p.requires_grad_(False)
    module = ScriptedPrior(prior, ratio=int(rave["ratio"]), sr=int(rave["sr"]), batch_size=batch_size,
                           continuous=continuous, resolution=resolution, conditioning=cond,
                           cond_channels=cond_channels, cond_vocab=facts.cond_vocab,
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
    m.set_listen("false")  # a fresh export generates
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
        "step": loaded.state.get("step"),
        "val_loss": loaded.state.get("val_loss"),
        "best_val_loss": loaded.state.get("best_val_loss"),
        "mlflow_run_id": run.get("mlflow_run_id"),
        "tracking_uri": redact_uri(run.get("tracking_uri")),
        "db_path": run.get("db_path"),
        "rave_sha256": rave.get("sha256"),
        "rave_file": rave.get("original_name") or rave.get("file"),
        "sr": int(rave["sr"]),
        "ratio": int(rave["ratio"]),
        "num_quantizers": int(scripted.num_quantizers),
        "continuous": bool(scripted.continuous),
        "resolution": int(scripted.resolution),
        "conditioning": loaded.config.model.conditioning,
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


def export_run(run: str, out: str, checkpoint: str = "best", batch_size: int = 1,
               continuous: Optional[bool] = None, quantize: Optional[str] = None,
               tracking_uri: Optional[str] = None) -> str:
    """Export `run` (run directory, s3:// URI, MLflow run id, or a checkpoint) to `out`; returns the path."""
    loaded = load_trained(run, checkpoint, tracking_uri)
    scripted = build_scripted(loaded, batch_size=batch_size, continuous=continuous, quantize=quantize)
    return save_scripted(scripted, out, metadata(loaded, scripted, quantize, checkpoint))
