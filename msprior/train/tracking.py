"""MLflow tracking for training runs.

The driver creates the run (params, config and manifest artifacts) and closes it (loss-curve plot,
run.json, final status); inside the training function only rank 0 logs metrics, to that run id.
Default store: a local sqlite file `./mlflow.db` with artifacts in `./mlartifacts/` (no server);
`--tracking_uri` or MLFLOW_TRACKING_URI point elsewhere.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from msprior.tracking import client, default_tracking_uri, experiment_id  # noqa: F401 (re-export)

RUN_DIR_TAG = "msprior.run_dir"


def start_run(c, experiment: str, run_name: str, params: Dict[str, Any], tags: Dict[str, str],
              parent_run_id: Optional[str] = None) -> str:
    from mlflow.entities import Param

    tags = dict(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # how MLflow nests runs
    run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=tags)
    items = [Param(k, param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def find_run(c, experiment: str, run_dir: str, tag: str = RUN_DIR_TAG) -> Optional[str]:
    """The latest MLflow run of this run (or sweep) directory, to continue it on --resume."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{run_dir}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_metrics(c, run_id: str, metrics: Dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if items:
        c.log_batch(run_id, metrics=items)


def log_dict(c, run_id: str, data: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        if name.endswith((".yaml", ".yml")):
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2))
        c.log_artifact(run_id, str(path))


def log_loss_curve(c, run_id: str, keys: Iterable[str] = ("train_loss", "val_loss")) -> Optional[str]:
    """Plot the metric histories into `loss_curve.png` on the run; returns the artifact name."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for key in keys:
        hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], label=key, marker="." if len(hist) < 50 else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "loss_curve.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        c.log_artifact(run_id, str(path))
    return "loss_curve.png"


def end_run(c, run_id: str, status: str = "FINISHED") -> None:
    c.set_terminated(run_id, status=status)


def nested_runs(c, parent_run_id: str) -> List[Any]:
    run = c.get_run(parent_run_id)
    return c.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
