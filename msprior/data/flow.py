"""The Ray Data run: tasks of files -> decode (CPU tasks) -> encode (actor pool) -> write (commit).

    from_items(tasks)       one row per task (~task_mb of input files, in plan.py's seeded order)
    decode  [CPU tasks]     decode.decode_task: one DECODED row per file (a row is never split, so
                            every chunk of a file reaches one encoder batch); Ray Data runs as many
                            as free CPUs allow (or --decode_concurrency), so encoders never wait on
                            one actor's decode threads
    encode  [actor pool]    encode.ChunkEncoder: --num_workers actors (num_gpus a GPU share each)
    write   [write tasks]   LedgerSink: bundles of ~target_file_mb -> commit.commit_bundle

Part of the table contract: a write task commits whole files only (`commit_bundle` checks each
source's chunks 0..n-1); a task that keeps failing costs only its files (`max_errored_blocks=-1`),
which report.json lists for a retry. `--decode_in_encoder` keeps the old path (decode threads inside
each encoder actor: `encode.Encoder`) for comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import pyarrow as pa

from msprior import devices, storage
from msprior.data import decode, encode
from msprior.data.commit import commit_bundle
from msprior.data.request import PreprocessRequest, RaveInfo, Settings


def encoder_memory(req: PreprocessRequest, s: Settings) -> int:
    """Ray `memory=` of one encoder: the model and a batch of audio with room for RAVE's activations."""
    if req.memory_per_worker_mb:
        return int(req.memory_per_worker_mb * 2**20)
    batch = req.batch_size * s.chunk_samples * 4
    return int(1024 * 2**20 + 8 * batch)  # Ray Data saw 953 MB for a 4 M-param encoder at batch 8 x 16 s


def _encoder_resources(req: PreprocessRequest, s: Settings) -> Dict:
    """num_cpus, num_gpus (a GPU share per actor) and memory= of an encoder, never more than the cluster has
    (an unschedulable actor would wait forever)."""
    import ray

    have = ray.cluster_resources()
    num_gpus = min(1.0, have.get("GPU", 0) / req.num_workers) if s.gpu else 0.0
    memory = min(encoder_memory(req, s), 0.8 * have.get("memory", 1e18) / req.num_workers)
    extra = devices.parse_resources(req.encoder_resources, "--encoder_resources")  # e.g. msprior_encode=1
    return {"num_cpus": req.cpus_per_worker, "num_gpus": num_gpus, "memory": memory,
            **({"resources": extra} if extra else {})}


def _largest_node_memory() -> float:
    import ray

    return max((n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=1e18) or 1e18


def build_stages(branches: List[Tuple["ray.data.Dataset", float]], s: Settings, req: PreprocessRequest,
                 rave: RaveInfo):
    """The decode stage (unless the old path) and the encoder pool. `branches`: (task rows, decode
    `memory=`) pairs, one decode stage each (`decode.split_long`: long files apart), one pool for all."""
    import ray

    pool = dict(compute=ray.data.ActorPoolStrategy(size=req.num_workers), max_restarts=-1, max_task_retries=2,
                fn_constructor_kwargs={"rave_ref": [ray.put(rave.data)], "settings": s}, **_encoder_resources(req, s))
    if req.decode_in_encoder:
        return _union([ds for ds, _ in branches]).map_batches(encode.Encoder, batch_size=1, batch_format="numpy", **pool)
    tasks = ray.data.TaskPoolStrategy(size=req.decode_concurrency)  # None: as many as free CPUs allow
    decoded = [ds.map_batches(decode.decode_task, fn_kwargs={"settings": s}, batch_size=1, batch_format="numpy",
                              compute=tasks, num_cpus=req.decode_cpus, max_retries=3,
                              **({"memory": memory} if memory else {})) for ds, memory in branches]
    return _union(decoded).map_batches(encode.ChunkEncoder, batch_size=None, batch_format="pyarrow", **pool)


def _union(parts: list):
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _rows(tasks: List[list]):
    """One Ray Data row (a few files) per task."""
    import ray

    items = [{"source": [f[0] for f in g], "path": [f[1] for f in g]} for g in tasks]
    return ray.data.from_items(items, override_num_blocks=len(items))


def encode_pending(tasks: List[list], s: Settings, req: PreprocessRequest, rave: RaveInfo) -> List[Dict]:
    """Decode, encode and commit the tasks' files; returns the write tasks' records (with `failed`)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    saved = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a task that keeps failing (a worker killed for memory) costs its
    # few files, reported and retried on resume, never the run
    explicit = devices.normalise(req.gpu, req.cpu) not in (None, devices.CPU)  # --gpu: wait for a GPU node
    want = {"GPU": 1.0, **devices.parse_resources(req.encoder_resources, "--encoder_resources")}
    machine = devices.Machine.of_ray(want, req.num_workers if explicit else 0, enough=1)
    dev = devices.choose(req.gpu, req.cpu, machine, mps=False)  # encoders share the GPUs
    devices.announce(dev if req.num_workers == 1 else dataclasses.replace(dev, index=None), "preprocess")
    s = dataclasses.replace(s, gpu=dev.gpu)
    node = _largest_node_memory()
    ds = build_stages([(_rows(part), decode.decode_memory(part, node)) for part in decode.split_long(tasks) if part],
                      s, req, rave)
    sink = make_sink(s)
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25, "max_retries": 3,
                                                 "memory": 3 * s.target_bytes})
    finally:
        ctx.max_errored_blocks = saved
    return sink.returns


def make_sink(s: Settings):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class LedgerSink(Datasink):
        """Ray Data write tasks: each bundle of ~target_bytes becomes one committed data file."""

        def __init__(self):
            self.returns: List[Dict] = []

        @property
        def min_bytes_per_write(self) -> int:
            return s.target_bytes

        def write(self, blocks, ctx) -> Dict:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"file": None, "skipped": [], "failed": []}
            t = pa.concat_tables(tables, promote_options="default")
            try:
                return commit_bundle(t, s)
            except OSError as e:
                if not storage.is_storage_full(e):
                    raise
                why = f"{storage.STORAGE_FULL}: {e}"[:300]  # the table's disk: every file retried on resume
                return {"file": None, "skipped": [], "failed": [[src, why] for src in sorted(set(t["source"].to_pylist()))]}

        def on_write_complete(self, write_result) -> None:
            self.returns = list(write_result.write_returns)

    return LedgerSink()
