"""Audio corpus (dir or s3://) -> latent table (dir or s3://), with Ray Data.

    list files (driver) -> decode + mono + resample + chunk + features   [Ray Data read tasks]
                        -> RAVE encode -> tokens                          [actor pool, model loaded once]
                        -> one Parquet shard per source, atomic           [driver: tokens are small]
                        -> manifest.json, report.json, rave.ts, centroids.npy

Resume: a source whose shard exists is not read again; shards appear only whole (temp + rename,
or a single S3 PUT), so an interrupted run leaves no partial shard. Bad files never stop the run:
each lands in report.json with its reason.
"""

from __future__ import annotations

from msprior.errors import UserError
import datetime as _dt
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from msprior import __version__, storage
from msprior.data import audio as audio_mod
from msprior.data import features as feat
from msprior.data import table as tbl
from msprior.runtime import ensure_ray

class PreprocessError(UserError):
    """A preprocessing problem the user can fix; one line."""


@dataclass(frozen=True)
class Settings:
    """What a decode task needs: plain values, cheap to ship to Ray workers."""

    audio_root: str
    sr: int
    ratio: int
    chunk_samples: int
    min_frames: int
    condition_ratio: int  # 0: no conditioning
    centroids: Optional[np.ndarray]
    scale: Optional[np.ndarray]
    s3: storage.S3Options


# --- Ray stages ----------------------------------------------------------------------------------


def _error_row(source: str, reason: str) -> dict:
    return {"source": source, "chunk": -1, "n_chunks": 0, "start_s": 0.0, "error": reason,
            "audio": np.zeros(0, np.float32), "features": np.zeros(0, np.float32),
            "tokens": np.zeros(0, np.int16)}


def decode_rows(item: dict, s: Settings) -> List[dict]:
    """One listed file -> its chunk rows (audio + conditioning), or one error row."""
    source = item["source"]
    try:
        fs, _ = storage.filesystem(s.audio_root, s.s3)
        with fs.open(item["path"], "rb") as f:
            data = f.read()
        x, _, _ = audio_mod.decode(data, s.sr)
        bounds = audio_mod.chunk_bounds(len(x), s.chunk_samples, s.ratio, s.min_frames)
        if not bounds:
            raise audio_mod.SkipFile(
                f"too short: {len(x) / s.sr:.2f} s is under one training window "
                f"({s.min_frames} frames = {s.min_frames * s.ratio / s.sr:.2f} s)")
    except audio_mod.SkipFile as e:
        return [_error_row(source, str(e))]
    except Exception as e:  # an unexpected failure on one file must not stop the corpus
        return [_error_row(source, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
    rows = []
    for i, (a, b) in enumerate(bounds):
        chunk = x[a:b]
        frames = math.ceil(len(chunk) / s.ratio)
        f = t = np.zeros(0, np.float32)
        if s.condition_ratio:
            n = feat.cond_frames(frames, s.condition_ratio)
            f = feat.compute(chunk, s.sr, s.condition_ratio * s.ratio, n)
            t = feat.assign(f, s.centroids, s.scale)
            f = f.ravel()
        rows.append({"source": source, "chunk": i, "n_chunks": len(bounds), "start_s": a / s.sr,
                     "error": "", "audio": chunk, "features": f.astype(np.float32),
                     "tokens": np.asarray(t, np.int16)})
    return rows


class Encoder:
    """Ray Data actor: loads the RAVE export once, turns audio chunks into int16 token rows."""

    def __init__(self, rave_ref: list, resolution: int, threads: int, gpu: bool,
                 latent_bins: Optional[Tuple[list, list]] = None):
        import ray
        import torch

        from msprior.rave import Rave, load_rave

        # the model's bytes come through the object store (a ref inside a list is not resolved by
        # Ray, so the actor's constructor arguments stay small)
        rave_bytes = ray.get(rave_ref[0])
        torch.set_num_threads(max(1, threads))
        with tempfile.NamedTemporaryFile(suffix=".ts") as f:
            f.write(rave_bytes)
            f.flush()
            self.rave: Rave = load_rave(f.name)
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.rave.to(self.device)
        self.resolution = resolution
        self.loc, self.scale = latent_bins or (None, None)  # continuous: the fitted affine

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        n = len(batch["source"])
        audio = list(batch["audio"])
        errors = [str(e) for e in batch["error"]]
        rave: List[np.ndarray] = [np.zeros(0, np.int16)] * n
        frames = np.zeros(n, np.int32)
        outside = np.zeros(n, np.int64)  # latents outside the fitted range (continuous)
        by_len: Dict[int, List[int]] = defaultdict(list)
        for i in range(n):
            if not errors[i]:
                by_len[len(audio[i])].append(i)
        for length, idx in by_len.items():  # equal lengths stack into one encode call
            try:
                x = torch.from_numpy(np.stack([np.asarray(audio[i], np.float32) for i in idx]))
                tok, out = self.rave.encode_tokens(x, self.resolution, self.loc, self.scale)  # [B, Q, T], [B]
                tok = tok.transpose(1, 2).to(torch.int16).numpy()  # frame-major [B, T, Q]
                for j, i in enumerate(idx):
                    rave[i] = tok[j].ravel()
                    frames[i] = tok.shape[1]
                    outside[i] = int(out[j])
            except Exception as e:
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                for i in idx:
                    errors[i] = f"RAVE encode failed: {msg[:200]}"
        seconds = np.array([len(a) for a in audio], np.float64) / self.rave.sr
        out = {k: batch[k] for k in ("source", "chunk", "n_chunks", "start_s", "tokens", "features")}
        out.update(error=np.array(errors, dtype=object), frames=frames, seconds=seconds, out_of_range=outside,
                   rave=_object_array(rave))
        return out


def _object_array(items: List[np.ndarray]) -> np.ndarray:
    a = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        a[i] = x
    return a


# --- driver --------------------------------------------------------------------------------------


class Progress:
    """Seconds of audio encoded, on one refreshed line (a TTY) or a line every ~10 s (a log)."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.start = time.monotonic()
        self.last = 0.0
        self.seconds = 0.0
        self.files = 0

    def update(self, seconds: float, files: int) -> None:
        self.seconds += seconds
        self.files += files
        now = time.monotonic()
        if not self.enabled or (now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        el = max(now - self.start, 1e-9)
        line = (f"preprocess: {self.seconds:,.0f} s of audio ({self.seconds / 3600:.2f} h), "
                f"{self.files} files written, {self.seconds / el:,.1f}x realtime")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.last:
            self.stream.write("\n")


def _rave_local(rave: str, s3: storage.S3Options) -> Tuple[str, bytes]:
    """(local path, bytes) of the RAVE export, downloading it first when it is on S3."""
    if storage.is_s3(rave):
        if not storage.exists(rave, s3):
            raise PreprocessError(f"{rave}: no such object; expected a RAVE model exported as TorchScript")
        data = storage.read_bytes(rave, s3)
        fd, path = tempfile.mkstemp(suffix=".ts")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path, data
    if not os.path.exists(rave):
        raise PreprocessError(f"--rave {rave}: no such file; expected a RAVE model exported as TorchScript (.ts)")
    with open(rave, "rb") as f:
        return rave, f.read()


def _list_corpus(audio: str, s3: storage.S3Options):
    """(corpus root, [(source, size)] audio files, [ignored non-audio sources])."""
    fs, root = storage.filesystem(audio, s3)
    if not fs.exists(root):
        raise PreprocessError(f"--audio {audio}: no such directory or s3:// prefix")
    if fs.isfile(root):  # a single file is a corpus of one, rooted at its folder
        parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
        audio_root = ("s3://" + parent) if storage.is_s3(audio) else parent
        files = [(name, int(fs.info(root).get("size") or 0))]
    else:
        audio_root, files = audio, storage.list_files(audio, s3)
    good = [(rel, size) for rel, size in files if audio_mod.is_audio_name(rel)]
    ignored = [rel for rel, _ in files if not audio_mod.is_audio_name(rel)]
    return audio_root, good, ignored


def _check_compatible(old: dict, new: dict, out_path: str) -> None:
    """A resumed table must have been made with the same RAVE and settings."""
    checks = [("rave.sha256", old["rave"].get("sha256"), new["rave"]["sha256"]),
              ("rave.resolution", old["rave"].get("resolution"), new["rave"]["resolution"]),
              ("chunk.num_secs", old["chunk"].get("num_secs"), new["chunk"]["num_secs"]),
              ("chunk.min_frames", old["chunk"].get("min_frames"), new["chunk"]["min_frames"]),
              ("conditioning.ratio", (old.get("conditioning") or {}).get("ratio"),
               (new.get("conditioning") or {}).get("ratio"))]
    for name, a, b in checks:
        if a != b:
            raise PreprocessError(f"--out_path {out_path} holds a table made with {name}={a}, this run has "
                                  f"{b}; use a new --out_path (or the same settings to resume)")


def _fit_conditioning(pending, root_audio, sr, ratio, cond_ratio, k, s3, max_files=16):
    """Features of a few evenly spaced files (driver side) -> (centroids, scale)."""
    if not pending:
        return None, None
    step = max(1, len(pending) // max_files)
    fs, _ = storage.filesystem(root_audio, s3)
    hop = cond_ratio * ratio
    sample = []
    for source, path, _ in pending[::step][: max_files * 2]:
        try:
            with fs.open(path, "rb") as f:  # the first 30 s of a file are a fair sample of it
                x, _, _ = audio_mod.decode(f.read(), sr, max_seconds=30.0)
        except Exception:
            continue
        sample.append(feat.compute(x, sr, hop, max(1, math.ceil(len(x) / hop))))
        if len(sample) >= max_files:
            break
    if not sample:
        return None, None
    return feat.fit_tokens(np.concatenate(sample), k)


def _conditioning_tokens(out_path, old, pending, audio_root, sr, ratio, condition_ratio, k, s3):
    """(centroids, scale): fitted once on a sample and saved; a resumed table keeps its own."""
    cpath = storage.join(out_path, tbl.CENTROIDS)
    if old is not None and storage.exists(cpath, s3) and (old.get("conditioning") or {}).get("tokens"):
        return tbl.load_centroids(out_path, s3), np.asarray(old["conditioning"]["tokens"]["scale"], np.float32)
    centroids, scale = _fit_conditioning(pending, audio_root, sr, ratio, condition_ratio, k, s3)
    if centroids is None:  # nothing decodable in the sample: the run will report why
        n = len(feat.feature_names())
        return np.zeros((1, n), np.float32), np.ones(n, np.float32)
    buf = io.BytesIO()
    np.save(buf, centroids)
    storage.write_bytes(cpath, buf.getvalue(), s3)
    return centroids, scale


def _encode_pending(pending, settings: Settings, out_path: str, rave_bytes: bytes, resolution: int,
                    batch_size: int, num_workers: int, gpu: bool, threads: int, cpus_per_worker: float,
                    cpus_per_read: float, progress: bool, latent_bins=None):
    """Run the Ray Data pipeline over the pending files, writing one shard per complete file.

    Returns (files written, seconds of audio, frames, {source: reason} of failed files, latents
    outside the fitted range in the written files).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line counts seconds of audio
    ctx.print_on_execution_start = False
    num_gpus = 0.0
    if gpu:
        total = ray.cluster_resources().get("GPU", 0)
        if total <= 0:
            raise PreprocessError("--gpu was given but the Ray cluster has no GPU")
        num_gpus = min(1.0, total / num_workers)  # a GPU fraction per actor
    items = [{"source": src, "path": path} for src, path, _ in pending]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
    ds = ds.flat_map(decode_rows, fn_kwargs={"s": settings}, num_cpus=cpus_per_read)
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={
        "rave_ref": [ray.put(rave_bytes)], "resolution": resolution, "threads": threads, "gpu": gpu,
        "latent_bins": latent_bins},
        compute=ray.data.ActorPoolStrategy(size=num_workers), batch_size=batch_size,
        batch_format="numpy", num_cpus=cpus_per_worker, num_gpus=num_gpus)
    conditioning = bool(settings.condition_ratio)
    bar = Progress(progress)
    rows: Dict[str, List[dict]] = defaultdict(list)
    bad: Dict[str, str] = {}
    written, seconds, frames = 0, 0.0, 0
    outside: Dict[str, int] = defaultdict(int)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        files, secs = 0, 0.0
        for i in range(len(batch["source"])):
            src, err = str(batch["source"][i]), str(batch["error"][i])
            if err:  # the file is skipped whole: drop any chunks already here
                bad.setdefault(src, err)
                rows.pop(src, None)
                outside.pop(src, None)
                continue
            if src in bad:
                continue
            rows[src].append({k: batch[k][i] for k in
                              ("source", "chunk", "start_s", "frames", "rave", "tokens", "features")})
            outside[src] += int(batch["out_of_range"][i])
            secs += float(batch["seconds"][i])
            frames += int(batch["frames"][i])
            if len(rows[src]) == int(batch["n_chunks"][i]):  # the whole file is here: write its shard
                data = tbl.shard_bytes(rows.pop(src), conditioning=conditioning)
                storage.write_bytes(storage.join(out_path, tbl.LATENTS, tbl.shard_name(src)), data, settings.s3)
                written += 1
                files += 1
        seconds += secs
        bar.update(secs, files)
    bar.close()
    return written, seconds, frames, bad, sum(outside.values())


def _fit_latent_bins(model, pending, audio_root: str, s3, max_files: int = 8) -> Tuple[list, list]:
    """Per-dimension (loc, scale) of a continuous RAVE's latents on the first 30 s of a few files."""
    import torch

    fs, _ = storage.filesystem(audio_root, s3)
    step = max(1, len(pending) // max_files)
    clips = []
    for _, path, _ in pending[::step]:
        try:
            with fs.open(path, "rb") as f:
                x, _, _ = audio_mod.decode(f.read(), model.sr, max_seconds=30.0)
        except Exception:  # the file is reported by the encode stage
            continue
        if len(x) >= model.ratio:
            clips.append(torch.from_numpy(x))
        if len(clips) >= max_files:
            break
    if not clips:  # nothing decodable: the run will report why; latents taken as standard
        return [0.0] * model.latent_size, [1.0] * model.latent_size
    return model.fit_bins(clips)


def _nothing_encoded(audio: str, out_path: str, skipped: List[dict]) -> PreprocessError:
    reasons: Dict[str, int] = defaultdict(int)
    for s in skipped:
        reasons[s["reason"].split(":")[0]] += 1
    top = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    return PreprocessError(f"nothing could be encoded from {audio}: {len(skipped)} files skipped "
                           f"({top or 'none listed'}); see {storage.join(out_path, tbl.REPORT)}")


def preprocess(audio: str, out_path: str, rave: str, num_secs: float = 16.0, resolution: int = 64,
               batch_size: int = 64, num_workers: int = 1, gpu: bool = False, condition_ratio: int = 4,
               condition_tokens: int = 64, min_frames: int = 257, threads_per_worker: Optional[int] = None,
               cpus_per_worker: float = 0.5, cpus_per_read: float = 1.0, progress: bool = True,
               echo=print) -> Dict:
    """Encode the audio under `audio` into the latent table `out_path`; return a summary dict.

    `min_frames`: files with fewer RAVE frames are skipped (one training window: seq_len + 1 of the
    default configs). `condition_ratio` 0 turns conditioning off. Uses the running Ray runtime (or
    starts a local one). Raises PreprocessError (one line) for bad arguments, and when the table
    ends up empty (report.json is written first).
    """
    import ray

    from msprior.rave import RaveError, load_rave, sha256_file

    t0 = time.monotonic()
    s3 = storage.S3Options.from_env()
    if num_secs <= 0:
        raise PreprocessError(f"--num_secs must be > 0 (got {num_secs})")
    if resolution < 2 or resolution > 32767:
        raise PreprocessError(f"--resolution must be in [2, 32767] (got {resolution})")
    if condition_ratio < 0:
        raise PreprocessError(f"--condition_ratio must be >= 0 (got {condition_ratio}; 0 turns conditioning off)")
    if num_workers < 1 or batch_size < 1:
        raise PreprocessError("--num_workers and --batch_size must be >= 1")

    rave_path, rave_bytes = _rave_local(rave, s3)
    try:
        model = load_rave(rave_path)
        rave_sha = sha256_file(rave_path)
    except RaveError as e:
        raise PreprocessError(f"--rave {e}") from None
    finally:
        if storage.is_s3(rave):  # our temporary download
            os.unlink(rave_path)
    if model.discrete and model.codebook_size > 32767:
        raise PreprocessError(f"--rave {rave}: codebook size {model.codebook_size} does not fit int16 tokens")
    sr, ratio = model.sr, model.ratio
    chunk_frames = max(1, round(num_secs * sr / ratio))
    manifest = {
        "format_version": tbl.FORMAT_VERSION,
        "msprior_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "audio": audio,
        "rave": {"file": tbl.RAVE_FILE, "original_name": os.path.basename(rave),
                 "sha256": rave_sha, "sr": sr, "ratio": ratio,
                 "latent_size": model.latent_size, "num_quantizers": model.num_quantizers,
                 "vocab_size": model.vocab_size(resolution), "continuous": not model.discrete,
                 "resolution": None if model.discrete else resolution,
                 "latent_loc": None, "latent_scale": None},
        "chunk": {"num_secs": float(num_secs), "frames": chunk_frames, "min_frames": int(min_frames)},
        "conditioning": {"ratio": int(condition_ratio)} if condition_ratio else None,
        "counts": {},
    }
    old = None
    if storage.exists(storage.join(out_path, tbl.MANIFEST), s3):
        old = tbl.load_manifest(out_path, s3)
        _check_compatible(old, manifest, out_path)
        manifest["created"] = old.get("created", manifest["created"])

    audio_root, files, ignored = _list_corpus(audio, s3)
    if not files:
        raise PreprocessError(f"--audio {audio}: no audio files found (looked for "
                              f".wav/.flac/.ogg/.opus/.mp3/.aiff... recursively)")
    done = {os.path.basename(p) for p in tbl.list_shards(out_path, s3)}
    _, root = storage.filesystem(audio_root, s3)
    pending = [(rel, f"{root}/{rel}", size) for rel, size in files if tbl.shard_name(rel) not in done]

    if not model.discrete:  # the latent bins' affine: fitted once, kept by a resumed table
        old_rave = (old or {}).get("rave") or {}
        if old_rave.get("latent_loc") is not None:
            bins = old_rave["latent_loc"], old_rave["latent_scale"]
        elif old is not None:  # binned without a fitted affine: new tokens would not match its own
            raise PreprocessError(f"--out_path {out_path} holds a table binned without rave.latent_loc "
                                  "(an older msprior); use a new --out_path")
        else:
            bins = _fit_latent_bins(model, pending, audio_root, s3)
        manifest["rave"]["latent_loc"], manifest["rave"]["latent_scale"] = bins
    centroids = scale = None
    if condition_ratio:
        centroids, scale = _conditioning_tokens(out_path, old, pending, audio_root, sr, ratio,
                                                condition_ratio, condition_tokens, s3)
    settings = Settings(audio_root=audio_root, sr=sr, ratio=ratio, chunk_samples=chunk_frames * ratio,
                        min_frames=min_frames, condition_ratio=condition_ratio, centroids=centroids,
                        scale=scale, s3=s3)
    written, seconds, frames, bad, ray_init_s, outside = 0, 0.0, 0, {}, 0.0, 0
    if pending:
        t = time.monotonic()  # timed apart: start-up is not throughput
        if ensure_ray():
            ray_init_s = time.monotonic() - t
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // num_workers)
        bins = None if model.discrete else (manifest["rave"]["latent_loc"], manifest["rave"]["latent_scale"])
        written, seconds, frames, bad, outside = _encode_pending(
            pending, settings, out_path, rave_bytes, resolution, batch_size, num_workers, gpu, threads,
            cpus_per_worker, cpus_per_read, progress, latent_bins=bins)
    skipped = ([{"source": s, "reason": "not an audio file extension (ignored)"} for s in ignored]
               + [{"source": s, "reason": r} for s, r in sorted(bad.items())])

    # report and manifest describe every shard of the table, not only this run's
    table = tbl.read_table(out_path, columns=["source", "frames"] + (["features"] if condition_ratio else []),
                           s3=s3)
    counts = {"files_listed": len(files) + len(ignored), "files_ok": len(set(table["source"].to_pylist())),
              "files_skipped": len(bad), "files_ignored": len(ignored), "files_written_this_run": written}
    report = {"created": manifest["created"], "audio": audio, "skipped": skipped, "counts": counts}
    storage.write_bytes(storage.join(out_path, tbl.REPORT), json.dumps(report, indent=1).encode(), s3)
    if len(table) == 0:
        raise _nothing_encoded(audio, out_path, skipped)
    frames_total = int(pc_sum(table["frames"]))
    manifest["counts"] = {"files_ok": counts["files_ok"], "files_skipped": len(bad), "files_ignored": len(ignored),
                          "chunks": len(table), "frames": frames_total, "seconds": frames_total * ratio / sr}
    if not model.discrete:  # latents clamped into an edge bin: counted over every run of the table
        n_out = int(((old or {}).get("counts") or {}).get("latents_out_of_range", 0)) + outside
        manifest["counts"]["latents_out_of_range"] = n_out
        manifest["counts"]["latents_out_of_range_fraction"] = n_out / max(1, frames_total * model.latent_size)
    if condition_ratio:
        names = feat.feature_names()
        f = np.concatenate([np.asarray(x, np.float32) for x in table["features"].to_numpy(zero_copy_only=False)])
        f = f.reshape(-1, len(names))
        manifest["conditioning"] = {
            "ratio": int(condition_ratio),
            "features": {"names": names, "size": len(names), "mean": f.mean(0).tolist(),
                         "std": (f.std(0) + 1e-6).tolist()},
            "tokens": {"vocab_size": int(len(centroids)), "centroids": tbl.CENTROIDS,
                       "scale": [float(v) for v in scale]},
        }
    rave_copy = storage.join(out_path, tbl.RAVE_FILE)
    if not storage.exists(rave_copy, s3):
        storage.write_bytes(rave_copy, rave_bytes, s3)
    storage.write_bytes(storage.join(out_path, tbl.MANIFEST), json.dumps(manifest, indent=1).encode(), s3)

    wall = time.monotonic() - t0 - ray_init_s
    summary = {"out_path": out_path, "files_encoded": written, "files_skipped": len(bad),
               "files_ignored": len(ignored), "files_already_done": len(files) - len(pending),
               "hours": seconds / 3600.0, "frames": frames, "seconds_audio": seconds,
               "wall_s": wall, "ray_init_s": ray_init_s, "realtime": seconds / wall if wall > 0 else 0.0,
               "table_chunks": len(table), "table_frames": frames_total, "latents_out_of_range": outside,
               "latents_out_of_range_fraction": outside / max(1, frames * model.latent_size)}
    echo(f"preprocess: encoded {written} files, skipped {len(bad)}"
         + (f" (see {storage.join(out_path, tbl.REPORT)})" if bad else "")
         + (f", {summary['files_already_done']} already in the table" if summary["files_already_done"] else "")
         + f", {summary['hours']:.3f} h of audio, {frames:,} frames in {wall:.1f} s"
         + f" ({summary['realtime']:.1f}x realtime) -> {out_path}")
    return summary


def pc_sum(col) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(col).as_py() or 0)
