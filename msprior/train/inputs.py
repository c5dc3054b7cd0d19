"""`LoopInputs`: everything a Ray Train worker is given, typed, built once by the driver.

`msprior.train.run.make_trainer` fills it from the resolved plan and hands it to every worker as
`train_loop_config`; `msprior.train.loop.Worker` reads nothing else. The data travels as the table's
index and read spec (each rank decodes its files into the node cache); the rest is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from msprior.config import Config


@dataclass(frozen=True)
class Fault:
    """A test's injected failure (tests only; docs/RELIABILITY.md): once (the `marker` file says it
    happened) on `rank` at `step`.

    `point`: "step" (after the optimizer step) or "upload" (inside the checkpoint upload of
    `step`, after part of the checkpoint is written). `kill`: SIGKILL the worker process (as an OOM
    kill or a lost node) instead of raising; `delay_s` first (Ray Train collects reports every few
    seconds: a checkpoint reported just before a death can be lost). `remove`: a folder (e.g. the
    latent table) deleted first, so the restarted workers must go on from the object store alone.
    """

    rank: int
    step: int
    marker: str
    point: str = "step"
    kill: bool = False
    delay_s: float = 0.0
    remove: Optional[str] = None

    def fire(self, rank: int, step: int, point: str = "step") -> None:
        """Fail here if this is the named rank, step and point and it has not failed yet."""
        import os
        import shutil

        if (rank, step, point) != (self.rank, self.step, self.point) or os.path.exists(self.marker):
            return
        open(self.marker, "w").close()
        if self.remove:
            shutil.rmtree(self.remove)
        if self.kill:
            import signal
            import time

            time.sleep(self.delay_s)
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {rank} at step {step} ({point}; test hook)")


@dataclass(frozen=True)
class LoopInputs:
    """One training's inputs for `train_loop_per_worker`.

    The device's own choices (bf16 autocast, gradient compression under `auto`) are made by the
    worker from the device Ray Train gives it, not here.
    """

    config: Config  # resolved (overrides and flags applied)
    manifest: Dict[str, Any]  # the latent table's manifest.json
    train_data: Any  # msprior.data.layout.TableData (for_workers): each rank reads its files via the node cache
    val_batches: Any  # ObjectRef of the fixed validation batches, drawn once by the driver
    tracking_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None  # rank 0 logs to this run; None: no MLflow logging
    codebooks: Any = None  # [Q, V, d] float tensor of a discrete RAVE (--pretrained_embedding), or None
    progress: Any = None  # ray.util.queue.Queue owned by the driver (rank 0's progress lines), or None
    mps: bool = False  # msprior.devices chose Apple's MPS (one worker); else Ray Train places the worker
    fault: Optional[Fault] = None
    run_lease: Optional[Dict[str, Any]] = None  # msprior.train.run_lease.identity: rank 0 fences each checkpoint
