"""The latent table on disk or S3: layout, the Parquet schema, the ledger of committed files, readers.

Layout and columns are specified in docs/ARCHITECTURE.md ("Latent table"). In short:

    intent.json, centroids.npy   settings fixed before any encoding (a resume must match them)
    lease.json                   the live writer (msprior.data.lease)
    latents/part-<h>.parquet     data files, many sources each, written by Ray write tasks
    ledger/part-<h>.json         one record per committed data file: a data file without its
                                 record is not part of the table (readers never see it)
    ledger/_seal.json            records of earlier lease epochs that count (msprior.data.commit)
    index.parquet                one row per committed source (compiled from the ledger)
    manifest.json, report.json   written last
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
INTENT = "intent.json"
LEDGER = "ledger"
SEAL = "_seal.json"  # in ledger/: which records of earlier lease epochs are committed
FORMAT_VERSION = 2  # 1: one shard per source, no intent/ledger/index (still read)
LEGACY_READ_THREADS = 16  # concurrent shard reads when a format-1 table is indexed

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


def data_schema(conditioning: bool) -> pa.Schema:
    """The columns of a data file: SCHEMA, less `tokens` and `features` for a table without
    conditioning."""
    return SCHEMA if conditioning else pa.schema([f for f in SCHEMA if f.name not in ("tokens", "features")])


def load_manifest(table_path: storage.Where) -> Dict:
    """The table's manifest.json as a dict (see docs/ARCHITECTURE.md)."""
    path = storage.Location.of(table_path).join(MANIFEST)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; run `msprior preprocess --out_path {table_path}` first")
    return json.loads(path.read_bytes())


def load_report(table_path: storage.Where) -> Dict:
    return json.loads(storage.Location.of(table_path).join(REPORT).read_bytes())


def load_centroids(table_path: storage.Where) -> np.ndarray:
    return np.load(io.BytesIO(storage.Location.of(table_path).join(CENTROIDS).read_bytes()))


def _legacy_shards(table: storage.Location) -> List[str]:
    """Format 1: the shards under latents/, relative to the table."""
    return [f"{LATENTS}/{rel}" for rel, _ in table.join(LATENTS).list_files()
            if rel.endswith(".parquet") and "/" not in rel]


def _data_files(table: storage.Location) -> List[str]:
    """The committed data files, relative to the table, sorted (see `list_shards`)."""
    if table.join(INDEX).exists():
        return sorted(set(read_index(table)["file"].to_pylist()))
    if table.join(LEDGER).exists():
        return sorted({e["file"] for e in read_ledger(table) if e.get("file")})
    return _legacy_shards(table)


def list_shards(table_path: storage.Where) -> List[str]:
    """Full paths (local paths or s3:// URIs) of the table's committed data files, sorted.

    A table with an index or a ledger lists only committed files (a file a killed run left behind,
    without its ledger record, is not part of the table); a table of format 1 lists its shards.
    """
    table = storage.Location.of(table_path)
    return [table.join(f).url for f in _data_files(table)]


def read_table(table_path: storage.Where, columns: Optional[List[str]] = None) -> pa.Table:
    """All rows of a latent table as one pyarrow Table (fine for tables that fit in memory)."""
    table = storage.Location.of(table_path)
    files = _data_files(table)
    if not files:
        return pa.table({}, schema=SCHEMA) if columns is None else SCHEMA.empty_table().select(columns)
    fs, root = table.pyarrow()
    tables = [pq.read_table(f"{root}/{f}", columns=columns, filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="default")


def rave_array(row_rave, frames: int) -> np.ndarray:
    """A row's flattened `rave` list -> int16 [frames, Q]."""
    a = np.asarray(row_rave, dtype=np.int16)
    return a.reshape(frames, -1)


def write_index(table_path: storage.Where, index: pa.Table) -> None:
    """Write `index.parquet` (INDEX_SCHEMA, sorted by source) in one atomic write."""
    buf = io.BytesIO()
    pq.write_table(index.cast(INDEX_SCHEMA).sort_by("source"), buf, compression="zstd")
    storage.Location.of(table_path).join(INDEX).write_bytes(buf.getvalue())


def read_index(table_path: storage.Where) -> pa.Table:
    """The table's index (INDEX_SCHEMA): one row per committed source.

    A table written before the index existed (one shard per source under latents/) is indexed from
    its shards' `source` and `frames` columns: slower, but such tables keep working.
    """
    table = storage.Location.of(table_path)
    if table.join(INDEX).exists():
        fs, root = table.pyarrow()
        return pq.read_table(f"{root}/{INDEX}", filesystem=fs).cast(INDEX_SCHEMA)
    if table.join(LEDGER).exists():  # a run still going (or killed): its commits
        return index_from_ledger(read_ledger(table))
    return _index_from_shards(table)


def _index_from_shards(table: storage.Location) -> pa.Table:
    """A format-1 table (one shard per source, no index): its shards' `source` and `frames` columns,
    read LEGACY_READ_THREADS at a time (object storage latency, not CPU, is what limits)."""
    from concurrent.futures import ThreadPoolExecutor

    fs, root = table.pyarrow()

    def one(shard: str) -> pa.Table:
        try:
            t = pq.read_table(f"{root}/{shard}", columns=["source", "frames"], filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            raise OSError(f"{table.join(shard)}: unreadable ({str(e).splitlines()[0]})") from None
        g = t.group_by("source").aggregate([("frames", "count"), ("frames", "sum")])
        return pa.table({"source": g["source"], "file": pa.array([shard] * g.num_rows),
                         "chunks": g["frames_count"].cast(pa.int32()), "frames": g["frames_sum"].cast(pa.int64())},
                        schema=INDEX_SCHEMA)

    shards = _legacy_shards(table)
    if not shards:
        return INDEX_SCHEMA.empty_table()
    with ThreadPoolExecutor(min(LEGACY_READ_THREADS, len(shards))) as pool:
        return pa.concat_tables(list(pool.map(one, shards))).sort_by("source")


# --- the ledger: one JSON record per committed data file ---------------------------------------------
#
# A write task writes its data file (one atomic write), then its record `ledger/<stem>.json` (one
# more): the record is the commit. A record holds what the driver needs to finish the table without
# reading the data back: the sources in the file (each complete: all its chunks, nothing else), the
# files skipped for good, and the file's statistics (float64 feature moments, counters).


def data_file_stem(sources: List[str]) -> str:
    """The name of the file holding exactly `sources`: a write task retried with the same input
    writes the same names again (idempotent), never a second copy."""
    return "part-" + hashlib.sha1("\n".join(sorted(sources)).encode("utf-8")).hexdigest()[:20]


def ledger_path(table_path: storage.Where, stem: str) -> storage.Location:
    return storage.Location.of(table_path).join(LEDGER, stem + ".json")


def write_ledger_entry(table_path: storage.Where, stem: str, entry: Dict) -> None:
    data = json.dumps(entry, separators=(",", ":")).encode()
    storage.retry(lambda: ledger_path(table_path, stem).write_bytes(data))


def read_seal(table_path: storage.Where) -> Optional[Dict]:
    """`ledger/_seal.json`: {"epoch": E, "stems": [...]}, written by the owner of lease epoch E when it
    took the table: the records of earlier epochs that are committed. None for a table never resumed."""
    path = storage.Location.of(table_path).join(LEDGER, SEAL)
    try:
        return json.loads(storage.retry(path.read_bytes))
    except FileNotFoundError:
        return None


def is_committed(entry: Dict, seal: Optional[Dict]) -> bool:
    """A record is part of the table if the latest seal lists it or it is of the seal's epoch or later:
    a record a fenced-out writer landed after a newer owner sealed the ledger is not."""
    if seal is None:
        return True
    return int(entry.get("epoch", 0)) >= int(seal["epoch"]) or entry["stem"] in set(seal["stems"])


def read_ledger(table_path: storage.Where, everything: bool = False) -> List[Dict]:
    """Every committed record of the table (sorted by name); each gets `"stem"`. `everything` also
    returns the records the seal rules out (the sweep deletes them)."""
    base = storage.Location.of(table_path).join(LEDGER)
    files = storage.retry(base.list_files)
    seal = None if everything else read_seal(table_path)
    out = []
    for rel, _ in files:
        if not rel.endswith(".json") or "/" in rel or rel.startswith("_"):
            continue
        try:
            e = json.loads(storage.retry(base.join(rel).read_bytes))
        except FileNotFoundError:  # removed since the listing (a duplicate dropped by the writer)
            continue
        e["stem"] = rel[: -len(".json")]
        if is_committed(e, seal):
            out.append(e)
    return out


def index_from_ledger(entries: List[Dict]) -> pa.Table:
    """INDEX_SCHEMA rows of every committed source; a source in two records (a write retried with
    another grouping) keeps the first record's file (the driver removes the other copy)."""
    rows: Dict[str, tuple] = {}
    for e in sorted(entries, key=lambda e: e["stem"]):
        for source, chunks, frames in e.get("sources", []):
            rows.setdefault(source, (e["file"], chunks, frames))
    return pa.table({"source": list(rows), "file": [v[0] for v in rows.values()],
                     "chunks": [v[1] for v in rows.values()], "frames": [v[2] for v in rows.values()]},
                    schema=INDEX_SCHEMA)


def index_digest(index: pa.Table) -> str:
    """sha256 of a table's committed content as its index states it: every (source, chunks, frames),
    sorted; which data file holds a source is left out (bundles form in the order tasks finish)."""
    rows = sorted(zip(index["source"].to_pylist(), index["chunks"].to_pylist(), index["frames"].to_pylist()))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def content_digest(table_path: storage.Where) -> str:
    """`index_digest` of the table at `table_path` (the manifest's `content_sha256`)."""
    return index_digest(read_index(table_path))


def moments(x: np.ndarray) -> Dict:
    """Per-column count, mean and sum of squared deviations (M2) of `x` [n, F], in float64."""
    x = np.asarray(x, np.float64)
    n = int(x.shape[0])
    if n == 0:
        return {"n": 0, "mean": [0.0] * x.shape[1], "m2": [0.0] * x.shape[1]}
    mean = x.mean(0)
    return {"n": n, "mean": mean.tolist(), "m2": ((x - mean) ** 2).sum(0).tolist()}


def merge_moments(parts: List[Dict]) -> Dict:
    """Combine per-task moments (Chan et al.'s pairwise update, float64): exact to rounding however
    many rows, unlike a running float32 sum."""
    n, mean, m2 = 0, None, None
    for p in parts:
        if not p or not p["n"]:
            continue
        pn, pmean, pm2 = p["n"], np.asarray(p["mean"], np.float64), np.asarray(p["m2"], np.float64)
        if mean is None:
            n, mean, m2 = pn, pmean, pm2
            continue
        delta, total = pmean - mean, n + pn
        mean = mean + delta * (pn / total)
        m2 = m2 + pm2 + delta * delta * (n * pn / total)
        n = total
    if mean is None:
        return {"n": 0, "mean": [], "m2": []}
    return {"n": n, "mean": mean.tolist(), "m2": m2.tolist()}


def mean_std(m: Dict) -> tuple:
    """(mean, population std) lists of merged moments."""
    if not m["n"]:
        return [], []
    return list(m["mean"]), np.sqrt(np.asarray(m["m2"]) / m["n"]).tolist()
