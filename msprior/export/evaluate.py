"""Validation cross-entropy of an export variant on the run's own validation split.

Used to report what `--quantize int8` costs: the same validation windows (split by source file,
as in training) scored teacher-forced by the fp32 prior and by its int8 copy.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from msprior.conditioning import ConditioningSpec
from msprior.config import Config
from msprior.model import Prior


def validation_batches(config: Config, db_path: str, batches: int = 8, batch_size: int = 8, seed: int = 0,
                       trained: Optional[ConditioningSpec] = None):
    """`batches` fixed batches of validation windows (falls back to training files when the split
    holds no validation file, e.g. a one-file corpus). `trained`: the prior's conditioning, which
    the table's must match (one line naming the field that differs)."""
    from msprior.data import reader
    from msprior.data.windows import WindowSampler
    from msprior.model import DatasetFacts

    m = config.model
    table = reader.open_table(db_path, config.data.val_fraction, config.data.seed, m.conditioning)
    cond = table.cond
    if trained is not None:
        trained.check_compatible(cond, f"{db_path}: the prior's conditioning vs this table's",
                                 "score the export on the table it was trained on")
    arrow = reader.read_split(table, val=True)
    if arrow.num_rows == 0:
        arrow = reader.read_split(table, val=False)
    facts = DatasetFacts.from_manifest(table.manifest)
    frames = reader.frames_from_arrow(arrow, facts.num_quantizers, cond)
    sampler = WindowSampler(frames, m.seq_len, cond, seed=seed)
    return [{k: torch.from_numpy(v) for k, v in sampler.sample(batch_size).items()} for _ in range(batches)]


@torch.no_grad()
def cross_entropy(prior: Prior, batches) -> float:
    """Mean teacher-forced cross-entropy (nats) over the batches."""
    prior.eval()
    return float(sum(float(prior.loss(b)) for b in batches) / len(batches))


def int8_effect(prior: Prior, config: Config, db_path: str, batches: int = 8,
                trained: Optional[ConditioningSpec] = None) -> Optional[Dict[str, float]]:
    """{"val_ce_fp32", "val_ce_int8", "val_ce_int8_delta"} on the same validation windows."""
    from msprior.export.run import quantize_int8

    data = validation_batches(config, db_path, batches, trained=trained)
    fp32 = cross_entropy(prior, data)
    int8 = cross_entropy(quantize_int8(prior), data)
    return {"val_ce_fp32": fp32, "val_ce_int8": int8, "val_ce_int8_delta": int8 - fp32}
