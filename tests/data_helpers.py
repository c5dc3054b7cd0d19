"""Helpers for the data tests: RAVE-like exports of several shapes, a reference decode."""


from typing import List

import numpy as np
import torch
from torch import nn


class V1Export(nn.Module):
    """A RAVE v1-style export: `sampling_rate` buffer, no `sr`, no get_methods."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("sampling_rate", torch.tensor(int(inner.sr)))
        self.register_buffer("encode_params", inner.encode_params.clone())

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(z)


class CachedConv1d(nn.Module):
    """Named like cached_conv's streaming convolution: marks a streaming export."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pad", torch.zeros(1, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class StreamingExport(nn.Module):
    sr: int

    def __init__(self):
        super().__init__()
        self.sr = 44100
        self.conv = CachedConv1d()
        self.register_buffer("encode_params", torch.tensor([1, 1, 4, 1024]))

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, :, ::1024].repeat(1, 4, 1)


class NoEncode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @torch.jit.export
    def decode(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [x]


def reference_audio(path: str, sr: int) -> np.ndarray:
    """The audio preprocess should encode, computed here independently: soundfile, mean, soxr HQ."""
    import soundfile as sf
    import soxr

    x, file_sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if file_sr != sr:
        x = soxr.resample(x, file_sr, sr, quality="HQ")
    return x.astype(np.float32)
