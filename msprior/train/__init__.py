"""Training on Ray Train (`train`), sweeps on Ray Tune (`msprior.train.tune.tune`), MLflow tracking,
checkpoints (`load_run`). See docs/ARCHITECTURE.md for the checkpoint and run.json contracts.

Names are imported on first use: the CLI reads the request types (`train.run.TrainRequest`) to
build its flags without paying for torch at every `msprior --help`.
"""

from importlib import import_module

_WHERE = {"train": "msprior.train.run", "TrainError": "msprior.train.request", "load_run": "msprior.checkpoint",
          "load_checkpoint": "msprior.checkpoint", "RunNotFound": "msprior.checkpoint"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'msprior.train' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
