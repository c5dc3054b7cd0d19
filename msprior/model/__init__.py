"""The prior model: PyTorch only (no Ray, no MLflow, no storage)."""

from msprior.model.prior import DatasetFacts, Int8SkipPredictor, Prior, alibi_mask, alibi_slopes, build_prior

__all__ = ["DatasetFacts", "Int8SkipPredictor", "Prior", "alibi_mask", "alibi_slopes", "build_prior"]
