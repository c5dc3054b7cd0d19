"""Continuous RAVE latents <-> tokens: the ONE definition used by preprocessing and export.

Each latent dimension of a variational RAVE is ~N(0, 1); it is mapped to `resolution` equiprobable
bins through the standard normal CDF, and back through the inverse CDF. The same `resolution`
(stored in the latent table's manifest) must be used on both sides: the original MSPrior trained on
64 bins and exported with 1024, which silently scrambles every token.

TorchScript-friendly (the nn~ export scripts `quantize` / `dequantize`): plain tensor ops only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def quantize(z: Tensor, resolution: int) -> Tensor:
    """Latents z (float, any shape) -> int64 tokens in [0, resolution): floor(Phi(z) * resolution)."""
    u = 0.5 * (1.0 + torch.erf(z.float() / math.sqrt(2.0)))  # standard normal CDF, in [0, 1]
    return torch.floor(u * resolution).long().clamp(0, resolution - 1)


def dequantize(tokens: Tensor, resolution: int, noise: Optional[Tensor] = None, edge: float = 0.01) -> Tensor:
    """Tokens -> float32 latents: Phi^-1 of a point inside the token's bin.

    `noise` (same shape as tokens, uniform in [0, 1)) dithers the point inside the bin, as the
    original MSPrior's export does; None takes the bin's centre (deterministic). Dithered points stay
    `edge` (a fraction of a bin) away from the bin's edges, so that quantize(dequantize(t)) == t
    despite float32 rounding in erf / erfinv.
    """
    t = tokens.float()
    if noise is None:
        offset = torch.full_like(t, 0.5)
    else:
        offset = edge + (1.0 - 2.0 * edge) * noise.to(t.dtype)
    u = (t.clamp(0, resolution - 1) + offset) / resolution  # strictly inside (0, 1)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
