"""The latent table's one reader (docs/ARCHITECTURE.md, "Latent table"; "Training input").

Driver side, no data file read: `open_table` lists, splits (by SOURCE FILE, a deterministic hash,
never by chunk) and sizes the table from `manifest.json` and `index.parquet` alone (one row per
source, naming the data file that holds it): a file not in the index is never read. Reading side
(Ray tasks, or the calling process for small tables): `read_files` reads data files, keeps the rows
of the indexed sources and checks them (schema, token ranges: one-line `DataError` naming the file);
`frames_from_arrow` flattens rows into `Frames`. Training (`msprior.data.windows`, through the node
cache) and export (`msprior.export.evaluate`) read the table through this module only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msprior.conditioning import ConditioningSpec
from msprior.errors import UserError
from msprior.storage import Location

CACHE_ENV = "MSPRIOR_CACHE_DIR"  # where each node caches decoded data files (msprior.data.node_cache)
READ_THREADS = 16  # concurrent file reads in one process (object storage latency, not CPU)


class DataError(UserError):
    """A latent-table problem, phrased as a one-line message for the user."""


# --- opening a table (driver side: manifest + index, no data file is read) ----------------------


def read_manifest(db_path: str) -> Dict:
    from msprior.data.table import load_manifest

    try:
        return load_manifest(db_path)
    except FileNotFoundError:
        raise DataError(f"{db_path}: no manifest.json; run `msprior preprocess` first or check --db_path") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{db_path}/manifest.json: not valid JSON ({e})") from None


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
    """What the driver knows about a latent table before training: manifest, index and split."""

    db_path: str
    manifest: Dict
    index: pa.Table  # msprior.data.table.INDEX_SCHEMA: source, file, chunks, frames
    columns: List[str]  # the columns training reads
    sources: List[str]
    val_sources: List[str]
    val_from: Optional[int] = None  # a one-file corpus: its chunks from this index on are validation
    cond: ConditioningSpec = field(default_factory=ConditioningSpec)  # what the prior reads of it

    def is_val(self, rows: pa.Table) -> pa.Array:
        """Which rows are validation: those of the validation files, or the one file's last chunks."""
        if self.val_from is not None:
            return pc.greater_equal(rows["chunk"], self.val_from)
        return pc.is_in(rows["source"], value_set=pa.array(self.val_sources, pa.string()))

    @property
    def files(self) -> List[str]:
        """Data files (relative to the table root) named by the index, sorted."""
        return sorted(set(self.index["file"].to_pylist()))

    @property
    def nbytes(self) -> int:
        """Token bytes of the table (int16 frames x quantizers), from the index alone."""
        q = int(self.manifest.get("rave", {}).get("num_quantizers") or 1)
        return int(pc.sum(self.index["frames"]).as_py() or 0) * q * 2

    def identity(self) -> Dict:
        """What makes two tables the same for a resume: the RAVE model and the indexed content."""
        return {"rave_sha256": self.manifest.get("rave", {}).get("sha256"), "sources": len(self.sources),
                "chunks": int(pc.sum(self.index["chunks"]).as_py() or 0),
                "frames": int(pc.sum(self.index["frames"]).as_py() or 0)}


def read_table_index(db_path: str) -> pa.Table:
    """The table's index, or a one-line error when the table holds nothing."""
    from msprior.data.table import read_index

    try:
        index = read_index(db_path)  # a format-1 table (no index) is indexed from its shards
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{db_path}: table index unreadable ({str(e).splitlines()[0]}); re-run preprocess") from None
    if index.num_rows == 0:
        raise DataError(f"{db_path}/latents: no .parquet shards; run `msprior preprocess` first")
    return index


def open_table(db_path: str, val_fraction: float, seed: int, conditioning: str = "none") -> Table:
    """Read the manifest and the index (two small files) and split by source file."""
    manifest = read_manifest(db_path)
    table_cond = ConditioningSpec.from_manifest(manifest)
    if not table_cond.has(conditioning):
        raise DataError(
            f"{db_path}: config model.conditioning={conditioning!r} but the table has no conditioning; "
            "preprocess with conditioning or train a config without it"
        )
    cond = table_cond.use(conditioning, db_path)
    index = read_table_index(db_path)
    sources = sorted(index["source"].to_pylist())
    columns = ["source", "frames", "rave"] + ([cond.column] if cond.column else [])
    val_from = one_file_split(db_path, index, val_fraction)
    return Table(db_path=db_path, manifest=manifest, index=index, columns=columns + ["chunk"] * (val_from is not None),
                 sources=sources, val_sources=split_sources(sources, val_fraction, seed), val_from=val_from,
                 cond=cond)


def one_file_split(db_path: str, index: pa.Table, val_fraction: float) -> Optional[int]:
    """A one-file corpus validates on its own last chunks (round(fraction x chunks), at least one):
    windows never cross a chunk, so training never sees them. None for a corpus of several files."""
    if val_fraction <= 0 or index.num_rows != 1:
        return None
    chunks = int(index["chunks"][0].as_py())
    if chunks < 2:
        raise DataError(f"{db_path}: one file of one chunk: no audio is left to validate on that training does not "
                        "see; add files, or preprocess with a shorter --num_secs so that the file makes several chunks")
    return chunks - min(chunks - 1, max(1, round(val_fraction * chunks)))


# --- reading and checking data files (inside Ray tasks, or in-process for small tables) --------


@dataclass
class ReadSpec:
    """How to read, check and flatten a table's rows: travels to the load tasks."""

    db_path: str
    columns: List[str]
    num_quantizers: int
    vocab_size: int
    cond: ConditioningSpec = field(default_factory=ConditioningSpec)  # the prior's (Table.cond)
    cache_dir: Optional[str] = None  # the node cache's root (msprior.data.node_cache); None: each node's default
    where: Optional[Location] = None  # db_path resolved where the spec is made (the driver): its S3 settings travel

    def __post_init__(self) -> None:
        if self.where is None:
            self.where = Location.of(self.db_path)

    @classmethod
    def of(cls, table: Table) -> "ReadSpec":
        from msprior.model import DatasetFacts  # the one reader of the manifest's shapes

        f = DatasetFacts.from_manifest(table.manifest)
        return cls(db_path=table.db_path, columns=table.columns, num_quantizers=f.num_quantizers,
                   vocab_size=f.vocab_size, cond=table.cond, cache_dir=os.environ.get(CACHE_ENV) or None)


def _value_range(column: pa.ChunkedArray) -> Tuple[Optional[int], Optional[int]]:
    mm = pc.min_max(pc.list_flatten(column))
    return mm["min"].as_py(), mm["max"].as_py()


def check_rows(rows: pa.Table, spec: ReadSpec, where: str) -> None:
    """Schema and token ranges of one data file's rows; a one-line DataError naming the file.

    Out-of-range tokens would index the wrong embedding rows (or hit a device assert on GPU at a
    random step): they are refused before any training starts.
    """
    missing = [c for c in spec.columns if c not in rows.column_names]
    if missing:
        raise DataError(f"{where}: no column(s) {missing}; re-run preprocess (or train a config without them)")
    q = spec.num_quantizers
    bad = pc.not_equal(pc.list_value_length(rows["rave"]), pc.multiply(rows["frames"].cast(pa.int64()), q))
    if pc.any(bad).as_py():
        raise DataError(f"{where}: a row's rave list is not frames x {q} quantizers long; re-run preprocess")
    checks = [("rave", spec.vocab_size, "rave.vocab_size")]
    if spec.cond.kind == "tokens":
        checks.append(("tokens", spec.cond.vocab_size, "conditioning.tokens.vocab_size"))
    for col, vocab, key in checks:
        lo, hi = _value_range(rows[col])
        if lo is not None and (lo < 0 or hi >= vocab):
            raise DataError(f"{where}: column {col} holds values in [{lo}, {hi}] but the manifest's {key} is "
                            f"{vocab}: tokens must lie in [0, {vocab}); re-run preprocess with the table's RAVE model")
    if spec.cond.kind == "features" and rows.num_rows:
        flat = pc.list_flatten(rows["features"])
        if not pc.all(pc.is_finite(flat)).as_py():
            raise DataError(f"{where}: column features holds NaN or inf values; re-run preprocess")


def _read_file(spec: ReadSpec, fs, root: str, rel: str, wanted: pa.Array) -> pa.Table:
    """One data file's rows of the `wanted` sources, checked; its footer and columns read once."""
    import pyarrow.parquet as pq

    path = spec.where.join(rel).url
    try:
        with fs.open_input_file(f"{root}/{rel}") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if any(c not in names for c in spec.columns):  # say which, naming the file
                check_rows(pa.table({n: pa.array([], pa.null()) for n in names}), spec, path)
            rows = pf.read(columns=list(spec.columns))
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]}); re-run preprocess") from None
    rows = rows.filter(pc.is_in(rows["source"], value_set=wanted))  # only what the index lists
    check_rows(rows, spec, path)
    return rows


def open_parquet(spec: ReadSpec, rel: str):
    """(pyarrow ParquetFile, full path, (size, mtime_ns)) of one data file, its columns checked; a
    one-line DataError naming the file when it is missing, unreadable or lacks a column."""
    import pyarrow.parquet as pq

    path = spec.where.join(rel).url
    fs, root = spec.where.pyarrow()
    try:
        info = fs.get_file_info(f"{root}/{rel}")
        pf = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]}); re-run preprocess") from None
    names = pf.schema_arrow.names
    if any(c not in names for c in spec.columns):  # say which, naming the file
        check_rows(pa.table({n: pa.array([], pa.null()) for n in names}), spec, path)
    return pf, path, (int(info.size or 0), int(info.mtime_ns or 0))


def read_files(spec: ReadSpec, files: Sequence[str], sources: Sequence[str]) -> pa.Table:
    """The rows of `sources` held by `files` (relative to the table root), each file read once and checked."""
    from concurrent.futures import ThreadPoolExecutor

    if not files:
        raise DataError(f"{spec.db_path}: the index lists no data file for this split")
    fs, root = spec.where.pyarrow()
    wanted = pa.array(sorted(set(sources)), pa.string())
    with ThreadPoolExecutor(min(READ_THREADS, len(files))) as pool:
        tables = list(pool.map(lambda rel: _read_file(spec, fs, root, rel, wanted), files))
    return pa.concat_tables(tables).combine_chunks()


def read_split(table: Table, val: bool = True) -> pa.Table:
    """The validation (or train) rows read in the calling process (small tables, export, benches)."""
    chosen = set(table.val_sources)
    spec = ReadSpec.of(table)
    if table.val_from is not None:  # one file: its last chunks are validation
        rows = read_files(spec, table.files, table.sources)
        mask = table.is_val(rows)
        return rows.filter(mask if val else pc.invert(mask))
    rows = [r for r in table.index.to_pylist() if (r["source"] in chosen) == val]
    if not rows:  # e.g. the validation split of a one-file table: no rows, the table's columns
        return read_files(spec, table.files[:1], []).slice(0, 0)
    return read_files(spec, sorted({r["file"] for r in rows}), [r["source"] for r in rows])


# --- rows -> flat arrays ---------------------------------------------------------------------------


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


def frames_from_arrow(table: pa.Table, num_quantizers: int, cond: ConditioningSpec = ConditioningSpec()) -> Frames:
    """Flatten chunk rows (Parquet columns of docs/ARCHITECTURE.md) into `Frames`; with `cond` (the
    prior's spec, `Table.cond`), its column too."""
    lengths = table["frames"].to_numpy().astype(np.int64)
    rave = pc.list_flatten(table["rave"]).to_numpy().astype(np.int16, copy=False)
    if rave.size != lengths.sum() * num_quantizers:
        raise DataError(
            f"latent table: rave holds {rave.size} values, expected frames x quantizers = "
            f"{lengths.sum()} x {num_quantizers}; the manifest does not match the shards"
        )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = Frames(rave=rave.reshape(-1, num_quantizers), starts=starts, lengths=lengths)
    if cond.column:
        clen = cond.frames(lengths)  # ceil(T / r) conditioning frames per chunk
        flat = pc.list_flatten(table[cond.column]).to_numpy()
        per = cond.per_frame
        if flat.size != clen.sum() * per:
            raise DataError(
                f"latent table: column {cond.column!r} holds {flat.size} values, expected "
                f"{clen.sum()} x {per} for ratio {cond.ratio}; re-run preprocess"
            )
        out.cond = flat.astype(np.float32).reshape(-1, per) if cond.kind == "features" else flat.astype(np.int16)
        out.cond_starts = np.concatenate([[0], np.cumsum(clen)[:-1]]).astype(np.int64)
    return out


def unigram_entropy(frames: Frames) -> float:
    """Entropy (nats) of the per-quantizer marginal token distribution, averaged over quantizers:
    the cross-entropy of the best model that ignores context."""
    hs = []
    for q in range(frames.rave.shape[1]):
        counts = np.bincount(frames.rave[:, q].astype(np.int64))
        p = counts[counts > 0] / counts.sum()
        hs.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(hs))
