"""Tiny trained priors that fit a RAVE export, exported for nn~ (the Pd test's models).

The prior's facts (quantizers, codebook size, ratio, rate) are read off the RAVE file itself, so
`[nn~ rave.ts encode]` -> `[nn~ prior.ts]` -> `[nn~ rave.ts decode]` is a valid chain. Training is a
few dozen steps on a learnable synthetic token stream: seconds, and enough for the test, which
checks the client's contract, not musical quality.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from msprior.checkpoint import save_checkpoint, write_run_json
from msprior.config import load_config
from msprior.export.run import export_run
from msprior.model import DatasetFacts, build_prior

TINY = ["model.dim=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16", "model.ff_mult=2",
        "model.seq_len=16", "model.cond_layers=1", "model.cond_ratio=2", "model.dropout=0.0"]
COND_VOCAB = 8


def rave_facts(rave_path: str) -> Dict:
    """Latent channels, samples per frame, rate and codebook size of a discrete RAVE export."""
    rave = torch.jit.load(rave_path, map_location="cpu")
    _, _, latents, ratio = [int(v) for v in rave.encode_params]  # [in_ch, in_ratio, out_ch, out_ratio]
    sr = int(rave.sr)
    embed = dict(rave.named_buffers())["encoder.rvq.layers.0._codebook.embed"]
    vocab = int(embed.shape[0])
    return {"latents": latents, "ratio": ratio, "sr": sr, "vocab": vocab}


def manifest(facts: Dict, conditioning: str) -> Dict:
    cond = None
    if conditioning == "tokens":
        cond = {"ratio": 2, "features": {"names": ["loudness"], "size": 1, "mean": [0.0], "std": [1.0]},
                "tokens": {"vocab_size": COND_VOCAB, "centroids": "centroids.npy"}}
    q = facts["latents"]
    return {
        "format_version": 1, "msprior_version": "0.1.0", "created": "2026-12-06T00:00:00Z",
        "rave": {"file": "rave.ts", "original_name": "rave.ts", "sha256": "ab" * 32, "sr": facts["sr"],
                 "ratio": facts["ratio"], "latent_size": q, "num_quantizers": q, "vocab_size": facts["vocab"],
                 "continuous": False, "resolution": None},
        "chunk": {"num_secs": 4.0, "frames": 172}, "conditioning": cond,
        "counts": {"files_ok": 1, "files_skipped": 0, "chunks": 1, "frames": 172, "seconds": 4.0},
    }


def _batch(n: int, frames: int, q: int, vocab: int, tokens: bool, gen: torch.Generator) -> Dict:
    """Each quantizer counts up with its own stride from a random start (conditioning: a slow count)."""
    start = torch.randint(0, vocab, (n, 1, 1), generator=gen)
    t = torch.arange(frames).view(1, -1, 1)
    batch = {"rave": (start + t * (torch.arange(q).view(1, 1, -1) + 1)) % vocab}
    if tokens:
        tc = -(-(frames - 1) // 2)
        batch["tokens"] = (start[:, :, 0] + torch.arange(tc).view(1, -1)) % COND_VOCAB
    return batch


def make_run(root: str, config_name: str, facts: Dict, steps: int = 30) -> str:
    cfg = load_config(config_name, TINY)
    man = manifest(facts, cfg.model.conditioning)
    torch.manual_seed(0)
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(man))
    opt = torch.optim.AdamW([p for p in prior.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = _batch(8, cfg.model.seq_len + 1, facts["latents"], facts["vocab"],
                       cfg.model.conditioning == "tokens", gen)
        loss = prior.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run_dir = os.path.join(root, config_name)
    ckpt = save_checkpoint(os.path.join(run_dir, "checkpoints", "best"), {
        "model": prior.state_dict(), "step": steps, "val_loss": loss.item(), "best_val_loss": loss.item(),
        "config": cfg.to_dict(), "manifest": man})
    write_run_json(run_dir, {"name": config_name, "best_checkpoint": os.path.dirname(ckpt),
                             "last_checkpoint": os.path.dirname(ckpt), "best_val_loss": loss.item(),
                             "step": steps, "mlflow_run_id": None, "tracking_uri": None, "db_path": None})
    return run_dir


def make_exports(root: str, rave_path: str) -> Dict[str, str]:
    """{name: .ts}: decoder_only fp32 and int8, and an encoder_decoder (seq2seq, token conditioning)."""
    facts = rave_facts(rave_path)
    out = {}
    run = make_run(root, "decoder_only", facts)
    out["prior"] = export_run(run, os.path.join(root, "prior.ts"))
    out["prior_int8"] = export_run(run, os.path.join(root, "prior_int8.ts"), quantize="int8")
    run = make_run(root, "encoder_decoder", facts)
    out["seq2seq"] = export_run(run, os.path.join(root, "seq2seq.ts"))
    return out
