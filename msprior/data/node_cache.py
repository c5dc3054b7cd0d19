"""A node-local cache of a latent table's data files, decoded once per node and read through np.memmap.

A data file (Parquet, zstd, `list<int16>` columns: docs/ARCHITECTURE.md) cannot be memory-mapped
as it is, so the first reader on a node decodes it into flat `.npy` arrays under the cache root
(`MSPRIOR_CACHE_DIR`, default `$XDG_CACHE_HOME/msprior/tables`, per user, 0700):

    <root>/<key>/rave.npy        int16 [N, Q]: every frame of the file's indexed sources
    <root>/<key>/cond.npy        tokens int16 [M] or features float32 [M, F] (when conditioned)
    <root>/<key>/lengths.npy     int64 [C]: frames per chunk, rows in file order
    <root>/<key>/source.npy      int32 [C]: the chunk's source, an index into meta.json's "sources"
    <root>/<key>/chunk.npy       int32 [C]: the chunk's number inside its source
    <root>/<key>/meta.json       {"file", "sources", "columns", "cond_ratio", "read_bytes"}
    <root>/fills.jsonl           one line per storage read on this node: {"kind", "file", "read_bytes", "t", ...}
                                 (kind "fill": a decode into the cache; "layout", "validation", "floor":
                                 the small reads that bypass it)

`<key>` digests the table path, the file's name, size and modification time, the columns and the
indexed sources, so an edited or rewritten file is decoded again and never read stale. The entry
is written into a temporary folder and renamed into place (readers never see half an entry);
`<key>.lock` (flock) makes concurrent fills on the node (ranks, sweep trials) wait for the first
one instead of reading storage again. Every process then maps the same files: the page cache holds
one copy per node, shared by every rank and trial, and none of it is heap.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msprior.data import faults
from msprior.data.reader import CACHE_ENV, DataError, Frames, ReadSpec, check_rows, frames_from_arrow, open_parquet

FILLS = "fills.jsonl"


def cache_root(spec: ReadSpec) -> str:
    """This node's cache root for the spec (created 0700: tokens of a user's corpus stay private)."""
    base = spec.cache_dir or os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msprior", "tables")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def _stat(spec: ReadSpec, rel: str):
    """(size, mtime_ns) of a data file on its storage (one HEAD request on S3)."""
    fs, root = spec.where.pyarrow()
    info = fs.get_file_info(f"{root}/{rel}")
    if info.size is None:
        raise DataError(f"{spec.where.join(rel)}: listed in the index but missing; re-run preprocess")
    return int(info.size), int(info.mtime_ns or 0)


def entry_key(spec: ReadSpec, rel: str, sources: Sequence[str], size: int, mtime_ns: int) -> str:
    what = [spec.db_path, rel, size, mtime_ns, sorted(spec.columns), spec.cond.kind, sorted(set(sources))]
    stem = os.path.splitext(os.path.basename(rel))[0][:40]
    return f"{stem}-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24]}"


@dataclass
class CachedFile:
    """One data file's indexed chunks, mapped read-only from the node cache."""

    path: str  # the entry's folder on this node
    file: str  # relative to the table root
    frames: Frames  # arrays are np.memmap views: page cache, not heap
    sources: List[str]
    source: np.ndarray  # int32 [C]: index into `sources`
    chunk: np.ndarray  # int32 [C]
    read_bytes: int  # bytes this node read from storage to fill it (0 when another fill had)

    @property
    def num_chunks(self) -> int:
        return self.frames.num_chunks


def _write_entry(spec: ReadSpec, rel: str, sources: Sequence[str], tmp: str) -> int:
    """Read, check and decode one data file into `tmp`, one row group at a time (a fill holds one
    row group, not the file); returns the bytes read from storage."""
    pf, path, (size, _) = open_parquet(spec, rel)
    try:
        small = pf.read(columns=["source", "chunk", "frames"])
        keep = pc.is_in(small["source"], value_set=pa.array(sorted(set(sources)), pa.string())).to_numpy(
            zero_copy_only=False)
        small = small.filter(pa.array(keep))
        lengths = small["frames"].to_numpy().astype(np.int64)
        out = _arrays(spec, tmp, lengths)
        done, row = [0, 0], 0
        for g in range(pf.num_row_groups):
            rows = pf.read_row_group(g, columns=list(spec.columns), use_threads=False)  # in this (niced) thread
            k, row = keep[row:row + rows.num_rows], row + rows.num_rows
            rows = rows if k.all() else rows.filter(pa.array(k))
            check_rows(rows, spec, path)  # schema, token ranges: one line naming the file
            f = frames_from_arrow(rows, spec.num_quantizers, spec.cond)
            for i, part in enumerate((f.rave, f.cond)):
                if part is not None:
                    out[i][done[i]:done[i] + len(part)] = part
                    done[i] += len(part)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]}); re-run preprocess") from None
    for a in out:
        if a is not None:
            a.flush()
    names = sorted(set(small["source"].to_pylist()))
    np.save(os.path.join(tmp, "lengths.npy"), lengths)
    np.save(os.path.join(tmp, "source.npy"), pc.index_in(small["source"], value_set=pa.array(names, pa.string()))
            .to_numpy().astype(np.int32))
    np.save(os.path.join(tmp, "chunk.npy"), small["chunk"].to_numpy().astype(np.int32))
    with open(os.path.join(tmp, "meta.json"), "w") as meta:
        json.dump({"file": rel, "sources": names, "columns": list(spec.columns), "cond_ratio": spec.cond.step,
                   "read_bytes": size}, meta)
    return size


def _arrays(spec: ReadSpec, tmp: str, lengths: np.ndarray):
    """The entry's rave (and cond) arrays, created full size on disk and filled in place."""
    from numpy.lib.format import open_memmap

    rave = open_memmap(os.path.join(tmp, "rave.npy"), "w+", np.int16, (int(lengths.sum()), spec.num_quantizers))
    if not spec.cond.column:
        return [rave, None]
    clen = int(spec.cond.frames(lengths).sum())  # ceil(T / r) conditioning frames per chunk
    if spec.cond.kind == "features":
        return [rave, open_memmap(os.path.join(tmp, "cond.npy"), "w+", np.float32, (clen, spec.cond.per_frame))]
    return [rave, open_memmap(os.path.join(tmp, "cond.npy"), "w+", np.int16, (clen,))]


def _fill_locked(spec: ReadSpec, rel: str, sources: Sequence[str], root: str, key: str) -> int:
    """Under the entry's lock: decode the file unless an earlier fill did; returns bytes read."""
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return 0
    for stale in (d for d in os.listdir(root) if d.startswith(key + ".tmp-")):  # a killed fill's leftovers
        shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=key + ".tmp-", dir=root)
    try:
        read = _write_entry(spec, rel, sources, tmp)
        faults.point("cache.before_rename")
        os.replace(tmp, final)  # atomic: an entry is complete or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(os.path.join(root, FILLS), "a") as log:  # one short line per write: O_APPEND keeps lines whole
        log.write(json.dumps({"kind": "fill", "key": key, "file": rel, "read_bytes": read,
                              "host": socket.gethostname(), "pid": os.getpid(), "t": round(time.time(), 3)}) + "\n")
    return read


def fill(spec: ReadSpec, rel: str, sources: Sequence[str], identity: Optional[Tuple[int, int]] = None) -> CachedFile:
    """The file's entry on this node, decoded now unless a fill on this node already did it.

    `identity` (size, mtime_ns), read by the driver when it opened the table, names the entry
    without asking storage: a restarted worker finds its files here even if storage is gone."""
    if "chunk" not in spec.columns:  # the split of a one-file corpus is by chunk number
        spec = dataclasses.replace(spec, columns=list(spec.columns) + ["chunk"])
    root = cache_root(spec)
    size, mtime = identity or _stat(spec, rel)
    key = entry_key(spec, rel, sources, size, mtime)
    with open(os.path.join(root, key + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and trials on this node wait for one reader
        try:
            read = _fill_locked(spec, rel, sources, root, key)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return open_entry(os.path.join(root, key), read)


def open_entry(path: str, read_bytes: int = 0) -> CachedFile:
    """Map a complete entry (read-only memmaps)."""
    def load(name: str) -> Optional[np.ndarray]:
        p = os.path.join(path, name)
        return np.load(p, mmap_mode="r") if os.path.exists(p) else None

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    lengths = np.asarray(load("lengths.npy"), dtype=np.int64)
    frames = Frames(rave=load("rave.npy"), starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
                    lengths=lengths, cond=load("cond.npy"))
    if frames.cond is not None:  # ceil(T / r) conditioning frames per chunk
        clen = -(-lengths // int(meta["cond_ratio"]))
        frames.cond_starts = np.concatenate([[0], np.cumsum(clen)[:-1]]).astype(np.int64)
    return CachedFile(path=path, file=meta["file"], frames=frames, sources=meta["sources"],
                      source=np.asarray(load("source.npy")), chunk=np.asarray(load("chunk.npy")),
                      read_bytes=read_bytes)


def record(spec: ReadSpec, kind: str, rel: str, nbytes: int) -> None:
    """One line in this node's log of storage reads (`fills`): reads that bypass the cache (the
    layout's small columns, validation and floor row groups) count too."""
    with open(os.path.join(cache_root(spec), FILLS), "a") as log:
        log.write(json.dumps({"kind": kind, "file": rel, "read_bytes": int(nbytes), "host": socket.gethostname(),
                              "pid": os.getpid(), "t": round(time.time(), 3)}) + "\n")


def fills(spec: ReadSpec) -> List[dict]:
    """Every decode this node's cache recorded (what the node read from storage)."""
    path = os.path.join(cache_root(spec), FILLS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
