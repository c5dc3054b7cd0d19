"""Per-frame conditioning features, pluggable, and their k-means tokens.

A feature frame covers `hop` = condition_ratio x RAVE ratio samples (non-overlapping Hann
frames). Each extractor maps the frames' power spectra to [frames, size] floats. Register more
with `register(name, size_names, fn)`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

Extractor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (power [n, bins], freqs Hz [bins]) -> [n, d]
EXTRACTORS: Dict[str, Tuple[List[str], Extractor]] = {}
EPS = 1e-10


def register(name: str, names: Sequence[str], fn: Extractor) -> None:
    EXTRACTORS[name] = (list(names), fn)


def _loudness(power, freqs):  # dB of the frame's mean power (dBFS-like, -100 for silence)
    return 10.0 * np.log10(power.mean(1, keepdims=True) + EPS)


def _centroid(power, freqs):  # log2 of the spectral centroid in Hz (octaves are perceptually even)
    c = (power * freqs).sum(1, keepdims=True) / (power.sum(1, keepdims=True) + EPS)
    return np.log2(c + 1.0)


def _flatness(power, freqs):  # geometric / arithmetic mean of the power spectrum, 0 (tonal) .. 1 (noise)
    p = power + EPS
    return np.exp(np.log(p).mean(1, keepdims=True)) / p.mean(1, keepdims=True)


def _chroma(power, freqs):  # share of power per pitch class (C = 0), 27.5 Hz .. 5 kHz
    keep = (freqs >= 27.5) & (freqs <= 5000.0)
    pc = (np.round(12 * np.log2(freqs[keep] / 440.0)).astype(int) + 9) % 12
    m = np.zeros((keep.sum(), 12), dtype=np.float64)
    m[np.arange(len(pc)), pc] = 1.0
    c = power[:, keep] @ m
    return c / (c.sum(1, keepdims=True) + EPS)


register("loudness", ["loudness_db"], _loudness)
register("centroid", ["centroid_log2_hz"], _centroid)
register("flatness", ["flatness"], _flatness)
register("chroma", [f"chroma_{i}" for i in range(12)], _chroma)

DEFAULT_FEATURES = ("loudness", "centroid", "flatness", "chroma")


def feature_names(extractors: Sequence[str] = DEFAULT_FEATURES) -> List[str]:
    return [n for e in extractors for n in EXTRACTORS[e][0]]


def compute(audio: np.ndarray, sr: int, hop: int, frames: int,
            extractors: Sequence[str] = DEFAULT_FEATURES) -> np.ndarray:
    """Mono audio -> float32 [frames, F]; the audio is zero-padded (or cut) to frames x hop."""
    x = np.zeros(frames * hop, dtype=np.float64)
    n = min(len(audio), len(x))
    x[:n] = audio[:n]
    window = np.hanning(hop + 1)[:-1]
    spec = np.fft.rfft(x.reshape(frames, hop) * window, axis=1)
    power = (spec.real ** 2 + spec.imag ** 2) / (window ** 2).sum()
    freqs = np.fft.rfftfreq(hop, 1.0 / sr)
    return np.concatenate([EXTRACTORS[e][1](power, freqs) for e in extractors], 1).astype(np.float32)


def assign(features: np.ndarray, centroids: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest centroid per frame in standardised units -> int16 [frames]."""
    f = features / scale
    c = centroids / scale
    d = (f * f).sum(1, keepdims=True) - 2.0 * f @ c.T + (c * c).sum(1)[None]
    return d.argmin(1).astype(np.int16)


def fit_tokens(sample: np.ndarray, k: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """k-means on standardised features -> (centroids [k', F] in feature units, scale [F])."""
    from msprior.codec import kmeans

    scale = sample.std(0) + 1e-6
    rng = np.random.default_rng(seed)
    if len(sample) > 20000:  # enough for a few dozen centroids; keeps the fit to seconds
        sample = sample[rng.choice(len(sample), 20000, replace=False)]
    uniq = np.unique(sample / scale, axis=0)
    c = kmeans(uniq, min(k, len(uniq)), seed=seed)
    return (c * scale).astype(np.float32), scale.astype(np.float32)


def cond_frames(frames: int, ratio: int) -> int:
    return math.ceil(frames / ratio)
