"""The latent table on disk or S3: shard names, the Parquet schema, manifest and shard readers.

Layout and columns are specified in docs/ARCHITECTURE.md ("Latent table").
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msprior import storage

MANIFEST = "manifest.json"
REPORT = "report.json"
RAVE_FILE = "rave.ts"
CENTROIDS = "centroids.npy"
LATENTS = "latents"
INDEX = "index.parquet"
FORMAT_VERSION = 1

SCHEMA = pa.schema([
    ("source", pa.string()),
    ("chunk", pa.int32()),
    ("start_s", pa.float64()),
    ("frames", pa.int32()),
    ("rave", pa.list_(pa.int16())),  # frames x quantizers, frame-major
    ("tokens", pa.list_(pa.int16())),  # ceil(frames / ratio) conditioning tokens (optional)
    ("features", pa.list_(pa.float32())),  # ceil(frames / ratio) x F, frame-major (optional)
])


# One row per source committed to the table: which data file (relative to the table root) holds its
# chunks, and how many. Training lists, splits and sizes the table from this one file.
INDEX_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("file", pa.string()),  # e.g. "latents/<name>.parquet", relative to the table root
    ("chunks", pa.int32()),
    ("frames", pa.int64()),
])


def shard_name(source: str) -> str:
    """One shard per source file, named from a hash of its path (stable across runs: resume)."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:20] + ".parquet"


def shard_bytes(rows: List[dict], conditioning: bool) -> bytes:
    """Rows (dicts with numpy arrays) of one source -> Parquet file bytes, sorted by chunk."""
    rows = sorted(rows, key=lambda r: r["chunk"])
    cols = {
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "chunk": pa.array([r["chunk"] for r in rows], pa.int32()),
        "start_s": pa.array([r["start_s"] for r in rows], pa.float64()),
        "frames": pa.array([r["frames"] for r in rows], pa.int32()),
        "rave": pa.array([np.asarray(r["rave"], np.int16) for r in rows], pa.list_(pa.int16())),
    }
    schema = SCHEMA
    if conditioning:
        cols["tokens"] = pa.array([np.asarray(r["tokens"], np.int16) for r in rows], pa.list_(pa.int16()))
        cols["features"] = pa.array([np.asarray(r["features"], np.float32).ravel() for r in rows],
                                    pa.list_(pa.float32()))
    else:
        schema = pa.schema([f for f in SCHEMA if f.name not in ("tokens", "features")])
    table = pa.table(cols, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def load_manifest(table_path: str, s3: Optional[storage.S3Options] = None) -> Dict:
    """The table's manifest.json as a dict (see docs/ARCHITECTURE.md)."""
    path = storage.join(table_path, MANIFEST)
    if not storage.exists(path, s3):
        raise FileNotFoundError(f"{path}: no manifest; run `msprior preprocess --out_path {table_path}` first")
    return json.loads(storage.read_bytes(path, s3))


def load_report(table_path: str, s3: Optional[storage.S3Options] = None) -> Dict:
    return json.loads(storage.read_bytes(storage.join(table_path, REPORT), s3))


def load_centroids(table_path: str, s3: Optional[storage.S3Options] = None) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(storage.join(table_path, CENTROIDS), s3)))


def list_shards(table_path: str, s3: Optional[storage.S3Options] = None) -> List[str]:
    """Full paths (local paths or s3:// URIs) of the table's Parquet shards, sorted."""
    base = storage.join(table_path, LATENTS)
    return [storage.join(base, rel) for rel, _ in storage.list_files(base, s3)
            if rel.endswith(".parquet") and "/" not in rel]


def read_table(table_path: str, columns: Optional[List[str]] = None,
               s3: Optional[storage.S3Options] = None) -> pa.Table:
    """All rows of a latent table as one pyarrow Table (fine for tables that fit in memory)."""
    shards = list_shards(table_path, s3)
    if not shards:
        return pa.table({}, schema=SCHEMA) if columns is None else SCHEMA.empty_table().select(columns)
    fs, _ = storage.pyarrow_filesystem(table_path, s3)
    paths = [s[len("s3://"):] if storage.is_s3(s) else s for s in shards]
    tables = [pq.read_table(p, columns=columns, filesystem=fs) for p in paths]
    return pa.concat_tables(tables, promote_options="default")


def rave_array(row_rave, frames: int) -> np.ndarray:
    """A row's flattened `rave` list -> int16 [frames, Q]."""
    a = np.asarray(row_rave, dtype=np.int16)
    return a.reshape(frames, -1)


def write_index(table_path: str, index: pa.Table, s3: Optional[storage.S3Options] = None) -> None:
    """Write `index.parquet` (INDEX_SCHEMA, sorted by source) in one atomic write."""
    buf = io.BytesIO()
    pq.write_table(index.cast(INDEX_SCHEMA).sort_by("source"), buf, compression="zstd")
    storage.write_bytes(storage.join(table_path, INDEX), buf.getvalue(), s3)


def read_index(table_path: str, s3: Optional[storage.S3Options] = None) -> pa.Table:
    """The table's index (INDEX_SCHEMA): one row per committed source.

    A table written before the index existed (one shard per source under latents/) is indexed from
    its shards' `source` and `frames` columns: slower, but such tables keep working.
    """
    path = storage.join(table_path, INDEX)
    if storage.exists(path, s3):
        fs, _ = storage.pyarrow_filesystem(table_path, s3)
        return pq.read_table(path[len("s3://"):] if storage.is_s3(path) else path, filesystem=fs).cast(INDEX_SCHEMA)
    rows = {"source": [], "file": [], "chunks": [], "frames": []}
    fs, _ = storage.pyarrow_filesystem(table_path, s3)
    for shard in list_shards(table_path, s3):
        t = pq.read_table(shard[len("s3://"):] if storage.is_s3(shard) else shard, columns=["source", "frames"],
                          filesystem=fs)
        rel = LATENTS + "/" + shard.rsplit("/", 1)[-1]
        for source in sorted(set(t["source"].to_pylist())):
            frames = [f for s_, f in zip(t["source"].to_pylist(), t["frames"].to_pylist()) if s_ == source]
            for k, v in (("source", source), ("file", rel), ("chunks", len(frames)), ("frames", sum(frames))):
                rows[k].append(v)
    return pa.table(rows, schema=INDEX_SCHEMA)
