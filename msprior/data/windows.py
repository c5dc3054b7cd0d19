"""Training windows drawn uniformly over a latent table that need not fit in memory.

* `WindowSampler`: random windows of `seq_len + 1` frames inside chunks, drawn as whole batches by
  vectorised fancy indexing. Two levels: a part (a data file) with probability proportional to its
  admissible starts, then a start inside it, so every admissible start of every part is equally
  likely; parts may be added while sampling (files landing in the node cache).
* `rank_share`: rank r's stratum of the training chunks, cut at equal frames (one chunk at most off
  balance), so every rank holds the same share of the table and the global batch stays uniform.
* `TrainWindows`: a Ray Train worker's windows. Ray tasks pinned to the worker's node decode its
  stratum's data files into the node cache (`msprior.data.node_cache`, `memory=` declared); the
  first file lets training start, the others join the draw as they land: time to first step is one
  file, whatever the table's size, and memory is the page cache of mapped files, not heap.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from msprior.conditioning import ConditioningSpec
from msprior.data import node_cache
from msprior.data.reader import DataError, Frames, ReadSpec, Table

LOAD_CPU = 0.25  # reads are I/O: a small CPU share so they never wait behind train workers
TASK_MEMORY = 64 << 20  # bytes a read task holds besides its data (pyarrow buffers, interpreter)
ROW_GROUP_BYTES = 256 << 20  # the most token bytes a row group is expected to hold (readers hold one at a time)
FILLS_IN_FLIGHT = 2  # fill tasks a rank keeps running: fill memory does not grow with the table
FILL_NICE = 19  # a fill's decode thread: below Ray's workers (nice 15), so below the step it feeds
# A rank's share up to this many bytes of data files is cached whole before step 1 and added to the
# draw in its seeded order: same seed, same windows (seconds of decode). Larger shares start with the
# first file that lands (time to first step flat in the table), their first draws timing-dependent.
WAIT_ALL_BYTES = 1 << 30


def task_memory(nbytes: int) -> int:
    """`memory=` of a task that decodes one row group of a file of `nbytes` tokens: the compressed
    column, Arrow's decoded copy and the flat array (readers hold one row group at a time)."""
    return int(TASK_MEMORY + 3 * min(nbytes, ROW_GROUP_BYTES))


def admissible_starts(lengths: np.ndarray, seq_len: int, step: int, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Window starts per chunk: s in {0, step, ...} with s + seq_len + 1 <= T (0 for masked-out chunks)."""
    room = np.asarray(lengths, np.int64) - (seq_len + 1)
    n = np.where(room >= 0, room // step + 1, 0)
    return n if mask is None else np.where(mask, n, 0)


def draw(num_starts: Sequence[np.ndarray], n: int, rng: np.random.Generator,
         cums: Optional[Sequence[np.ndarray]] = None):
    """(part, chunk, start index) of `n` windows drawn uniformly over every admissible start:
    a part with probability proportional to its starts, then a start inside it."""
    cums = cums if cums is not None else [np.cumsum(s) for s in num_starts]
    totals = np.array([int(c[-1]) if len(c) else 0 for c in cums], np.int64)
    part_cum = np.cumsum(totals)
    k = rng.integers(0, int(part_cum[-1]), size=n)
    part = np.searchsorted(part_cum, k, side="right")
    local = k - (part_cum[part] - totals[part])
    chunk, first = np.empty(n, np.int64), np.empty(n, np.int64)
    for g in np.unique(part):
        sel = part == g
        c = np.searchsorted(cums[g], local[sel], side="right")
        chunk[sel], first[sel] = c, local[sel] - (cums[g][c] - num_starts[g][c])
    return part, chunk, first


class WindowSampler:
    """Random windows of `seq_len + 1` frames inside chunks, drawn as whole batches.

    `frames` is one `Frames` or a list of them (e.g. data files mapped from the node cache);
    `masks` (optional, one bool [C] per part) says which chunks windows may come from. Windows are
    drawn uniformly over all admissible starts of all parts, never across a chunk boundary. With
    conditioning, window starts are multiples of the ratio r, so that decoder frame t of the window
    sees conditioning frames 0 .. t // r of the window (docs/ARCHITECTURE.md).
    """

    def __init__(self, frames: Union[Frames, Sequence[Frames]], seq_len: int,
                 cond: ConditioningSpec = ConditioningSpec(), seed: int = 0,
                 masks: Optional[Sequence[np.ndarray]] = None):
        parts = [frames] if isinstance(frames, Frames) else list(frames)
        self.seq_len, self.conditioning = seq_len, cond.kind
        self.step = cond.step  # window start granularity
        self.parts: List[Frames] = []
        self.num_starts: List[np.ndarray] = []
        self.cums: List[np.ndarray] = []
        self.total = 0
        self.longest = 0
        for i, p in enumerate(parts):
            self.add(p, None if masks is None else masks[i])
        self.rng = np.random.default_rng(seed)
        self.offsets = np.arange(seq_len + 1)
        self.cond_offsets = np.arange(cond.frames(seq_len))
        if parts and self.total == 0:
            raise self.too_short()

    def add(self, frames: Frames, mask: Optional[np.ndarray] = None) -> None:
        """One more part to draw from (a data file that just landed in the node cache)."""
        starts = admissible_starts(frames.lengths, self.seq_len, self.step, mask)
        self.longest = max(self.longest, int(frames.lengths.max(initial=0)))
        if starts.sum():
            self.parts.append(frames)
            self.num_starts.append(starts)
            self.cums.append(np.cumsum(starts))
            self.total += int(starts.sum())

    def too_short(self) -> DataError:
        return DataError(f"no chunk holds seq_len + 1 = {self.seq_len + 1} frames (longest: {self.longest}); "
                         "lower model.seq_len or preprocess with longer chunks")

    def _gather(self, attr: str, part: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """parts[part[i]].<attr>[rows[i]] for every window i (one fancy index per part used)."""
        first = getattr(self.parts[0], attr)
        if len(self.parts) == 1:
            return np.asarray(first[rows])
        out = np.empty(rows.shape + first.shape[1:], first.dtype)
        for g in np.unique(part):
            sel = part == g
            out[sel] = getattr(self.parts[g], attr)[rows[sel]]
        return out

    def sample(self, batch_size: int) -> Dict[str, np.ndarray]:
        if self.total == 0:
            raise self.too_short()
        part, chunk, first = draw(self.num_starts, batch_size, self.rng, self.cums)
        row, crow = np.empty(batch_size, np.int64), np.empty(batch_size, np.int64)
        for g in np.unique(part):  # first frame of each window inside its part's arrays
            sel, p = part == g, self.parts[g]
            row[sel] = p.starts[chunk[sel]] + first[sel] * self.step
            if self.conditioning != "none":
                crow[sel] = p.cond_starts[chunk[sel]] + first[sel]
        batch = {"rave": self._gather("rave", part, row[:, None] + self.offsets).astype(np.int64)}  # [B, T+1, Q]
        if self.conditioning != "none":
            cond = self._gather("cond", part, crow[:, None] + self.cond_offsets)
            if self.conditioning == "tokens":
                batch["tokens"] = cond.astype(np.int64)  # [B, ceil(T/r)]
            else:
                batch["features"] = np.asarray(cond, np.float32)  # [B, ceil(T/r), F]
        return batch


# --- a rank's share of the table ------------------------------------------------------------------


Share = Dict[str, Dict[str, Tuple[int, int]]]  # data file -> source -> chunk range [lo, hi) of one rank
ALL_CHUNKS = 2**31 - 1


def rank_share(table: Table, rank: int, world: int) -> Share:
    """Rank `rank`'s stratum of the training chunks: the chunks in (file, source, chunk) order cut
    into `world` runs of equal frames (a chunk belongs to the run holding its middle frame; chunks
    of a source counted as equal), so every rank holds the same share of the table within one chunk
    and reads ~1/world of the files. The first and last range of a source are open-ended."""
    val = set(table.val_sources)
    rows = sorted((f, s, int(c), int(n)) for s, f, c, n in zip(
        table.index["source"].to_pylist(), table.index["file"].to_pylist(), table.index["chunks"].to_pylist(),
        table.index["frames"].to_pylist()) if s not in val)
    if table.val_from is not None:  # a one-file corpus: its chunks from val_from on are validation
        rows = [(f, s, min(c, table.val_from), n * min(c, table.val_from) // max(c, 1)) for f, s, c, n in rows]
    chunks = np.array([max(c, 1) for _, _, c, _ in rows], np.int64)
    if chunks.sum() < world:  # fewer chunks than ranks: every rank draws from all of them
        world = 1
    per_chunk = np.repeat([n / max(c, 1) for _, _, c, n in rows], chunks)
    middle = np.cumsum(per_chunk) - per_chunk / 2
    owner = np.minimum((middle * world / max(per_chunk.sum(), 1e-9)).astype(np.int64), world - 1)
    first = np.concatenate([[0], np.cumsum(chunks)[:-1]])
    out: Share = {}
    for (f, s, _, _), lo, n in zip(rows, first, chunks):
        here = np.flatnonzero(owner[lo:lo + n] == rank)
        if world == 1 or len(here):
            a, b = (0, n) if world == 1 else (int(here[0]), int(here[-1]) + 1)
            out.setdefault(f, {})[s] = (a, ALL_CHUNKS if b == n else b)
    return out


def train_mask(table: Table, cached: "node_cache.CachedFile", mine: Dict[str, Tuple[int, int]]) -> np.ndarray:
    """Which chunks of a cached file are this rank's training chunks."""
    lo = np.array([mine.get(s, (0, 0))[0] for s in cached.sources], np.int64)[cached.source]
    hi = np.array([mine.get(s, (0, 0))[1] for s in cached.sources], np.int64)[cached.source]
    keep = (cached.chunk >= lo) & (cached.chunk < hi)
    if table.val_from is not None:  # a one-file corpus: its last chunks are validation
        keep &= cached.chunk < table.val_from
    return keep


def background() -> None:
    """Give the calling thread the lowest CPU priority there is (nice 19; Linux sets it per thread).

    Relative to Ray's workers, which all run at nice 15 (RAY_worker_niceness): the absolute nice 10
    used before put fills AHEAD of the training worker they feed (steps 5x slower while a 6 GB
    table filled). Not SCHED_IDLE either: a CPU training that keeps every core busy would starve
    the fills, and the draw would stay on the first files for the whole run (bench/RESULTS.md,
    "node-cache fill priority")."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the worker's own priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILL_NICE)


def _fill(spec: ReadSpec, rel: str, sources: List[str], identity):
    """Ray task: the file's node-cache entry (path, bytes read); a table problem as {"error": line}.

    The decode runs in a thread of its own under SCHED_IDLE (`background`): a fill never takes a
    core from the training step it feeds."""
    from concurrent.futures import ThreadPoolExecutor

    from msprior.errors import UserError

    def niced():
        background()
        return node_cache.fill(spec, rel, sources, identity)

    try:
        with ThreadPoolExecutor(1) as pool:
            entry = pool.submit(niced).result()
    except UserError as e:
        return {"error": str(e).splitlines()[0]}
    return {"path": entry.path, "read_bytes": entry.read_bytes, "chunks": entry.num_chunks}


def fill_task(spec: ReadSpec, rel: str, sources: List[str], nbytes: int, identity):
    """One fill task, pinned to the calling process's node (its cache is the one to fill)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from msprior.data import windows as this  # a module-level function is what Ray pickles by reference

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(this._fill).options(num_cpus=LOAD_CPU, max_retries=3, scheduling_strategy=here,
                                          memory=task_memory(nbytes)).remote(spec, rel, sources, identity)


class TrainWindows:
    """A rank's training windows: its stratum's files decoded into the node cache by Ray tasks on
    this node (FILLS_IN_FLIGHT at a time, in a seeded random order), drawn from as soon as the first
    one lands; the others join the draw as they land. A file already in the node cache (another
    rank's, trial's or run's fill) costs no read."""

    def __init__(self, data, rank: int, world: int, seq_len: int, seed: int):
        """`data`: `msprior.data.layout.TableData` (table, read spec, file identities)."""
        self.spec, self.table, self.identity = data.spec, data.table, data.identity
        self.mine = rank_share(self.table, rank, world)
        indexed: Dict[str, List[str]] = {}  # an entry holds every indexed source of its file: ranks share it
        for s, f in zip(self.table.index["source"].to_pylist(), self.table.index["file"].to_pylist()):
            if f in self.mine:
                indexed.setdefault(f, []).append(s)
        order = np.random.default_rng(seed).permutation(sorted(self.mine))  # no region of the corpus first
        self.queue = [(str(f), indexed[f]) for f in order]
        self.nbytes, self.pending, self.read_bytes = file_bytes(self.table), [], 0
        self.sampler = WindowSampler([], seq_len, self.spec.cond, seed=seed)
        if sum(self.nbytes.get(f, 0) for f in self.mine) <= WAIT_ALL_BYTES:
            self._fill_all()
        self.submit()
        while self.sampler.total == 0:  # training starts with the first file that holds a window
            if not self.pending:
                raise self.sampler.too_short()
            self.poll(block=True)

    def _fill_all(self) -> None:
        """Every file of the share, FILLS_IN_FLIGHT at a time, added in the queue's (seeded) order."""
        import ray

        while self.queue:
            batch, self.queue = self.queue[:FILLS_IN_FLIGHT], self.queue[FILLS_IN_FLIGHT:]
            refs = [fill_task(self.spec, rel, sources, self.nbytes.get(rel, 0), self.identity.get(rel))
                    for rel, sources in batch]
            self.pending = refs
            self._add(ray.get(refs))
        self.pending = []

    def _add(self, outs) -> None:
        """Each landed fill into the draw, in the order given."""
        for out in outs:
            if "error" in out:
                raise DataError(out["error"])
            cached = node_cache.open_entry(out["path"])
            self.read_bytes += out["read_bytes"]
            self.sampler.add(cached.frames, train_mask(self.table, cached, self.mine[cached.file]))

    def submit(self) -> None:
        while self.queue and len(self.pending) < FILLS_IN_FLIGHT:
            rel, sources = self.queue.pop(0)
            self.pending.append(fill_task(self.spec, rel, sources, self.nbytes.get(rel, 0), self.identity.get(rel)))

    def poll(self, block: bool = False) -> None:
        """Add the files that landed in the node cache since the last call; start the next fills."""
        import ray

        if not self.pending:
            return
        ready, self.pending = ray.wait(self.pending, num_returns=1 if block else len(self.pending),
                                       timeout=None if block else 0)
        self._add(ray.get(ready))
        self.submit()

    @property
    def warm(self) -> bool:
        """Every file of this rank's stratum is in the draw."""
        return not self.pending and not self.queue

    def sample(self, batch_size: int) -> Dict[str, np.ndarray]:
        self.poll()
        return self.sampler.sample(batch_size)


def file_bytes(table: Table) -> Dict[str, int]:
    """Token bytes (frames x quantizers x int16) per data file, from the index."""
    q = int(table.manifest.get("rave", {}).get("num_quantizers") or 1)
    out: Dict[str, int] = {}
    for f, n in zip(table.index["file"].to_pylist(), table.index["frames"].to_pylist()):
        out[f] = out.get(f, 0) + int(n) * q * 2
    return out
