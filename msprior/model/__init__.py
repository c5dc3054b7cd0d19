"""The prior model: PyTorch only (no Ray, no MLflow, no storage)."""

from msprior.model.prior import (DatasetFacts, InputMajorLinear, Int8SkipPredictor, Prior, alibi_mask, alibi_slopes,
                                 build_prior, input_major_linears)

__all__ = ["DatasetFacts", "InputMajorLinear", "Int8SkipPredictor", "Prior", "alibi_mask", "alibi_slopes", "build_prior",
           "input_major_linears"]
