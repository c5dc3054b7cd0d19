"""Audio corpus (dir or s3://) -> latent table (dir or s3://), with Ray Data.

    lease + intent (driver)     take the table's lease; write (or check) intent.json + centroids.npy
    list + pending (driver)     list the corpus; drop what the ledger says is committed or bad for good
    encode  [actor pool]        per task a few files: stream-decode, resample, chunk, features, RAVE
                                tokens; every chunk of a file comes out in the same batch
    write   [Ray write tasks]   bundles of ~target_file_mb -> one Parquet data file, then its ledger
                                record (the commit), with the file's statistics
    finish (driver)             index.parquet, report.json, manifest.json from the ledger records only

Resume: committed sources (in the ledger) and files skipped for good are not read again; a data file
without its record is deleted; files that failed for a transient cause are retried. A source is in
exactly one committed file, complete, or absent. See docs/ARCHITECTURE.md ("Latent table").
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from msprior import __version__, console, devices, storage
from msprior.data import audio as audio_mod
from msprior.data import features as feat
from msprior.data import commit as commit_mod
from msprior.data import faults
from msprior.data import table as tbl
from msprior.data.commit import commit_bundle, file_stats  # noqa: F401  (the commit lives in data/commit.py)
from msprior.data.lease import Lease
from msprior.devices import CPU_HELP, GPU_HELP
from msprior.errors import UserError
from msprior.flags import flag
from msprior.runtime import ensure_ray


class PreprocessError(UserError):
    """A preprocessing problem the user can fix; one line."""


@dataclass
class PreprocessRequest:
    """What `msprior preprocess` is asked to do: its flags, then library-only tuning knobs."""

    audio: str = flag(help="Folder or s3://bucket/prefix of audio files (searched recursively).")
    out_path: str = flag(help="Latent table folder or s3:// prefix (re-runs resume).")
    rave: str = flag(help="RAVE model exported as TorchScript (.ts), local or s3://.")
    num_secs: float = flag(16.0, "Chunk length in seconds.")
    resolution: int = flag(64, "Bins per latent dimension (continuous RAVE only).")
    batch_size: int = flag(64, "Chunks per RAVE encode call.")
    num_workers: int = flag(1, "Encoder actors (each loads the model once).")
    gpu: Optional[int] = flag(None, GPU_HELP + " Ray encoders share the GPUs (a fraction per actor).")
    cpu: bool = flag(False, CPU_HELP)
    condition_ratio: int = flag(4, "RAVE frames per conditioning frame; 0 = no conditioning.")
    condition_tokens: int = flag(64, "k-means classes of the conditioning tokens.")
    min_frames: int = flag(257, "One training window in frames: shorter files are padded to it (see --short).")
    short: str = flag("pad", "Files shorter than --min_frames: pad (silence after the audio, counted in the "
                             "manifest) or skip (reported in report.json).")
    normalize: bool = flag(False, "Peak-normalise each chunk, at most +30 dB (the original's flag).",
                           names="--normalize/--nonormalize")
    silence_threshold: Optional[int] = flag(None, "Drop each file's leading audio quieter than -N dBFS (the "
                                                  "original's flag, 30-50).")
    # the original's preprocess flags that have nothing to set here (accepted, so its commands run)
    num_tokens: Optional[int] = flag(None, "The original's RAVE vocabulary size: read from the RAVE export here.")
    db_size: Optional[int] = flag(None, "The original's LMDB size cap (GB): a Parquet table needs none.")
    dyndb: bool = flag(True, "The original's LMDB growth switch: a Parquet table always grows.",
                       names="--dyndb/--nodyndb")
    preprocessor: Sequence[str] = flag((), "The original's extra preprocessor modules: not loaded here "
                                           "(--condition_ratio computes the conditioning).")
    files_per_task: int = flag(64, "At most this many files per encode task...")
    task_mb: float = flag(128.0, "...and about this many MB of input (a failed task redoes only these).")
    target_file_mb: float = flag(192.0, "Rows per data file, in MB before compression.")
    decode_threads: int = flag(1, "Decode threads per encoder (a GPU encoder needs several to stay fed).")
    cpus_per_worker: float = flag(0.5, "Logical CPUs requested per encoder actor.")
    threads_per_worker: Optional[int] = None  # torch threads per encoder; None: from the node's cores
    memory_per_worker_mb: Optional[float] = None  # Ray `memory=` of an encoder; None: estimated
    lease_ttl_s: Optional[float] = None  # None: MSPRIOR_LEASE_TTL_S or 60
    progress: bool = True


@dataclass(frozen=True)
class Settings:
    """What encode and write tasks need: plain values, cheap to ship to Ray workers."""

    audio_root: str
    out_path: str
    run_id: str
    sr: int
    ratio: int
    chunk_samples: int
    min_frames: int
    resolution: int
    batch_size: int
    condition_ratio: int
    centroids: Optional[np.ndarray]
    scale: Optional[np.ndarray]
    s3: storage.S3Options
    threads: int = 1
    decode_threads: int = 1
    gpu: bool = False
    normalize: bool = False  # per chunk, the original's --normalize
    silence_db: Optional[int] = None  # the original's --silence_threshold
    pad_short: bool = True  # a file under min_frames frames is padded to it (else skipped)
    target_bytes: int = 192 << 20
    row_group_bytes: int = 64 << 20
    latent_loc: Optional[Tuple[float, ...]] = None  # continuous RAVE: the latent bins' fitted affine
    progress: object = None  # a ray.util.queue.Queue the encoders report (files, seconds of audio) to
    latent_scale: Optional[Tuple[float, ...]] = None
    epoch: int = 0  # the lease epoch every commit is fenced on (msprior.data.lease.fence)
    faults: Optional[Dict[str, str]] = None  # fault-injection settings of the driver (tests only)


@dataclass(frozen=True)
class RaveInfo:
    data: bytes
    sha256: str
    facts: Dict  # the manifest's "rave" dict


# --- encode: files -> complete token rows (Ray actor) ---------------------------------------------


@contextmanager
def _local_file(path: str, s: Settings) -> Iterator[str]:
    """A local path to read with libsndfile: the file itself, or a download of an S3 object (the
    download is retried on transient errors; decoding a half-read stream could end silently)."""
    if not storage.is_s3(s.audio_root):
        yield path
        return
    fs, _ = storage.filesystem(s.audio_root, s.s3)
    fd, tmp = tempfile.mkstemp(suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        storage.retry(lambda: fs.get_file(path, tmp))
        yield tmp
    finally:
        os.unlink(tmp)


def _file_events(source: str, path: str, s: Settings):
    """One file -> ("chunk", source, index, start_s, audio, features, tokens) events, then ("done",
    source, n) or ("error", source, reason, transient)."""
    n, padded = 0, []
    try:
        with _local_file(path, s) as local:
            blocks = audio_mod.stream(local, s.sr)
            if s.silence_db is not None:
                blocks = audio_mod.trim_leading_silence(blocks, s.silence_db, s.sr)
            for start, x in audio_mod.iter_chunks(blocks, s.chunk_samples, s.ratio, s.min_frames, s.sr,
                                                  pad=s.pad_short, on_pad=padded.append):
                x = audio_mod.normalize(x) if s.normalize else x
                f = t = np.zeros(0, np.float32)
                if s.condition_ratio:
                    frames = math.ceil(len(x) / s.ratio)
                    f = feat.compute(x, s.sr, s.condition_ratio * s.ratio, feat.cond_frames(frames, s.condition_ratio))
                    t = feat.assign(f, s.centroids, s.scale)
                counts = {"files_padded": 1, "padded_ms": int(padded[0] * 1000)} if padded else {}
                yield ("chunk", source, n, start / s.sr, x, f, np.asarray(t, np.int16), counts)
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


def _producer(files: List[Tuple[str, str]], s: Settings, q: "queue.Queue", threads: int) -> None:
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
            for ev in _file_events(source, path, s):
                q.put(ev)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(max(1, threads))]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        q.put(None)


def _flat(col) -> list:
    """A batch column of file names, or of lists of them (one row per task), as one list."""
    return [x for v in col for x in ([v] if isinstance(v, str) else list(v))]


class Encoder:
    """Ray Data actor: loads the RAVE export once; turns a batch of files into token rows.

    Every chunk of a file is in the batch it returns (or one error row), so a write task always
    sees whole files.
    """

    def __init__(self, rave_ref: list, settings: Settings):
        import ray
        import torch

        from msprior.rave import load_rave

        # the model's bytes come through the object store (a ref inside a list is not resolved by
        # Ray, so the actor's constructor arguments stay small)
        rave_bytes = rave_ref[0] if isinstance(rave_ref[0], bytes) else ray.get(rave_ref[0])
        torch.set_num_threads(max(1, settings.threads))
        with tempfile.NamedTemporaryFile(suffix=".ts") as f:
            f.write(rave_bytes)
            f.flush()
            self.rave = load_rave(f.name)
        self.device = "cuda" if settings.gpu and torch.cuda.is_available() else "cpu"
        self.rave.to(self.device)
        self.s = settings

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        files = [(str(a), str(b)) for a, b in zip(_flat(batch["source"]), _flat(batch["path"]))]
        n = self.s.decode_threads
        q: "queue.Queue" = queue.Queue(maxsize=4 * n)  # decode runs a few chunks ahead, no more
        threading.Thread(target=_producer, args=(files, self.s, q, n), daemon=True).start()
        chunks: Dict[str, Dict[int, dict]] = defaultdict(dict)
        errors: Dict[str, Tuple[str, bool]] = {}
        buckets: Dict[int, List[Tuple[str, int]]] = defaultdict(list)  # equal lengths stack
        while (ev := q.get()) is not None:
            if ev[0] == "chunk":
                _, source, i, start_s, x, f, t, counts = ev
                chunks[source][i] = {"start_s": start_s, "audio": x, "features": f, "tokens": t, "counts": counts}
                buckets[len(x)].append((source, i))
                if len(buckets[len(x)]) >= self.s.batch_size:
                    self._encode(buckets.pop(len(x)), chunks, errors)
            elif ev[0] == "error":
                errors[ev[1]] = (ev[2], ev[3])
        for items in buckets.values():
            self._encode(items, chunks, errors)
        self._report(files, chunks)
        return _rows_table(files, chunks, errors)

    def _report(self, files, chunks) -> None:
        """(files, seconds of audio) done, for the driver's progress line; never fails the batch."""
        if self.s.progress is None:
            return
        frames = sum(c.get("frames", 0) for per in chunks.values() for c in per.values())
        try:
            self.s.progress.put_nowait((len(files), frames * self.s.ratio / self.s.sr))
        except Exception:
            pass

    def _tokens(self, x):
        """Tokens [B, Q, T]; for a continuous RAVE also the latents outside the fitted range, per item."""
        if self.rave.discrete:
            return self.rave.tokens(x, self.s.resolution)
        tok, outside = self.rave.encode_tokens(x, self.s.resolution, self.s.latent_loc, self.s.latent_scale)
        return tok, {"latents_out_of_range": outside.numpy()}

    def _encode(self, items: List[Tuple[str, int]], chunks, errors, x=None) -> None:
        """Encode one bucket of equal-length chunks; a transient failure (GPU out of memory) is
        retried with half the batch, a permanent one fails the files involved."""
        import torch

        if x is None:
            items = [(src, i) for src, i in items if src not in errors]
            if not items:
                return
            x = torch.from_numpy(np.stack([chunks[src][i]["audio"] for src, i in items]))
            for src, i in items:  # the stacked copy is the only one now
                chunks[src][i]["audio"] = None
        try:
            out = self._tokens(x)
        except Exception as e:
            transient = storage.is_transient(e)
            if transient and len(items) > 1:  # e.g. GPU out of memory: half the batch, then retry
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                half = len(items) // 2
                self._encode(items[:half], chunks, errors, x[:half])
                self._encode(items[half:], chunks, errors, x[half:])
                return
            try:
                if not transient:
                    raise
                out = storage.retry(lambda: self._tokens(x), deadline_s=20)
            except Exception as e2:
                msg = str(e2).strip().splitlines()[-1] if str(e2).strip() else type(e2).__name__
                for src, _ in items:
                    errors.setdefault(src, (f"RAVE encode failed: {msg[:200]}", storage.is_transient(e2)))
                return
        counts: Dict[str, np.ndarray] = {}
        if isinstance(out, tuple):  # (tokens, {name: [B] counts}) when the RAVE wrapper counts things
            out, counts = out
        tok = out.transpose(1, 2).to(torch.int16).numpy()  # frame-major [B, T, Q]
        for j, (src, i) in enumerate(items):
            c = chunks[src][i]
            c.update(rave=tok[j].ravel(), frames=tok.shape[1], audio=None,
                     counts={**c.get("counts", {}), **{k: int(np.asarray(v)[j]) for k, v in counts.items()}})


# what an encode row carries besides the data file's columns (tbl.SCHEMA): never written to the table
ROW_EXTRA = {"n_chunks": pa.int32(), "error": pa.string(), "transient": pa.bool_(), "counts": pa.string()}


def _rows_table(files, chunks, errors) -> pa.Table:
    """The encode output: every chunk row of each complete file, one row per failed file."""
    cols: Dict[str, list] = {k: [] for k in ("source", "chunk", "n_chunks", "start_s", "frames", "rave",
                                             "tokens", "features", "error", "transient", "counts")}

    def add(source, chunk, n, start_s, frames, rave, tokens, features, error, transient, counts):
        for k, v in zip(cols, (source, chunk, n, start_s, frames, rave, tokens, features, error,
                               transient, json.dumps(counts))):
            cols[k].append(v)

    empty16, empty32 = np.zeros(0, np.int16), np.zeros(0, np.float32)
    for source, _ in files:
        if source in errors or source not in chunks:
            reason, transient = errors.get(source, ("no chunk was produced", True))
            add(source, -1, 0, 0.0, 0, empty16, empty16, empty32, reason, transient, {})
            continue
        rows = chunks[source]
        for i in range(len(rows)):
            c = rows[i]
            add(source, i, len(rows), c["start_s"], c["frames"], c["rave"], c["tokens"],
                np.asarray(c["features"], np.float32).ravel(), "", False, c.get("counts", {}))
    types = {**{f.name: f.type for f in tbl.SCHEMA}, **ROW_EXTRA}  # the table's columns, and the encode's own
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})



# --- write: bundles of complete files -> one data file + its ledger record (Ray write tasks) ----------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _make_sink(s: Settings):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class LedgerSink(Datasink):
        """Ray Data write tasks: each bundle of ~target_bytes becomes one committed data file."""

        def __init__(self):
            self.returns: List[Dict] = []

        @property
        def min_bytes_per_write(self) -> int:
            return s.target_bytes

        def write(self, blocks, ctx) -> Dict:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"file": None, "skipped": [], "failed": []}
            t = pa.concat_tables(tables, promote_options="default")
            try:
                return commit_bundle(t, s)
            except OSError as e:
                if not storage.is_storage_full(e):
                    raise
                why = f"{storage.STORAGE_FULL}: {e}"[:300]  # the table's disk: every file retried on resume
                return {"file": None, "skipped": [], "failed": [[src, why] for src in sorted(set(t["source"].to_pylist()))]}

        def on_write_complete(self, write_result) -> None:
            self.returns = list(write_result.write_returns)

    return LedgerSink()


# --- driver: arguments, RAVE, intent, pending files ------------------------------------------------


def _validate(req: PreprocessRequest) -> None:
    if req.num_secs <= 0:
        raise PreprocessError(f"--num_secs must be > 0 (got {req.num_secs})")
    if req.resolution < 2 or req.resolution > 32767:
        raise PreprocessError(f"--resolution must be in [2, 32767] (got {req.resolution})")
    if req.condition_ratio < 0:
        raise PreprocessError(f"--condition_ratio must be >= 0 (got {req.condition_ratio}; 0 turns conditioning off)")
    if min(req.num_workers, req.batch_size, req.files_per_task, req.decode_threads) < 1:
        raise PreprocessError("--num_workers, --batch_size, --files_per_task and --decode_threads must be >= 1")
    _validate_original(req)


def _validate_original(req: PreprocessRequest) -> None:
    """The original MSPrior's options: checked here, applied by the decode (msprior.data.audio)."""
    if req.short not in ("pad", "skip"):
        raise PreprocessError(f"--short {req.short!r}: use pad or skip")
    if req.silence_threshold is not None and req.silence_threshold <= 0:
        raise PreprocessError(f"--silence_threshold {req.silence_threshold}: give dB below full scale, e.g. 40")
    if req.preprocessor:
        raise PreprocessError(f"--preprocessor {' '.join(req.preprocessor)}: extra preprocessor modules are not "
                              "loaded here; conditioning features come from --condition_ratio / --condition_tokens")


def _note_original(req: PreprocessRequest, rave: "RaveInfo", echo) -> None:
    """Original flags with nothing to do here: say so once, so a copied command is not misread."""
    vocab = rave.facts.get("vocab_size")
    if req.num_tokens is not None and req.num_tokens != vocab:
        echo(f"note: --num_tokens {req.num_tokens}: the vocabulary is read from the RAVE export ({vocab} here)")
    if req.db_size is not None or not req.dyndb:
        echo("note: --db_size / --nodyndb size the original's LMDB file; a Parquet table needs no size")


def _audio_options(req: PreprocessRequest) -> Dict:
    """The decode options a resume must repeat (only those set: older tables resume as before)."""
    opts = {"audio.normalize": True if req.normalize else None, "audio.silence_threshold": req.silence_threshold,
            "audio.short": "skip" if req.short == "skip" else None}
    return {k: v for k, v in opts.items() if v is not None}


def _read_rave(req: PreprocessRequest, s3: storage.S3Options) -> bytes:
    if storage.is_s3(req.rave):
        if not storage.exists(req.rave, s3):
            raise PreprocessError(f"{req.rave}: no such object; expected a RAVE model exported as TorchScript")
        return storage.read_bytes(req.rave, s3)
    if not os.path.exists(req.rave):
        raise PreprocessError(f"--rave {req.rave}: no such file; expected a RAVE model exported as TorchScript (.ts)")
    with open(req.rave, "rb") as f:
        return f.read()


def _inspect_rave(data: bytes, name: str, resolution: int) -> Dict:
    """(in a Ray task: the driver never loads torch) the manifest's RAVE facts, or {"error": line}."""
    from msprior.rave import RaveError, load_rave

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, os.path.basename(name) or "rave.ts")
        with open(path, "wb") as f:
            f.write(data)
        try:
            model = load_rave(path)
        except RaveError as e:
            return {"error": f"--rave {str(e).replace(path, name)}"}
    if model.discrete and model.codebook_size > 32767:
        return {"error": f"--rave {name}: codebook size {model.codebook_size} does not fit int16 tokens"}
    return {"sr": model.sr, "ratio": model.ratio, "latent_size": model.latent_size,
            "num_quantizers": model.num_quantizers, "vocab_size": model.vocab_size(resolution),
            "continuous": not model.discrete, "resolution": None if model.discrete else resolution}


def _remote(fn, *args, num_cpus: float = 0.5):
    """Run `fn(*args)` as a Ray task and return its result (keeps model loading off the driver)."""
    import ray

    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=2)(fn).remote(*args))


class _RayUp:
    """Start or join Ray on first need; the start-up time is kept apart (it is not throughput)."""

    def __init__(self):
        self.init_s = 0.0

    def __call__(self) -> None:
        t = time.monotonic()
        if ensure_ray():
            self.init_s += time.monotonic() - t


def _load_rave(req: PreprocessRequest, s3: storage.S3Options, old_intent: Optional[Dict], ray_up) -> RaveInfo:
    """The RAVE export's bytes, sha256 and facts; the facts come from the table's intent when it
    was made with the same file, else from loading it (in a Ray task)."""
    import hashlib

    data = _read_rave(req, s3)
    sha = hashlib.sha256(data).hexdigest()
    head = {"file": tbl.RAVE_FILE, "original_name": os.path.basename(req.rave), "sha256": sha}
    if old_intent and old_intent["rave"]["sha256"] == sha:
        facts = {**old_intent["rave"], **head}
        if facts["continuous"]:  # what this request asks; the intent check compares it
            facts.update(resolution=req.resolution, vocab_size=req.resolution)
        return RaveInfo(data=data, sha256=sha, facts=facts)
    ray_up()
    facts = _remote(_inspect_rave, data, req.rave, req.resolution)
    if "error" in facts:
        raise PreprocessError(facts["error"])
    return RaveInfo(data=data, sha256=sha, facts={**head, **facts})


def _list_corpus(audio: str, s3: storage.S3Options):
    """(corpus root, [(source, full path, bytes)] audio files, [ignored non-audio sources])."""
    fs, root = storage.filesystem(audio, s3)
    if not fs.exists(root):
        raise PreprocessError(f"--audio {audio}: no such directory or s3:// prefix")
    if fs.isfile(root):  # a single file is a corpus of one, rooted at its folder
        parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
        audio_root = ("s3://" + parent) if storage.is_s3(audio) else parent
        files = [(name, int(fs.info(root).get("size") or 0))]
    else:
        audio_root, files = audio, storage.list_files(audio, s3)
    _, base = storage.filesystem(audio_root, s3)
    good = [(rel, f"{base}/{rel}", size) for rel, size in files if audio_mod.is_audio_name(rel)]
    ignored = [rel for rel, _ in files if not audio_mod.is_audio_name(rel)]
    if not good:
        raise PreprocessError(f"--audio {audio}: no audio files found (looked for "
                              f".wav/.flac/.ogg/.opus/.mp3/.aiff... recursively)")
    return audio_root, good, ignored


def listing_digest(corpus) -> str:
    """sha256 of the corpus listing (every audio file's path under the root and its size, sorted)."""
    import hashlib

    return hashlib.sha256("\n".join(f"{rel}\t{size}" for rel, _, size in sorted(corpus[1])).encode()).hexdigest()


def _request_fields(req: PreprocessRequest, rave: RaveInfo, corpus) -> Dict:
    """The request a resume must repeat: the same corpus (root and listing) and the same settings."""
    return {"audio.root": req.audio, "audio.listing_sha256": listing_digest(corpus),
            "rave.sha256": rave.sha256, "rave.resolution": rave.facts["resolution"],
            "chunk.num_secs": float(req.num_secs), "chunk.min_frames": int(req.min_frames),
            "conditioning.ratio": int(req.condition_ratio),
            "conditioning.tokens": int(req.condition_tokens) if req.condition_ratio else None,
            **_audio_options(req)}


def _fit_conditioning(files, audio_root, sr, ratio, cond_ratio, k, s3, max_files=16):
    """Features of the first 30 s of a few of `files` -> (centroids, scale)."""
    step = 1
    s = Settings(audio_root=audio_root, out_path="", run_id="", sr=sr, ratio=ratio, chunk_samples=1,
                 min_frames=1, resolution=2, batch_size=1, condition_ratio=cond_ratio, centroids=None,
                 scale=None, s3=s3)
    hop, sample = cond_ratio * ratio, []
    for _, path, _ in files[::step][: max_files * 2]:
        try:
            with _local_file(path, s) as local:
                x, n = [], 0
                for block in audio_mod.stream(local, sr):
                    x.append(block)
                    n += len(block)
                    if n >= 30 * sr:  # the first 30 s of a file are a fair sample of it
                        break
                x = np.concatenate(x)[: 30 * sr]
        except Exception:
            continue
        sample.append(feat.compute(x, sr, hop, max(1, math.ceil(len(x) / hop))))
        if len(sample) >= max_files:
            break
    if not sample:  # nothing decodable in the sample: the run will report why
        n = len(feat.feature_names())
        return np.zeros((1, n), np.float32), np.ones(n, np.float32)
    return feat.fit_tokens(np.concatenate(sample), k)


def _fit_latent_bins(rave_bytes: bytes, files, audio_root: str, sr: int, s3, max_files: int = 8):
    """(in a Ray task) per-dimension (loc, scale) of a continuous RAVE's latents over the first 30 s
    of a few files; (None, None) when none of them decodes (the run reports why)."""
    import torch

    from msprior.rave import load_rave

    with tempfile.NamedTemporaryFile(suffix=".ts") as f:
        f.write(rave_bytes)
        f.flush()
        model = load_rave(f.name)
    s = Settings(audio_root=audio_root, out_path="", run_id="", sr=sr, ratio=model.ratio, chunk_samples=1,
                 min_frames=1, resolution=2, batch_size=1, condition_ratio=0, centroids=None, scale=None, s3=s3)
    clips = []
    for _, path, _ in files:
        try:
            with _local_file(path, s) as local:
                x = np.concatenate(list(_first_seconds(audio_mod.stream(local, sr), 30 * sr)))
        except Exception:
            continue
        if len(x) >= model.ratio:
            clips.append(torch.from_numpy(x))
        if len(clips) >= max_files:
            break
    return model.fit_bins(clips) if clips else (None, None)


def _first_seconds(blocks, n: int):
    got = 0
    for block in blocks:
        yield block[: n - got]
        got += len(block)
        if got >= n:
            return


def _latent_bins(req: PreprocessRequest, rave: RaveInfo, corpus, s3) -> Dict:
    """The manifest's `rave.latent_loc/latent_scale`: fitted on a sample, or standard latents."""
    audio_root, files, _ = corpus
    sample = files[:: max(1, len(files) // 8)][:16]
    loc, scale = _remote(_fit_latent_bins, rave.data, sample, audio_root, rave.facts["sr"], s3, num_cpus=1.0)
    q = rave.facts["latent_size"]
    return {"latent_loc": loc or [0.0] * q, "latent_scale": scale or [1.0] * q}


def _save_npy(path: str, a: np.ndarray, s3) -> str:
    import hashlib

    buf = io.BytesIO()
    np.save(buf, a)
    storage.write_bytes(path, buf.getvalue(), s3)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _intent(req: PreprocessRequest, rave: RaveInfo, corpus, s3, run_id: str, ray_up) -> Dict:
    """Check the table's intent record against this request, or write it (before any encoding):
    settings, RAVE facts and the conditioning centroids, fitted once and never again."""
    out = req.out_path
    path = storage.join(out, tbl.INTENT)
    want = _request_fields(req, rave, corpus)
    if storage.exists(path, s3):
        intent = json.loads(storage.read_bytes(path, s3))
        was = {"audio.root": intent.get("audio"), **intent["request"]}  # older intents: no listing digest
        for name, value in want.items():
            if name in was and was.get(name) != value:
                raise PreprocessError(f"--out_path {out} holds a table made with {name}={was.get(name)}, "
                                      f"this run has {value}; use a new --out_path (or the same settings to resume)")
        return intent
    if storage.exists(storage.join(out, tbl.MANIFEST), s3):
        raise PreprocessError(f"--out_path {out} holds a table written by an older msprior (no {tbl.INTENT}); "
                              "it stays readable, but resume it into a new --out_path")
    sr, ratio = rave.facts["sr"], rave.facts["ratio"]
    cond = None
    if req.condition_ratio:
        audio_root, files, _ = corpus
        sample = files[:: max(1, len(files) // 16)][:32]  # evenly spaced files, fitted in a Ray task
        ray_up()
        centroids, scale = _remote(_fit_conditioning, sample, audio_root, sr, ratio, req.condition_ratio,
                                   req.condition_tokens, s3, num_cpus=1.0)
        sha = _save_npy(storage.join(out, tbl.CENTROIDS), centroids, s3)
        names = feat.feature_names()
        cond = {"ratio": int(req.condition_ratio), "features": {"names": names, "size": len(names)},
                "tokens": {"vocab_size": int(len(centroids)), "centroids": tbl.CENTROIDS, "sha256": sha,
                           "scale": [float(v) for v in scale]}}
    facts = {**rave.facts, "latent_loc": None, "latent_scale": None}  # discrete: no latent bins
    if facts.get("continuous"):  # the latent bins' affine, fitted once and kept by every resume
        ray_up()
        facts.update(_latent_bins(req, rave, corpus, s3))
    storage.write_bytes(storage.join(out, tbl.RAVE_FILE), rave.data, s3)
    intent = {"format_version": tbl.FORMAT_VERSION, "msprior_version": __version__, "created": _now(),
              "run_id": run_id, "audio": req.audio, "request": want, "rave": facts,
              "chunk": {"num_secs": float(req.num_secs), "frames": max(1, round(req.num_secs * sr / ratio)),
                        "min_frames": int(req.min_frames)},
              "conditioning": cond}
    storage.create_exclusive(path, json.dumps(intent, indent=1).encode(), s3)  # we hold the lease
    return intent


def _conditioning_arrays(intent: Dict, out: str, s3) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(centroids, scale) of the intent, checked against the sha256 the intent recorded."""
    import hashlib

    cond = intent.get("conditioning")
    if not cond:
        return None, None
    data = storage.read_bytes(storage.join(out, tbl.CENTROIDS), s3)
    if hashlib.sha256(data).hexdigest() != cond["tokens"]["sha256"]:
        raise PreprocessError(f"{storage.join(out, tbl.CENTROIDS)} is not the file {tbl.INTENT} recorded; "
                              "the table was edited: use a new --out_path")
    return np.load(io.BytesIO(data)), np.asarray(cond["tokens"]["scale"], np.float32)


def _pending(files, entries: List[Dict]) -> Tuple[list, int]:
    """(files to encode, files already in the table): committed sources and files skipped for good
    are not encoded again."""
    done = {src for e in entries for src, _, _ in e.get("sources", [])}
    done |= {src for e in entries for src, _ in e.get("skipped", [])}
    committed = {src for e in entries for src, _, _ in e.get("sources", [])}
    pending = [f for f in files if f[0] not in done]
    return pending, sum(1 for f in files if f[0] in committed)


# --- driver: the Ray Data run -----------------------------------------------------------------------


def _encoder_memory(req: PreprocessRequest, s: Settings) -> int:
    """Ray `memory=` of one encoder: the model and a batch of audio with room for RAVE's activations."""
    if req.memory_per_worker_mb:
        return int(req.memory_per_worker_mb * 2**20)
    batch = req.batch_size * s.chunk_samples * 4
    return int(1024 * 2**20 + 8 * batch)  # Ray Data saw 953 MB for a 4 M-param encoder at batch 8 x 16 s


def _tasks(pending, req: PreprocessRequest) -> List[list]:
    """Group files into tasks of about `task_mb` of input, at most `files_per_task` files: a few long
    files or many short ones per task, so that scheduling stays cheap and a failed task costs little."""
    tasks, cur, size = [], [], 0
    for f in pending:
        if cur and (len(cur) >= req.files_per_task or size + f[2] > req.task_mb * 2**20):
            tasks.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += f[2]
    return tasks + ([cur] if cur else [])


def _encode_pending(pending, s: Settings, req: PreprocessRequest, rave: RaveInfo) -> List[Dict]:
    """Encode and commit the pending files; returns the write tasks' records (with `failed`)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    saved = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a task that keeps failing (a worker killed for memory) costs its
    # few files, reported and retried on resume, never the run
    dev = devices.choose(req.gpu, req.cpu, devices.Machine.of_ray(), mps=False)  # encoders share the GPUs
    devices.announce(dev if req.num_workers == 1 else dataclasses.replace(dev, index=None), "preprocess")
    s = dataclasses.replace(s, gpu=dev.gpu)
    num_gpus = 0.0
    if s.gpu:  # msprior.devices' choice (preprocess(): a GPU when the cluster has one)
        num_gpus = min(1.0, ray.cluster_resources().get("GPU", 0) / req.num_workers)  # a GPU fraction per actor
    # never ask for more than the cluster has: an unschedulable actor would wait forever
    memory = min(_encoder_memory(req, s), 0.8 * ray.cluster_resources().get("memory", 1e18) / req.num_workers)
    items = [{"source": [f[0] for f in g], "path": [f[1] for f in g]} for g in _tasks(pending, req)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one row (a few files) per task
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={"rave_ref": [ray.put(rave.data)], "settings": s},
                        compute=ray.data.ActorPoolStrategy(size=req.num_workers), batch_size=1,
                        batch_format="numpy", num_cpus=req.cpus_per_worker, num_gpus=num_gpus,
                        memory=memory, max_restarts=-1, max_task_retries=2)
    sink = _make_sink(s)
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25, "max_retries": 3,
                                                 "memory": 3 * s.target_bytes})
    finally:
        ctx.max_errored_blocks = saved
    return sink.returns


class _Progress(threading.Thread):
    """One live line: files and hours encoded, x realtime, ETA. On a terminal it is rewritten in
    place twice a second; in a log, a new line every ~10 s. The encoders report to a Ray queue."""

    def __init__(self, total_files: int):
        from ray.util.queue import Queue

        super().__init__(daemon=True)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.total, self.files, self.seconds = total_files, 0, 0.0
        self.stop, self.t0 = threading.Event(), time.monotonic()
        self.out = console.out()
        self.tty = getattr(self.out, "isatty", lambda: False)()

    def run(self) -> None:
        while not self.stop.wait(0.5 if self.tty else 10.0):
            self._drain()
            self._print(end="" if self.tty else "\n")

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=2)
        self._drain()
        if self.tty and self.files:
            self._print(end="\n")
        try:
            self.queue.shutdown()
        except Exception:
            pass

    def _drain(self) -> None:
        try:
            for files, seconds in self.queue.get_nowait_batch(self.queue.qsize()):
                self.files, self.seconds = self.files + files, self.seconds + seconds
        except Exception:
            pass

    def _print(self, end: str) -> None:
        el = time.monotonic() - self.t0
        eta = el / self.files * (self.total - self.files) if self.files else float("nan")
        eta_txt = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "--"
        line = (f"preprocess: {self.files}/{self.total} files, {self.seconds / 3600:.2f} h of audio, "
                f"{self.seconds / max(el, 1e-9):.1f}x realtime, ETA {eta_txt}")
        self.out.write(("\r" + line if self.tty else line) + end)
        self.out.flush()


# --- driver: finish from the ledger (nothing re-reads the table) -----------------------------------


def _nothing_encoded(audio: str, out_path: str, skipped: List[dict]) -> PreprocessError:
    reasons: Dict[str, int] = defaultdict(int)
    for s in skipped:
        reasons[s["reason"].split(":")[0]] += 1
    top = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    return PreprocessError(f"nothing could be encoded from {audio}: {len(skipped)} files skipped "
                           f"({top or 'none listed'}); see {storage.join(out_path, tbl.REPORT)}")


def _report(req, intent, corpus, entries, returns, pending) -> Dict:
    """report.json: every listed file not in the table, with its reason."""
    _, files, ignored = corpus
    committed = {src for e in entries for src, _, _ in e.get("sources", [])}
    bad = {src: why for e in entries for src, why in e.get("skipped", [])}
    later = {src: f"{why} (transient: retried on resume)" for r in returns for src, why in r.get("failed", [])}
    for src, *_ in pending:  # a task that failed for good (e.g. its worker killed for memory) loses its files
        if src not in committed and src not in bad and src not in later:
            later[src] = "not encoded: its task failed (worker lost, e.g. killed for memory); retried on resume"
    skipped = ([{"source": s, "reason": "not an audio file extension (ignored)"} for s in ignored]
               + [{"source": s, "reason": r} for s, r in sorted({**bad, **later}.items())])
    written = {src for e in entries if e.get("run_id") == intent.get("this_run") for src, _, _ in e.get("sources", [])}
    counts = {"files_listed": len(files) + len(ignored), "files_ok": len(committed),
              "files_skipped": len(bad) + len(later), "files_ignored": len(ignored),
              "files_retry": len(later), "files_written_this_run": len(written)}
    return {"created": intent["created"], "audio": req.audio, "skipped": skipped, "counts": counts}


def _tuple(v) -> Optional[Tuple[float, ...]]:
    return tuple(float(x) for x in v) if v is not None else None


def _manifest(intent: Dict, entries: List[Dict], report: Dict) -> Dict:
    frames = sum(f for e in entries for _, _, f in e.get("sources", []))
    chunks = sum(c for e in entries for _, c, _ in e.get("sources", []))
    rave = intent["rave"]
    counts = {"files_ok": report["counts"]["files_ok"], "files_skipped": report["counts"]["files_skipped"],
              "files_ignored": report["counts"]["files_ignored"], "chunks": chunks, "frames": frames,
              "seconds": frames * rave["ratio"] / rave["sr"]}
    for e in entries:  # per-task counters (e.g. latents outside the quantiser's range) sum up here
        for k, v in (e.get("counters") or {}).items():
            counts[k] = counts.get(k, 0) + v
    if rave.get("continuous"):  # latents clamped into an edge bin, over every run of the table
        n = counts.setdefault("latents_out_of_range", 0)
        counts["latents_out_of_range_fraction"] = n / max(1, frames * rave["latent_size"])
    cond = None
    if intent.get("conditioning"):
        mean, std = tbl.mean_std(tbl.merge_moments([e.get("features") for e in entries]))
        c = intent["conditioning"]
        cond = {"ratio": c["ratio"], "features": {**c["features"], "mean": mean, "std": [v + 1e-6 for v in std]},
                "tokens": {k: v for k, v in c["tokens"].items() if k != "sha256"}}
    return {"format_version": tbl.FORMAT_VERSION, "msprior_version": __version__, "created": intent["created"],
            "audio": intent["audio"], "rave": rave, "chunk": intent["chunk"], "conditioning": cond,
            "counts": counts, "content_sha256": tbl.index_digest(tbl.index_from_ledger(entries))}


def _finish(req, intent, corpus, entries, returns, pending, s3) -> Tuple[Dict, Dict]:
    """index.parquet, report.json, then manifest.json (last: its presence means the table is done)."""
    out = req.out_path
    tbl.write_index(out, tbl.index_from_ledger(entries), s3)
    faults.point("finish.after_index")
    report = _report(req, intent, corpus, entries, returns, pending)
    storage.write_bytes(storage.join(out, tbl.REPORT), json.dumps(report, indent=1).encode(), s3)
    faults.point("finish.after_report")
    _stop_if_storage_full(report, out)
    if not report["counts"]["files_ok"]:
        raise _nothing_encoded(req.audio, out, report["skipped"])
    manifest = _manifest(intent, entries, report)
    storage.write_bytes(storage.join(out, tbl.MANIFEST), json.dumps(manifest, indent=1).encode(), s3)
    return report, manifest


def preprocess(req: PreprocessRequest, echo=print) -> Dict:
    """Encode the audio under `req.audio` into the latent table `req.out_path`; return a summary.

    Uses the running Ray runtime (or starts a local one). Raises PreprocessError (one line) for bad
    arguments, a table made with other settings, a table another live run holds, and when the table
    ends up empty (report.json is written first).
    """
    t0 = time.monotonic()
    req.audio, req.out_path = storage.absolute(req.audio), storage.absolute(req.out_path)
    s3 = storage.S3Options.from_env()
    _validate(req)
    devices.pin_local_gpu(req.gpu, req.num_workers)  # --gpu N: the only card a local Ray sees
    intent_path = storage.join(req.out_path, tbl.INTENT)
    old_intent = json.loads(storage.read_bytes(intent_path, s3)) if storage.exists(intent_path, s3) else None
    ray_up = _RayUp()
    rave = _load_rave(req, s3, old_intent, ray_up)
    _note_original(req, rave, echo)
    corpus = _list_corpus(req.audio, s3)
    run_id = uuid.uuid4().hex[:12]
    with Lease.acquire(req.out_path, s3, req.lease_ttl_s, run_id) as lease:
        intent = _intent(req, rave, corpus, s3, run_id, ray_up)
        intent["this_run"] = run_id
        centroids, scale = _conditioning_arrays(intent, req.out_path, s3)
        entries = commit_mod.seal(req.out_path, s3, lease.epoch)  # a fenced-out writer's later records never count
        commit_mod.sweep(req.out_path, s3)
        pending, already = _pending(corpus[1], entries)
        s = Settings(audio_root=corpus[0], out_path=req.out_path, run_id=run_id, sr=intent["rave"]["sr"],
                     ratio=intent["rave"]["ratio"], chunk_samples=intent["chunk"]["frames"] * intent["rave"]["ratio"],
                     min_frames=req.min_frames, resolution=req.resolution, batch_size=req.batch_size,
                     condition_ratio=req.condition_ratio, centroids=centroids, scale=scale, s3=s3,
                     threads=req.threads_per_worker or max(1, (os.cpu_count() or 1) // req.num_workers),
                     normalize=req.normalize, silence_db=req.silence_threshold, pad_short=req.short == "pad",
                     target_bytes=int(req.target_file_mb * 2**20),
                     decode_threads=req.decode_threads, latent_loc=_tuple(intent["rave"].get("latent_loc")),
                     latent_scale=_tuple(intent["rave"].get("latent_scale")), epoch=lease.epoch,
                     faults=faults.spec() or None)
        returns = []
        if pending:
            ray_up()
            progress = _Progress(len(pending)) if req.progress else None
            if progress:
                s = dataclasses.replace(s, progress=progress.queue)
                progress.start()
            try:
                returns = _encode_pending(pending, s, req, rave)
            finally:
                if progress:
                    progress.close()
        lease.check()
        entries = commit_mod.drop_duplicates(tbl.read_ledger(req.out_path, s3), s)
        lease.check()
        report, manifest = _finish(req, intent, corpus, entries, returns, pending, s3)
    return _summary(req, t0, ray_up.init_s, run_id, entries, report, manifest, already, echo)


def _stop_if_storage_full(report: Dict, out_path: str) -> None:
    """A full disk is a storage error that stops the run (one line), never a bad audio file."""
    full = [s for s in report["skipped"] if storage.STORAGE_FULL in s["reason"]]
    if full:
        raise PreprocessError(f"{len(full)} file(s) not encoded: {full[0]['reason'].splitlines()[0][:200]}; free "
                              f"space (the temp folder or {out_path}) and run the same command again to resume them")


def _summary(req, t0, ray_init_s, run_id, entries, report, manifest, already, echo) -> Dict:
    mine = [e for e in entries if e.get("run_id") == run_id]
    frames = sum(f for e in mine for _, _, f in e.get("sources", []))
    rave = manifest["rave"]
    seconds = frames * rave["ratio"] / rave["sr"]
    wall = time.monotonic() - t0 - ray_init_s
    c = report["counts"]
    summary = {"out_path": req.out_path, "files_encoded": c["files_written_this_run"],
               "files_skipped": c["files_skipped"] - c["files_retry"], "files_retry": c["files_retry"],
               "files_ignored": c["files_ignored"], "files_already_done": already,
               "data_files_written": sum(1 for e in mine if e.get("file")),
               "hours": seconds / 3600.0, "frames": frames, "seconds_audio": seconds, "wall_s": wall,
               "ray_init_s": ray_init_s, "realtime": seconds / wall if wall > 0 else 0.0,
               "table_chunks": manifest["counts"]["chunks"], "table_frames": manifest["counts"]["frames"]}
    echo(f"preprocess: encoded {summary['files_encoded']} files into {summary['data_files_written']} data files, "
         f"skipped {summary['files_skipped']}"
         + (f", {c['files_retry']} to retry" if c["files_retry"] else "")
         + (f" (see {storage.join(req.out_path, tbl.REPORT)})" if c["files_skipped"] else "")
         + (f", {already} already in the table" if already else "")
         + (f", {padded} short files padded to one window" if (padded := manifest["counts"].get("files_padded")) else "")
         + f", {summary['hours']:.3f} h of audio, {frames:,} frames in {wall:.1f} s"
         + f" ({summary['realtime']:.1f}x realtime) -> {req.out_path}")
    return summary
