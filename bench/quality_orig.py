"""The original MSPrior's side of bench/quality.py: runs INSIDE the original's venv (acids-msprior
1.1.3 and its own dependencies), never in msprior's. Imports nothing from this repository.

1. Writes the training tokens into the original's own dataset format (an LMDB of udls
   AudioExamples, buffer "rave" [frames, quantizers] int16, keys `%016d`) through the original's
   own `msprior.preprocessor.preprocess_batch`, as its `msprior_scripts/preprocess.py` does.
   The original's train script holds out `--val_size` examples with `random_split(seed 42)`: the
   database gets the N training chunks plus ONE held-out chunk placed at the index that split
   sends to validation, so the original trains on exactly the N training chunks msprior gets.
2. Reads the database back through the original's `SequenceDataset` and checks the tokens equal
   the ones given (same integer tokens for both tools).
3. Trains with the original's own `msprior_scripts/train.py`, patched only where it insists on a
   GPU (`accelerator='gpu'`, `devices=[FLAGS.gpu]`) and given `max_steps`; seeded here.
4. Scores the trained weights (as training left them) on the held-out windows with the original's
   own model: teacher-forced cross-entropy per quantizer (nats), token-weighted over batches.

    python bench/quality_orig.py --tokens DIR --work DIR --seed 0 --steps 1512 --batch_size 16 \
        --binding MODEL_DIM=128 ... --out result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import sys
import time

import numpy as np


def chunks_of(path: str):
    z = np.load(path)
    rave, lengths = z["rave"], z["lengths"]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return [rave[s:s + n] for s, n in zip(starts, lengths)]


def token_hash(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int16).tobytes())
    return h.hexdigest()


def val_position(n_train: int, val_size: int = 1) -> int:
    """The database index the train script's `random_split(..., Generator().manual_seed(42))`
    sends to validation when the database holds n_train + 1 examples."""
    import torch

    perm = torch.randperm(n_train + val_size, generator=torch.Generator().manual_seed(42)).tolist()
    return perm[n_train]


def write_database(db_path: str, train, heldout_chunk) -> list:
    """The LMDB the original trains on; returns its examples in key order."""
    import lmdb
    import msprior.preprocessor as pre

    class Tokens(pre.Preprocessor):  # what RAVEEncoder returns, already computed: [T, Q] per chunk
        def __call__(self, arrays, paths):
            return list(arrays)

    pre.register_preprocessor(Tokens("rave", mode="dynamic", dtype=np.int16, resample=False))
    pos = val_position(len(train))
    examples = list(train[:pos]) + [heldout_chunk] + list(train[pos:])
    aes = pre.preprocess_batch(examples, [f"chunk{i}" for i in range(len(examples))], None)
    env = lmdb.open(db_path, map_size=1 << 32, readahead=False)
    with env.begin(write=True) as txn:
        for i, ae in enumerate(aes):
            txn.put(f"{i:016d}".encode(), ae.SerializeToString())
    env.sync()
    env.close()
    return examples


def check_database(db_path: str, examples) -> str:
    """The tokens the original's SequenceDataset reads back, compared with what was written;
    returns the hash of its training examples (every example but the one sent to validation)."""
    from msprior.dataset import SequenceDataset

    ds = SequenceDataset(db_path=db_path)
    got = [ds[i]["rave"] for i in range(len(ds))]
    if len(got) != len(examples) or any(not np.array_equal(g, e) for g, e in zip(got, examples)):
        raise SystemExit("quality_orig: the original's dataset reads back other tokens than were written")
    pos = val_position(len(got) - 1)
    return token_hash(got[:pos] + got[pos + 1:])


def patched_train_script(work: str, steps: int) -> str:
    """A copy of msprior_scripts/train.py with the GPU-only lines made CPU (and max_steps)."""
    import msprior_scripts

    src = open(os.path.join(os.path.dirname(msprior_scripts.__file__), "train.py")).read()
    patches = [("accelerator='gpu'", "accelerator='cpu'"), ("devices=[FLAGS.gpu]", f"devices=1, max_steps={steps}")]
    for old, new in patches:
        if src.count(old) != 1:
            raise SystemExit(f"quality_orig: train.py no longer holds {old!r} once; update the patch")
        src = src.replace(old, new)
    path = os.path.join(work, "train_cpu.py")
    with open(path, "w") as f:
        f.write(src)
    return path


def train(work: str, db_path: str, args) -> dict:
    """Run the patched train script in this process; keep the LightningModule it fitted."""
    import pytorch_lightning as pl

    fitted = {}
    fit = pl.Trainer.fit

    def keep(self, model, *a, **kw):  # harness hook: the weights as training leaves them
        fit(self, model, *a, **kw)
        fitted["model"], fitted["step"] = model, self.global_step

    pl.Trainer.fit = keep
    pl.seed_everything(args.seed, workers=True)
    script = patched_train_script(work, args.steps)
    sys.argv = [script, "--config", "decoder_only", "--db_path", db_path, "--name", f"seed{args.seed}",
                "--batch_size", str(args.batch_size), "--val_size", "1", "--val_every", str(args.steps)]
    for b in args.binding:
        sys.argv += ["--override", b]
    cwd = os.getcwd()
    os.chdir(work)  # the script writes runs/NAME under the current folder
    t0, c0 = time.time(), time.process_time()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # absl's app.run exits after main
        if e.code not in (None, 0):
            raise
    finally:
        os.chdir(cwd)
    if "model" not in fitted:
        raise SystemExit("quality_orig: the train script returned without fitting")
    return {"model": fitted["model"], "steps_done": int(fitted["step"]), "train_s": time.time() - t0,
            "train_cpu_s": time.process_time() - c0}


def score(model, windows: np.ndarray, batch_size: int):
    """Teacher-forced CE per quantizer (nats), mean over every held-out target token; and the
    largest difference between a batch's mean over quantizers and the original's own `loss`."""
    import torch

    model.eval()
    q = windows.shape[-1]
    total, count, worst = torch.zeros(q, dtype=torch.float64), 0, 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            w = torch.from_numpy(windows[i:i + batch_size].astype(np.int64))
            x, y = w[:, :-1], w[:, 1:]
            logits = model(x, None, y)  # [B, T, Q, V]: the original's forward, targets teacher-forced
            logp = torch.log_softmax(logits.float(), -1)
            ce = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [B, T, Q]
            total += ce.double().sum(dim=(0, 1))
            count += y.shape[0] * y.shape[1]
            own, _ = model.loss({"decoder_inputs": x, "decoder_targets": y, "encoder_inputs": torch.tensor([])})
            worst = max(worst, abs(float(own) - float(ce.mean())))
    return (total / count).tolist(), worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1512)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--binding", action="append", default=[])
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    train_chunks = chunks_of(os.path.join(args.tokens, "train.npz"))
    heldout_chunks = chunks_of(os.path.join(args.tokens, "heldout.npz"))
    if len(train_chunks) < args.batch_size:
        raise SystemExit(f"quality_orig: {len(train_chunks)} training chunks < batch {args.batch_size}: the "
                         "original draws one window per chunk per batch slot (drop_last); make a larger corpus")
    db = os.path.join(args.work, "db")
    if os.path.exists(db):
        import shutil

        shutil.rmtree(db)
    examples = write_database(db, train_chunks, heldout_chunks[0])
    db_hash = check_database(db, examples)
    run = train(args.work, db, args)
    windows = np.load(os.path.join(args.tokens, "heldout_windows.npy"))
    ce, own_loss_diff = score(run["model"], windows, args.batch_size)
    result = {"tool": "original", "seed": args.seed, "steps": args.steps, "steps_done": run["steps_done"],
              "train_s": round(run["train_s"], 1),
              "train_cpu_s": round(run["train_cpu_s"], 1), "own_loss_max_diff": own_loss_diff, "ce": ce, "mean": float(np.mean(ce)),
              "train_tokens_sha256": db_hash, "params": sum(p.numel() for p in run["model"].parameters()),
              "windows": int(len(windows)), "bindings": args.binding}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "ce"}))


if __name__ == "__main__":
    main()
