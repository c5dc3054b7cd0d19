"""A small DEMO codec with RAVE's exported TorchScript interface (no pretrained RAVE can be fetched here).

It is a real, if crude, codec: each frame of `ratio` samples is described by its log energy in
`bands` mel-spaced bands (normalised to ~N(0, 1)), and decoded as noise filtered to those band
energies, so decoded token streams are audible (a whispered/noisy rendering of the spectral
envelope). Two variants, like RAVE:

* continuous: `encode` returns the normalised log band energies (`bands` latent channels);
* discrete: a residual vector quantiser (k-means codebooks fitted at build time on a seeded
  synthetic signal) turns the band-energy vector into `num_quantizers` codebook indices,
  returned as float32 like RAVE's discrete exports, with buffers
  `encoder.rvq.layers.N._codebook.embed` and an encoder class named `Discrete...`.

Everything is deterministic: building twice gives the same file contents' behaviour.
It is NOT a RAVE model; use a trained RAVE export for real work.
"""


from typing import List

import numpy as np
import torch
from torch import nn


# --- analysis / synthesis building blocks (TorchScript) ------------------------------------------


def mel_band_matrix(sr: int, n_fft: int, bands: int) -> np.ndarray:
    """[n_fft // 2 + 1, bands] 0/1 matrix assigning each FFT bin to one mel-spaced band."""
    n_bins = n_fft // 2 + 1
    freqs = np.arange(n_bins) * sr / n_fft
    mel = 2595.0 * np.log10(1.0 + freqs / 700.0)
    edges = np.linspace(0.0, mel[-1], bands + 1)
    idx = np.clip(np.searchsorted(edges, mel, side="right") - 1, 0, bands - 1)
    # every band needs at least one bin: walk the low bands up to one bin each
    for b in range(bands):
        if not np.any(idx == b):
            idx[min(n_bins - 1, int(np.argmax(idx >= b)) if np.any(idx >= b) else n_bins - 1)] = b
    m = np.zeros((n_bins, bands), dtype=np.float32)
    m[np.arange(n_bins), idx] = 1.0
    if (m.sum(0) == 0).any():
        raise ValueError(f"{bands} bands do not fit in {n_bins} FFT bins: use fewer bands or a larger ratio")
    return m


class BandAnalysis(nn.Module):
    """Audio [B, 1, N] -> normalised log band energies [B, bands, ceil(N / ratio)]."""

    def __init__(self, ratio: int, band_matrix: np.ndarray, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.ratio = ratio
        self.register_buffer("window", torch.hann_window(ratio, periodic=True))
        self.register_buffer("band_matrix", torch.from_numpy(band_matrix))
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))

    def log_energy(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[-1]
        t = (n + self.ratio - 1) // self.ratio
        x = torch.nn.functional.pad(x.reshape(b, n), (0, t * self.ratio - n))
        frames = x.reshape(b, t, self.ratio) * self.window
        power = torch.fft.rfft(frames).abs().pow(2)  # [B, T, bins]
        energy = power @ self.band_matrix  # [B, T, bands]
        return torch.log(energy + 1e-8).transpose(1, 2)  # [B, bands, T], natural log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_energy(x) - self.mean[:, None]) / self.std[:, None]


class NoiseBandSynthesis(nn.Module):
    """Normalised log band energies [B, bands, T] -> band-filtered noise [B, 1, T * ratio]."""

    def __init__(self, ratio: int, band_matrix: np.ndarray, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.ratio = ratio
        m = torch.from_numpy(band_matrix)
        window_power = float(torch.hann_window(ratio, periodic=True).pow(2).sum())
        # energy of band b spread evenly over its bins, as a per-bin power spectral density
        self.register_buffer("spread", (m / m.sum(0, keepdim=True)).t().contiguous() / window_power)
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t = z.shape[0], z.shape[2]
        energy = torch.exp(z * self.std[:, None] + self.mean[:, None]).transpose(1, 2)  # [B, T, bands]
        gain = torch.sqrt(energy @ self.spread)  # [B, T, bins]
        noise = torch.randn(b, t, self.ratio, device=z.device)
        y = torch.fft.irfft(torch.fft.rfft(noise) * gain, n=self.ratio)
        return y.reshape(b, 1, t * self.ratio)


class Codebook(nn.Module):
    def __init__(self, embed: np.ndarray):
        super().__init__()
        self.register_buffer("embed", torch.from_numpy(embed.astype(np.float32)))  # [K, D]


class VQLayer(nn.Module):
    def __init__(self, embed: np.ndarray):
        super().__init__()
        self._codebook = Codebook(embed)

    def quantize(self, r: torch.Tensor) -> torch.Tensor:
        """r [B, T, D] -> nearest codeword index [B, T]."""
        e = self._codebook.embed
        d = (r * r).sum(-1, keepdim=True) - 2.0 * r @ e.t() + (e * e).sum(-1)[None, None, :]
        return d.argmin(-1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self._codebook.embed[idx]


class ResidualVQ(nn.Module):
    def __init__(self, codebooks: List[np.ndarray]):
        super().__init__()
        self.layers = nn.ModuleList([VQLayer(c) for c in codebooks])

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, T] -> indices [B, Q, T] (greedy residual quantisation)."""
        r = z.transpose(1, 2)
        out: List[torch.Tensor] = []
        for layer in self.layers:
            idx = layer.quantize(r)
            r = r - layer.lookup(idx)
            out.append(idx)
        return torch.stack(out, 1)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """indices [B, Q, T] -> z [B, D, T]."""
        z = torch.zeros(idx.shape[0], idx.shape[2], 0, device=idx.device)
        q = 0
        for layer in self.layers:
            e = layer.lookup(idx[:, q])
            z = e if q == 0 else z + e
            q += 1
        return z.transpose(1, 2)


class DiscreteBandEncoder(nn.Module):
    """Band energies, then residual VQ; the class name says "Discrete" like RAVE's."""

    def __init__(self, analysis: BandAnalysis, codebooks: List[np.ndarray]):
        super().__init__()
        self.analysis = analysis
        self.rvq = ResidualVQ(codebooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rvq.encode(self.analysis(x)).float()


class BandEncoder(nn.Module):
    def __init__(self, analysis: BandAnalysis):
        super().__init__()
        self.analysis = analysis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.analysis(x)


class DiscreteDecoder(nn.Module):
    def __init__(self, codebooks: List[np.ndarray], synth: NoiseBandSynthesis):
        super().__init__()
        self.rvq = ResidualVQ(codebooks)
        self.synth = synth

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.synth(self.rvq.decode(idx.long()))


class ContinuousDecoder(nn.Module):
    def __init__(self, synth: NoiseBandSynthesis):
        super().__init__()
        self.synth = synth

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.synth(z)


class DemoCodec(nn.Module):
    """RAVE's exported interface: encode / decode / forward, `sr`, `<method>_params` buffers."""

    sr: int
    latent_size: int
    full_latent_size: int
    n_channels: int

    def __init__(self, sr: int, ratio: int, latent: int, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.sr = sr
        self.latent_size = latent
        self.full_latent_size = latent
        self.n_channels = 1
        self.encoder = encoder
        self.decoder = decoder
        # [in_ch, in_ratio, out_ch, out_ratio], as RAVE / nn~ define them
        self.register_buffer("encode_params", torch.tensor([1, 1, latent, ratio]))
        self.register_buffer("decode_params", torch.tensor([latent, ratio, 1, 1]))
        self.register_buffer("forward_params", torch.tensor([1, 1, 1, 1]))

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.jit.export
    def get_methods(self) -> List[str]:
        return ["forward", "encode", "decode"]

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return []


# --- building ----------------------------------------------------------------------------------


def training_signal(sr: int, seconds: float = 60.0, seed: int = 0) -> np.ndarray:
    """A seeded mix of harmonic tones, filtered noise and near-silence to fit stats/codebooks on."""
    rng = np.random.default_rng(seed)
    seg = int(0.5 * sr)
    t = np.arange(seg) / sr
    out = []
    for _ in range(int(seconds / 0.5)):
        kind = rng.integers(0, 4)
        amp = 10 ** rng.uniform(-3, 0)
        if kind == 0:  # harmonic tone
            f0 = 55 * 2 ** rng.uniform(0, 5)
            x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8) if f0 * k < sr / 2)
        elif kind == 1:  # coloured noise
            x = np.cumsum(rng.standard_normal(seg)) * rng.uniform(0, 0.1) + rng.standard_normal(seg)
            x = x - x.mean()
        elif kind == 2:  # chord of pure tones
            x = sum(np.sin(2 * np.pi * 110 * 2 ** (rng.integers(0, 36) / 12) * t) for _ in range(3))
        else:  # near silence
            x = rng.standard_normal(seg) * 1e-4
        x = np.asarray(x, dtype=np.float64)
        out.append(amp * x / (np.abs(x).max() + 1e-12))
    return np.concatenate(out).astype(np.float32)


def kmeans(x: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Plain Lloyd k-means (k-means++ init) -> centroids [k, D]; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    k = min(k, n)
    c = [x[rng.integers(n)]]
    d2 = ((x - c[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        c.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - c[-1]) ** 2).sum(1))
    c = np.stack(c)
    x2 = (x * x).sum(1, keepdims=True)
    for _ in range(iters):
        assign = (x2 - 2.0 * x @ c.T + (c * c).sum(1)[None]).argmin(1)  # squared distances, no [N, k, D]
        sums = np.stack([np.bincount(assign, weights=x[:, d], minlength=k) for d in range(x.shape[1])], 1)
        counts = np.bincount(assign, minlength=k)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c.astype(np.float32)


def build_codec(discrete: bool = False, sr: int = 44100, ratio: int = 1024, bands: int = 16,
                num_quantizers: int = 4, codebook_size: int = 64) -> torch.jit.ScriptModule:
    """Build the scripted demo codec. Continuous: `bands` latent channels; discrete: `num_quantizers`."""
    if ratio < 2 * bands:
        raise ValueError(f"ratio {ratio} is too small for {bands} bands")
    m = mel_band_matrix(sr, ratio, bands)
    sig = torch.from_numpy(training_signal(sr))[None, None]
    zero, one = np.zeros(bands, np.float32), np.ones(bands, np.float32)
    logE = BandAnalysis(ratio, m, zero, one).log_energy(sig)[0].t().numpy()  # [T, bands]
    mean, std = logE.mean(0), logE.std(0) + 1e-3
    analysis = BandAnalysis(ratio, m, mean, std)
    synth = NoiseBandSynthesis(ratio, m, mean, std)
    if discrete:
        z = ((logE - mean) / std).astype(np.float64)
        codebooks, r = [], z
        for q in range(num_quantizers):
            c = kmeans(r, codebook_size, seed=q)
            if len(c) < codebook_size:  # pad so every layer has exactly codebook_size entries
                c = np.concatenate([c, np.repeat(c[-1:], codebook_size - len(c), 0)])
            idx = (((r[:, None, :] - c[None]) ** 2).sum(-1)).argmin(1)
            r = r - c[idx]
            codebooks.append(c)
        model = DemoCodec(sr, ratio, num_quantizers, DiscreteBandEncoder(analysis, codebooks),
                          DiscreteDecoder(codebooks, synth))
    else:
        model = DemoCodec(sr, ratio, bands, BandEncoder(analysis), ContinuousDecoder(synth))
    return torch.jit.script(model.eval())


def save_codec(out: str, discrete: bool = False, **kw) -> str:
    """Build the demo codec and save it as TorchScript to `out` (atomically)."""
    import io

    from msprior import storage

    buf = io.BytesIO()
    torch.jit.save(build_codec(discrete=discrete, **kw), buf)
    storage.write_bytes(str(out), buf.getvalue())
    return str(out)
