"""Decode: an audio file -> its chunks (resampled, cut, with conditioning features and tokens).

Part of the table contract: the chunking rules of docs/ARCHITECTURE.md ("Latent table": chunks of
`chunk.frames`, a short tail joins the chunk before it, short files padded or skipped), applied by
`msprior.data.audio`; a file is either all its chunks or one error (a reason, and whether it is
transient: retried on resume, or bad for good: recorded in the ledger's `skipped`).

Two callers. The CPU decode stage (`decode_task`, a Ray Data task per group of files) turns each
file into one `DECODED` row (a row is never split between blocks, so every chunk of a file reaches
the same encoder batch); the old path (`producer`) runs decode threads inside the encoder actor.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pyarrow as pa

from msprior import storage
from msprior.data import audio as audio_mod
from msprior.data import features as feat
from msprior.data.request import Settings

# one row per file: its chunks' audio, features and tokens flattened, with the lengths to cut them
DECODED = pa.schema([("source", pa.string()), ("start_s", pa.list_(pa.float64())),
                     ("samples", pa.list_(pa.int64())), ("audio", pa.large_list(pa.float32())),
                     ("features", pa.large_list(pa.float32())), ("tokens", pa.large_list(pa.int16())),
                     ("counts", pa.list_(pa.string())), ("error", pa.string()), ("transient", pa.bool_())])


@contextmanager
def local_file(path: str, s: Settings) -> Iterator[str]:
    """A local path to read with libsndfile: the file itself, or a download of an S3 object (the
    download is retried on transient errors; decoding a half-read stream could end silently)."""
    with s.audio_root.at(path).local_copy() as local:
        yield local


def _chunk_event(source: str, n: int, start: int, x: np.ndarray, padded: list, s: Settings) -> tuple:
    x = audio_mod.normalize(x) if s.normalize else x
    f = t = np.zeros(0, np.float32)
    if s.condition_ratio:
        frames = math.ceil(len(x) / s.ratio)
        f = feat.compute(x, s.sr, s.condition_ratio * s.ratio, feat.cond_frames(frames, s.condition_ratio))
        t = feat.assign(f, s.centroids, s.scale)
    counts = {"files_padded": 1, "padded_ms": int(padded[0] * 1000)} if padded else {}
    return ("chunk", source, n, start / s.sr, x, f, np.asarray(t, np.int16), counts)


def file_events(source: str, path: str, s: Settings):
    """One file -> ("chunk", source, index, start_s, audio, features, tokens, counts) events, then
    ("done", source, n) or ("error", source, reason, transient)."""
    n, padded = 0, []
    try:
        with local_file(path, s) as local:
            blocks = audio_mod.stream(local, s.sr)
            if s.silence_db is not None:
                blocks = audio_mod.trim_leading_silence(blocks, s.silence_db, s.sr)
            for start, x in audio_mod.iter_chunks(blocks, s.chunk_samples, s.ratio, s.min_frames, s.sr,
                                                  pad=s.pad_short, on_pad=padded.append):
                yield _chunk_event(source, n, start, x, padded, s)
                n += 1
    except audio_mod.SkipFile as e:
        yield ("error", source, str(e), False)
        return
    except Exception as e:  # one file's failure never stops the corpus
        if storage.is_storage_full(e):  # our disk, not the file: retried on resume, and the run stops
            yield ("error", source, f"{storage.STORAGE_FULL}: {e}"[:300], True)
            return
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        yield ("error", source, msg, storage.is_transient(e))
        return
    yield ("done", source, n)


def first_seconds(blocks, n: int):
    """The first `n` samples of a stream of blocks."""
    got = 0
    for block in blocks:
        yield block[: n - got]
        got += len(block)
        if got >= n:
            return


def flat(col) -> list:
    """A batch column of file names, or of lists of them (one row per task), as one list."""
    return [x for v in col for x in ([v] if isinstance(v, str) else list(v))]


# --- the old path: decode threads inside the encoder actor ----------------------------------------


def producer(files: List[Tuple[str, str]], s: Settings, q: "queue.Queue", threads: int) -> None:
    """Decode threads: `threads` of them take files from one list and stream their chunks into a
    bounded queue (soundfile, soxr and numpy release the GIL, so decoding overlaps the encode on the
    actor's main thread); None marks the end."""
    todo = list(reversed(files))

    def work() -> None:
        while True:
            try:
                source, path = todo.pop()  # list.pop is atomic under the GIL
            except IndexError:
                return
            for ev in file_events(source, path, s):
                q.put(ev)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(max(1, threads))]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        q.put(None)


# --- the decode stage: a task of files -> one DECODED row per file --------------------------------


def _large(a: np.ndarray) -> pa.Array:
    """One large_list row holding `a`."""
    return pa.LargeListArray.from_arrays(pa.array(np.array([0, len(a)], np.int64)), pa.array(a))


def _cat(arrays: List[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in arrays]).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def decoded_row(source: str, path: str, s: Settings) -> pa.Table:
    """Decode one file into its DECODED row (all its chunks, or its error)."""
    chunks, error, transient = [], "", False
    for ev in file_events(source, path, s):
        if ev[0] == "chunk":
            chunks.append(ev)
        elif ev[0] == "error":
            chunks, error, transient = [], ev[2], ev[3]
    if not chunks and not error:
        error, transient = "no chunk was produced", True
    cols = [pa.array([source]), pa.array([[c[3] for c in chunks]], DECODED.field("start_s").type),
            pa.array([[len(c[4]) for c in chunks]], DECODED.field("samples").type),
            _large(_cat([c[4] for c in chunks], np.float32)), _large(_cat([c[5] for c in chunks], np.float32)),
            _large(_cat([c[6] for c in chunks], np.int16)),
            pa.array([[json.dumps(c[7]) for c in chunks]], DECODED.field("counts").type),
            pa.array([error]), pa.array([transient])]
    return pa.Table.from_arrays(cols, schema=DECODED)


# float32 mono samples per byte of file, at most: PCM 16-bit (2 bytes) -> 4 bytes; FLAC ~2x smaller than
# PCM; lossy codecs at >= 64 kb/s (8 kB/s) against 44.1 kHz x 4 B = 176 kB/s: ~22x. A resample to a
# higher rate than the file's grows it further: bounded by 2x here (22.05 -> 44.1 kHz).
EXPANSION = {"wav": 4.0, "wave": 4.0, "aif": 4.0, "aiff": 4.0, "aifc": 4.0, "flac": 8.0, "wv": 8.0}
LOSSY_EXPANSION = 44.0
DECODE_BASE = 256 << 20  # the interpreter, PyAV/soundfile, numpy: measured ~200 MB RSS per decode task
COPIES = 3  # the decoded audio, its chunks' concatenation (`_cat`) and the Arrow row built from them


def decode_memory(tasks: List[list], node_memory: float) -> int:
    """Ray `memory=` of a decode task: its largest file decoded (a row holds a whole file, a multi-hour
    file included), so that Ray starts no more decodes on a node than its memory holds; never more than
    80% of the largest node's memory (a task that fits nowhere would wait forever)."""
    largest = max((decoded_bytes(f) for t in tasks for f in t), default=0.0)
    return int(min(DECODE_BASE + COPIES * largest, 0.8 * node_memory))


LONG_DECODED = 1 << 30  # a file decoding to more than this (~1.7 h of 44.1 kHz mono float32) decodes apart


def decoded_bytes(f) -> float:
    """What a pending file (source, path, size) takes once decoded: its size x its codec's expansion."""
    ext = f[0].rsplit(".", 1)[-1].lower() if "." in f[0] else ""
    return f[2] * EXPANSION.get(ext, LOSSY_EXPANSION)


def split_long(tasks: List[list]) -> Tuple[List[list], List[list]]:
    """(tasks without their long files, one task per long file). The decode stage's `memory=` is
    one figure for all its tasks: with a 3-hour file among them every decode would ask for that
    file's memory and a node would run a few decodes instead of one per CPU."""
    regular = [[f for f in t if decoded_bytes(f) <= LONG_DECODED] for t in tasks]
    return [t for t in regular if t], [[f] for t in tasks for f in t if decoded_bytes(f) > LONG_DECODED]


def decode_task(batch: Dict[str, np.ndarray], settings: Settings) -> Iterator[pa.Table]:
    """(Ray Data task, CPU) the files of a task row, one DECODED row each, streamed out file by file."""
    for source, path in zip(flat(batch["source"]), flat(batch["path"])):
        yield decoded_row(str(source), str(path), settings)


def _values(col: pa.ChunkedArray, i: int) -> np.ndarray:
    """Row i of a large_list column as a numpy view (no Python floats)."""
    return col[i].values.to_numpy(zero_copy_only=False)


def file_chunks(t: pa.Table, s: Settings) -> Iterator[tuple]:
    """DECODED rows -> (source, [chunk dicts], "", False) or (source, None, error, transient)."""
    nf = len(feat.feature_names()) if s.condition_ratio else 0
    for i, source in enumerate(t["source"].to_pylist()):
        error = t["error"][i].as_py()
        if error:
            yield source, None, error, bool(t["transient"][i].as_py())
            continue
        audio, feats, toks = _values(t["audio"], i), _values(t["features"], i), _values(t["tokens"], i)
        out, a, f = [], 0, 0
        for start_s, n, counts in zip(t["start_s"][i].as_py(), t["samples"][i].as_py(), t["counts"][i].as_py()):
            cond = feat.cond_frames(math.ceil(n / s.ratio), s.condition_ratio) if s.condition_ratio else 0
            out.append({"start_s": start_s, "audio": audio[a:a + n], "features": feats[f * nf:(f + cond) * nf],
                        "tokens": toks[f:f + cond], "counts": json.loads(counts)})
            a, f = a + n, f + cond
        yield source, out, "", False
