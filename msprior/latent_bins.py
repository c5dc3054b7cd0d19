"""Continuous RAVE latents <-> tokens: the ONE definition used by preprocessing and export.

A latent dimension is first standardised with a per-dimension affine fitted on the corpus
(`loc` = mean, `scale` = std: a trained RAVE's latents are only roughly N(0, 1), and after the
export's PCA each dimension has its own spread; random-weight models are far from it). The
standardised value z' is mapped to `resolution` equiprobable bins of the standard normal truncated
to the fitted range |z'| <= Z_MAX (4), and back through the inverse CDF. Every bin is then bounded, so
inside the range a round trip quantize -> dequantize stays within half a bin (in bin units);
a latent outside the range lands in an edge bin, and `out_of_range` lets the caller count it.

The same `resolution`, `loc` and `scale` (stored in the latent table's manifest) must be used on
both sides: the original MSPrior trained on 64 bins and exported with 1024, which silently scrambles
every token. Without `loc` / `scale` the latents are taken as already standard.

TorchScript-friendly (the nn~ export scripts `quantize` / `dequantize`): plain tensor ops only;
`loc` / `scale` broadcast against the latents (shape [C, 1] for [B, C, T], [C] for [B, T, C]).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

Z_MAX = 4.0  # the fitted range, in standard deviations: N(0, 1) puts 6e-5 of its mass outside


def _low(z_max: float) -> float:
    """Phi(-z_max): the standard normal mass below the range (TorchScript sees no module globals)."""
    return 0.5 * (1.0 + math.erf(-z_max / math.sqrt(2.0)))


def standardize(z: Tensor, loc: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """(z - loc) / scale in float32; the identity without loc / scale."""
    z = z.float()
    if loc is not None:
        z = z - loc.to(z.dtype)
    if scale is not None:
        z = z / scale.to(z.dtype)
    return z


def quantize(z: Tensor, resolution: int, loc: Optional[Tensor] = None, scale: Optional[Tensor] = None,
             z_max: float = 4.0) -> Tensor:
    """Latents z (float, any shape) -> int64 tokens in [0, resolution): floor(F(z') * resolution),
    F the standard normal CDF truncated to [-z_max, z_max] (clamped outside it)."""
    u = 0.5 * (1.0 + torch.erf(standardize(z, loc, scale) / math.sqrt(2.0)))  # normal CDF, in [0, 1]
    low = _low(z_max)
    u = (u - low) / (1.0 - 2.0 * low)
    return torch.floor(u * resolution).long().clamp(0, resolution - 1)


def dequantize(tokens: Tensor, resolution: int, noise: Optional[Tensor] = None, edge: float = 0.01,
               loc: Optional[Tensor] = None, scale: Optional[Tensor] = None, z_max: float = 4.0) -> Tensor:
    """Tokens -> float32 latents: loc + scale * F^-1 of a point inside the token's bin.

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
    low = _low(z_max)
    u = low + (1.0 - 2.0 * low) * (t.clamp(0, resolution - 1) + offset) / resolution  # inside (0, 1)
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    if scale is not None:
        z = z * scale.to(z.dtype)
    if loc is not None:
        z = z + loc.to(z.dtype)
    return z


def out_of_range(z: Tensor, loc: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                 z_max: float = 4.0) -> Tensor:
    """Bool mask of the latents outside the fitted range (they are clamped into an edge bin)."""
    return standardize(z, loc, scale).abs() > z_max


def fit(z: Tensor, min_scale: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """Per-dimension (loc, scale) [C] of latents z [N, C]: mean and standard deviation.

    A dimension that hardly moves keeps `min_scale`, so that standardising never divides by ~0.
    """
    z = z.double()
    return z.mean(0).float(), z.std(0, unbiased=False).clamp_min(min_scale).float()
