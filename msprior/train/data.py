"""Training windows from a latent table (docs/ARCHITECTURE.md, "Latent table").

The driver opens the table (manifest + Parquet shards), splits it by SOURCE FILE into train and
validation (a deterministic hash, never by chunk) and hands Ray Train two Ray Data datasets; the
train one is split across workers. Each worker pulls its shard once into flat numpy arrays
(`Frames`) and then draws batches of random windows by vectorised fancy indexing: no per-sample
Python in the hot path. A latent table is small next to the audio (16 int16 per frame at ~21 Hz:
~5 MB per hour), so a shard fits comfortably in a worker's memory.
"""

from __future__ import annotations

from msprior.errors import UserError
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COLUMNS = ("source", "chunk", "frames", "rave", "tokens", "features")


class DataError(UserError):
    """A latent-table problem, phrased as a one-line message for the user."""


# --- opening a table (driver side) --------------------------------------------------------------


def _fs_and_path(db_path: str):
    """(fsspec filesystem, path inside it) for a local dir or an s3:// prefix."""
    from msprior import storage

    return storage.filesystem(db_path)


def read_manifest(db_path: str) -> Dict:
    from msprior.data.table import load_manifest

    try:
        return load_manifest(db_path)
    except FileNotFoundError:
        raise DataError(f"{db_path}: no manifest.json; run `msprior preprocess` first or check --db_path") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{db_path}/manifest.json: not valid JSON ({e})") from None


def list_shards(db_path: str) -> Tuple[object, List[str], int]:
    """(filesystem, shard paths, total bytes)."""
    fs, root = _fs_and_path(db_path)
    found = fs.glob(f"{root.rstrip('/')}/latents/*.parquet", detail=True)
    shards = sorted(found)
    if not shards:
        raise DataError(f"{db_path}/latents: no .parquet shards; run `msprior preprocess` first")
    return fs, shards, int(sum(found[p].get("size") or 0 for p in shards))


def source_hash(source: str, seed: int) -> int:
    """A stable 64-bit hash of a source path (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:8], "big")


def split_sources(sources: Sequence[str], val_fraction: float, seed: int) -> List[str]:
    """Validation sources: the `round(fraction x n)` (at least 1) files with the smallest hash.

    Deterministic in (sources, fraction, seed) and stable when files are added: a file's side only
    changes if it crosses the cut. Empty when the fraction is 0 or there is a single file.
    """
    unique = sorted(set(sources))
    if val_fraction <= 0 or len(unique) < 2:
        return []
    k = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return sorted(sorted(unique, key=lambda s: source_hash(s, seed))[:k])


@dataclass
class Table:
    """What the driver knows about a latent table before training."""

    db_path: str
    manifest: Dict
    shards: List[str]
    filesystem: object
    columns: List[str]
    sources: List[str]
    val_sources: List[str]
    nbytes: int = 0  # Parquet bytes on storage


def open_table(db_path: str, val_fraction: float, seed: int, conditioning: str = "none") -> Table:
    """Read the manifest and the `source` column (cheap: one column) and split by source file."""
    import pyarrow.dataset as pads

    manifest = read_manifest(db_path)
    fs, shards, nbytes = list_shards(db_path)
    from msprior import storage

    dataset = pads.dataset(shards, filesystem=storage.pyarrow_filesystem(db_path)[0], format="parquet")
    names = set(dataset.schema.names)
    missing = {"source", "frames", "rave"} - names
    if missing:
        raise DataError(f"{db_path}/latents: shards lack column(s) {sorted(missing)}; re-run preprocess")
    if conditioning != "none" and conditioning not in names:
        raise DataError(
            f"{db_path}: config model.conditioning={conditioning!r} but the table has no {conditioning!r} "
            "column; preprocess with conditioning or train a config without it"
        )
    columns = ["source", "frames", "rave"] + ([conditioning] if conditioning != "none" else [])
    sources = pc.unique(dataset.to_table(columns=["source"])["source"]).to_pylist()
    return Table(
        db_path=db_path,
        manifest=manifest,
        shards=shards,
        filesystem=fs,
        columns=columns,
        sources=sorted(sources),
        val_sources=split_sources(sources, val_fraction, seed),
        nbytes=nbytes,
    )


def _arrow_fs(table: "Table"):
    """pyarrow's native filesystem for the table (its S3 client is the fastest for bulk reads)."""
    from msprior import storage

    return storage.pyarrow_filesystem(table.db_path)[0]


INLINE_MAX_BYTES = 64 << 20  # tables up to this size are read by the driver in one go (below)


def train_dataset(table: Table, inline_max_bytes: int = INLINE_MAX_BYTES):
    """The train split as a Ray Data dataset of chunk rows (Ray Train splits it across workers).

    A small table (most latent tables: ~5 MB per hour of audio) is read by the driver with pyarrow
    and handed to Ray Data as in-memory blocks: on a loaded 2-core machine `read_parquet` spent
    6-35 s starting read tasks for 8 small files, `from_arrow` 0.05 s. Larger tables stream
    through distributed `read_parquet` tasks.
    """
    import ray.data

    if table.nbytes <= inline_max_bytes:
        rows = read_split(table, val=False)
        step = max(1, -(-rows.num_rows // 16))  # a few blocks so the split stays balanced
        return ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    ds = ray.data.read_parquet(
        table.shards,
        filesystem=_arrow_fs(table),
        # Reads are I/O: a small CPU share so they never wait behind train workers (FIELD_NOTES).
        num_cpus=0.25,
    ).select_columns(table.columns)
    if not table.val_sources:
        return ds
    val = pa.array(table.val_sources, type=pa.string())

    def drop_val(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch["source"], value_set=val)))

    return ds.map_batches(drop_val, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0.25)


def read_split(table: Table, val: bool = True) -> pa.Table:
    """The validation (or train) rows read directly with pyarrow, in the calling process.

    Validation is small (a few % of the files) and must be the same windows on every rank and
    every run: the driver reads it once and ships it to the workers through the object store.
    """
    import pyarrow.dataset as pads

    dataset = pads.dataset(table.shards, filesystem=_arrow_fs(table), format="parquet")
    mask = pads.field("source").isin(table.val_sources)
    return dataset.to_table(columns=table.columns, filter=mask if val else ~mask)


# --- a worker's frames in memory ----------------------------------------------------------------


@dataclass
class Frames:
    """All chunks of one shard, concatenated. Chunk i spans rave[starts[i]:starts[i]+lengths[i]]."""

    rave: np.ndarray  # int16 [N, Q]
    starts: np.ndarray  # int64 [C] first frame of each chunk in `rave`
    lengths: np.ndarray  # int64 [C] frames per chunk
    cond: Optional[np.ndarray] = None  # int16 [M] tokens or float32 [M, F] features
    cond_starts: Optional[np.ndarray] = None  # int64 [C] first conditioning frame of each chunk

    @property
    def num_chunks(self) -> int:
        return len(self.lengths)


def frames_from_arrow(table: pa.Table, num_quantizers: int, conditioning: str = "none",
                      cond_ratio: int = 1, cond_features: int = 0) -> Frames:
    """Flatten chunk rows (Parquet columns of docs/ARCHITECTURE.md) into `Frames`."""
    lengths = table["frames"].to_numpy().astype(np.int64)
    rave = pc.list_flatten(table["rave"]).to_numpy().astype(np.int16, copy=False)
    if rave.size != lengths.sum() * num_quantizers:
        raise DataError(
            f"latent table: rave holds {rave.size} values, expected frames x quantizers = "
            f"{lengths.sum()} x {num_quantizers}; the manifest does not match the shards"
        )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = Frames(rave=rave.reshape(-1, num_quantizers), starts=starts, lengths=lengths)
    if conditioning != "none":
        clen = -(-lengths // cond_ratio)  # ceil(T / r) conditioning frames per chunk
        flat = pc.list_flatten(table[conditioning]).to_numpy()
        per = cond_features if conditioning == "features" else 1
        if flat.size != clen.sum() * per:
            raise DataError(
                f"latent table: column {conditioning!r} holds {flat.size} values, expected "
                f"{clen.sum()} x {per} for ratio {cond_ratio}; re-run preprocess"
            )
        out.cond = flat.astype(np.float32).reshape(-1, per) if conditioning == "features" else flat.astype(np.int16)
        out.cond_starts = np.concatenate([[0], np.cumsum(clen)[:-1]]).astype(np.int64)
    return out


def load_shard(iterator, **kw) -> Frames:
    """Pull a Ray Data shard (DataIterator) into memory as `Frames`."""
    tables = [t for t in iterator.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    if not tables:
        raise DataError("this worker's shard of the latent table is empty: use fewer workers or more data")
    return frames_from_arrow(pa.concat_tables(tables).combine_chunks(), **kw)


class WindowSampler:
    """Random windows of `seq_len + 1` frames inside chunks, drawn as whole batches.

    With conditioning, window starts are multiples of the ratio r, so that decoder frame t of the
    window sees conditioning frames 0 .. t // r of the window (docs/ARCHITECTURE.md).
    """

    def __init__(self, frames: Frames, seq_len: int, conditioning: str = "none", cond_ratio: int = 1,
                 seed: int = 0):
        self.f = frames
        self.seq_len = seq_len
        self.conditioning = conditioning
        self.step = cond_ratio if conditioning != "none" else 1  # window start granularity
        # number of admissible starts per chunk: s in {0, step, ...} with s + seq_len + 1 <= T
        room = frames.lengths - (seq_len + 1)
        self.num_starts = np.where(room >= 0, room // self.step + 1, 0)
        total = self.num_starts.sum()
        if total == 0:
            raise DataError(
                f"no chunk holds seq_len + 1 = {seq_len + 1} frames (longest: {frames.lengths.max()}); "
                "lower model.seq_len or preprocess with longer chunks"
            )
        self.cum = np.cumsum(self.num_starts)  # windows are drawn uniformly over all admissible starts
        self.total = int(total)
        self.rng = np.random.default_rng(seed)
        self.offsets = np.arange(seq_len + 1)
        self.cond_len = math.ceil(seq_len / cond_ratio)
        self.cond_offsets = np.arange(self.cond_len)

    def sample(self, batch_size: int) -> Dict[str, np.ndarray]:
        k = self.rng.integers(0, self.total, size=batch_size)
        chunk = np.searchsorted(self.cum, k, side="right")
        first = k - (self.cum[chunk] - self.num_starts[chunk])
        start = first * self.step  # frame offset inside the chunk
        rows = (self.f.starts[chunk] + start)[:, None] + self.offsets  # [B, T+1]
        batch = {"rave": self.f.rave[rows].astype(np.int64)}  # [B, T+1, Q]
        if self.conditioning != "none":
            crows = (self.f.cond_starts[chunk] + start // self.step)[:, None] + self.cond_offsets
            if self.conditioning == "tokens":
                batch["tokens"] = self.f.cond[crows].astype(np.int64)  # [B, ceil(T/r)]
            else:
                batch["features"] = self.f.cond[crows]  # [B, ceil(T/r), F] float32
        return batch


def unigram_entropy(frames: Frames) -> float:
    """Entropy (nats) of the per-quantizer marginal token distribution, averaged over quantizers:
    the cross-entropy of the best model that ignores context."""
    hs = []
    for q in range(frames.rave.shape[1]):
        counts = np.bincount(frames.rave[:, q].astype(np.int64))
        p = counts[counts > 0] / counts.sum()
        hs.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(hs))
