"""The outcome of a sweep: each trial's result from Tune (a trial ASHA stopped gets the run.json and
MLflow tag its own run never wrote), the best trial on the sweep's parent run, and sweep.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from msprior.redact import redact_text, redact_uri
from msprior.train.request import TrainError

if TYPE_CHECKING:
    from msprior.train.tune import SweepPlan


def summarise(p: SweepPlan, grid) -> Dict[str, Any]:
    """Best trial -> parent run params/tags, sweep.json; returns the sweep summary."""
    from mlflow.entities import Param

    from msprior import storage as st
    from msprior.checkpoint import read_run_json
    from msprior.train import tracking

    client, parent, name, uri = p.tracking["client"], p.parent_run_id, p.req.name, p.tracking["uri"]
    db_path = st.absolute(p.req.db_path)  # trials run in their own working directories
    trials = [trial_summary(r, name, p.storage_path, db_path, uri, client) for r in grid]
    ok = [t for t in trials if t["val_loss"] is not None]
    if not ok:
        client.set_terminated(parent, status="FAILED")
        first = next((t["error"] for t in trials if t["error"]), "none")
        last_line = [ln for ln in str(first).splitlines() if ln.strip()][-1:] or ["none"]
        raise TrainError(f"sweep {name}: no trial reported a validation; first error: {last_line[0].strip()}")
    best = min(ok, key=lambda t: t["val_loss"])
    run_dir = best["run_dir"]
    info = read_run_json(run_dir) or {}
    client.log_batch(parent, params=[Param(f"best.{k}", tracking.param_value(v)) for k, v in best["config"].items()])
    client.log_metric(parent, "best_val_loss", best["val_loss"])
    for q, ce in enumerate(best.get("val_ce_q") or []):  # the best trial's best validation, per quantizer
        client.log_metric(parent, f"best_val_ce_q{q}", ce)
    client.set_tag(parent, "msprior.best_trial", best["trial_id"])
    client.set_tag(parent, "msprior.best_run_dir", run_dir)
    if info.get("best_checkpoint"):
        client.set_tag(parent, "msprior.best_checkpoint", info["best_checkpoint"])
    if info.get("mlflow_run_id"):
        client.set_tag(parent, "msprior.best_run_id", info["mlflow_run_id"])
    summary = {"name": name, "best_trial": best["trial_id"], "best_config": best["config"],
               "best_val_loss": best["val_loss"], "best_checkpoint": info.get("best_checkpoint"),
               "best_run_dir": run_dir, "run_dir": run_dir, "best_run_id": info.get("mlflow_run_id"),
               "parent_run_id": parent, "tracking_uri": redact_uri(uri), "trials": trials}
    tracking.log_dict(client, parent, summary, "sweep.json")
    client.set_terminated(parent, status="FINISHED")
    return summary


def best_quantizer_ce(result) -> Optional[List[float]]:
    """Per-quantizer validation CE (`val_ce_q<i>`) of the trial's best validation, from its Tune results."""
    import re

    df = result.metrics_dataframe
    if df is None or "val_loss" not in df:
        return None
    cols = sorted((c for c in df.columns if re.fullmatch(r"val_ce_q\d+", c)), key=lambda c: int(c[len("val_ce_q"):]))
    rows = df.dropna(subset=["val_loss"])
    if rows.empty or not cols:
        return None
    best = rows.loc[rows["val_loss"].idxmin()]
    return [float(best[c]) for c in cols]


def trial_summary(result, sweep_name: str, runs_root: str, db_path: str, uri: str, client) -> Dict[str, Any]:
    """One trial's outcome from its Tune results; completes run.json / MLflow for stopped trials.

    A trial stopped by ASHA is killed mid-training: its own run.json and MLflow close never ran.
    Every Tune result carries the checkpoint path of that validation (TuneReportCallback), so the
    trial's best and last checkpoints are known here and the run stays exportable.
    """
    from msprior import storage as st
    from msprior.train import tracking
    from msprior.checkpoint import read_run_json, write_run_json

    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    out = {"trial_id": trial_id, "config": result.config, "error": redact_text(str(result.error)) if result.error else None,
           "val_loss": metrics.get("best_val_loss"), "val_ce_q": best_quantizer_ce(result), "step": metrics.get("step"),
           "start_step": metrics.get("start_step"), "run_dir": None}
    if not trial_id or out["val_loss"] is None:
        return out
    run_dir = out["run_dir"] = st.join(runs_root, f"{sweep_name}-{trial_id}")
    if read_run_json(run_dir) is not None:
        return out
    df = result.metrics_dataframe
    root = st.Location.of(runs_root)  # Tune reports checkpoint paths inside the runs' filesystem
    rows = df.dropna(subset=["val_loss", "checkpoint_path"]) if df is not None else None
    if rows is None or rows.empty:
        return out
    best_row = rows.loc[rows["val_loss"].idxmin()]
    run_id = tracking.find_run(client, sweep_name, run_dir)
    write_run_json(run_dir, {
        "name": f"{sweep_name}-{trial_id}", "best_checkpoint": root.at(best_row["checkpoint_path"]).url,
        "last_checkpoint": root.at(rows.iloc[-1]["checkpoint_path"]).url, "best_val_loss": float(rows["val_loss"].min()),
        "step": int(rows.iloc[-1]["step"]), "mlflow_run_id": run_id, "tracking_uri": redact_uri(uri), "db_path": db_path,
        "stopped_early_by": "ASHA"})
    if run_id:
        client.set_tag(run_id, "msprior.stopped_by", "ASHA")
    return out
