"""The MLflow connection every stage shares: which store, a client, an experiment by name.

Default store: a local sqlite file `./mlflow.db` with artifacts in `./mlartifacts/` (no server);
`--tracking_uri` or MLFLOW_TRACKING_URI point elsewhere. Training's logging (`msprior.train.tracking`)
and the registry (`msprior.registry`) both build on this module and on nothing of each other.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


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


@contextmanager
def active(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.start_run`, `log_model`) pointed at `uri` for this block only.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ (credentials included)
    for every later subprocess of this process; the block's end puts the globals and the environment
    back as they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    before = {k: os.environ.get(k) for k in _URI_ENV}
    # the raw globals (None when never set), not get_*_uri(): those resolve a default we must not pin
    old_tracking, old_registry = tracking_state._tracking_uri, registry_state._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


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
