"""The training read path without Ray: windows uniform over the table, rank strata balanced by frames,
and the node cache (one decode per node under a lock, atomic entries, never stale). Faults are real:
a filling process is SIGSTOPped or SIGKILLed at `cache.before_rename` (msprior.data.faults)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from msprior.data import node_cache
from msprior.data.reader import DataError, Frames, ReadSpec, Table, open_table
from msprior.data.windows import WindowSampler, admissible_starts, rank_share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = "latents/00000001.parquet"


def _file_frames(file_id: int, chunk_lengths, sources=None) -> Frames:
    """Frames whose quantizer 0 holds the file's id and quantizer 1 the chunk's source number."""
    lengths = np.asarray(chunk_lengths, np.int64)
    src = np.repeat(np.arange(len(lengths)) if sources is None else np.asarray(sources), lengths)
    rave = np.stack([np.full(lengths.sum(), file_id), src], axis=1).astype(np.int16)
    return Frames(rave=rave, starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths=lengths)


def _shares(batches_per_file, starts_per_file):
    drawn = np.asarray(batches_per_file, np.float64)
    expected = np.asarray(starts_per_file, np.float64)
    return drawn / drawn.sum(), expected / expected.sum()


def test_windows_are_uniform_over_every_file():
    """Files of very different sizes and chunk lengths (some chunks too short, some masked out):
    over many draws each file's share of windows is within 5% of its share of admissible starts."""
    rng = np.random.default_rng(0)
    files = [rng.integers(lo, hi, n) for n, lo, hi in [(3, 17, 40), (60, 10, 64), (8, 200, 400), (300, 16, 24)]]
    masks = [None, rng.random(60) < 0.5, None, rng.random(300) < 0.9]
    sampler = WindowSampler([_file_frames(i, l) for i, l in enumerate(files)], seq_len=16, seed=1, masks=masks)
    counts = np.zeros(len(files))
    for _ in range(400):
        counts += np.bincount(sampler.sample(256)["rave"][:, 0, 0], minlength=len(files))
    starts = [admissible_starts(l, 16, 1, m).sum() for l, m in zip(files, masks)]
    drawn, expected = _shares(counts, starts)
    assert np.all(np.abs(drawn / expected - 1) < 0.05), (drawn, expected)


def _table(chunks_per_source, files: int, frames: int = 64) -> Table:
    n = len(chunks_per_source)
    index = pa.table({"source": [f"s{i:04d}" for i in range(n)], "file": [f"f{i % files:02d}" for i in range(n)],
                      "chunks": list(chunks_per_source), "frames": [c * frames for c in chunks_per_source]})
    return Table(db_path="", manifest={"rave": {"num_quantizers": 2}}, index=index, columns=[],
                 sources=index["source"].to_pylist(), val_sources=[])


def test_rank_strata_keep_the_global_batch_uniform():
    """4 ranks each draw the same batch from their own stratum: each file's share of all windows
    stays within 5% of its share of admissible starts, because strata are cut at equal frames (inside
    a source when it is long), whatever the sources' lengths."""
    rng = np.random.default_rng(2)
    chunks = (rng.pareto(1.2, 300) * 4 + 1).astype(np.int64)  # heavy-tailed: a few sources are huge
    table, world, seq = _table(chunks, files=12), 4, 16
    counts, starts, held = np.zeros(12), np.zeros(12), 0
    for rank in range(world):
        mine = rank_share(table, rank, world)
        parts = []
        for f, ranges in sorted(mine.items()):
            n = sum(min(hi, c) - lo for (lo, hi), c in ((r, chunks[int(s[1:])]) for s, r in ranges.items()))
            parts.append(_file_frames(int(f[1:]), [64] * n))
            starts[int(f[1:])] += n * admissible_starts(np.array([64]), seq, 1)[0]
            held += n
        sampler = WindowSampler(parts, seq_len=seq, seed=rank)
        for _ in range(300):
            counts += np.bincount(sampler.sample(128)["rave"][:, 0, 0], minlength=12)
    drawn, expected = _shares(counts, starts)
    assert np.all(np.abs(drawn / expected - 1) < 0.05), (drawn, expected)
    assert held == chunks.sum()  # every chunk in exactly one stratum


# --- the node cache: real processes ---------------------------------------------------------------------


def _fill_cmd(table: str, cache: str) -> list:
    code = ("import json, sys\n"
            "from msprior.data import node_cache\n"
            "from msprior.data.reader import ReadSpec, open_table\n"
            f"t = open_table({table!r}, 0.0, 0)\n"
            f"e = node_cache.fill(ReadSpec.of(t), {FILE!r}, ['dir/file_01.wav'])\n"
            "print(json.dumps({'read': e.read_bytes, 'chunks': e.num_chunks}))\n")
    return [sys.executable, "-c", code]


def _env(cache: str, **faults) -> dict:
    return {**os.environ, "MSPRIOR_CACHE_DIR": cache, "PYTHONPATH": ROOT, **faults}


def _wait_for(path: str, text: str, proc, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not (os.path.exists(path) and text in open(path).read()):
        assert proc.poll() is None and time.monotonic() - t0 < timeout, "the fault point was not reached"
        time.sleep(0.2)


@pytest.fixture
def table(tmp_path):
    from tests._train_data import write_synthetic_table

    write_synthetic_table(tmp_path / "t", num_files=3)
    return str(tmp_path / "t")


@pytest.mark.timeout(300)
def test_concurrent_fills_on_a_node_decode_once(table, tmp_path):
    """A filler stopped inside its fill (holding the lock): a second one waits, then maps the first
    one's entry instead of reading storage again."""
    cache, mark = str(tmp_path / "cache"), str(tmp_path / "mark")
    first = subprocess.Popen(_fill_cmd(table, cache), stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env(
        cache, MSPRIOR_FAULT_STOP="cache.before_rename", MSPRIOR_FAULT_MARK=mark))
    try:
        _wait_for(mark, "cache.before_rename", first)
        second = subprocess.Popen(_fill_cmd(table, cache), stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=_env(cache))
        time.sleep(8)  # long enough to import, open the table and reach the lock
        assert second.poll() is None  # waiting on the first filler's lock
    finally:
        first.send_signal(signal.SIGCONT)
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in (first, second)]
    assert first.returncode == second.returncode == 0
    assert outs[0]["read"] == os.path.getsize(os.path.join(table, FILE)) and outs[1]["read"] == 0
    assert outs[0]["chunks"] == outs[1]["chunks"] == 4
    spec = ReadSpec(db_path=table, columns=[], num_quantizers=4, vocab_size=16, cache_dir=cache)
    assert len(node_cache.fills(spec)) == 1  # one decode on this node


@pytest.mark.timeout(300)
def test_a_fill_killed_before_its_rename_leaves_no_entry(table, tmp_path):
    cache = str(tmp_path / "cache")
    killed = subprocess.run(_fill_cmd(table, cache), capture_output=True, text=True, cwd=ROOT,
                            env=_env(cache, MSPRIOR_FAULT_KILL="cache.before_rename"), timeout=180)
    assert killed.returncode == -signal.SIGKILL
    left = [d for d in os.listdir(cache) if os.path.isdir(os.path.join(cache, d))]
    assert left and all(".tmp-" in d for d in left)  # a half-written entry is never under its name
    t = open_table(table, 0.0, 0)
    entry = node_cache.fill(_spec(t, cache), FILE, ["dir/file_01.wav"])
    assert entry.read_bytes > 0 and entry.num_chunks == 4 and entry.frames.rave.shape == (4 * 64, 4)
    assert not [d for d in os.listdir(cache) if ".tmp-" in d]  # the killed fill's leftovers are gone


def _spec(t, cache: str) -> ReadSpec:
    import dataclasses

    return dataclasses.replace(ReadSpec.of(t), cache_dir=cache)


def test_a_rewritten_data_file_is_decoded_again(table, tmp_path):
    """The entry's name holds the file's size and modification time: an edited file is never read stale."""
    from tests.test_train_windows import _edit_rows

    cache = str(tmp_path / "cache")
    t = open_table(table, 0.0, 0)
    first = node_cache.fill(_spec(t, cache), FILE, ["dir/file_01.wav"])
    assert first.read_bytes > 0 and int(first.frames.rave.max()) < 16
    again = node_cache.fill(_spec(t, cache), FILE, ["dir/file_01.wav"])
    assert again.read_bytes == 0 and again.path == first.path  # a hit: storage not read
    time.sleep(0.01)
    _edit_rows(os.path.join(table, FILE), "rave", 99)  # out of the vocabulary: the check must see it
    with pytest.raises(DataError, match="00000001.parquet: column rave holds values in"):
        node_cache.fill(_spec(open_table(table, 0.0, 0), cache), FILE, ["dir/file_01.wav"])
