"""Checkpoints and finished runs (docs/ARCHITECTURE.md, "Checkpoints and runs").

A checkpoint directory holds `checkpoint.pt`: plain containers of tensors, numbers and strings, so
`torch.load(path, weights_only=True)` reads it (no pickled code). `load_run` finds the best or last
checkpoint of a finished run from its directory (local or s3://) or its MLflow run id.
"""

from __future__ import annotations

from msprior.errors import UserError
import io
import json
import os
from typing import Any, Dict, Optional

import torch

CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"
REQUEST_FILE = "request.json"  # what a run was started with: a --resume must match it


class RunNotFound(UserError):
    """No usable run at the given directory / id; a one-line message for the user."""


def save_checkpoint(directory: str, state: Dict[str, Any]) -> str:
    """Write `state` to `<directory>/checkpoint.pt` atomically (temp name, then rename)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_FILE)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _fs(uri: str):
    from msprior import storage

    return storage.filesystem(uri)


def load_checkpoint(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Load a checkpoint file, or the checkpoint.pt inside a checkpoint directory (local or s3://)."""
    fs, p = _fs(path)
    if fs.isdir(p):
        p = p.rstrip("/") + "/" + CHECKPOINT_FILE
    if not fs.exists(p):
        raise RunNotFound(f"{path}: no {CHECKPOINT_FILE} here")
    with fs.open(p, "rb") as f:
        data = io.BytesIO(f.read())
    return _upgrade(torch.load(data, map_location=map_location, weights_only=True))


def _upgrade(state: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint of msprior 0.1 (before `model.predictor` existed) names the predictor it was
    trained with, so it loads and exports as it was trained: the shared linear FiLM."""
    model_cfg = (state.get("config") or {}).get("model")
    if isinstance(model_cfg, dict) and "predictor" not in model_cfg and "predictor.film.weight" in state.get("model", {}):
        model_cfg["predictor"] = "linear_film"
    return state


def _write_json(run_dir: str, name: str, info: Dict[str, Any]) -> str:
    fs, p = _fs(run_dir)
    fs.makedirs(p, exist_ok=True)
    path = p.rstrip("/") + "/" + name
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    fs.mv(tmp, path)
    return path


def _read_json(run_dir: str, name: str) -> Optional[Dict[str, Any]]:
    fs, p = _fs(run_dir)
    path = p.rstrip("/") + "/" + name
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_run_json(run_dir: str, info: Dict[str, Any]) -> str:
    return _write_json(run_dir, RUN_FILE, info)


def read_run_json(run_dir: str) -> Optional[Dict[str, Any]]:
    return _read_json(run_dir, RUN_FILE)


def write_run_request(run_dir: str, record: Dict[str, Any]) -> str:
    """`<run>/request.json`: {"config", "table": {rave_sha256, sources, chunks, frames}, "db_path"}."""
    return _write_json(run_dir, REQUEST_FILE, record)


def read_run_request(run_dir: str) -> Optional[Dict[str, Any]]:
    return _read_json(run_dir, REQUEST_FILE)


def resolve_run_dir(run_dir_or_mlflow_id: str, tracking_uri: Optional[str] = None) -> str:
    """A run directory, from itself or from an MLflow run id (tag `msprior.run_dir`)."""
    from msprior import storage

    ref = str(run_dir_or_mlflow_id)
    if ref and storage.Location.of(ref).exists():  # a folder or an s3:// prefix holding the run
        return ref
    if len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):  # MLflow run ids: 32 hex digits
        from msprior.tracking import client

        try:
            run = client(tracking_uri).get_run(ref)
        except Exception as e:  # MlflowException: unknown id / unreachable store
            raise RunNotFound(f"MLflow run {ref}: not found ({str(e).splitlines()[0]})") from None
        run_dir = run.data.tags.get("msprior.run_dir")
        if not run_dir:
            raise RunNotFound(f"MLflow run {ref} has no msprior.run_dir tag: not an msprior training run")
        return run_dir
    raise RunNotFound(f"{ref}: neither a run directory nor an MLflow run id")


def is_checkpoint(run: str) -> bool:
    """One checkpoint (a `checkpoint.pt` file or a folder holding one), not a run folder or run id."""
    return str(run).endswith(".pt") or os.path.isfile(os.path.join(str(run), CHECKPOINT_FILE))


def load_trained_state(run: str, which: str = "best", tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    """The checkpoint dict of what a user names as a trained prior: a run folder (or s3://) or MLflow
    run id (`which` = best | last), a checkpoint folder or a checkpoint.pt; RunNotFound in one line."""
    if which not in ("best", "last"):
        raise RunNotFound(f"--checkpoint must be 'best' or 'last', got {which!r}")
    state = load_checkpoint(run) if is_checkpoint(run) else load_run(run, which, tracking_uri)
    missing = [k for k in ("model", "config", "manifest") if k not in state]
    if missing:
        raise RunNotFound(f"{run}: the checkpoint has no {missing[0]!r} entry; not an msprior checkpoint")
    return state


def load_run(run_dir_or_mlflow_id: str, which: str = "best", tracking_uri: Optional[str] = None,
             map_location: str = "cpu") -> Dict[str, Any]:
    """The `best` (default) or `last` checkpoint dict of a finished run, plus `run` (its run.json)."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    run_dir = resolve_run_dir(run_dir_or_mlflow_id, tracking_uri)
    info = read_run_json(run_dir)
    if info is None:
        raise RunNotFound(f"{run_dir}: no {RUN_FILE}; the run has not finished (or this is not a run directory)")
    path = info.get(f"{which}_checkpoint") or info.get("last_checkpoint")
    if not path:
        raise RunNotFound(f"{run_dir}/{RUN_FILE}: no checkpoint recorded; train longer than train.val_every")
    state = load_checkpoint(path, map_location=map_location)
    state["run"] = info
    return state
