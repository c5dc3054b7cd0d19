"""Intent and resume: the RAVE export's facts, the settings a table is made with, fitted once.

Part of the table contract: `intent.json` (docs/ARCHITECTURE.md "Latent table") is written
create-only, under the lease, after `centroids.npy` and `rave.ts` and before any encoding; a run on
a table whose recorded `request` differs refuses in one line naming the field, and a resume reuses
the recorded centroids (checked against their sha256), latent bins and `shuffle_seed`: nothing is
fitted twice. The driver never loads torch: the RAVE export is inspected, and the conditioning and
latent bins fitted, in Ray tasks.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import tempfile
import time
from typing import Dict, Optional, Tuple

import numpy as np

from msprior import __version__, storage
from msprior.conditioning import NONE, TABLE, ConditioningSpec
from msprior.data import audio as audio_mod
from msprior.data import decode
from msprior.data import features as feat
from msprior.data import plan
from msprior.data import table as tbl
from msprior.data.request import PreprocessError, PreprocessRequest, RaveInfo, Settings
from msprior.runtime import ensure_ray


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def shuffle_seed(intent: Dict, req: PreprocessRequest) -> int:
    """The seed tasks are planned with: the table's (recorded by its first run), else this request's."""
    seed = intent.get("shuffle_seed")
    return int(req.shuffle_seed if seed is None else seed)


def audio_options(req: PreprocessRequest) -> Dict:
    """The decode options a resume must repeat (only those set: older tables resume as before)."""
    opts = {"audio.normalize": True if req.normalize else None, "audio.silence_threshold": req.silence_threshold,
            "audio.short": "skip" if req.short == "skip" else None}
    return {k: v for k, v in opts.items() if v is not None}


def read_rave(req: PreprocessRequest) -> bytes:
    where = storage.Location.of(req.rave)
    if not where.exists():
        raise PreprocessError(f"--rave {req.rave}: no such file; expected a RAVE model exported as TorchScript (.ts)")
    return where.read_bytes()


def inspect_rave(data: bytes, name: str, resolution: int) -> Dict:
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


def remote(fn, *args, num_cpus: float = 0.5):
    """Run `fn(*args)` as a Ray task and return its result (keeps model loading off the driver)."""
    import ray

    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=2)(fn).remote(*args))


class RayUp:
    """Start or join Ray on first need; the start-up time is kept apart (it is not throughput)."""

    def __init__(self):
        self.init_s = 0.0

    def __call__(self) -> None:
        t = time.monotonic()
        if ensure_ray():
            self.init_s += time.monotonic() - t


def rave_info(req: PreprocessRequest, old_intent: Optional[Dict], ray_up) -> RaveInfo:
    """The RAVE export's bytes, sha256 and facts; the facts come from the table's intent when it
    was made with the same file, else from loading it (in a Ray task)."""
    data = read_rave(req)
    sha = hashlib.sha256(data).hexdigest()
    head = {"file": tbl.RAVE_FILE, "original_name": os.path.basename(req.rave), "sha256": sha}
    if old_intent and old_intent["rave"]["sha256"] == sha:
        facts = {**old_intent["rave"], **head}
        if facts["continuous"]:  # what this request asks; the intent check compares it
            facts.update(resolution=req.resolution, vocab_size=req.resolution)
        return RaveInfo(data=data, sha256=sha, facts=facts)
    ray_up()
    facts = remote(inspect_rave, data, req.rave, req.resolution)
    if "error" in facts:
        raise PreprocessError(facts["error"])
    return RaveInfo(data=data, sha256=sha, facts={**head, **facts})


def request_fields(req: PreprocessRequest, rave: RaveInfo, corpus) -> Dict:
    """The request a resume must repeat: the same corpus (root and listing) and the same settings."""
    return {"audio.root": req.audio, "audio.listing_sha256": plan.listing_digest(corpus),
            "rave.sha256": rave.sha256, "rave.resolution": rave.facts["resolution"],
            "chunk.num_secs": float(req.num_secs), "chunk.min_frames": int(req.min_frames),
            "conditioning.ratio": int(req.condition_ratio),
            "conditioning.tokens": int(req.condition_tokens) if req.condition_ratio else None,
            **audio_options(req)}


def fit_conditioning(files, audio_root, sr, ratio, cond_ratio, k, max_files=16):
    """Features of the first 30 s of a few of `files` -> (centroids, scale)."""
    step = 1
    s = Settings(audio_root=audio_root, out_path="", run_id="", sr=sr, ratio=ratio, chunk_samples=1,
                 min_frames=1, resolution=2, batch_size=1, condition_ratio=cond_ratio, centroids=None,
                 scale=None)
    hop, sample = cond_ratio * ratio, []
    for _, path, _ in files[::step][: max_files * 2]:
        try:
            with decode.local_file(path, s) as local:
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


def fit_latent_bins(rave_bytes: bytes, files, audio_root: storage.Location, sr: int, max_files: int = 8):
    """(in a Ray task) per-dimension (loc, scale) of a continuous RAVE's latents over the first 30 s
    of a few files; (None, None) when none of them decodes (the run reports why)."""
    import torch

    from msprior.rave import load_rave

    with tempfile.NamedTemporaryFile(suffix=".ts") as f:
        f.write(rave_bytes)
        f.flush()
        model = load_rave(f.name)
    s = Settings(audio_root=audio_root, out_path="", run_id="", sr=sr, ratio=model.ratio, chunk_samples=1,
                 min_frames=1, resolution=2, batch_size=1, condition_ratio=0, centroids=None, scale=None)
    clips = []
    for _, path, _ in files:
        try:
            with decode.local_file(path, s) as local:
                x = np.concatenate(list(decode.first_seconds(audio_mod.stream(local, sr), 30 * sr)))
        except Exception:
            continue
        if len(x) >= model.ratio:
            clips.append(torch.from_numpy(x))
        if len(clips) >= max_files:
            break
    return model.fit_bins(clips) if clips else (None, None)


def latent_bins(req: PreprocessRequest, rave: RaveInfo, corpus) -> Dict:
    """The manifest's `rave.latent_loc/latent_scale`: fitted on a sample, or standard latents."""
    audio_root, files, _ = corpus
    sample = files[:: max(1, len(files) // 8)][:16]
    loc, scale = remote(fit_latent_bins, rave.data, sample, audio_root, rave.facts["sr"], num_cpus=1.0)
    q = rave.facts["latent_size"]
    return {"latent_loc": loc or [0.0] * q, "latent_scale": scale or [1.0] * q}


def save_npy(path: storage.Location, a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def check_or_write(req: PreprocessRequest, rave: RaveInfo, corpus, run_id: str, ray_up) -> Dict:
    """Check the table's intent record against this request, or write it (before any encoding):
    settings, RAVE facts and the conditioning centroids, fitted once and never again."""
    out = storage.Location.of(req.out_path)
    path = out.join(tbl.INTENT)
    want = request_fields(req, rave, corpus)
    if path.exists():
        intent = json.loads(path.read_bytes())
        was = {"audio.root": intent.get("audio"), **intent["request"]}  # older intents: no listing digest
        for name, value in want.items():
            if name in was and was.get(name) != value:
                raise PreprocessError(f"--out_path {out} holds a table made with {name}={was.get(name)}, "
                                      f"this run has {value}; use a new --out_path (or the same settings to resume)")
        return intent
    if out.join(tbl.MANIFEST).exists():
        raise PreprocessError(f"--out_path {out} holds a table written by an older msprior (no {tbl.INTENT}); "
                              "it stays readable, but resume it into a new --out_path")
    sr, ratio = rave.facts["sr"], rave.facts["ratio"]
    cond = None
    if req.condition_ratio:
        audio_root, files, _ = corpus
        sample = files[:: max(1, len(files) // 16)][:32]  # evenly spaced files, fitted in a Ray task
        ray_up()
        centroids, scale = remote(fit_conditioning, sample, audio_root, sr, ratio, req.condition_ratio,
                                  req.condition_tokens, num_cpus=1.0)
        sha = save_npy(out.join(tbl.CENTROIDS), centroids)
        cond = ConditioningSpec(kind=TABLE, ratio=int(req.condition_ratio), names=tuple(feat.feature_names()),
                                vocab_size=int(len(centroids)), scale=tuple(float(v) for v in scale),
                                centroids=tbl.CENTROIDS, centroids_sha256=sha).to_manifest()
    facts = {**rave.facts, "latent_loc": None, "latent_scale": None}  # discrete: no latent bins
    if facts.get("continuous"):  # the latent bins' affine, fitted once and kept by every resume
        ray_up()
        facts.update(latent_bins(req, rave, corpus))
    out.join(tbl.RAVE_FILE).write_bytes(rave.data)
    intent = {"format_version": tbl.FORMAT_VERSION, "msprior_version": __version__, "created": now(),
              "run_id": run_id, "audio": req.audio, "request": want, "rave": facts,
              "chunk": {"num_secs": float(req.num_secs), "frames": max(1, round(req.num_secs * sr / ratio)),
                        "min_frames": int(req.min_frames)},
              "conditioning": cond, "shuffle_seed": int(req.shuffle_seed)}
    path.create_exclusive(json.dumps(intent, indent=1).encode())  # we hold the lease
    return intent


def conditioning_arrays(intent: Dict, out: storage.Where) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(centroids, scale) of the intent, checked against the sha256 the intent recorded."""
    cond = ConditioningSpec.from_manifest(intent)
    if cond.kind == NONE:
        return None, None
    path = storage.Location.of(out).join(tbl.CENTROIDS)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != cond.centroids_sha256:
        raise PreprocessError(f"{path} is not the file {tbl.INTENT} recorded; "
                              "the table was edited: use a new --out_path")
    return np.load(io.BytesIO(data)), np.asarray(cond.scale, np.float32)
