"""The MLflow connection every stage shares: which store, a client, an experiment by name.

Default store: a local sqlite file `./mlflow.db` with artifacts in `./mlartifacts/` (no server);
`--tracking_uri` or MLFLOW_TRACKING_URI point elsewhere. Training's logging (`msprior.train.tracking`)
and the registry (`msprior.registry`) both build on this module and on nothing of each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def default_tracking_uri(tracking_uri: Optional[str] = None) -> str:
    """The URI to use, absolute: workers run in other directories than the driver."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:  # a bare directory: MLflow's file store
        uri = str(Path(uri).resolve())
    return uri


def _artifact_root(uri: str) -> Optional[str]:
    """For a local sqlite store: `mlartifacts/` next to the db file (MLflow would use the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def client(tracking_uri: Optional[str] = None):
    from mlflow.tracking import MlflowClient

    from msprior.redact import hide_printed_credentials

    uri = default_tracking_uri(tracking_uri)
    hide_printed_credentials(uri)  # MLflow would print the URI, password included
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(c.tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except Exception:  # created concurrently (two sweep trials): read it back
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
