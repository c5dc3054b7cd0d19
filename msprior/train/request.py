"""What one training is asked to do: the flags of `msprior train` (`TrainRequest`), what a library
caller adds (`TrainContext`), and where runs live (`<--storage_path or MSPRIOR_STORAGE or ./runs>/<name>`).

No Ray, no torch: the CLI builds its options from these fields at every `msprior --help`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

from msprior import devices
from msprior.config import Config
from msprior.devices import CPU_HELP, GPU_HELP, Device
from msprior.errors import UserError
from msprior.flags import flag

DEFAULT_CPUS_PER_WORKER = 0.5  # per worker on GPUs and per sweep trial worker; a worker's torch threads: its CPUs
CONFIG_HELP = "Shipped config name (msprior/configs/*.yaml) or a YAML path."


class TrainError(UserError):
    """A training request that cannot run as asked; a one-line message for the user."""


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}")


def check_name(name: str, flag: str = "--name") -> str:
    """A run (or sweep) name is one folder under the storage path: no separators, no '..'."""
    if not name or not NAME_RE.fullmatch(name) or ".." in name:
        raise TrainError(f"{flag} {name!r}: use letters, digits and . _ - (one folder name, not starting "
                         "with '.' or containing '..' or '/')")
    return name


def runs_root(storage_path: Optional[str]) -> str:
    from msprior import storage

    return storage.absolute(storage_path or os.environ.get("MSPRIOR_STORAGE") or "runs")


def in_root(root: str, name: str) -> str:
    from msprior import storage

    return storage.join(root, name)


def run_folder(storage_path: Optional[str], name: str) -> str:
    """Where the run `name` lives: `<--storage_path or MSPRIOR_STORAGE or ./runs>/<name>`."""
    return in_root(runs_root(storage_path), name)


def has_checkpoints(run_dir: str) -> bool:
    from msprior import storage

    return any(n.startswith("checkpoint_") for n in storage.Location.of(run_dir).listdir())


@dataclass
class TrainContext:
    """What a library caller fills in for one training, never a flag of `msprior train`.

    `experiment` / `parent_run_id` / `tune_report` / `data` / `gpus_per_worker` are for sweeps
    (nested MLflow runs, Tune reports, the table opened once by the sweep driver, a trial's GPU
    share); `progress` off for sweeps and quiet callers; `fault_injection` = the fields of
    `msprior.train.inputs.Fault` (tests only).
    """

    progress: bool = True
    experiment: Optional[str] = None
    parent_run_id: Optional[str] = None
    tune_report: bool = False
    fault_injection: Optional[Dict[str, Any]] = None
    data: Any = None  # msprior.data.layout.TableData, already opened (a sweep's); else opened here
    gpus_per_worker: Optional[float] = None  # a sweep's share of its trial's GPUs; else 1 on a GPU


@dataclass
class TrainRequest:
    """One training as the user asks it: the flags of `msprior train` (the pipeline and sweeps set
    the same fields), plus `ctx`, what a library caller fills in (`TrainContext`)."""

    config: Union[str, Config, Dict] = flag("decoder_only", CONFIG_HELP, repeat=True)
    db_path: str = flag("", "Latent table (folder or s3:// prefix) from `msprior preprocess`.", required=True)
    name: str = flag("", "Run name: the run folder under --storage_path and the MLflow experiment.",
                     required=True)
    pretrained_embedding: Optional[str] = flag(None, "RAVE .ts: start from its codebooks (a continuous RAVE has "
                                                     "none: a warning, and training goes on without).")
    num_workers: int = flag(1, "Ray Train workers (DDP).")
    gpu: Optional[int] = flag(None, GPU_HELP)
    cpu: bool = flag(False, CPU_HELP)
    batch_size: Optional[int] = flag(None, "Windows per worker per step (global: x workers); default: config.")
    max_steps: Optional[int] = flag(None, "Training steps; default: config.")
    val_every: Optional[int] = flag(None, "Steps between validations (and checkpoints: train.checkpoint_every); "
                                          "default: config.")
    overrides: Sequence[str] = flag((), "section.key=value, repeatable.", names="--override")
    resume: bool = flag(False, "Continue the run NAME from its last checkpoint.")
    tracking_uri: Optional[str] = flag(None, "MLflow URI (default MLFLOW_TRACKING_URI or ./mlflow.db).")
    storage_path: Optional[str] = flag(None, "Where runs live (folder or s3://); default MSPRIOR_STORAGE or ./runs.")
    cpus_per_worker: Optional[float] = flag(None, "CPUs per worker, its torch threads (rounded); default: 0.5 on GPUs, "
                                                  "on the CPU the nodes' CPUs left after data reads, shared by the workers.")
    max_failures: int = flag(3, "Worker-group restarts (a worker or node lost) before the run fails.")
    worker_resources: Optional[str] = flag(None, devices.RESOURCES_HELP.format(what="Train worker"))
    # the original MSPrior's train flags, same meaning (train/original.py translates them)
    ckpt: Optional[str] = flag(None, "Resume from a checkpoint of run NAME (the original's flag; = --resume).")
    ema: Optional[float] = flag(None, "EMA decay of the weights (the original's flag; = --override train.ema=F).")
    val_size: Optional[int] = flag(None, "Validation chunks (the original's flag): files holding about this many "
                                         "chunks are held out; default: data.val_fraction of the files.")
    workers: Optional[int] = flag(None, "The original's data-loader processes: accepted, not needed (windows are "
                                        "drawn from memory); --num_workers sets the DDP workers.")
    ctx: TrainContext = field(default_factory=TrainContext)

    def wants_gpus(self) -> bool:
        """An explicit --gpu N (not the default choice, not the CPU)."""
        return devices.normalise(self.gpu, self.cpu) not in (None, devices.CPU)

    def gpus(self, device: Optional[Device]) -> float:
        """GPUs per worker on `device` (the choice of msprior.devices)."""
        on = device.gpu if device is not None else devices.normalise(self.gpu, self.cpu) not in (None, devices.CPU)
        share = self.ctx.gpus_per_worker
        return (share if share is not None else 1.0) if on else 0.0
