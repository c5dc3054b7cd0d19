"""The lr rule at W workers (msprior.train.schedule): the peak by optim.lr_scaling, the warm-up the
one-worker warm-up line extended to that peak (no step's lr rises faster than on one worker)."""

from __future__ import annotations

import math

import pytest
import torch

from msprior.config import OptimConfig
from msprior.train.schedule import make_optimizer, make_scheduler, warmup_for


def lrs(world: int, steps: int, max_steps: int = 10_000_000, **optim) -> list:
    cfg = OptimConfig(**{"lr": 1e-3, "warmup_steps": 100, "warmup_start": 0.01, "decay": 1.0, **optim})
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, world=world)
    sched = make_scheduler(opt, cfg, max_steps, world=world)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("world", [1, 8, 64])
def test_warmup_keeps_the_one_worker_slope_up_to_the_scaled_peak(world):
    one, w = lrs(1, 2000), lrs(world, 2000)
    peak = 1e-3 * math.sqrt(world)
    steps = warmup_for(100, None, math.sqrt(world), 0.01)
    assert steps == math.ceil(100 * (math.sqrt(world) - 0.01) / 0.99 - 1e-9)  # 100, 285, 808
    assert w[0] == pytest.approx(one[0])  # starts where one worker starts (warmup_start x optim.lr)
    slope1 = one[1] - one[0]
    rise = max(b - a for a, b in zip(w, w[1:]))
    assert slope1 * 0.99 < rise <= slope1 * (1 + 1e-9)  # never steeper than one worker's warm-up
    assert w[steps] == pytest.approx(peak) and max(w) == pytest.approx(peak)  # reaches the sqrt(W) peak
    assert w[steps - 1] < peak
    assert all(a <= b + 1e-15 for a, b in zip(w[:99], one[:99]))  # at or below one worker's warm-up


def test_cap_at_a_tenth_of_the_run_and_other_scalings():
    assert warmup_for(10_000, 200_000, 8.0, 0.01) == 20_000  # 80,707 capped at a tenth of the run
    assert warmup_for(10_000, None, 8.0, 0.01) == 80_708  # W = 64 by the sqrt rule
    assert warmup_for(10_000, 300) == 30 and warmup_for(10_000, None) == 10_000  # one worker: unchanged
    none = lrs(64, 300, lr_scaling="none")
    assert none == pytest.approx(lrs(1, 300))  # no scaling: the one-worker schedule
    lin = lrs(8, 1000, lr_scaling="linear")
    assert max(lin) == pytest.approx(8e-3) and lin.index(max(lin)) == warmup_for(100, None, 8.0, 0.01)
