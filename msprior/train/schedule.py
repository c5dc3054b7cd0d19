"""Learning-rate schedule: linear warm-up, then exponential decay (the original MSPrior's)."""

from __future__ import annotations

from functools import partial

import torch

from msprior.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, warmup_start: float, decay: float) -> float:
    """Multiplier of the peak lr at `step`: warmup_start -> 1 over warmup_steps, then decay**k."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    return decay ** (step - warmup_steps)


def make_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; `fused` (CUDA) updates every parameter in one kernel."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # A partial (not a lambda) keeps the scheduler's state dict free of code: weights_only loads it.
    fn = partial(lr_factor, warmup_steps=cfg.warmup_steps, warmup_start=cfg.warmup_start, decay=cfg.decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
