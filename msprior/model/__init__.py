"""The prior model: PyTorch only (no Ray, no MLflow, no storage)."""

from msprior.model.prior import (DatasetFacts, InputMajorLinear, Prior, alibi_mask, alibi_slopes, build_prior,
                                 input_major_linears, int8_predictor)

__all__ = ["DatasetFacts", "InputMajorLinear", "Prior", "alibi_mask", "alibi_slopes", "build_prior",
           "input_major_linears", "int8_predictor"]
