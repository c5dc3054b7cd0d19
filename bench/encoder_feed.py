"""Does the encoder stay fed? Decode as its own Ray Data stage against the old in-actor decode, one run.

    python bench/encoder_feed.py [--minutes 20] [--capacity 16] [--old_task_mb 4] [--new_task_mb 32]

Both paths preprocess the same corpus into fresh tables on one local Ray (4 logical CPUs), one encoder
actor of 1 CPU (torch: 1 thread, from Ray's assignment), `--encode_batch_size` chunks per call:

    old   --decode_in_encoder: the actor decodes its task with --decode_threads 1 thread (the old
          default), tasks of --old_task_mb (the old 128 MB default, scaled to this corpus)
    new   CPU decode tasks (1 CPU each, as many as fit) feed the actor; tasks of --new_task_mb (the
          new 1024 MB default, scaled the same: 8x the old)

Measured per path: the encoder's busy fraction (time inside RAVE encode / the actor's wall from ready
to its last batch, written by the actor: `PreprocessRequest.stats_dir`), the driver's CPU seconds
(this process: Ray Data's executor runs here) per planned task, wall and x realtime. At scale the
driver's CPU is extrapolated as per-task CPU x tasks of 6.3 TB of input at 128 MB vs 1024 MB.
The encoder is bench/encode.py's RAVE-shaped one at a small capacity, so that, as a GPU is, it is
faster than one decode thread. The machine may be shared: say so with the figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encode import build_heavy, self_cpu_seconds, write_bench_corpus  # noqa: E402

SCALE_BYTES = 6.3e12  # 10,000 h of WAV (half as FLAC), docs/SCALE.md


def run_path(name: str, corpus: Path, rave: str, work: Path, args, old: bool) -> dict:
    from msprior.data import plan
    from msprior.data.preprocess import PreprocessRequest, preprocess

    table, stats = work / f"table-{name}", work / f"stats-{name}"
    shutil.rmtree(table, ignore_errors=True)
    shutil.rmtree(stats, ignore_errors=True)
    stats.mkdir(parents=True)
    req = PreprocessRequest(str(corpus), str(table), rave, num_secs=args.num_secs, min_frames=1, condition_ratio=0,
                            batch_size=args.encode_batch_size, num_workers=1, cpus_per_worker=1.0,
                            decode_in_encoder=old, decode_threads=1,
                            task_mb=args.old_task_mb if old else args.new_task_mb, progress=False,
                            stats_dir=str(stats))
    tasks = len(plan.tasks(plan.list_corpus(str(corpus))[1], req, 0))
    cpu0 = self_cpu_seconds()
    s = preprocess(req, echo=lambda *_: None)
    driver = self_cpu_seconds() - cpu0
    actors = [json.loads(Path(p).read_text()) for p in glob.glob(str(stats / "encoder-*.json"))]
    busy, wall = sum(a["busy_s"] for a in actors), sum(a["wall_s"] for a in actors)
    r = {"tasks": tasks, "task_mb": req.task_mb, "wall_s": s["wall_s"], "realtime": s["realtime"],
         "driver_cpu_s": driver, "driver_cpu_per_task_s": driver / tasks, "encoder_busy_s": busy,
         "encoder_wall_s": wall, "busy_fraction": busy / max(wall, 1e-9), "actors": len(actors),
         "torch_threads": [a["threads"] for a in actors], "files": s["files_encoded"]}
    print(name, json.dumps(r), flush=True)
    return r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="corpus length (audio minutes)")
    ap.add_argument("--file_secs", type=float, default=30.0)
    ap.add_argument("--capacity", type=int, default=16, help="encoder width (bench/encode.py's HeavyEncoder)")
    ap.add_argument("--num_secs", type=float, default=16.0)
    ap.add_argument("--encode_batch_size", type=int, default=16)
    ap.add_argument("--old_task_mb", type=float, default=4.0)
    ap.add_argument("--new_task_mb", type=float, default=32.0)
    ap.add_argument("--workdir", default="/tmp/msprior-bench-feed")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rave = str(work / f"heavy_c{args.capacity}.ts")
    params = build_heavy(rave, args.capacity)
    paths = write_bench_corpus(work / "corpus", args.minutes, args.file_secs)
    mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"corpus: {len(paths)} files, {args.minutes:.0f} min, {mb:.0f} MB; encoder {params / 1e6:.2f} M params",
          flush=True)
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", object_store_memory=1 << 30)
    try:
        warm = work / "corpus-warm"  # Ray's workers and both code paths warm, not measured
        warm.mkdir(exist_ok=True)
        for p in paths[:2]:
            shutil.copy(p, warm / p.name)
        for old in (True, False):
            run_path(f"warmup-{'old' if old else 'new'}", warm, rave, work, args, old=old)
        result = {"old": run_path("old", work / "corpus", rave, work, args, old=True),
                  "new": run_path("new", work / "corpus", rave, work, args, old=False)}
    finally:
        ray.shutdown()
    old, new = result["old"], result["new"]
    at_scale = {k: r["driver_cpu_per_task_s"] * SCALE_BYTES / (mb_ * 2**20) / 60
                for k, r, mb_ in (("old_128MB_min", old, 128), ("new_1024MB_min", new, 1024))}
    result.update(args=vars(args), corpus_mb=mb, params_M=params / 1e6, driver_cpu_at_scale=at_scale,
                  busy_ratio=new["busy_fraction"] / max(old["busy_fraction"], 1e-9),
                  wall_ratio=old["wall_s"] / new["wall_s"])
    print(f"encoder busy fraction: old {old['busy_fraction']:.2f} -> new {new['busy_fraction']:.2f} "
          f"(x{result['busy_ratio']:.2f}); wall old/new {result['wall_ratio']:.2f}; driver CPU per task: old "
          f"{old['driver_cpu_per_task_s'] * 1e3:.0f} ms ({old['tasks']} tasks) -> new "
          f"{new['driver_cpu_per_task_s'] * 1e3:.0f} ms ({new['tasks']} tasks); at 6.3 TB: old "
          f"{at_scale['old_128MB_min']:.1f} min vs new {at_scale['new_1024MB_min']:.1f} min of driver CPU")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
