"""bf16 gradient compression against none: the same 2-worker DDP training (Ray Train, CPU, gloo),
per seed, and the gradient bytes per step of the full-size model.

Prints, per seed, the final val_loss with `train.grad_compression=none` and `=bf16` and their
difference, then the spread between seeds of the uncompressed runs (the noise the hook's effect is
compared with), and the bytes DDP all-reduces per step for decoder_only at 16 quantizers x 1,024
codes in fp32 and bf16 (msprior.train.ddp.grad_bytes on the built model).

    python bench/ddp_compression.py                  # seeds 0 1 2, 100 steps
    python bench/ddp_compression.py --seeds 0 1 --steps 200
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def grad_bytes_full_size() -> dict:
    from msprior.config import load_config
    from msprior.model import DatasetFacts, build_prior
    from msprior.train.ddp import grad_bytes

    facts = DatasetFacts(num_quantizers=16, vocab_size=1024, cond_ratio=None, cond_vocab=0, cond_features=0,
                         feature_mean=[], feature_std=[])
    prior = build_prior(load_config("decoder_only").model, facts)
    return {c: grad_bytes(prior, c) for c in ("none", "bf16")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from msprior.train import train
    from tests._train_data import write_synthetic_table
    from tests.test_train_windows import TINY

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    work = tempfile.mkdtemp(prefix="bench-ddp-")
    write_synthetic_table(f"{work}/table")
    loss = {}
    # a first run fills the node cache: a cold cache draws from the files landed so far (timing-dependent)
    train("decoder_only", f"{work}/table", "warm-up", num_workers=2, batch_size=16, max_steps=args.steps,
          val_every=args.steps, storage_path=f"{work}/runs", tracking_uri=f"sqlite:///{work}/mlflow.db",
          progress=False, overrides=TINY)
    for seed, comp in itertools.product(args.seeds, ("none", "bf16")):
        t0 = time.perf_counter()
        s = train("decoder_only", f"{work}/table", f"s{seed}-{comp}", num_workers=2, batch_size=16,
                  max_steps=args.steps, val_every=args.steps, storage_path=f"{work}/runs",
                  tracking_uri=f"sqlite:///{work}/mlflow.db", progress=False,
                  overrides=TINY + [f"train.seed={seed}", f"train.grad_compression={comp}"])
        loss[seed, comp] = s["metrics"]["val_loss"]
        print(f"seed {seed} {comp:4s} val_loss {loss[seed, comp]:.6f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ray.shutdown()
    effects = [abs(loss[s, "bf16"] - loss[s, "none"]) for s in args.seeds]
    gaps = [abs(loss[a, "none"] - loss[b, "none"]) for a, b in itertools.combinations(args.seeds, 2)]
    print(f"hook effect |bf16 - none| per seed: {', '.join(f'{e:.5f}' for e in effects)} (max {max(effects):.5f})")
    if gaps:
        print(f"seed-to-seed gap (none): min {min(gaps):.5f}, max {max(gaps):.5f}; "
              f"max effect / min gap = {max(effects) / max(min(gaps), 1e-12):.3f}")
    b = grad_bytes_full_size()
    print(f"gradient bytes per step, decoder_only Q=16 V=1024: fp32 {b['none'] / 1e6:.1f} MB, "
          f"bf16 {b['bf16'] / 1e6:.1f} MB (ratio {b['bf16'] / b['none']:.2f})")


if __name__ == "__main__":
    main()
