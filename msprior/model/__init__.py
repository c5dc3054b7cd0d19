"""The prior model: PyTorch only (no Ray, no MLflow, no storage)."""

from msprior.model.prior import DatasetFacts, Prior, alibi_mask, alibi_slopes, build_prior

__all__ = ["DatasetFacts", "Prior", "alibi_mask", "alibi_slopes", "build_prior"]
