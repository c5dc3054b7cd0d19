"""Listing and planning: the corpus listed once, what is left to encode, and the tasks it is cut into.

Part of the table contract: `audio.listing_sha256` (every audio file's path and size) is recorded in
`intent.json`, so a resume runs on the same corpus; a source the ledger holds (committed, or skipped
for good) is never encoded again (`pending`). Tasks take the pending files in a seeded order
(`shuffled`: the seed is the table's `shuffle_seed`, recorded in its intent and manifest), so a data
file gathers sources from all over the corpus instead of one contiguous stretch of it, and the same
seed and ledger always give the same tasks.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Tuple

from msprior import storage
from msprior.data import audio as audio_mod
from msprior.data.request import PreprocessError, PreprocessRequest

MIN_TASKS_PER_ENCODER = 4  # a small corpus still spreads over the decoders and every encoder


def list_corpus(audio: storage.Where):
    """(corpus root Location, [(source, full path as its filesystem names it, bytes)] audio files,
    [ignored non-audio sources])."""
    where = storage.Location.of(audio)
    fs, root = where.fs()
    if not fs.exists(root):
        raise PreprocessError(f"--audio {audio}: no such directory or s3:// prefix")
    if fs.isfile(root):  # a single file is a corpus of one, rooted at its folder
        parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
        audio_root = where.at(parent)
        files = [(name, int(fs.info(root).get("size") or 0))]
    else:
        audio_root, files = where, where.list_files()
    _, base = audio_root.fs()
    good = [(rel, f"{base}/{rel}", size) for rel, size in files if audio_mod.is_audio_name(rel)]
    ignored = [rel for rel, _ in files if not audio_mod.is_audio_name(rel)]
    if not good:
        raise PreprocessError(f"--audio {audio}: no audio files found (looked for "
                              f".wav/.flac/.ogg/.opus/.mp3/.aiff... recursively)")
    return audio_root, good, ignored


def listing_digest(corpus) -> str:
    """sha256 of the corpus listing (every audio file's path under the root and its size, sorted)."""
    return hashlib.sha256("\n".join(f"{rel}\t{size}" for rel, _, size in sorted(corpus[1])).encode()).hexdigest()


def pending(files, entries: List[Dict]) -> Tuple[list, int]:
    """(files to encode, files already in the table): committed sources and files skipped for good
    are not encoded again."""
    committed = {src for e in entries for src, _, _ in e.get("sources", [])}
    done = committed | {src for e in entries for src, _ in e.get("skipped", [])}
    return [f for f in files if f[0] not in done], sum(1 for f in files if f[0] in committed)


def shuffled(files, seed: int) -> list:
    """`files` in the seed's order. A file's place is a hash of (seed, source), whatever else is
    listed: a resume's pending files keep the order they had in the first run."""
    return sorted(files, key=lambda f: hashlib.sha1(f"{seed}\0{f[0]}".encode()).digest())


def task_bytes(files, req: PreprocessRequest) -> float:
    """~`task_mb` of input per task (thousands of tasks at scale, so the driver's cost per task stays
    small), but at least MIN_TASKS_PER_ENCODER tasks per encoder (or decode slot) on a small corpus."""
    total = sum(f[2] for f in files)
    spread = MIN_TASKS_PER_ENCODER * max(req.num_workers, req.decode_concurrency or 1)
    return max(1.0, min(req.task_mb * 2**20, total / spread))


def tasks(files, req: PreprocessRequest, seed: int) -> List[list]:
    """Group the pending files, in the seed's order, into tasks of about `task_bytes` of input and at
    most `files_per_task` files: many short files or a few long ones per task."""
    limit = task_bytes(files, req)
    out, cur, size = [], [], 0
    for f in shuffled(files, seed):
        if cur and (len(cur) >= req.files_per_task or size + f[2] > limit):
            out.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += f[2]
    return out + ([cur] if cur else [])
