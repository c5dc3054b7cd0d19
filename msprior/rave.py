"""Load and inspect a RAVE model exported as TorchScript, and map its latents to tokens.

Facts read off RAVE's own exports (acids-rave 2.3, tests/fixtures/rave): `encode(x [B, 1, N]) ->
[B, C, ceil(N / ratio)]`, an `sr` attribute (v2; RAVE 1's exporter stored a `sampling_rate` buffer),
`encode_params = [in_ch, in_ratio, out_ch, out_ratio]`. Discrete (RVQ) exports return codebook
indices as floats, one channel per quantizer, and hold `encoder.rvq.layers.N._codebook.embed`.
Continuous (variational) exports SAMPLE their latent inside `encode` (mean + std * noise, then the
PCA kept at export): msprior seeds that noise per item, and quantises the latents into `resolution`
bins after a per-dimension affine fitted on the corpus (msprior.latent_bins).
"""

from __future__ import annotations

from msprior.errors import UserError
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch


class RaveError(UserError):
    """A file that is not a usable RAVE export; the message is one line naming the file."""


# continuous latents <-> tokens: the one definition shared with export (same resolution at both ends)
from msprior import latent_bins as bins  # noqa: E402
from msprior.latent_bins import dequantize as dequantize_normal  # noqa: E402,F401 (re-export)
from msprior.latent_bins import quantize as quantize_normal  # noqa: E402,F401 (re-export)
from msprior.storage import sha256_file  # noqa: E402,F401 (re-export)


# --- loading ---------------------------------------------------------------------------------------


def _describe_non_torchscript(path: str, name: str) -> str:
    """What a file that torch.jit.load refused actually is, for a one-line error."""
    p = Path(path)
    if p.stat().st_size == 0:
        return f"{name}: empty file; expected a RAVE model exported as TorchScript (.ts)"
    if zipfile.is_zipfile(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        if isinstance(obj, dict):
            return (f"{name}: a plain PyTorch state dict / checkpoint ({len(obj)} keys), not a TorchScript "
                    "export; export it with RAVE's `rave export` and pass the .ts file")
        return (f"{name}: a torch.save() archive, not TorchScript; export the model with RAVE's "
                "`rave export` and pass the .ts file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return f"{name}: a Python pickle (old torch.save), not TorchScript; expected a RAVE .ts export"
    return f"{name}: not a TorchScript file; expected a RAVE model exported as TorchScript (.ts)"


@dataclass
class Rave:
    """A loaded RAVE export and the facts msprior needs from it."""

    module: torch.jit.ScriptModule
    path: str
    sr: int
    ratio: int  # audio samples per latent frame
    latent_size: int  # channels `encode` returns (= quantizers for discrete models)
    discrete: bool
    codebook_size: Optional[int]  # discrete only
    version: str  # "v2" (`sr` attribute) or "v1" (`sampling_rate` buffer)

    @property
    def num_quantizers(self) -> int:
        return self.latent_size

    def vocab_size(self, resolution: int) -> int:
        return int(self.codebook_size) if self.discrete else int(resolution)

    def to(self, device: str) -> "Rave":
        self.module = self.module.to(device)
        return self

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, N] or [B, 1, N] float audio at `sr` -> raw latents [B, C, ceil(N / ratio)] (float32).

        Each item is encoded on its own, so the same audio gives the same latents whatever batch it
        is in (equal to a direct `export.encode(x)` on that item alone): a real discrete export's
        convolutions round differently at other batch sizes, and RVQ codes near a tie flip (5% of
        the deeper quantizers' codes of one file of tests/fixtures/audio between batch 1 and 5).
        Continuous (variational) exports sample their latent: the RNG is seeded to 0 per item.
        """
        if audio.dim() == 2:
            audio = audio[:, None, :]
        dev = next(iter(self.module.buffers()), torch.empty(0)).device
        audio = audio.to(dev, torch.float32)
        out = []
        for i in range(audio.shape[0]):
            if not self.discrete:
                torch.manual_seed(0)
            out.append(self.module.encode(audio[i:i + 1]).float().cpu())
        return torch.cat(out)

    def latent_bins(self, loc: Optional[List[float]], scale: Optional[List[float]]):
        """The manifest's per-dimension affine as [C, 1] tensors (None, None when absent)."""
        if loc is None or scale is None:
            return None, None
        return torch.tensor(loc, dtype=torch.float32)[:, None], torch.tensor(scale, dtype=torch.float32)[:, None]

    def encode_tokens(self, audio: torch.Tensor, resolution: int, loc: Optional[List[float]] = None,
                      scale: Optional[List[float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Audio [B, N] -> (int64 tokens [B, C, T], latents outside the fitted range per item [B]).

        Discrete: the codebook indices (nothing is out of range). Continuous: bins of the latents
        standardised by the fitted `loc` / `scale` (per dimension); those outside the range are
        clamped into an edge bin and counted.
        """
        z = self.encode(audio)
        if self.discrete:
            return torch.round(z).long(), torch.zeros(z.shape[0], dtype=torch.long)
        lo, sc = self.latent_bins(loc, scale)
        return bins.quantize(z, resolution, lo, sc), bins.out_of_range(z, lo, sc).flatten(1).sum(1)

    def tokens(self, audio: torch.Tensor, resolution: int, loc: Optional[List[float]] = None,
               scale: Optional[List[float]] = None) -> torch.Tensor:
        """Audio [B, N] -> int64 tokens [B, C, T]: codebook indices, or bins of the latents."""
        return self.encode_tokens(audio, resolution, loc, scale)[0]

    def fit_bins(self, clips: List[torch.Tensor]) -> Tuple[List[float], List[float]]:
        """Per-dimension (loc, scale) of a continuous export's latents over audio clips [N] each."""
        z = torch.cat([self.encode(c.reshape(1, -1))[0].T for c in clips])  # [frames, C]
        loc, scale = bins.fit(z)
        return loc.tolist(), scale.tolist()


def _has_method(m, name: str) -> bool:
    try:
        return hasattr(m, name) and callable(getattr(m, name))
    except Exception:
        return False


# What only a `--streaming` RAVE export holds: cached_conv's stateful layers (their cache buffers carry
# the tail of the previous call into the next). Every v2 export, streaming or not, also holds
# `CachedPQMF` and `CachedSequential` modules: those names alone say nothing.
STREAMING_MODULES = frozenset({"CachedConv1d", "CachedConvTranspose1d", "CachedPadding1d"})


def is_streaming(m: torch.jit.ScriptModule) -> bool:
    """True when the export holds a stateful cached convolution or padding (a `--streaming` export)."""
    return any(getattr(sub, "original_name", "") in STREAMING_MODULES for _, sub in m.named_modules())


def load_rave(path: str, allow_streaming: bool = False) -> Rave:
    """Load a RAVE TorchScript export; raise RaveError (one line) for anything else."""
    name = str(path)
    p = Path(path)
    if not p.exists():
        raise RaveError(f"{name}: no such file; expected a RAVE model exported as TorchScript (.ts)")
    if p.is_dir():
        raise RaveError(f"{name}: is a directory; expected a RAVE .ts file")
    try:
        m = torch.jit.load(str(p), map_location="cpu")
    except Exception:
        raise RaveError(_describe_non_torchscript(str(p), name)) from None
    m.eval()
    if not _has_method(m, "encode"):
        try:
            methods = sorted(m._c._method_names())
        except Exception:
            methods = []
        raise RaveError(f"{name}: TorchScript module without an `encode` method (found {methods or 'none'}); "
                        "expected a RAVE export")
    buffers = dict(m.named_buffers())
    if hasattr(m, "sr"):
        sr, version = int(m.sr), "v2"
    elif "sampling_rate" in buffers:
        sr, version = int(buffers["sampling_rate"].item()), "v1"
    else:
        raise RaveError(f"{name}: no `sr` attribute nor `sampling_rate` buffer; expected a RAVE export")
    if "encode_params" in buffers:
        params = [int(v) for v in buffers["encode_params"].tolist()]
        latent_size, ratio = params[2], params[3]
    else:  # no encode_params: probe the shape of `encode` once
        try:
            with torch.no_grad():
                z = m.encode(torch.zeros(1, 1, 2 ** 16))
        except Exception as e:
            raise RaveError(f"{name}: no `encode_params` buffer and `encode` failed on a probe "
                            f"({type(e).__name__}); expected a RAVE export") from None
        latent_size, ratio = int(z.shape[1]), 2 ** 16 // int(z.shape[2])
    if ratio <= 0 or latent_size <= 0:
        raise RaveError(f"{name}: encode_params {buffers.get('encode_params')} make no sense for a RAVE export")
    if is_streaming(m) and not allow_streaming:
        raise RaveError(f"{name}: a streaming export (cached convolutions keep state between calls, "
                        "so chunks would leak into each other); export the model again without "
                        "--streaming for preprocessing")
    encoder = getattr(m, "encoder", None) if _has_method(m, "encode") else None
    codebooks = sorted(((n, b) for n, b in buffers.items() if n.endswith("_codebook.embed")),
                       key=lambda nb: nb[0])
    discrete = bool(codebooks) or "Discrete" in str(getattr(encoder, "original_name", ""))
    codebook_size = None
    if discrete:
        if codebooks:
            codebook_size = int(codebooks[0][1].shape[0])
        else:
            raise RaveError(f"{name}: a discrete RAVE export without `*._codebook.embed` buffers; "
                            "cannot tell its codebook size")
    return Rave(module=m, path=str(p), sr=sr, ratio=ratio, latent_size=latent_size,
                discrete=discrete, codebook_size=codebook_size, version=version)


def describe(r: Rave) -> dict:
    """The facts of a RAVE export as the manifest's `rave` section wants them (minus file names)."""
    return {"sr": r.sr, "ratio": r.ratio, "latent_size": r.latent_size,
            "num_quantizers": r.num_quantizers, "continuous": not r.discrete, "version": r.version,
            "codebook_size": r.codebook_size}


def load_bytes(data: bytes) -> torch.jit.ScriptModule:
    """A TorchScript module from bytes (e.g. a .ts read from S3)."""
    return torch.jit.load(io.BytesIO(data), map_location="cpu")
