"""Tiny trained runs for the export and registry tests (no dataset, no Ray: seconds each).

`make_run` trains a tiny prior of a shipped config for a few dozen steps on a synthetic, learnable
token sequence and writes a run directory in the documented format (docs/ARCHITECTURE.md,
"Checkpoints and runs"): `<dir>/checkpoints/best/checkpoint.pt` + `<dir>/run.json`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from msprior.config import load_config
from msprior.model import DatasetFacts, build_prior
from msprior.checkpoint import save_checkpoint, write_run_json

Q, V = 4, 16  # quantizers, vocabulary (discrete) / resolution (continuous)
RATIO, SR = 1024, 44100
COND_RATIO, COND_VOCAB, COND_FEATURES = 2, 8, 3
TINY = ["model.dim=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16", "model.ff_mult=2",
        "model.seq_len=16", "model.cond_layers=1", f"model.cond_ratio={COND_RATIO}", "model.dropout=0.0"]


def manifest(continuous: bool = False, conditioning: str = "none") -> Dict:
    cond = None
    if conditioning != "none":
        cond = {"ratio": COND_RATIO,
                "features": {"names": ["loudness", "centroid", "flatness"], "size": COND_FEATURES,
                             "mean": [0.0] * COND_FEATURES, "std": [1.0] * COND_FEATURES},
                "tokens": {"vocab_size": COND_VOCAB, "centroids": "centroids.npy"}}
    return {
        "format_version": 1, "msprior_version": "0.1.0", "created": "2026-11-25T15:00:00Z",
        "rave": {"file": "rave.ts", "original_name": "tiny.ts", "sha256": "ab" * 32, "sr": SR, "ratio": RATIO,
                 "latent_size": Q, "num_quantizers": Q, "vocab_size": V, "continuous": continuous,
                 "resolution": V if continuous else None},
        "chunk": {"num_secs": 4.0, "frames": 172}, "conditioning": cond,
        "counts": {"files_ok": 1, "files_skipped": 0, "chunks": 1, "frames": 172, "seconds": 4.0},
    }


def synthetic_batch(n: int, frames: int, conditioning: str, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """A learnable stream: each quantizer counts up with its own stride from a random start."""
    start = torch.randint(0, V, (n, 1, 1), generator=gen)
    t = torch.arange(frames).view(1, -1, 1)
    rave = (start + t * (torch.arange(Q).view(1, 1, -1) + 1)) % V
    batch = {"rave": rave}
    tc = -(-(frames - 1) // COND_RATIO)
    if conditioning == "tokens":
        batch["tokens"] = (start[:, :, 0] + torch.arange(tc).view(1, -1)) % COND_VOCAB
    elif conditioning == "features":
        batch["features"] = torch.randn(n, tc, COND_FEATURES, generator=gen)
    return batch


def train_tiny(config_name: str, continuous: bool = False, steps: int = 30, seed: int = 0):
    """(prior, config, manifest, final loss) of a tiny prior trained in-process."""
    cfg = load_config(config_name, TINY)
    man = manifest(continuous, cfg.model.conditioning)
    torch.manual_seed(seed)
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(man))
    opt = torch.optim.AdamW([p for p in prior.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = prior.loss(synthetic_batch(8, cfg.model.seq_len + 1, cfg.model.conditioning, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior.eval(), cfg, man, float(loss.detach())


def make_run(root: str, config_name: str, continuous: bool = False, steps: int = 30,
             val_loss: Optional[float] = None, seed: int = 0, name: Optional[str] = None) -> str:
    """A finished run directory; `val_loss` overrides the recorded validation loss (registry tests)."""
    prior, cfg, man, loss = train_tiny(config_name, continuous, steps, seed)
    name = name or f"{config_name}{'-continuous' if continuous else ''}"
    run_dir = os.path.join(root, name)
    recorded = loss if val_loss is None else val_loss
    ckpt = save_checkpoint(os.path.join(run_dir, "checkpoints", "best"), {
        "model": prior.state_dict(), "step": steps, "val_loss": recorded, "best_val_loss": recorded,
        "config": cfg.to_dict(), "manifest": man,
    })
    write_run_json(run_dir, {"name": name, "best_checkpoint": os.path.dirname(ckpt),
                             "last_checkpoint": os.path.dirname(ckpt), "best_val_loss": recorded,
                             "step": steps, "mlflow_run_id": None, "tracking_uri": None, "db_path": None})
    return run_dir


def window(config_name: str, frames: int, seed: int = 1) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One synthetic stream (tokens [1, frames, Q], conditioning at the decoder rate or None)."""
    cfg = load_config(config_name, TINY)
    b = synthetic_batch(1, frames + 1, cfg.model.conditioning, torch.Generator().manual_seed(seed))
    rave = b["rave"][:, :frames]
    if "tokens" in b:
        return rave, b["tokens"].repeat_interleave(COND_RATIO, 1)[:, :frames]
    if "features" in b:
        return rave, b["features"].repeat_interleave(COND_RATIO, 1)[:, :frames]
    return rave, None


class _Decoder(torch.nn.Module):
    """RAVE's decode interface only ([B, latent, T] -> [B, 1, T * RATIO]): enough for previews."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z.mean(1, keepdim=True) / 10).repeat_interleave(1024, -1)  # = RATIO (TorchScript needs the literal)


def save_decoder(path: str) -> str:
    """A TorchScript stand-in for a latent table's RAVE copy, as used by audio previews."""
    torch.jit.script(_Decoder()).save(path)
    return path
