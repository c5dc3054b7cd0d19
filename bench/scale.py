"""Scale of the preprocess write path: local disk vs S3 in one run, driver CPU share, objects written,
train start-up on S3 tables of 20 and 2,000 files, and the peak RSS of a decode worker on a 1-hour file.

    python bench/scale.py                  # everything (the corpus part takes ~10 min on 2 cores)
    python bench/scale.py --only rss       # the 1-hour file only
    python bench/scale.py --only corpus --files 2000 --secs 2

Ratios are against baselines measured in the same run (the machine may be shared: say so with
the figures). Corpus: own demo codec (`msprior codec`), synthetic tones/noise (msprior.data.synthetic).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import ray_tree_cpu, self_cpu_seconds  # noqa: E402  (the same /proc accounting)

MIN_FRAMES, SEQ = 65, 64  # 2 s files are 86 frames of the demo codec: windows of 64 + 1
TRAIN_OVERRIDES = [f"model.seq_len={SEQ}", "model.dim=64", "model.num_layers=2", "model.num_heads=2",
                   "model.head_dim=32", "train.batch_size=8"]


# --- peak RSS of a decode worker on a 1-hour file -----------------------------------------------------


def decode_child(path: str) -> None:
    """The decode side of a task alone: stream, resample, chunk, features (what the decode thread does)."""
    import numpy as np

    from msprior.data import features as feat
    from msprior.data.decode import file_events
    from msprior.data.request import Settings

    sr, ratio, n = 44100, 1024, len(feat.feature_names())
    s = Settings(audio_root=str(Path(path).parent), out_path="", run_id="", sr=sr, ratio=ratio,
                 chunk_samples=round(16 * sr / ratio) * ratio, min_frames=257, resolution=64, batch_size=64,
                 condition_ratio=4, centroids=np.zeros((8, n), np.float32), scale=np.ones(n, np.float32))
    t = time.perf_counter()
    events = [ev[0] for ev in file_events("long.wav", path, s)]
    print(json.dumps({"chunks": events.count("chunk"), "last": events[-1], "wall_s": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss_child(path: str, rave: str, conditioning: bool, batch_size: int = 64) -> None:
    """Run one encode task (decode thread + RAVE encode) over `path` in this process; print peak RSS."""
    import numpy as np

    from msprior.data import features as feat
    from msprior.data.encode import Encoder
    from msprior.data.request import Settings

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sr, ratio = 44100, 1024
    s = Settings(audio_root=str(Path(path).parent), out_path="", run_id="", sr=sr, ratio=ratio,
                 chunk_samples=round(16 * sr / ratio) * ratio, min_frames=257, resolution=64,
                 batch_size=batch_size, condition_ratio=4 if conditioning else 0,
                 centroids=np.zeros((8, len(feat.feature_names())), np.float32) if conditioning else None,
                 scale=np.ones(len(feat.feature_names()), np.float32) if conditioning else None,
                 threads=2)
    enc = Encoder([Path(rave).read_bytes()], s)
    t = time.perf_counter()
    out = enc({"source": np.array(["long.wav"]), "path": np.array([path])})
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": out.num_rows, "errors": [e for e in out["error"].to_pylist() if e],
                      "peak_rss_mb": peak / 1024, "rss_before_task_mb": base / 1024, "wall_s": wall}))


def old_decode_child(path: str) -> None:
    """The previous path: the whole file's bytes, decoded and resampled at once."""
    from msprior.data import audio as audio_mod

    with open(path, "rb") as f:
        x, _, _ = audio_mod.decode(f.read(), 44100)
    print(json.dumps({"samples": len(x), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_rss(work: Path, rave: str, old: bool) -> dict:
    import numpy as np
    import soundfile as sf

    path = work / "one_hour_48k_stereo.wav"
    if not path.exists():  # 1 h of 48 kHz stereo PCM16 (660 MiB), written in 1-minute blocks
        rng = np.random.default_rng(0)
        with sf.SoundFile(str(path), "w", 48000, 2, "PCM_16") as f:
            t = np.arange(48000 * 60) / 48000
            for m in range(60):
                tone = 0.2 * np.sin(2 * np.pi * (110 + 5 * m) * t)
                f.write(np.stack([tone + 0.01 * rng.standard_normal(len(t)), tone], 1))
    out = {"file": str(path), "size_mb": path.stat().st_size / 2**20}
    for name, args in (("decode_task", ["--decode_child", str(path)]),
                       ("encode_task_batch16", ["--rss_child", str(path), rave, "16"]),
                       ("encode_task_batch64", ["--rss_child", str(path), rave, "64"]),
                       ("old_whole_file_decode", ["--old_child", str(path)])):
        if name.startswith("old") and not old:
            continue
        r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        out[name] = json.loads(line[-1]) if line else {"error": r.stderr[-1500:]}
        print(name, out[name], flush=True)
    return out


# --- the 2,000-file corpus: local disk vs S3, driver CPU, objects -------------------------------------


def objects_under(table: str) -> int:
    from msprior import storage

    return len(storage.list_files(table))


class RayCpu(threading.Thread):
    """CPU seconds of every process of the Ray node this driver started, sampled every 0.25 s and kept
    per pid (a worker that exits between samples loses at most 0.25 s; its parent may not reap it)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.first, self.last, self.stop = {}, {}, threading.Event()
        self.sample(first=True)

    def sample(self, first=False) -> None:
        for pid, cpu in ray_tree_cpu().items():
            self.first.setdefault(pid, cpu if first else 0.0)
            self.last[pid] = cpu

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.sample()

    def total(self) -> float:
        self.stop.set()
        self.join()
        self.sample()
        return sum(self.last[p] - self.first[p] for p in self.last)


def run_preprocess(audio: str, out: str, rave: str, workers: int) -> dict:
    from msprior.data import PreprocessRequest, preprocess

    ray_cpu = RayCpu()
    ray_cpu.start()
    cpu0, t0 = self_cpu_seconds(), time.perf_counter()
    s = preprocess(PreprocessRequest(audio, out, rave, min_frames=MIN_FRAMES, num_workers=workers,
                                     cpus_per_worker=1.0, progress=False), echo=lambda *_: None)
    wall = time.perf_counter() - t0
    driver, others = self_cpu_seconds() - cpu0, ray_cpu.total()
    r = {"wall_s": wall, "driver_cpu_s": driver, "ray_cpu_s": others,
         "driver_cpu_share": driver / max(1e-9, driver + others), "objects": objects_under(out),
         "files_encoded": s["files_encoded"], "data_files": s["data_files_written"]}
    print(out, json.dumps(r), flush=True)
    return r


def train_start(table: str, work: Path, name: str, env: dict) -> dict:
    """`msprior train --max_steps 1` as a user runs it: wall from launch to exit (Ray start included)."""
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).parent / "msprior"), "train", "--db_path", table, "--name", name,
                        "--max_steps", "1", "--val_every", "1", "--storage_path", str(work / "runs"),
                        "--tracking_uri", f"sqlite:///{work / 'mlflow.db'}",
                        *sum((["--override", o] for o in TRAIN_OVERRIDES), [])],
                       capture_output=True, text=True, env=env, timeout=1800)
    out = {"wall_s": time.perf_counter() - t0, "rc": r.returncode}
    if r.returncode:
        out["error"] = r.stderr[-800:]
    print("train", table, out, flush=True)
    return out


def bench_corpus(work: Path, rave: str, files: int, secs: float, workers: int, train: bool) -> dict:
    import ray

    from msprior.data.synthetic import write_corpus
    from msprior.devstack import SeaweedS3

    corpus = work / f"corpus-{files}x{secs:g}s"
    if not corpus.exists():
        write_corpus(str(corpus), n_files=files, seconds=secs, seed=0)
    small = work / "corpus-20"
    if not small.exists():
        small.mkdir()
        for p in sorted(x for x in corpus.rglob("*") if x.is_file())[:20]:
            dst = small / p.relative_to(corpus)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
    result = {"files": files, "secs": secs, "workers": workers}
    with SeaweedS3(data_dir=str(work / "seaweed")) as s3:
        s3.create_bucket("bench")
        os.environ.update(s3.env())
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", object_store_memory=1 << 30)
        try:
            run = int(time.time())
            # local, S3, local again: the first run also warms the page cache and Ray's workers
            for key, out in (("local_1", str(work / "table-local-1")), ("s3", f"s3://bench/t{run}/big"),
                             ("local_2", str(work / "table-local-2"))):
                shutil.rmtree(out, ignore_errors=True) if not out.startswith("s3://") else None
                result[key] = run_preprocess(str(corpus), out, rave, workers)
            result["s3_small"] = run_preprocess(str(small), f"s3://bench/t{run}/small", rave, workers)
        finally:
            ray.shutdown()
        result["local"] = min((result["local_1"], result["local_2"]), key=lambda r: r["wall_s"])
        result["s3_over_local_wall"] = result["s3"]["wall_s"] / result["local"]["wall_s"]
        print(f"S3 / local wall = {result['s3_over_local_wall']:.2f} (goal <= 1.5); driver CPU share "
              f"local {result['local']['driver_cpu_share']:.1%}, S3 {result['s3']['driver_cpu_share']:.1%} "
              f"(goal < 10%); objects: S3 table {result['s3']['objects']}", flush=True)
        if train:
            env = {**os.environ}
            env.pop("RAY_ADDRESS", None)
            result["train_20"] = train_start(f"s3://bench/t{run}/small", work, f"small{run}", env)
            result["train_2000"] = train_start(f"s3://bench/t{run}/big", work, f"big{run}", env)
            result["train_ratio"] = result["train_2000"]["wall_s"] / result["train_20"]["wall_s"]
            print(f"train start to first step: 2000-file / 20-file = {result['train_ratio']:.2f} (goal <= 1.1)")
    return result


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--rss_child":
        return rss_child(sys.argv[2], sys.argv[3], conditioning=True, batch_size=int(sys.argv[4]))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--decode_child":
        return decode_child(sys.argv[2])
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--old_child":
        return old_decode_child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["rss", "corpus"], default=None)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no_train", action="store_true")
    ap.add_argument("--old", action="store_true", help="also measure the old whole-file decode (~5 GB)")
    ap.add_argument("--workdir", default="/tmp/msprior-bench-scale")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from msprior.codec import save_codec

    rave = save_codec(str(work / "codec.ts"), discrete=False)
    result = {"machine": f"{os.cpu_count()} cores", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.only in (None, "rss"):
        result["rss"] = bench_rss(work, rave, args.old)
    if args.only in (None, "corpus"):
        result["corpus"] = bench_corpus(work, rave, args.files, args.secs, args.workers, not args.no_train)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
