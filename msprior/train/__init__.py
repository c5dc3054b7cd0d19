"""Training on Ray Train (`train`), sweeps on Ray Tune (`msprior.train.tune.tune`), MLflow tracking,
checkpoints (`load_run`). See docs/ARCHITECTURE.md for the checkpoint and run.json contracts."""

from msprior.checkpoint import RunNotFound, load_checkpoint, load_run
from msprior.train.run import TrainError, train

__all__ = ["train", "TrainError", "load_run", "load_checkpoint", "RunNotFound"]
