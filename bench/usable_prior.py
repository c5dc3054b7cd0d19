"""How much audio and how many steps make a usable prior: the demo's codec, model and corpus kind.

For each corpus size (minutes of `msprior demo`'s synthetic melodies/chords/noise) it preprocesses
once, trains the demo prior (DEMO_OVERRIDES) and reads the validation cross-entropy every
`--val_every` steps from MLflow. The baseline, measured in the same run on the same validation
files, is the unigram floor training logs (`unigram_ce`: a unigram fitted on the training tokens,
scored on the same validation windows; what a prior that ignores context scores): the gain over it
(nats per token) is what a prior learned of the sequence. A prior is called usable here once its gain is
at least half of the best gain seen for that corpus (the curve's knee), and its validation CE no
longer rises (no overfitting).

    python bench/usable_prior.py --minutes 1,4,12 --steps 600 --val_every 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def curve(tmp: str, minutes: float, steps: int, val_every: int) -> dict:
    from msprior.codec import save_codec
    from msprior.data.preprocess import PreprocessRequest, preprocess
    from msprior.data.synthetic import write_corpus
    from msprior.demo import DEMO_OVERRIDES
    from msprior.train import tracking
    from msprior.train.run import train

    root = os.path.join(tmp, f"m{minutes:g}")
    rave = save_codec(os.path.join(root, "rave.ts"), discrete=True)
    n_files = max(2, round(minutes * 60 / 20))  # the demo's 20 s files
    write_corpus(os.path.join(root, "audio"), n_files=n_files, seconds=20.0, seed=0)
    table = os.path.join(root, "table")
    t0 = time.monotonic()
    preprocess(PreprocessRequest(os.path.join(root, "audio"), table, rave, num_secs=8.0, min_frames=65,
                                 progress=False))
    pre_s = time.monotonic() - t0
    uri = f"sqlite:///{root}/mlflow.db"
    t0 = time.monotonic()
    s = train("decoder_only", table, f"m{minutes:g}", overrides=DEMO_OVERRIDES, max_steps=steps,
              val_every=val_every, storage_path=os.path.join(root, "runs"), tracking_uri=uri, progress=False)
    train_s = time.monotonic() - t0
    c = tracking.client(uri)
    hist = c.get_metric_history(s["mlflow_run_id"], "val_loss")
    # the floor training logged on the same validation windows (msprior.train.quality.unigram_ce: a
    # unigram fitted on the training tokens) -- not the validation tokens' own entropy, an in-sample
    # bound a prior cannot reach on a small corpus
    h0 = c.get_run(s["mlflow_run_id"]).data.metrics["unigram_ce"]
    return {"minutes": minutes, "files": n_files, "unigram_nats": h0, "preprocess_s": pre_s, "train_s": train_s,
            "val": [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)]}


def usable_step(c: dict) -> object:
    gains = [(step, c["unigram_nats"] - v) for step, v in c["val"]]
    best = max(g for _, g in gains)
    return next((step for step, g in gains if g >= 0.5 * best and best > 0), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", default="1,4,12")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--val_every", type=int, default=100)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a loaded machine starts Ray slowly
    for attempt in range(3):  # and sometimes not at all on the first try
        try:
            ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
            break
        except Exception as e:
            print(f"ray.init failed ({e}); retrying", flush=True)
            time.sleep(10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in [float(x) for x in args.minutes.split(",")]:
            c = curve(tmp, m, args.steps, args.val_every)
            rows.append(c)
            print(json.dumps(c), flush=True)
    print(f"\n| audio | files | unigram CE (baseline) | val CE by step | best gain | usable from step | train wall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in rows:
        vals = ", ".join(f"{s}: {v:.2f}" for s, v in c["val"])
        best = max(c["unigram_nats"] - v for _, v in c["val"])
        print(f"| {c['minutes']:g} min | {c['files']} | {c['unigram_nats']:.2f} | {vals} | {best:.2f} nats "
              f"({best / c['unigram_nats']:.0%}) | {usable_step(c)} | {c['train_s']:.0f} s |")


if __name__ == "__main__":
    main()
