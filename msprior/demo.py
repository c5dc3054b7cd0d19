"""The embedded default: the whole pipeline on one machine with no flags and no servers.

Builds the demo codec, synthesises a small corpus, then runs the pipeline on local Ray, local
storage and a sqlite MLflow store, all under one work folder (default ./msprior-demo).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict

from msprior.flags import flag

# A small prior so the demo trains in a few minutes on 2 CPU cores; real runs use the shipped sizes.
DEMO_OVERRIDES = [
    "model.dim=128", "model.num_layers=2", "model.num_heads=4", "model.head_dim=32", "model.seq_len=64",
    "optim.warmup_steps=50", "optim.lr=2e-3", "train.batch_size=16", "train.val_batches=4",
]
# The demo corpus (6,896 frames) is one epoch per ~7 steps of 16 x 64 frames: validation CE is best
# at step 50-75 and rises after (memorising; bench/RESULTS.md, "The demo's steps"): validate every
# 25 steps and stop after 2 validations without a new best (~100 steps); the best is exported.
DEMO_VAL_EVERY = 25
DEMO_STOP = ["train.patience=2"]


@dataclass
class DemoRequest:
    """`msprior demo`: the embedded default, with nothing to pass."""

    workdir: str = flag("msprior-demo", "Work folder (codec, corpus, table, runs, mlflow.db).")
    max_steps: int = flag(300, "At most this many training steps of the small demo prior (validated every 25, "
                                "stopped after 2 validations without a new best; the best is exported).")


@dataclass
class CodecRequest:
    """`msprior codec`: write the demo codec (RAVE's exported interface, not a trained RAVE)."""

    out: str = flag("rave.ts", "Where to write the TorchScript file (local or s3://).")
    discrete: bool = flag(False, "RVQ token codec (like a discrete RAVE) instead of continuous.")


def run_demo(workdir: str = DemoRequest.workdir, max_steps: int = DemoRequest.max_steps,
             echo: Callable[[str], Any] = print) -> Dict:
    from msprior.codec import save_codec
    from msprior.data.synthetic import write_corpus
    from msprior.pipeline import PipelineRequest, run_pipeline

    t0 = time.monotonic()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    rave = os.path.join(workdir, "rave.ts")
    if not os.path.exists(rave):
        save_codec(rave, discrete=True)
        echo(f"[demo] demo codec (a small RAVE-compatible model, not a trained RAVE) -> {rave}")
    audio = os.path.join(workdir, "audio")
    if not os.path.isdir(audio):
        write_corpus(audio, n_files=8, seconds=20.0, seed=0)
        echo(f"[demo] synthetic corpus (melodies, chords, noise) -> {audio}")
    tracking = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    req = PipelineRequest(audio, rave, os.path.join(workdir, "out"), config="decoder_only", name="demo",
                          overrides=DEMO_OVERRIDES + DEMO_STOP, max_steps=max_steps, val_every=DEMO_VAL_EVERY,
                          num_secs=8.0, tracking_uri=tracking)
    result = run_pipeline(req, echo=echo)
    reg = result["registered"]
    ref = f"{reg['name']}@champion"
    echo("")
    echo(f"Done in {time.monotonic() - t0:.0f} s.")
    echo(f"  registered model : {reg['name']} version {reg['version']} in {tracking}")
    echo(f"  exported file    : {result['model']}")
    echo(f"  pull it          : msprior pull {ref} --out demo.ts --tracking_uri {tracking}")
    echo(f"  browse runs      : mlflow ui --backend-store-uri {tracking}")
    echo("  in Max/MSP or Pd : put demo.ts in nn~'s model folder, then create [nn~ demo forward] (mc.nn~ for")
    echo("                     several streams); 'set temperature 0.8', 'set listen 0' (generate) or 1 (listen),")
    echo("                     'set reset 1' to clear its memory; outlets = RAVE latents + perplexity.")
    return result
