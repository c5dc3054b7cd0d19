"""A synthetic audio corpus (melodies, chords, filtered noise) for tests and the demo.

`write_corpus(out_dir, ...)` writes seeded files at 22.05/44.1/48 kHz, mono and stereo, as wav
and flac; `write_bad_files(out_dir)` adds the inputs preprocess must skip and report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence

import numpy as np

KINDS = ("melody", "chord", "noise")


def _envelope(n: int, sr: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
    e = np.ones(n)
    a, r = min(n, int(attack * sr)), min(n, int(release * sr))
    e[:a] = np.linspace(0, 1, a)
    if r:
        e[n - r:] *= np.linspace(1, 0, r)
    return e


def melody(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Notes of a pentatonic scale with a few harmonics: repetitive enough for a prior to learn."""
    scale = np.array([0, 2, 4, 7, 9, 12, 14, 16])
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    out, n_total = [], int(seconds * sr)
    while sum(len(o) for o in out) < n_total:
        dur = rng.choice([0.125, 0.25, 0.25, 0.5])
        n = int(dur * sr)
        f0 = root * 2 ** (rng.choice(scale) / 12)
        t = np.arange(n) / sr
        x = sum(np.sin(2 * np.pi * f0 * k * t) * 0.6 ** k for k in range(1, 6) if f0 * k < sr / 2)
        out.append(x * _envelope(n, sr) * np.exp(-3 * t))
    return np.concatenate(out)[:n_total]


def chord(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A progression of triads, one per second."""
    out, n_total = [], int(seconds * sr)
    while sum(len(o) for o in out) < n_total:
        n = sr
        t = np.arange(n) / sr
        root = 220 * 2 ** (rng.integers(-5, 7) / 12)
        third = rng.choice([3, 4])
        x = sum(np.sin(2 * np.pi * root * 2 ** (s / 12) * t) for s in (0, third, 7))
        out.append(x * _envelope(n, sr, 0.05, 0.2))
    return np.concatenate(out)[:n_total]


def noise(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Bursts of noise, each low-passed by a different one-pole filter."""
    from scipy.signal import lfilter

    out, n_total = [], int(seconds * sr)
    while sum(len(o) for o in out) < n_total:
        n = int(rng.uniform(0.1, 0.6) * sr)
        a = rng.uniform(0.05, 0.99)
        x = lfilter([1 - a], [1, -a], rng.standard_normal(n)) * _envelope(n, sr, 0.005, 0.05)
        out.append(x / (np.abs(x).max() + 1e-9))
    return np.concatenate(out)[:n_total]


GENERATORS = {"melody": melody, "chord": chord, "noise": noise}


def write_corpus(out_dir: str, n_files: int = 6, seconds: float = 10.0, seed: int = 0,
                 sample_rates: Sequence[int] = (22050, 44100, 48000), kinds: Sequence[str] = KINDS,
                 formats: Sequence[str] = ("wav", "flac")) -> List[str]:
    """Write `n_files` seeded files (kinds, rates, mono/stereo and formats cycle); return their paths."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    paths = []
    for i in range(n_files):
        kind = kinds[i % len(kinds)]
        sr = sample_rates[i % len(sample_rates)]
        channels = 2 if i % 2 else 1
        fmt = formats[i % len(formats)]
        x = np.stack([GENERATORS[kind](seconds, sr, rng) for _ in range(channels)], 1)
        x = 0.5 * x / (np.abs(x).max() + 1e-9)
        sub = out / kind
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"{kind}_{i:03d}_{sr}_{'stereo' if channels == 2 else 'mono'}.{fmt}"
        sf.write(str(p), x.astype(np.float32), sr, subtype="PCM_16")
        paths.append(str(p))
    return paths


def write_bad_files(out_dir: str, sr: int = 44100) -> dict:
    """Inputs preprocess must skip and report: {file name: what is wrong with it}."""
    import soundfile as sf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    (out / "empty.wav").write_bytes(b"")
    (out / "notes.wav").write_text("this is text, not audio\n" * 20)
    (out / "garbage.flac").write_bytes(rng.bytes(5000))
    # a real wav header followed by random bytes that claim a bad format chunk
    good = out / "tmp_full.wav"
    sf.write(str(good), (0.3 * rng.standard_normal(sr)).astype(np.float32), sr)
    data = good.read_bytes()
    (out / "corrupt.wav").write_bytes(data[:12] + rng.bytes(len(data) - 12))
    os.unlink(good)
    # under one RAVE frame: skipped even where short files are padded (preprocess --short pad)
    sf.write(str(out / "tiny.wav"), (0.3 * rng.standard_normal(sr // 100)).astype(np.float32), sr)
    sf.write(str(out / "silent.wav"), np.zeros(sr * 2, np.float32), sr)
    (out / "README.txt").write_text("not audio, ignored\n")
    return {"empty.wav": "empty", "notes.wav": "decode", "garbage.flac": "decode",
            "corrupt.wav": "decode", "tiny.wav": "too short", "silent.wav": "silent",
            "README.txt": "ignored"}
