"""What a trained prior is worth: per-quantizer cross-entropy, the unigram floor, a generation check.

One definition each, shared by training's validation, `msprior evaluate` and bench/quality.py:

* `held_out_windows(db_path, seq_len, ...)`: every window of a whole table (no split, no random
  draw): chunk by chunk, windows of seq_len + 1 frames starting at 0, stride, 2 x stride, ...
  (stride = seq_len, rounded down to a multiple of the conditioning ratio), so each frame after a
  chunk's first is a target at most once; a chunk's tail shorter than a stride is not scored.
  Pure numpy (`Windows`): another tool's model can be scored on exactly the same windows.
* `quantizer_ce(prior, windows)`: `prior.quantizer_losses(batch)` averaged over the windows,
  weighted by tokens -> nats per token, one value per quantizer [Q].
* `unigram_ce(fit_counts, eval_counts)`: the cross-entropy of a unigram (per quantizer, fitted on
  token counts with add-one smoothing) on other tokens: what a prior that learnt nothing scores.
  A fresh training with `train.unigram_bias` starts at that unigram (`sampler_counts`,
  `Prior.init_output_bias`).
* `generation_check(prior, ...)`: frames sampled at temperature 1 through the streaming path; the
  KL of the validation tokens' histogram to theirs (mean over quantizers) and the fraction of
  frames that repeat the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from msprior.conditioning import ConditioningSpec

SMOOTH = 0.5  # add-1/2 counts per token in the generation check's histograms (finite KL)
GEN_STREAMS = 8  # streams sampled in parallel by the generation check
GEN_FRAMES = 64  # frames per stream (at most seq_len: the conditioning of one validation window)


# --- windows (pure numpy: the table's side, no model) -------------------------------------------


@dataclass
class Windows:
    """Fixed windows of a table: rave int16 [N, T + 1, Q]; cond tokens int16 [N, Tc] or features
    float32 [N, Tc, F] (Tc = ceil(T / r)), or None."""

    rave: np.ndarray
    conditioning: str = "none"
    cond: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.rave.shape[0])

    @property
    def tokens(self) -> int:
        """Predicted tokens per quantizer: windows x seq_len."""
        return len(self) * (self.rave.shape[1] - 1)

    def batches(self, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
        """Batches in the prior's format (docs/ARCHITECTURE.md, "Model contract"), in order."""
        for i in range(0, len(self), batch_size):
            batch = {"rave": self.rave[i:i + batch_size].astype(np.int64)}
            if self.conditioning == "tokens":
                batch["tokens"] = self.cond[i:i + batch_size].astype(np.int64)
            elif self.conditioning == "features":
                batch["features"] = self.cond[i:i + batch_size]
            yield batch


def tile_windows(frames, seq_len: int, cond: ConditioningSpec = ConditioningSpec()) -> Windows:
    """Every window of `frames` (msprior.data.reader.Frames), in chunk order: starts 0, stride, ...
    `cond`: the prior's conditioning (`Table.cond`), whose frames the windows carry."""
    conditioning, r = cond.kind, cond.step
    stride = max(r, seq_len // r * r)  # conditioned windows start on a conditioning frame
    room = frames.lengths - (seq_len + 1)
    per_chunk = np.where(room >= 0, room // stride + 1, 0)
    chunk = np.repeat(np.arange(len(per_chunk)), per_chunk)
    start = (np.arange(len(chunk)) - np.repeat(np.cumsum(per_chunk) - per_chunk, per_chunk)) * stride
    rows = (frames.starts[chunk] + start)[:, None] + np.arange(seq_len + 1)
    out = Windows(rave=frames.rave[rows], conditioning=conditioning)
    if conditioning != "none":
        crows = (frames.cond_starts[chunk] + start // r)[:, None] + np.arange(cond.frames(seq_len))
        out.cond = frames.cond[crows]  # tokens [N, Tc] or features [N, Tc, F]
    return out


def read_frames(db_path: str, conditioning: str = "none"):
    """(Table, Frames) of a whole table, every indexed source, checked as training checks it; the
    prior reads `conditioning` (a kind) of it."""
    from msprior.data import reader
    from msprior.model import DatasetFacts

    table = reader.open_table(db_path, 0.0, 0, conditioning)  # fraction 0: no validation split
    rows = reader.read_split(table, val=False)
    facts = DatasetFacts.from_manifest(table.manifest)
    return table, reader.frames_from_arrow(rows, facts.num_quantizers, table.cond)


def held_out_windows(db_path: str, seq_len: int, conditioning: str = "none") -> Windows:
    """Every window of the whole table at `db_path` (see the module's docstring); deterministic."""
    from msprior.data.reader import DataError

    table, frames = read_frames(db_path, conditioning)
    windows = tile_windows(frames, seq_len, table.cond)
    if not len(windows):
        raise DataError(f"{db_path}: no chunk holds seq_len + 1 = {seq_len + 1} frames (longest: "
                        f"{int(frames.lengths.max(initial=0))}); nothing to score")
    return windows


# --- scores ---------------------------------------------------------------------------------------


@torch.no_grad()
def quantizer_ce(prior: torch.nn.Module, windows: Windows, batch_size: int = 16,
                 device: str = "cpu") -> np.ndarray:
    """Teacher-forced cross-entropy (nats per token) of each quantizer [Q] over `windows`:
    `prior.quantizer_losses` of each batch, weighted by its tokens (eval mode, float64 sums)."""
    was = prior.training
    prior.eval()
    total, n = None, 0
    try:
        for b in windows.batches(batch_size):
            tokens = b["rave"].shape[0] * (b["rave"].shape[1] - 1)
            ce = prior.quantizer_losses({k: torch.from_numpy(v).to(device) for k, v in b.items()})
            part = ce.double().cpu().numpy() * tokens
            total, n = (part if total is None else total + part), n + tokens
    finally:
        prior.train(was)
    return total / n


def token_counts(rave: np.ndarray, vocab_size: int) -> np.ndarray:
    """Counts [Q, V] of tokens `rave` [..., Q] (int64)."""
    q = rave.shape[-1]
    flat = rave.reshape(-1, q).astype(np.int64) + np.arange(q) * vocab_size
    return np.bincount(flat.ravel(), minlength=q * vocab_size).reshape(q, vocab_size)


def sampler_counts(sampler, vocab_size: int, max_frames: int = 1 << 20) -> np.ndarray:
    """Counts [Q, V] of the training chunks a `msprior.data.windows.WindowSampler` draws from (the
    chunks holding a window), chunk by chunk in its order up to `max_frames` frames: the tokens a
    rank holds when its training starts (`train.unigram_bias`)."""
    rows, left = [], max_frames
    for part, starts in zip(sampler.parts, sampler.num_starts):
        for c in np.flatnonzero(starts):
            if left <= 0:
                break
            n = min(int(part.lengths[c]), left)
            rows.append(np.asarray(part.rave[part.starts[c]:part.starts[c] + n]))
            left -= n
    if not rows:
        raise ValueError("the window sampler holds no training chunk")
    return token_counts(np.concatenate(rows), vocab_size)


def unigram_ce(fit_counts: np.ndarray, eval_counts: np.ndarray) -> np.ndarray:
    """Cross-entropy [Q] (nats) of the unigram fitted on `fit_counts` [Q, V] (add-one smoothing, so
    an unseen token costs log(n + V)) on the tokens counted in `eval_counts` [Q, V]."""
    fit = fit_counts.astype(np.float64) + 1.0
    logp = np.log(fit / fit.sum(axis=1, keepdims=True))
    ev = eval_counts.astype(np.float64)
    return -(ev * logp).sum(axis=1) / np.maximum(ev.sum(axis=1), 1.0)


def target_counts(batches, vocab_size: int) -> np.ndarray:
    """Counts [Q, V] of the predicted tokens (frames 1..T) of batches of windows."""
    return sum(token_counts(b["rave"][:, 1:], vocab_size) for b in batches)


def repeat_fraction(rave: np.ndarray) -> float:
    """Fraction of frames equal (every quantizer) to the frame before, in windows [N, T, Q]."""
    same = (rave[:, 1:] == rave[:, :-1]).all(axis=-1)
    return float(same.mean()) if same.size else 0.0


def histogram_kl(ref_counts: np.ndarray, counts: np.ndarray) -> float:
    """KL(ref || other) of token histograms [Q, V] (add-1/2 smoothing), mean over quantizers."""
    p = ref_counts + SMOOTH
    p = p / p.sum(axis=1, keepdims=True)
    q = counts + SMOOTH
    q = q / q.sum(axis=1, keepdims=True)
    return float((p * np.log(p / q)).sum(axis=1).mean())


# --- the generation check -------------------------------------------------------------------------


def _decoder_rate(cond: torch.Tensor, ratio: int, frames: int) -> torch.Tensor:
    """Conditioning [B, Tc(, F)] at the conditioning rate -> [B, frames(, F)], one value per frame."""
    return cond.repeat_interleave(ratio, dim=1)[:, :frames]


@torch.no_grad()
def generate(prior, batch: Dict[str, torch.Tensor], frames: int, temperature: float = 1.0) -> torch.Tensor:
    """Frames [B, frames, Q] sampled through the streaming path (init_stream, stream_context,
    predict), each stream seeded with the first frame of a window and conditioned by its values."""
    was = prior.training
    prior.eval()
    try:
        cond = batch.get("tokens", batch.get("features"))
        if cond is not None:
            cond = _decoder_rate(cond, prior.cond_ratio, frames)
        x = batch["rave"][:, :1].long()
        prior.init_stream(x.shape[0])
        out = []
        for t in range(frames):
            h = prior.stream_context(x, None if cond is None else cond[:, t:t + 1])
            frame, _ = prior.predict(h[:, -1], temperature)
            out.append(frame)
            x = frame[:, None]
        prior.init_stream(1)  # the caches of one stream only: training never reads them
        return torch.stack(out, dim=1)
    finally:
        prior.train(was)


def generation_check(prior, batches, vocab_size: int, val_counts: np.ndarray,
                     streams: int = GEN_STREAMS, frames: int = GEN_FRAMES) -> Dict[str, float]:
    """{"gen_kl", "gen_kl_ref", "gen_repeat"} of `streams` x `frames` tokens sampled at temperature 1.

    `gen_kl` is KL(validation histogram || generated histogram); `gen_kl_ref` the same for as many
    real validation frames (what a perfect model scores at this sample size)."""
    first = {k: v[:streams] for k, v in batches[0].items()}
    frames = min(frames, first["rave"].shape[1] - 1)
    gen = generate(prior, first, frames).cpu().numpy()
    real = first["rave"][:, 1:frames + 1].cpu().numpy()
    return {"gen_kl": histogram_kl(val_counts, token_counts(gen, vocab_size)),
            "gen_kl_ref": histogram_kl(val_counts, token_counts(real, vocab_size)),
            "gen_repeat": repeat_fraction(gen)}


# --- the unigram floor of a training (driver side, once per run) ---------------------------------


def train_counts(data) -> np.ndarray:
    """Token counts [Q, V] of a sample of the training chunks (a few whole row groups, drawn in
    proportion to their training frames), counted by Ray tasks where the data is
    (`msprior.data.layout.train_token_counts`): a constant read whatever the table's size."""
    from msprior.data.layout import train_token_counts

    return train_token_counts(data, int(data.table.manifest["rave"]["vocab_size"]))


def floor_metrics(data, val_batches) -> Dict[str, float]:
    """{"unigram_ce", "unigram_ce_q<i>", "val_repeat"}: the unigram of a sample of the training tokens
    (`train_counts`) scored on the validation windows' targets (the CE of a prior that learnt nothing), and how often a real
    validation frame repeats the one before (the generation check's reference)."""
    vocab = int(data.table.manifest["rave"]["vocab_size"])
    floor = unigram_ce(train_counts(data), target_counts(val_batches, vocab))
    out = {"unigram_ce": float(floor.mean()), **{f"unigram_ce_q{q}": float(v) for q, v in enumerate(floor)}}
    out["val_repeat"] = float(np.mean([repeat_fraction(b["rave"]) for b in val_batches]))
    return out


def log_floor(tracking: Dict, data, val_ref) -> None:
    """Log `floor_metrics` to the run's MLflow run at step 0, once (a resumed run has them)."""
    import ray

    from msprior.train import tracking as tr

    client, run_id = tracking["client"], tracking["run_id"]
    if "unigram_ce" not in client.get_run(run_id).data.metrics:
        tr.log_metrics(client, run_id, floor_metrics(data, ray.get(val_ref)), 0)
