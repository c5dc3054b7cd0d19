"""The prior model: PyTorch only (no Ray, no MLflow, no storage)."""

from msprior.model.layers import alibi_mask, alibi_slopes
from msprior.model.predictor import InputMajorLinear, input_major_linears, int8_predictor
from msprior.model.prior import DatasetFacts, Prior, build_prior

__all__ = ["DatasetFacts", "InputMajorLinear", "Prior", "alibi_mask", "alibi_slopes", "build_prior",
           "input_major_linears", "int8_predictor"]
