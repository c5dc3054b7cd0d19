"""`msprior evaluate`: score a trained prior on a latent table (held-out material).

Every window of the whole table (`quality.held_out_windows`: no split, no random draw), scored
teacher-forced by `quality.quantizer_ce` (the function bench/quality.py scores msprior with), and
the table's own unigram floor for reference: per quantizer, in nats per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from msprior.conditioning import ConditioningSpec
from msprior.errors import UserError
from msprior.flags import flag


class EvaluateError(UserError):
    """A prior and a table that cannot be scored together; one line."""


@dataclass
class EvaluateRequest:
    """`msprior evaluate`: one trained prior, one latent table."""

    run: str = flag("", "Trained prior: run folder (or s3://), MLflow run id, checkpoint folder or checkpoint.pt.",
                    required=True)
    db_path: str = flag("", "Latent table to score (held-out material: every window of the whole table).",
                        required=True)
    checkpoint: str = flag("best", "best | last checkpoint of the run.")
    batch_size: int = flag(16, "Windows per forward pass.")
    tracking_uri: Optional[str] = flag(None, "MLflow URI, to find a run given by its MLflow run id.")


def load_state(run: str, which: str, tracking_uri: Optional[str]) -> Dict[str, Any]:
    """The checkpoint dict of a run (best|last) or of one checkpoint folder / file."""
    from msprior import checkpoint as ckpt

    try:
        return ckpt.load_trained_state(run, which, tracking_uri)
    except ckpt.RunNotFound as e:
        raise EvaluateError(f"--run {e}" if str(e).startswith(str(run)) else str(e)) from None


def check_table(run: str, trained: Dict, table: Dict, db_path: str, conditioning: str) -> None:
    """The table must hold what the prior reads: its quantizers, vocabulary and conditioning."""
    from msprior.model import DatasetFacts

    a, b = DatasetFacts.from_manifest(trained), DatasetFacts.from_manifest(table)
    if (a.num_quantizers, a.vocab_size) != (b.num_quantizers, b.vocab_size):
        raise EvaluateError(
            f"--db_path {db_path}: the table has {b.num_quantizers} quantizers x {b.vocab_size} tokens, the prior "
            f"({run}) was trained on {a.num_quantizers} x {a.vocab_size}: score it on a table encoded by the same "
            "RAVE model")
    prior = ConditioningSpec.from_manifest(trained).use(conditioning, f"--run {run}")
    prior.check_compatible(ConditioningSpec.from_manifest(table).use(conditioning, f"--db_path {db_path}"),
                           f"--db_path {db_path}: the prior's conditioning vs the table's",
                           "preprocess it with the prior's conditioning settings")


def evaluate(req: EvaluateRequest, echo: Optional[Callable[[str], Any]] = None) -> Dict[str, Any]:
    """Per-quantizer cross-entropy of the prior on every window of the table, and the table's own
    unigram floor. Returns {"ce", "ce_q", "unigram", "unigram_q", "windows", "tokens", "step", ...}."""
    from msprior import storage
    from msprior.config import Config
    from msprior.model import DatasetFacts, build_prior
    from msprior.train import quality
    from msprior.data.reader import read_manifest

    state = load_state(req.run, req.checkpoint, req.tracking_uri)
    cfg = Config.from_dict(state["config"], where=f"{req.run} (checkpoint config)")
    db_path = storage.absolute(req.db_path)
    m = cfg.model
    check_table(req.run, state["manifest"], read_manifest(db_path), req.db_path, m.conditioning)
    if req.batch_size < 1:
        raise EvaluateError(f"--batch_size {req.batch_size}: must be >= 1")
    prior = build_prior(m, DatasetFacts.from_manifest(state["manifest"]))
    prior.load_state_dict(state["model"])
    table, frames = quality.read_frames(db_path, m.conditioning)
    manifest, windows = table.manifest, quality.tile_windows(frames, m.seq_len, table.cond)
    if not len(windows):
        raise EvaluateError(f"--db_path {req.db_path}: no chunk holds seq_len + 1 = {m.seq_len + 1} frames; "
                            "nothing to score")
    ce = quality.quantizer_ce(prior, windows, req.batch_size)
    vocab = prior.vocab_size
    floor = quality.unigram_ce(quality.token_counts(frames.rave, vocab), quality.target_counts([{"rave": windows.rave}], vocab))
    out = {"run": req.run, "checkpoint": req.checkpoint, "step": state.get("step"), "db_path": req.db_path,
           "ce_q": [float(x) for x in ce], "ce": float(ce.mean()), "unigram_q": [float(x) for x in floor],
           "unigram": float(floor.mean()), "windows": len(windows), "tokens": windows.tokens,
           "seq_len": m.seq_len, "vocab_size": vocab,
           "same_rave": manifest.get("rave", {}).get("sha256") == state["manifest"].get("rave", {}).get("sha256")}
    for line in report_lines(out):
        (echo or print)(line)
    return out


def report_lines(r: Dict[str, Any]) -> list:
    """The printed report: one row per quantizer, then the mean and its perplexity."""
    lines = [f"[evaluate] {r['run']} ({r['checkpoint']}, step {r['step']}) on {r['db_path']}: {r['windows']} windows "
             f"of {r['seq_len']} predicted frames ({r['tokens']} tokens per quantizer)"]
    if not r["same_rave"]:
        lines.append("[evaluate] note: the table was encoded by another RAVE model than the prior's training table")
    lines.append(f"{'quantizer':>9}  {'CE (nats)':>10}  {'unigram':>8}")
    for q, (ce, uni) in enumerate(zip(r["ce_q"], r["unigram_q"])):
        lines.append(f"{'q' + str(q):>9}  {ce:10.4f}  {uni:8.4f}")
    lines.append(f"{'mean':>9}  {r['ce']:10.4f}  {r['unigram']:8.4f}")
    lines.append(f"perplexity exp(mean CE) {math.exp(min(r['ce'], 50.0)):.2f} of a vocabulary of {r['vocab_size']}; "
                 f"gain over the table's unigram {r['unigram'] - r['ce']:.4f} nats")
    return lines
