"""Learning-rate schedule: linear warm-up, then exponential decay (the original MSPrior's).

The warm-up follows the run's length: `warmup_for(warmup_steps, max_steps)` is the configured
warm-up, capped at WARMUP_SHARE of the run. A long run (max_steps >= 10 x optim.warmup_steps) keeps
the original's schedule exactly; a short one (the demo, a smoke test, a sweep trial of a few hundred
steps) reaches its peak lr after a tenth of its steps instead of training at ~1% of it throughout.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from msprior.config import OptimConfig

WARMUP_SHARE = 0.1  # at most this fraction of max_steps is warm-up


def warmup_for(warmup_steps: int, max_steps: Optional[int]) -> int:
    """The warm-up a run of `max_steps` uses: min(warmup_steps, floor(0.1 x max_steps)).

    `max_steps` None: the configured warm-up (no run length known)."""
    if max_steps is None:
        return warmup_steps
    return max(0, min(warmup_steps, int(WARMUP_SHARE * max_steps)))


def lr_factor(step: int, warmup_steps: int, warmup_start: float, decay: float) -> float:
    """Multiplier of the peak lr at `step`: warmup_start -> 1 over warmup_steps, then decay**k."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    return decay ** (step - warmup_steps)


def make_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; `fused` (CUDA) updates every parameter in one kernel."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   max_steps: Optional[int] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a run of `max_steps` (warm-up from `warmup_for`; None: as configured).

    The factor is a function of the step alone, so a resume recomputes it from the resumed
    request's max_steps (lengthening a short run may put it back into a longer warm-up)."""
    # A partial (not a lambda) keeps the scheduler's state dict free of code: weights_only loads it.
    fn = partial(lr_factor, warmup_steps=warmup_for(cfg.warmup_steps, max_steps), warmup_start=cfg.warmup_start,
                 decay=cfg.decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
