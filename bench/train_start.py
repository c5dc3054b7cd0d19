"""`msprior train --max_steps 1` start to first step on S3 latent tables of 20 and 2,000 source files.

A local SeaweedFS serves the tables. Two layouts of the same rows: `indexed` (what preprocess
writes: the sources packed into a few data files + index.parquet) and `legacy` (one shard per
source, no index: read through the fallback that lists and reads every shard). Each command is a
fresh process (own Ray start); runs alternate 20 / 2,000 so machine load hits both alike. Prints
seconds to the `step 1` line and to exit, and the ratio 2,000 / 20 (goal <= 1.1 for `indexed`).

    python bench/train_start.py                 # indexed and legacy, 2 rounds
    python bench/train_start.py --layouts indexed --rounds 3
    python bench/train_start.py --data_only     # only open + load + check, in one process
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.seq_len=32",
        "train.batch_size=8", "train.val_batches=1", "data.val_fraction=0.05"]


def make_tables(work: str, server, sizes, layouts) -> dict:
    """Write each (layout, size) table locally, upload it to the bucket; returns {(layout, n): s3 uri}."""
    from msprior import storage
    from tests._train_data import write_synthetic_table

    out = {}
    for layout in layouts:
        for n in sizes:
            local = os.path.join(work, f"{layout}-{n}")
            # ~3 s of audio per source at 44.1 kHz / 2048: one chunk of 64 frames, 8 quantizers x 1024
            write_synthetic_table(local, num_files=n, chunks_per_file=1, frames=64, quantizers=8, vocab=1024,
                                  sources_per_file=n if layout == "indexed" else 1, index=layout == "indexed")
            uri = f"s3://bench/{layout}-{n}"
            files = storage.list_files(local)
            fs, root = storage.filesystem(uri)  # one client, parallel PUTs
            fs.put([os.path.join(local, rel) for rel, _ in files], [f"{root}/{rel}" for rel, _ in files])
            print(f"table {layout} {n} sources: {len(files)} objects on S3", flush=True)
            out[(layout, n)] = uri
    return out


def run_once(uri: str, work: str, tag: str) -> tuple:
    """(seconds to the `step 1` progress line, seconds to exit) of one `msprior train` process."""
    msprior = os.path.join(os.path.dirname(sys.executable), "msprior")
    cmd = [msprior, "train", "--db_path", uri, "--name", tag, "--max_steps", "1", "--val_every", "1",
           "--storage_path", os.path.join(work, "runs"), "--tracking_uri", f"sqlite:///{work}/mlflow.db"]
    for o in TINY:
        cmd += ["--override", o]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and "step 1/1" in line:
            first = time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{''.join(lines[-30:])}")
    return first, total


def data_path(uri: str) -> tuple:
    """(seconds to open the table from manifest + index, seconds to load and check it) in this process."""
    from msprior.data.layout import open_data
    from msprior.data.reader import ReadSpec, open_table

    t0 = time.perf_counter()
    table = open_table(uri, 0.05, 0)
    t1 = time.perf_counter()
    data = open_data(table, ReadSpec.of(table))  # the layout: footers and small columns, no token
    t2 = time.perf_counter()
    assert data.train_chunks + data.val_chunks == len(table.sources)
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[20, 2000])
    ap.add_argument("--layouts", nargs="+", default=["indexed", "legacy"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data_only", action="store_true",
                    help="time only opening + loading the table (one Ray, no training process)")
    args = ap.parse_args()

    from msprior.devstack import SeaweedS3

    work = tempfile.mkdtemp(prefix="msprior-train-start-")
    with SeaweedS3(data_dir=os.path.join(work, "s3")) as server:
        server.create_bucket("bench")
        os.environ.update(server.env())
        tables = make_tables(work, server, args.sizes, args.layouts)
        if args.data_only:
            import ray

            ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
            for layout in args.layouts:
                for r in range(args.rounds):
                    for n in args.sizes:
                        o, ld = data_path(tables[(layout, n)])
                        print(f"{layout:8s} {n:5d} sources, round {r}: open {o:6.2f} s, load + check {ld:6.2f} s",
                              flush=True)
            return
        for layout in args.layouts:
            best = {}
            for r in range(args.rounds):
                for n in args.sizes:
                    first, total = run_once(tables[(layout, n)], work, f"{layout}-{n}-{r}")
                    print(f"{layout:8s} {n:5d} sources, round {r}: first step {first:6.1f} s, exit {total:6.1f} s",
                          flush=True)
                    b = best.setdefault(n, [first, total])
                    best[n] = [min(b[0], first), min(b[1], total)]
            small, large = (best[n] for n in args.sizes)
            print(f"{layout}: best of {args.rounds}: first step {small[0]:.1f} s / {large[0]:.1f} s "
                  f"(ratio {large[0] / small[0]:.2f}); exit {small[1]:.1f} s / {large[1]:.1f} s "
                  f"(ratio {large[1] / small[1]:.2f})  goal <= 1.1", flush=True)


if __name__ == "__main__":
    main()
