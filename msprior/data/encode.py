"""Encode: chunks of audio -> RAVE tokens, in a Ray Data actor that loads the RAVE export once.

Part of the table contract: what becomes a data file's `rave` column (frame-major int16 tokens,
every item encoded alone so its tokens do not depend on the batch; continuous latents through
`msprior.latent_bins` with the intent's affine, values outside the range counted), and the encode
rows (`rows_table`: the table's columns plus ROW_EXTRA) that write tasks commit: every chunk of a
complete file, or one error row per failed file, so a write task always sees whole files.

`ChunkEncoder` takes the decode stage's DECODED rows (the default); `Encoder` decodes inside the
actor with `decode_threads` threads (the old path, `--decode_in_encoder`). Torch threads come from
the CPUs Ray assigned the actor, never from the node's core count.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa

from msprior import devices, storage
from msprior.data import decode
from msprior.data import table as tbl
from msprior.data.request import Settings

# what an encode row carries besides the data file's columns (tbl.SCHEMA): never written to the table
ROW_EXTRA = {"n_chunks": pa.int32(), "error": pa.string(), "transient": pa.bool_(), "counts": pa.string()}


class _EncoderBase:
    """Loads the RAVE export once; encodes buckets of equal-length chunks; keeps its busy time."""

    def __init__(self, rave_ref: list, settings: Settings):
        import ray
        import torch

        from msprior.rave import load_rave

        # the model's bytes come through the object store (a ref inside a list is not resolved by
        # Ray, so the actor's constructor arguments stay small)
        rave_bytes = rave_ref[0] if isinstance(rave_ref[0], bytes) else ray.get(rave_ref[0])
        self.threads = devices.assigned_threads(settings.threads)
        torch.set_num_threads(self.threads)
        with tempfile.NamedTemporaryFile(suffix=".ts") as f:
            f.write(rave_bytes)
            f.flush()
            self.rave = load_rave(f.name)
        self.device = "cuda" if settings.gpu and torch.cuda.is_available() else "cpu"
        self.rave.to(self.device)
        self.s = settings
        self.ready, self.busy_s, self.calls = time.monotonic(), 0.0, 0

    def _encode_all(self, files, chunks, errors, buckets) -> pa.Table:
        for items in buckets.values():
            self._encode(items, chunks, errors)
        self._report(files, chunks)
        self._stats()
        return rows_table(files, chunks, errors)

    def _stats(self) -> None:
        """Busy time (in the model) against the actor's wall since it was ready (benchmarks only)."""
        self.calls += 1
        if not self.s.stats_dir:
            return
        body = {"pid": os.getpid(), "busy_s": self.busy_s, "wall_s": time.monotonic() - self.ready,
                "calls": self.calls, "threads": self.threads}
        with open(os.path.join(self.s.stats_dir, f"encoder-{os.getpid()}.json"), "w") as f:
            json.dump(body, f)

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
        t = time.monotonic()
        try:
            if self.rave.discrete:
                return self.rave.tokens(x, self.s.resolution)
            tok, outside = self.rave.encode_tokens(x, self.s.resolution, self.s.latent_loc, self.s.latent_scale)
            return tok, {"latents_out_of_range": outside.numpy()}
        finally:
            self.busy_s += time.monotonic() - t

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
            out = self._retry(x, items, errors, e)
            if out is None:
                return
        self._keep(out, items, chunks)

    def _retry(self, x, items, errors, e: Exception):
        """One item, or a permanent error: retried for ~20 s when transient; else its files fail."""
        try:
            if not storage.is_transient(e):
                raise e
            return storage.retry(lambda: self._tokens(x), deadline_s=20)
        except Exception as e2:
            msg = str(e2).strip().splitlines()[-1] if str(e2).strip() else type(e2).__name__
            for src, _ in items:
                errors.setdefault(src, (f"RAVE encode failed: {msg[:200]}", storage.is_transient(e2)))
            return None

    def _keep(self, out, items, chunks) -> None:
        import torch

        counts: Dict[str, np.ndarray] = {}
        if isinstance(out, tuple):  # (tokens, {name: [B] counts}) when the RAVE wrapper counts things
            out, counts = out
        tok = out.transpose(1, 2).to(torch.int16).numpy()  # frame-major [B, T, Q]
        for j, (src, i) in enumerate(items):
            c = chunks[src][i]
            c.update(rave=tok[j].ravel(), frames=tok.shape[1], audio=None,
                     counts={**c.get("counts", {}), **{k: int(np.asarray(v)[j]) for k, v in counts.items()}})

    def _add(self, source: str, i: int, chunk: Dict, chunks, buckets, errors) -> None:
        """One decoded chunk in; a full bucket of its length is encoded at once."""
        chunks[source][i] = chunk
        n = len(chunk["audio"])
        buckets[n].append((source, i))
        if len(buckets[n]) >= self.s.batch_size:
            self._encode(buckets.pop(n), chunks, errors)


class ChunkEncoder(_EncoderBase):
    """Ray Data actor fed by the decode stage: a block of DECODED rows (whole files) -> encode rows."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        chunks: Dict[str, Dict[int, dict]] = defaultdict(dict)
        errors: Dict[str, Tuple[str, bool]] = {}
        buckets: Dict[int, List[Tuple[str, int]]] = defaultdict(list)  # equal lengths stack
        files = []
        for source, parts, error, transient in decode.file_chunks(batch, self.s):
            files.append((source, ""))
            if parts is None:
                errors[source] = (error, transient)
                continue
            for i, c in enumerate(parts):
                self._add(source, i, c, chunks, buckets, errors)
        return self._encode_all(files, chunks, errors, buckets)


class Encoder(_EncoderBase):
    """Ray Data actor of the old path: a task row of files, decoded by `decode_threads` threads here."""

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        files = [(str(a), str(b)) for a, b in zip(decode.flat(batch["source"]), decode.flat(batch["path"]))]
        n = self.s.decode_threads
        q: "queue.Queue" = queue.Queue(maxsize=4 * n)  # decode runs a few chunks ahead, no more
        threading.Thread(target=decode.producer, args=(files, self.s, q, n), daemon=True).start()
        chunks: Dict[str, Dict[int, dict]] = defaultdict(dict)
        errors: Dict[str, Tuple[str, bool]] = {}
        buckets: Dict[int, List[Tuple[str, int]]] = defaultdict(list)
        while (ev := q.get()) is not None:
            if ev[0] == "chunk":
                _, source, i, start_s, x, f, t, counts = ev
                chunk = {"start_s": start_s, "audio": x, "features": f, "tokens": t, "counts": counts}
                self._add(source, i, chunk, chunks, buckets, errors)
            elif ev[0] == "error":
                errors[ev[1]] = (ev[2], ev[3])
        return self._encode_all(files, chunks, errors, buckets)


def rows_table(files, chunks, errors) -> pa.Table:
    """The encode output: every chunk row of each complete file, one row per failed file."""
    names = ("source", "chunk", "n_chunks", "start_s", "frames", "rave", "tokens", "features", "error",
             "transient", "counts")
    cols: Dict[str, list] = {k: [] for k in names}

    def add(*values) -> None:
        for k, v in zip(names, values):
            cols[k].append(v)

    empty16, empty32 = np.zeros(0, np.int16), np.zeros(0, np.float32)
    for source, _ in files:
        if source in errors or source not in chunks:
            reason, transient = errors.get(source, ("no chunk was produced", True))
            add(source, -1, 0, 0.0, 0, empty16, empty16, empty32, reason, transient, "{}")
            continue
        rows = chunks[source]
        for i in range(len(rows)):
            c = rows[i]
            add(source, i, len(rows), c["start_s"], c["frames"], c["rave"], c["tokens"],
                np.asarray(c["features"], np.float32).ravel(), "", False, json.dumps(c.get("counts", {})))
    types = {**{f.name: f.type for f in tbl.SCHEMA}, **ROW_EXTRA}  # the table's columns, and the encode's own
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})
