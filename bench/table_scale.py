"""Training on a latent table larger than memory (issue 21): a big table against a 10x smaller one,
the object store capped at 1 GB, and a 4-trial sweep's storage reads on the node.

    python bench/table_scale.py --work /var/tmp/msprior-scale                 # 0.6 and 6 GB, sweep
    python bench/table_scale.py --work /var/tmp/msprior-scale --keep_tables   # reuse them next time

Writes both tables in the documented format (docs/ARCHITECTURE.md, "Latent table": data files of
~192 MB of rows, zstd, row groups of ~64 MB, index.parquet, manifest.json; 16 quantizers x 1024,
chunks of 344 frames), then runs `msprior.train.run.train` on each in a fresh child process that
holds its own Ray (`ray.init(object_store_memory=1e9, num_cpus=2)`) and a cold node cache. The
parent samples the child's process tree (Ray's processes are its descendants) every 0.5 s: peak
PSS anon + shmem (heap and the object store; the memory-mapped node cache is page cache, excluded).
Prints the wall of the train call, the time to the first step (the step-1 `train_loss` timestamp
in MLflow) and the ratios big / small. Then a 4-trial sweep on the big table, cold cache: bytes
read from storage on this node (the node cache's read log) against the table's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Q, VOCAB, FRAMES, CHUNKS_PER_SOURCE = 16, 1024, 344, 16  # 16 s chunks at ratio 2048, ~4 min sources
TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.seq_len=64",
        "train.val_batches=1", "train.log_every=1", "data.val_fraction=0.05"]


# --- the tables ---------------------------------------------------------------------------------


def write_table(root: Path, gb: float, file_mb: int = 192, rg_mb: int = 64) -> dict:
    """A format-2 table of `gb` GB of tokens written directly (no audio); returns its sizes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from msprior.data.table import INDEX_SCHEMA, write_index

    (root / "latents").mkdir(parents=True, exist_ok=True)
    chunk_values = FRAMES * Q
    total = int(gb * 1e9 // (chunk_values * 2)) // CHUNKS_PER_SOURCE * CHUNKS_PER_SOURCE
    per_file = (file_mb << 20) // (chunk_values * 2) // CHUNKS_PER_SOURCE * CHUNKS_PER_SOURCE  # whole sources
    base = np.random.default_rng(0).integers(0, VOCAB, per_file * chunk_values, dtype=np.int16)
    index = {"source": [], "file": [], "chunks": [], "frames": []}
    for f, first in enumerate(range(0, total, per_file)):
        n = min(per_file, total - first)
        values = (base[:n * chunk_values] + f) % VOCAB  # another file, other tokens
        chunk = np.arange(first, first + n)
        sources = [f"src/{c // CHUNKS_PER_SOURCE:07d}.wav" for c in chunk]
        rel = f"latents/part-{f:05d}.parquet"
        pq.write_table(pa.table({
            "source": pa.array(sources, pa.string()),
            "chunk": pa.array(chunk % CHUNKS_PER_SOURCE, pa.int32()),
            "start_s": pa.array((chunk % CHUNKS_PER_SOURCE) * 16.0, pa.float64()),
            "frames": pa.array(np.full(n, FRAMES), pa.int32()),
            "rave": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * chunk_values),
                                             pa.array(values.astype(np.int16))),
        }), root / rel, compression="zstd", row_group_size=(rg_mb << 20) // (chunk_values * 2))
        for src in range(first // CHUNKS_PER_SOURCE, (first + n) // CHUNKS_PER_SOURCE):
            index["source"].append(f"src/{src:07d}.wav"), index["file"].append(rel)
            index["chunks"].append(CHUNKS_PER_SOURCE), index["frames"].append(CHUNKS_PER_SOURCE * FRAMES)
    write_index(str(root), pa.table(index, schema=INDEX_SCHEMA))
    _manifest(root, total)
    data = sum(p.stat().st_size for p in (root / "latents").glob("*.parquet"))
    return {"tokens_gb": total * chunk_values * 2 / 1e9, "files": f + 1, "file_bytes": data}


def _manifest(root: Path, chunks: int) -> None:
    manifest = {
        "format_version": 2, "msprior_version": "0.1.0", "created": "2026-12-06T00:00:00Z",
        "rave": {"file": "rave.ts", "original_name": "bench.ts", "sha256": "0" * 64, "sr": 44100, "ratio": 2048,
                 "latent_size": Q, "num_quantizers": Q, "vocab_size": VOCAB, "continuous": False, "resolution": None},
        "chunk": {"num_secs": 16.0, "frames": FRAMES}, "conditioning": {},
        "counts": {"files_ok": chunks // CHUNKS_PER_SOURCE, "files_skipped": 0, "chunks": chunks,
                   "frames": chunks * FRAMES, "seconds": chunks * 16.0}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "report.json").write_text(json.dumps({"skipped": []}))


# --- memory of a process tree -------------------------------------------------------------------


def _tree(pid: int) -> list:
    parents = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                parents[int(p)] = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def _anon_shmem(pid: int) -> int:
    """PSS of anonymous and shared (object store) memory in bytes; file-backed pages excluded."""
    total = 0
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, sum(_anon_shmem(p) for p in _tree(self.pid)))
            time.sleep(0.5)


# --- children: one Ray each ---------------------------------------------------------------------


def _ray_init() -> None:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, object_store_memory=10**9, include_dashboard=False, logging_level="WARNING")


def child_train(db: str, work: str, name: str, steps: int) -> dict:
    from msprior.train import tracking
    from msprior.train.run import train

    _ray_init()
    uri = f"sqlite:///{os.environ.get('TABLE_SCALE_MLFLOW_DIR') or work}/mlflow-{name}.db"
    t0 = time.time()
    Path(work, f"t0-{name}").write_text(str(t0))  # the fill timeline's origin (see `timeline`)
    s = train("decoder_only", db, name, overrides=TINY, num_workers=1, batch_size=8, max_steps=steps,
              val_every=steps, storage_path=f"{work}/runs", tracking_uri=uri, progress=False)
    wall = time.time() - t0
    hist = tracking.client(uri).get_metric_history(s["mlflow_run_id"], "train_loss")
    at = {h.step: h.timestamp / 1000 for h in hist}
    first = at[1] - t0
    tail = steps - steps // 3  # the last third of the steps: the rate once most fills have landed
    return {"wall_s": wall, "first_step_s": first, "step": s["step"], "last_third_s": at[steps] - at[tail],
            "last_step_s": at[steps] - t0}


def child_sweep(db: str, work: str, trials: int, steps: int) -> dict:
    import yaml

    from msprior.train.tune import tune

    _ray_init()
    spec = {"base": "decoder_only", "overrides": TINY, "search": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
            "scheduler": {"grace_period": 100, "reduction_factor": 2}, "num_samples": trials,
            "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
            "train": {"max_steps": steps, "val_every": steps, "batch_size": 8}}
    Path(work, "sweep.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.time()
    s = tune(str(Path(work, "sweep.yaml")), db, f"scale-sweep-{int(time.time())}",
             tracking_uri=f"sqlite:///{work}/mlflow-sweep.db", storage_path=f"{work}/runs", verbose=0)
    return {"wall_s": time.time() - t0, "trials_ok": sum(t["error"] is None for t in s["trials"])}


def run_child(args: list, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)  # a cold node cache for every measured run
    env = {**os.environ, "MSPRIOR_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=str(ROOT))
    mem = Sampler(proc.pid)
    mem.start()
    out = proc.communicate()[0]
    mem.done.set()
    if proc.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed ({proc.returncode}):\n{out[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_mb": mem.peak / 2**20}


def timeline(cache: Path, t0: float, last_step_s: float) -> str:
    """Storage reads by kind (MB), when the node cache's fills landed (s after the train call) and
    how many had joined the draw by the last step."""
    rows = [json.loads(line) for line in open(cache / "fills.jsonl")]
    mb: dict = {}
    for r in rows:
        mb[r["kind"]] = mb.get(r["kind"], 0) + r["read_bytes"] / 1e6
    t = sorted(r["t"] - t0 for r in rows if r["kind"] == "fill" and "t" in r)
    when = f"fills landed {t[0]:.1f} .. {t[-1]:.1f} s" if t else "no fill"
    drawn = sum(x <= last_step_s for x in t)
    return (f"reads (MB) {({k: round(v) for k, v in mb.items()})}; {len(t)} {when}; "
            f"{drawn} of {len(t)} files in the draw at the last step ({last_step_s:.1f} s)")


def reads(cache: Path) -> dict:
    by_kind: dict = {}
    keys = []
    for line in open(cache / "fills.jsonl"):
        r = json.loads(line)
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + r["read_bytes"]
        keys += [r["key"]] if r["kind"] == "fill" else []
    return {"bytes": by_kind, "fills": len(keys), "duplicate_fills": len(keys) - len(set(keys))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/var/tmp/msprior-table-scale")
    ap.add_argument("--small_gb", type=float, default=0.6)
    ap.add_argument("--big_gb", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--sweep_steps", type=int, default=300)
    ap.add_argument("--keep_tables", action="store_true")
    ap.add_argument("--mlflow_dir", default="", help="where the trainings' sqlite MLflow lives (default: --work); "
                                                     "e.g. /dev/shm to take its per-step commits off the cache's disk")
    ap.add_argument("--skip_train", action="store_true", help="only the sweep (tables kept from an earlier run)")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        out = child_train(*rest[:3], int(rest[3])) if kind == "train" else child_sweep(rest[0], rest[1], int(rest[2]),
                                                                                        int(rest[3]))
        print(json.dumps(out), flush=True)
        return
    work = Path(a.work)
    if a.mlflow_dir:
        os.environ["TABLE_SCALE_MLFLOW_DIR"] = a.mlflow_dir  # the children inherit it
    tables = {}
    for tag, gb in (("small", a.small_gb), ("big", a.big_gb)):
        root = work / f"table-{tag}"
        if not (root / "manifest.json").exists():
            t0 = time.time()
            info = write_table(root, gb)
            print(f"wrote {tag} table: {info} in {time.time() - t0:.0f} s", flush=True)
        tables[tag] = root
    if not a.skip_train:
        compare(a, work, tables)
    if a.trials:
        sweep(a, work, tables)
    if not a.keep_tables:
        shutil.rmtree(work, ignore_errors=True)


def compare(a, work: Path, tables: dict) -> None:
    res = {}
    for tag in ("small", "big"):
        res[tag] = run_child(["train", str(tables[tag]), str(work), f"scale-{tag}-{int(time.time())}", str(a.steps)],
                             work / f"cache-{tag}")
        print(f"{tag}: {res[tag]}", flush=True)
        t0 = max(work.glob("t0-scale-" + tag + "-*"), key=lambda p: p.stat().st_mtime)
        print(f"{tag}: {timeline(work / f'cache-{tag}', float(t0.read_text()), res[tag]['last_step_s'])}", flush=True)
        shutil.rmtree(work / f"cache-{tag}", ignore_errors=True)
    s, b = res["small"], res["big"]
    print(f"\nbig/small ({a.big_gb:g} GB vs {a.small_gb:g} GB of tokens, {a.steps} steps, object store 1 GB): "
          f"peak memory {b['peak_mb']:.0f} / {s['peak_mb']:.0f} MB = {b['peak_mb'] / s['peak_mb']:.2f}; "
          f"wall {b['wall_s']:.1f} / {s['wall_s']:.1f} s = {b['wall_s'] / s['wall_s']:.2f}; "
          f"first step {b['first_step_s']:.1f} / {s['first_step_s']:.1f} s = "
          f"{b['first_step_s'] / s['first_step_s']:.2f}; last third of the steps {b['last_third_s']:.1f} / "
          f"{s['last_third_s']:.1f} s = {b['last_third_s'] / max(s['last_third_s'], 1e-9):.2f}",
          flush=True)


def sweep(a, work: Path, tables: dict) -> None:
    """A sweep on the big table, cold node cache: what the node read from storage, against the table."""
    sw = run_child(["sweep", str(tables["big"]), str(work), str(a.trials), str(a.sweep_steps)], work / "cache-sweep")
    r = reads(work / "cache-sweep")
    table_bytes = sum(p.stat().st_size for p in (tables["big"] / "latents").glob("*.parquet"))
    total = sum(r["bytes"].values())
    print(f"sweep: {sw}; reads on this node: {r}; table {table_bytes / 1e9:.2f} GB of data files; read "
          f"{total / 1e9:.2f} GB = {total / table_bytes:.2f} x the table for {a.trials} trials "
          f"(fills {r['bytes'].get('fill', 0) / table_bytes:.2f} x, {r['duplicate_fills']} files decoded twice)",
          flush=True)
    shutil.rmtree(work / "cache-sweep", ignore_errors=True)


if __name__ == "__main__":
    main()
