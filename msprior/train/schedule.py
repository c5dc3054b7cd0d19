"""Learning-rate schedule: linear warm-up, then exponential decay (the original MSPrior's).

The warm-up follows the run's length: `warmup_for(warmup_steps, max_steps)` is the configured
warm-up, capped at WARMUP_SHARE of the run. A long run (max_steps >= 10 x optim.warmup_steps) keeps
the original's schedule exactly; a short one (the demo, a smoke test, a sweep trial of a few hundred
steps) reaches its peak lr after a tenth of its steps instead of training at ~1% of it throughout.

The warm-up follows the number of workers W too (`warmup_for(..., scale=peak / optim.lr)`): the peak
is `optim.lr x sqrt(W)` (msprior.config.scaled_lr), and the warm-up is the one-worker warm-up line
extended to that peak. It starts where one worker starts (`warmup_start x optim.lr`) and rises by
the same lr per step, so it lasts `warmup_steps x (scale - warmup_start) / (1 - warmup_start)` steps
(10,000 -> 80,708 at W = 64 by the sqrt rule): no step's lr rises faster than on one worker, where
`optim.lr` and `warmup_steps` were tuned. AdamW's update is ~lr whatever the batch, so the per-step
slope, not the data seen, is what the tuned warm-up bounds. The lr reaches `optim.lr` at the
one-worker warm-up's end, then climbs to the scaled peak: Goyal et al.'s gradual warm-up (from the
one-worker lr to k x lr), counted in steps. The cap at a tenth of the run still applies.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch

from msprior.config import OptimConfig, scaled_lr

WARMUP_SHARE = 0.1  # at most this fraction of max_steps is warm-up


def warmup_for(warmup_steps: int, max_steps: Optional[int], scale: float = 1.0, start: float = 0.01) -> int:
    """The warm-up (steps) of a run of `max_steps` whose peak is `scale` x the one-worker lr.

    The one-worker line (`start` -> 1 over `warmup_steps`) extended to `scale`, then capped at
    floor(0.1 x max_steps); `max_steps` None: no cap (no run length known)."""
    steps = warmup_steps
    if scale > 1.0 and start < 1.0:  # the same slope per step, up to the scaled peak
        steps = math.ceil(warmup_steps * (scale - start) / (1.0 - start) - 1e-9)  # up: never steeper
    if max_steps is None:
        return steps
    return max(0, min(steps, int(WARMUP_SHARE * max_steps)))


def lr_factor(step: int, warmup_steps: int, warmup_start: float, decay: float) -> float:
    """Multiplier of the peak lr at `step`: warmup_start -> 1 over warmup_steps, then decay**k."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    return decay ** (step - warmup_steps)


def make_optimizer(params, cfg: OptimConfig, fused: bool = False, world: int = 1) -> torch.optim.Optimizer:
    """AdamW at the peak lr of `world` workers (`scaled_lr`); `fused` (CUDA) updates every parameter in one kernel."""
    return torch.optim.AdamW(params, lr=scaled_lr(cfg, world), betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   max_steps: Optional[int] = None, world: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a run of `max_steps` on `world` workers (warm-up from `warmup_for`).

    `cfg` is the config as written (the one-worker lr); the optimizer holds the scaled peak
    (`make_optimizer(..., world=world)`). The factor is a function of the step alone, so a resume
    recomputes it from the resumed request's max_steps and workers (lengthening a short run may
    put it back into a longer warm-up)."""
    scale = scaled_lr(cfg, world) / cfg.lr
    # A partial (not a lambda) keeps the scheduler's state dict free of code: weights_only loads it.
    fn = partial(lr_factor, warmup_steps=warmup_for(cfg.warmup_steps, max_steps, scale, cfg.warmup_start),
                 warmup_start=cfg.warmup_start / scale, decay=cfg.decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
