"""What the driver of a training learns about a latent table without holding it: where every chunk
is, the fixed validation windows and a sample of the training tokens, each read by Ray tasks.

* `open_data`: Ray tasks read the small columns (`source`, `chunk`, `frames`) and the row-group
  sizes of every indexed data file, and check each file's schema: the split's chunk counts, and
  where each chunk lies (`FileLayout`), kept on the driver (~16 bytes per chunk).
* `validation_windows`: `batches x batch_size` windows drawn uniformly over the validation chunks'
  admissible starts (seeded: the same for every rank, run and resume), cut out by Ray tasks that
  read only the row groups holding them; the driver receives the windows, never a data file.
* `train_token_counts`: token counts of a few whole row groups of training chunks, drawn in
  proportion to their training frames (the unigram floor's sample: constant cost, any table size).

Every task declares `memory=` (`windows.task_memory`); a table problem comes back as one line.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msprior.conditioning import ConditioningSpec
from msprior.data import node_cache
from msprior.data.reader import READ_THREADS, DataError, ReadSpec, Table, check_rows, open_parquet
from msprior.data.windows import LOAD_CPU, admissible_starts, draw, file_bytes, task_memory
from msprior.errors import UserError

LAYOUT_FILES = 64  # data files per layout task (footer + three small columns each)
FLOOR_ROW_GROUPS = 4  # row groups counted for the unigram floor
OUTSIDE = "DEFAULT"  # outside a sweep trial's placement group (its bundle holds only the trial driver)


@dataclass
class FileLayout:
    """Where each indexed chunk of one data file lies (rows in file order)."""

    file: str
    sources: List[str]
    source: np.ndarray  # int32 [C]: index into `sources`
    chunk: np.ndarray  # int32 [C]: chunk number inside its source
    lengths: np.ndarray  # int32 [C]: frames
    row: np.ndarray  # int64 [C]: row number in the file
    group_rows: np.ndarray  # int64 [G]: rows per row group
    identity: Tuple[int, int] = (0, 0)  # (size, mtime_ns) on its storage: the node cache's key


@dataclass
class TableData:
    """A table opened for training: shared by every trial of a sweep and every restart.

    Workers get it without `layouts` (`for_workers`): they read their data files through the node
    cache (`msprior.data.windows.TrainWindows`), not through the driver."""

    table: Table
    spec: ReadSpec
    train_chunks: int = 0
    val_chunks: int = 0
    layouts: List[FileLayout] = field(default_factory=list, repr=False)
    identity: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # file -> (size, mtime_ns)
    memo: Dict = field(default_factory=dict, repr=False)  # validation windows and floor counts, by their arguments

    def for_workers(self) -> "TableData":
        return dataclasses.replace(self, layouts=[], memo={})

    def masks(self, val: bool) -> List[np.ndarray]:
        """Per layout, which chunks are validation (`val`) or training chunks."""
        out = []
        for lay in self.layouts:
            if self.table.val_from is not None:  # a one-file corpus: its last chunks
                is_val = lay.chunk >= self.table.val_from
            else:
                is_val = np.isin(np.asarray(lay.sources, dtype=object), self.table.val_sources)[lay.source]
            out.append(is_val if val else ~is_val)
        return out


def _group_bytes(pf, group: int, columns: Sequence[str]) -> int:
    """Compressed bytes of `columns` in one row group: what reading them fetches from storage."""
    rg = pf.metadata.row_group(group)
    return sum(rg.column(i).total_compressed_size for i in range(rg.num_columns)
               if rg.column(i).path_in_schema.split(".")[0] in columns)


def _layout_file(spec: ReadSpec, rel: str, wanted: pa.Array) -> FileLayout:
    pf, path, ident = open_parquet(spec, rel)  # schema checked: one line naming the file
    try:
        rows = pf.read(columns=["source", "chunk", "frames"])
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]}); re-run preprocess") from None
    node_cache.record(spec, "layout", rel, pf.metadata.serialized_size + sum(
        _group_bytes(pf, g, ["source", "chunk", "frames"]) for g in range(pf.metadata.num_row_groups)))
    keep = pc.is_in(rows["source"], value_set=wanted).to_numpy(zero_copy_only=False)
    rows = rows.filter(pa.array(keep))
    sources = sorted(set(rows["source"].to_pylist()))
    groups = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)], np.int64)
    source = pc.index_in(rows["source"], value_set=pa.array(sources, pa.string())).to_numpy().astype(np.int32)
    return FileLayout(file=rel, sources=sources, source=source, chunk=rows["chunk"].to_numpy().astype(np.int32),
                      lengths=rows["frames"].to_numpy().astype(np.int32), row=np.flatnonzero(keep).astype(np.int64),
                      group_rows=groups, identity=ident)


def _layouts(spec: ReadSpec, files: List[str], sources: List[List[str]]):
    """Ray task: the layouts of a group of files, or {"error": line}."""
    try:
        with ThreadPoolExecutor(min(READ_THREADS, len(files))) as pool:
            return list(pool.map(lambda a: _layout_file(spec, a[0], pa.array(a[1], pa.string())), zip(files, sources)))
    except UserError as e:
        return {"error": str(e).splitlines()[0]}


def _first_error(outs: Sequence) -> None:
    errors = [o["error"] for o in outs if isinstance(o, dict) and "error" in o]
    if errors:
        raise DataError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


def open_data(table: Table, spec: ReadSpec) -> TableData:
    """The table's layout, read by Ray tasks (no token is read); raises the first DataError."""
    import ray

    from msprior.data import layout as this  # a module-level function is what Ray pickles by reference

    by_file: Dict[str, List[str]] = {}
    for s, f in zip(table.index["source"].to_pylist(), table.index["file"].to_pylist()):
        by_file.setdefault(f, []).append(s)
    files = sorted(by_file)
    task = ray.remote(num_cpus=LOAD_CPU, max_retries=3, memory=task_memory(0),
                      scheduling_strategy=OUTSIDE)(this._layouts)
    outs = ray.get([task.remote(spec, files[i:i + LAYOUT_FILES], [by_file[f] for f in files[i:i + LAYOUT_FILES]])
                    for i in range(0, len(files), LAYOUT_FILES)])
    _first_error(outs)
    layouts = [lay for out in outs for lay in out]
    data = TableData(table=table, spec=spec, layouts=layouts, identity={lay.file: lay.identity for lay in layouts})
    data.train_chunks = int(sum(m.sum() for m in data.masks(val=False)))
    data.val_chunks = int(sum(m.sum() for m in data.masks(val=True)))
    if not data.train_chunks:
        raise DataError(f"{table.db_path}: no training chunks after the validation split; add files or lower "
                        "data.val_fraction")
    return data


# --- windows cut out where the data is ------------------------------------------------------------


def _row_groups(pf, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(row group, row inside it) of file rows."""
    starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(g).num_rows
                                             for g in range(pf.metadata.num_row_groups)])])
    g = np.searchsorted(starts, rows, side="right") - 1
    return g, rows - starts[g]


def _cut(spec: ReadSpec, rel: str, rows: np.ndarray, first: np.ndarray, seq_len: int):
    """Ray task: windows of seq_len + 1 frames at (file row, start index) pairs, reading only their
    row groups; {"rave": int16 [n, T+1, Q], "cond": ... or None}, or {"error": line}."""
    step, clen, col = spec.cond.step, spec.cond.frames(seq_len), spec.cond.column
    q = spec.num_quantizers
    out = {"rave": np.empty((len(rows), seq_len + 1, q), np.int16), "cond": [None] * len(rows)}
    try:
        pf, path, _ = open_parquet(spec, rel)
        group, inner = _row_groups(pf, rows)
        for g in np.unique(group):
            t = pf.read_row_group(int(g), columns=list(spec.columns))
            node_cache.record(spec, "validation", rel, _group_bytes(pf, int(g), spec.columns))
            check_rows(t, spec, path)  # schema and token ranges, one line naming the file
            for i in np.flatnonzero(group == g):
                s = int(first[i]) * step
                out["rave"][i] = t["rave"][int(inner[i])].values.to_numpy().reshape(-1, q)[s:s + seq_len + 1]
                if col:
                    c = t[col][int(inner[i])].values.to_numpy()
                    c = c.reshape(-1, spec.cond.per_frame) if col == "features" else c
                    out["cond"][i] = c[s // step:s // step + clen]
    except UserError as e:
        return {"error": str(e).splitlines()[0]}
    except (OSError, pa.ArrowInvalid) as e:
        return {"error": f"{spec.db_path}/{rel}: unreadable ({str(e).splitlines()[0]}); re-run preprocess"}
    out["cond"] = np.stack(out["cond"]) if col else None
    return out


def validation_windows(data: TableData, seq_len: int, batches: int, batch_size: int,
                       seed: int) -> List[Dict[str, np.ndarray]]:
    """`batches` batches of `batch_size` validation windows, uniform over the validation chunks'
    admissible starts (the training chunks only when the split holds none: data.val_fraction 0).
    Kept in `data.memo`: a sweep draws them once on its driver and every trial gets them."""
    import ray

    key = ("validation", seq_len, batches, batch_size, seed)
    if key in data.memo:
        return data.memo[key]

    from msprior.data import layout as this

    spec = data.spec
    step = spec.cond.step
    masks = data.masks(val=bool(data.val_chunks))
    starts = [admissible_starts(lay.lengths, seq_len, step, m) for lay, m in zip(data.layouts, masks)]
    if not sum(int(s.sum()) for s in starts):
        longest = max((int(lay.lengths.max(initial=0)) for lay in data.layouts), default=0)
        raise DataError(f"no chunk holds seq_len + 1 = {seq_len + 1} frames (longest: {longest}); "
                        "lower model.seq_len or preprocess with longer chunks")
    n = batches * batch_size
    part, chunk, first = draw(starts, n, np.random.default_rng(seed))
    nbytes = file_bytes(data.table)
    task = ray.remote(num_cpus=LOAD_CPU, max_retries=3, scheduling_strategy=OUTSIDE)(this._cut)
    picks = {int(g): np.flatnonzero(part == g) for g in np.unique(part)}
    calls = [lambda g=g, i=i: task.options(memory=task_memory(nbytes.get(data.layouts[g].file, 0))).remote(
        spec, data.layouts[g].file, data.layouts[g].row[chunk[i]], first[i], seq_len) for g, i in picks.items()]
    outs = dict(zip(picks, bounded(calls)))
    _first_error(list(outs.values()))
    data.memo[key] = _assemble(outs, picks, n, batch_size, spec.cond.kind)
    return data.memo[key]


def bounded(calls: Sequence, limit: int = 0) -> List:
    """Results of `calls` (each submits one Ray task), in order, with at most `limit` tasks in
    flight (default: the cluster's CPUs, at least 2). Each holds a decoded row group (~0.45 GB with
    its worker, measured): a draw that lands in 8 files must not hold 8 at once, nor one in 1,000
    files 1,000 (bench/RESULTS.md, "validation windows in flight")."""
    import ray

    limit = limit or max(2, int(ray.cluster_resources().get("CPU", 2)))
    refs, out = [], {}
    for call in calls:
        running = [r for r in refs if r not in out]
        if len(running) >= limit:
            done, _ = ray.wait(running, num_returns=1)
            out.update(zip(done, ray.get(done)))
        refs.append(call())
    rest = [r for r in refs if r not in out]
    out.update(zip(rest, ray.get(rest)))
    return [out[r] for r in refs]


def _assemble(outs: Dict, picks: Dict, n: int, batch_size: int, conditioning: str) -> List[Dict[str, np.ndarray]]:
    """The cut windows back in draw order, as batches in the prior's format."""
    first = next(iter(outs.values()))
    rave = np.empty((n,) + first["rave"].shape[1:], np.int64)
    cond = None if first["cond"] is None else np.empty((n,) + first["cond"].shape[1:], first["cond"].dtype)
    for g, idx in picks.items():
        rave[idx] = outs[g]["rave"]
        if cond is not None:
            cond[idx] = outs[g]["cond"]
    out = []
    for i in range(0, n, batch_size):
        b = {"rave": rave[i:i + batch_size]}
        if conditioning == "tokens":
            b["tokens"] = cond[i:i + batch_size].astype(np.int64)
        elif conditioning == "features":
            b["features"] = cond[i:i + batch_size].astype(np.float32)
        out.append(b)
    return out


# --- a sample of the training tokens (the unigram floor) -----------------------------------------


def _count(spec: ReadSpec, rel: str, group: int, inner: np.ndarray, vocab: int):
    """Ray task: token counts [Q, V] of rows `inner` of one row group, or {"error": line}."""
    try:
        pf, path, _ = open_parquet(spec, rel)
        t = pf.read_row_group(group, columns=["source", "frames", "rave"])
        node_cache.record(spec, "floor", rel, _group_bytes(pf, group, ["source", "frames", "rave"]))
        check_rows(t, dataclasses.replace(spec, columns=["source", "frames", "rave"], cond=ConditioningSpec()), path)
    except UserError as e:
        return {"error": str(e).splitlines()[0]}
    rave = pc.list_flatten(t.take(pa.array(inner))["rave"]).to_numpy().astype(np.int64).reshape(-1, spec.num_quantizers)
    flat = rave + np.arange(spec.num_quantizers) * vocab
    return np.bincount(flat.ravel(), minlength=spec.num_quantizers * vocab).reshape(spec.num_quantizers, vocab)


def train_token_counts(data: TableData, vocab: int, seed: int = 0, groups: int = FLOOR_ROW_GROUPS) -> np.ndarray:
    """Counts [Q, V] of the training tokens of `groups` row groups drawn (without replacement) in
    proportion to their training frames: a constant read whatever the table's size (kept in
    `data.memo`, like the validation windows)."""
    import ray

    key = ("floor", vocab, seed, groups)
    if key in data.memo:
        return data.memo[key]

    from msprior.data import layout as this

    cand = []  # (layout, row group, training rows inside it, training frames)
    for lay, m in zip(data.layouts, data.masks(val=False)):
        starts = np.concatenate([[0], np.cumsum(lay.group_rows)])
        g = np.searchsorted(starts, lay.row, side="right") - 1
        for k in np.unique(g[m]):
            sel = m & (g == k)
            cand.append((lay, int(k), lay.row[sel] - starts[k], int(lay.lengths[sel].sum())))
    w = np.array([c[3] for c in cand], np.float64)
    k = min(groups, int((w > 0).sum()))
    chosen = np.random.default_rng(seed).choice(len(cand), size=k, replace=False, p=w / w.sum())
    nbytes = file_bytes(data.table)
    task = ray.remote(num_cpus=LOAD_CPU, max_retries=3, scheduling_strategy=OUTSIDE)(this._count)
    outs = bounded([lambda i=i: task.options(memory=task_memory(nbytes.get(cand[i][0].file, 0))).remote(
        data.spec, cand[i][0].file, cand[i][1], cand[i][2], vocab) for i in chosen])
    _first_error(outs)
    data.memo[key] = sum(outs)
    return data.memo[key]
