"""Audio corpus (dir or s3://) -> latent table (dir or s3://), with Ray Data: the run, step by step.

    lease + intent (driver)     take the table's lease; write (or check) intent.json + centroids.npy
                                (msprior.data.lease, msprior.data.intent)
    list + pending (driver)     list the corpus; drop what the ledger says is committed or bad for good;
                                group the rest in a seeded order into tasks of ~task_mb (plan.py)
    decode  [CPU tasks]         stream-decode, resample, chunk, features (decode.py)
    encode  [actor pool]        RAVE tokens, every chunk of a file in the same batch (encode.py)
    write   [Ray write tasks]   bundles of ~target_file_mb -> one Parquet data file, then its ledger
                                record (the commit; msprior.data.commit), run by flow.py
    finish (driver)             index.parquet, report.json, manifest.json from the ledger records only
                                (finish.py)

Resume: committed sources (in the ledger) and files skipped for good are not read again; a data file
without its record is deleted; files that failed for a transient cause are retried. A source is in
exactly one committed file, complete, or absent. See docs/ARCHITECTURE.md ("Latent table").
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Dict, Optional, Tuple

from msprior import devices, storage
from msprior.data import commit as commit_mod
from msprior.data import faults, finish, flow, intent as intent_mod, plan
from msprior.data.lease import Lease
from msprior.data.progress import Progress
from msprior.data.request import PreprocessError, PreprocessRequest, RaveInfo, Settings, note_original, validate
from msprior.data import table as tbl

__all__ = ["preprocess", "PreprocessRequest", "PreprocessError", "Settings", "RaveInfo"]


def _tuple(v) -> Optional[Tuple[float, ...]]:
    return tuple(float(x) for x in v) if v is not None else None


def _settings(req: PreprocessRequest, intent: Dict, audio_root: storage.Location, out: storage.Location, run_id: str,
              cond, epoch: int) -> Settings:
    """The plain values every Ray task of this run gets (torch threads: from Ray's assignment)."""
    rave, chunk = intent["rave"], intent["chunk"]
    return Settings(audio_root=audio_root, out_path=out, run_id=run_id, sr=rave["sr"], ratio=rave["ratio"],
                    chunk_samples=chunk["frames"] * rave["ratio"], min_frames=req.min_frames,
                    resolution=req.resolution, batch_size=req.batch_size, condition_ratio=req.condition_ratio,
                    centroids=cond[0], scale=cond[1], threads=req.threads_per_worker or 0,
                    normalize=req.normalize, silence_db=req.silence_threshold, pad_short=req.short == "pad",
                    target_bytes=int(req.target_file_mb * 2**20), decode_threads=req.decode_threads,
                    latent_loc=_tuple(rave.get("latent_loc")), latent_scale=_tuple(rave.get("latent_scale")),
                    epoch=epoch, faults=faults.spec() or None, stats_dir=req.stats_dir)


def _run(pending, s: Settings, req: PreprocessRequest, rave: RaveInfo, seed: int) -> list:
    """Encode the pending files (with the progress line); the write tasks' records."""
    progress = Progress(len(pending)) if req.progress else None
    if progress:
        s = dataclasses.replace(s, progress=progress.queue)
        progress.start()
    try:
        return flow.encode_pending(plan.tasks(pending, req, seed), s, req, rave)
    finally:
        if progress:
            progress.close()


def preprocess(req: PreprocessRequest, echo=print) -> Dict:
    """Encode the audio under `req.audio` into the latent table `req.out_path`; return a summary.

    Uses the running Ray runtime (or starts a local one). Raises PreprocessError (one line) for bad
    arguments, a table made with other settings, a table another live run holds, and when the table
    ends up empty (report.json is written first).
    """
    t0 = time.monotonic()
    req.audio, req.out_path = storage.absolute(req.audio), storage.absolute(req.out_path)
    out = storage.Location.of(req.out_path)  # the S3 settings are read here, once, and travel with it
    validate(req)
    devices.pin_local_gpu(req.gpu, req.num_workers)  # --gpu N: the only card a local Ray sees
    intent_path = out.join(tbl.INTENT)
    old_intent = json.loads(intent_path.read_bytes()) if intent_path.exists() else None
    ray_up = intent_mod.RayUp()
    rave = intent_mod.rave_info(req, old_intent, ray_up)
    note_original(req, rave, echo)
    corpus = plan.list_corpus(req.audio)
    run_id = uuid.uuid4().hex[:12]
    with Lease.acquire(out, req.lease_ttl_s, run_id) as lease:
        intent = intent_mod.check_or_write(req, rave, corpus, run_id, ray_up)
        intent["this_run"] = run_id
        cond = intent_mod.conditioning_arrays(intent, out)
        entries = commit_mod.seal(out, lease.epoch)  # a fenced-out writer's later records never count
        commit_mod.sweep(out)
        pending, already = plan.pending(corpus[1], entries)
        s = _settings(req, intent, corpus[0], out, run_id, cond, lease.epoch)
        returns = []
        if pending:
            ray_up()
            returns = _run(pending, s, req, rave, intent_mod.shuffle_seed(intent, req))
        lease.check()
        entries = commit_mod.drop_duplicates(tbl.read_ledger(out), s)
        lease.check()
        report, manifest = finish.finish(req, intent, corpus, entries, returns, pending)
    return finish.summary(req, t0, ray_up.init_s, run_id, entries, report, manifest, already, echo)
