"""msprior's side of bench/quality.py (runs in msprior's venv, on this repository's code): tokens
out of latent tables, the held-out windows, the unigram floor, training (through the product's
`msprior train`, or in-process with msprior's own model/optimizer code and the exact configured
schedule) and the held-out score with `prior.quantizer_losses`.

Held-out windows (the same array is scored by both tools): every chunk of the held-out table in
source order, windows of seq_len + 1 frames starting at frames 0, seq_len, 2 x seq_len, ... (targets
never overlap); each window predicts its frames 1 .. seq_len teacher-forced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

# The architecture (decoder_only, 4 x 128, 8 heads x 16, seq_len 64, dropout 0.01) and the
# original's optimizer: AdamW (weight decay = torch's AdamW default 0.01), no gradient clipping.
BASE_OVERRIDES = ["model.dim=128", "model.num_layers=4", "model.num_heads=8", "model.head_dim=16",
                  "model.seq_len=64", "model.dropout=0.01", "model.ff_mult=4", "optim.lr=1e-3",
                  "optim.betas=[0.9, 0.99]", "optim.warmup_steps=10000", "optim.warmup_start=0.01",
                  "optim.decay=0.9999985", "optim.weight_decay=0.01", "optim.grad_clip=0",
                  "optim.lr_scaling=none", "train.ema=0", "train.compile=false", "data.val_fraction=0"]


def config(overrides: Sequence[str] = ()):
    from msprior.config import load_config

    return load_config("decoder_only", list(BASE_OVERRIDES) + list(overrides))


def table_chunks(db_path: str) -> List[np.ndarray]:
    """Every chunk of a latent table ([frames, Q] int16), in source order, read by msprior's reader."""
    from msprior.model import DatasetFacts
    from msprior.data import reader as W

    table = W.open_table(db_path, 0.0, 0)
    rows = W.read_split(table, val=False)
    rows = rows.take(np.argsort(np.array(rows["source"].to_pylist()), kind="stable"))
    q = DatasetFacts.from_manifest(table.manifest).num_quantizers
    f = W.frames_from_arrow(rows, q)
    return [f.rave[s:s + n] for s, n in zip(f.starts, f.lengths)]


def save_chunks(path: str, chunks: List[np.ndarray]) -> None:
    np.savez(path, rave=np.concatenate(chunks).astype(np.int16), lengths=np.array([len(c) for c in chunks]))


def heldout_windows(chunks: List[np.ndarray], seq_len: int) -> np.ndarray:
    """[W, seq_len + 1, Q] int16: windows at stride seq_len from frame 0 of every chunk."""
    out = [c[s:s + seq_len + 1] for c in chunks for s in range(0, len(c) - seq_len, seq_len)]
    return np.stack(out).astype(np.int16)


def unigram_ce(train: List[np.ndarray], windows: np.ndarray, vocab: int) -> List[float]:
    """CE (nats) per quantizer of the training tokens' add-one-smoothed unigram on the held-out
    targets (frames 1..seq_len of each window): what a prior that learned no context scores."""
    rave = np.concatenate(train).astype(np.int64)
    target = windows[:, 1:].reshape(-1, windows.shape[-1]).astype(np.int64)
    out = []
    for q in range(rave.shape[1]):
        counts = np.bincount(rave[:, q], minlength=vocab) + 1.0
        logp = np.log(counts / counts.sum())
        out.append(float(-logp[target[:, q]].mean()))
    return out


def frames_of(chunks: List[np.ndarray]):
    from msprior.data.reader import Frames

    lengths = np.array([len(c) for c in chunks], np.int64)
    return Frames(rave=np.concatenate(chunks).astype(np.int16), starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                  lengths=lengths)


@torch.no_grad()
def score(prior, windows: np.ndarray, batch_size: int = 16) -> List[float]:
    """Held-out CE per quantizer: `prior.quantizer_losses`, averaged over batches weighted by tokens."""
    prior.eval()
    total, count = torch.zeros(windows.shape[-1], dtype=torch.float64), 0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i:i + batch_size].astype(np.int64))
        n = w.shape[0] * (w.shape[1] - 1)
        total += prior.quantizer_losses({"rave": w}).double() * n
        count += n
    return (total / count).tolist()


def train_inprocess(cfg, facts, train: List[np.ndarray], seed: int, steps: int, threads: int):
    """msprior's model and optimizer code, the configured schedule exactly (no run-length rule),
    seeded as a one-worker `msprior train` is (weights: train.seed; windows: (seed, rank 0, step 0))."""
    from msprior.model import build_prior
    from msprior.train.schedule import lr_factor, make_optimizer
    from msprior.data.windows import WindowSampler

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    prior = build_prior(cfg.model, facts)
    if cfg.train.unigram_bias:  # as a fresh `msprior train` does, from every training token here
        from msprior.train.quality import token_counts

        prior.init_output_bias(torch.from_numpy(token_counts(np.concatenate(train), facts.vocab_size)))
    opt = make_optimizer([p for p in prior.parameters() if p.requires_grad], cfg.optim)
    o = cfg.optim
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, o.warmup_start, o.decay))
    sampler = WindowSampler(frames_of(train), cfg.model.seq_len,
                            seed=np.random.SeedSequence([seed, 0, 0]).generate_state(1)[0])
    prior.train()
    t0, c0 = time.time(), time.process_time()
    for step in range(steps):
        batch = {k: torch.from_numpy(v) for k, v in sampler.sample(cfg.train.batch_size).items()}
        opt.zero_grad(set_to_none=True)
        loss = prior.loss(batch)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(prior.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            print(f"  msprior in-process seed {seed}: step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    return prior, time.time() - t0, time.process_time() - c0


def train_product(db_path: str, runs: str, name: str, overrides: Sequence[str], seed: int, steps: int,
                  batch_size: int, log: str) -> float:
    """`msprior train` on the training table (a real run folder under `runs`); returns seconds."""
    cmd = [sys.executable, "-m", "msprior", "train", "--config", "decoder_only", "--db_path", db_path,
           "--name", name, "--storage_path", runs, "--tracking_uri", f"sqlite:///{runs}/mlflow.db",
           "--batch_size", str(batch_size), "--max_steps", str(steps), "--val_every", str(steps)]
    for o in list(BASE_OVERRIDES) + list(overrides) + [f"train.seed={seed}"]:
        cmd += ["--override", o]
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"bench/quality: msprior train failed (exit {r.returncode}); see {log}")
    return time.time() - t0


def load_product_run(run_dir: str):
    """The prior of a finished `msprior train` run (its last checkpoint), via msprior.checkpoint."""
    from msprior.checkpoint import load_run
    from msprior.config import Config
    from msprior.model import DatasetFacts, build_prior

    state = load_run(run_dir, "last")
    cfg = Config.from_dict(state["config"], where=f"{run_dir} (checkpoint config)")
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(state["manifest"]))
    prior.load_state_dict(state["model"])
    return prior.eval(), int(state.get("step", -1))


def shared_check(prior, windows: np.ndarray, heldout_db: str, seq_len: int, ce: List[float]) -> Dict:
    """When msprior has the shared scorer (msprior.train.quality: training's validation and
    `msprior evaluate`), check that it cuts the same held-out windows from the held-out table and
    scores this prior as `score` did. {} when the module is not there."""
    try:
        from msprior.train import quality as Q

        theirs = Q.held_out_windows(heldout_db, seq_len).rave
        ce2 = Q.quantizer_ce(prior, Q.Windows(rave=windows))
    except (ImportError, AttributeError) as e:
        return {"shared_scorer": f"unavailable ({e.__class__.__name__})"}
    key = lambda a: sorted(w.tobytes() for w in np.ascontiguousarray(a, dtype=np.int16))  # noqa: E731
    return {"shared_windows_equal": key(theirs) == key(windows),
            "shared_ce_max_abs_diff": float(np.max(np.abs(np.asarray(ce2) - np.asarray(ce))))}


def write_json(path: str, data: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
