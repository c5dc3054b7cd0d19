"""A synthetic latent table for the training tests, written directly (no preprocessing, no RAVE).

Tokens follow a learnable process: per quantizer q, the next token is the previous one plus
(q + 1) modulo V with probability `p`, else uniform noise. Marginals are ~uniform (unigram entropy
~ log V) while the conditional entropy is low, so a prior that learns anything beats the unigram.
Conditioning columns (`tokens`, `features`) follow docs/ARCHITECTURE.md. `sources_per_file` sources
share one data file and `index.parquet` lists them (the table layout preprocess writes);
`index=False` leaves the index out (a table written before the index existed); `feature_names`
(default f0, f1, ...) names the `features` columns in the manifest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_synthetic_table(root, *, num_files=8, chunks_per_file=4, frames=64, quantizers=4, vocab=16,
                          ratio=4, cond_vocab=8, features=3, p=0.9, seed=0, sources_per_file=1,
                          index=True, feature_names=None) -> dict:
    root = Path(root)
    (root / "latents").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clen = math.ceil(frames / ratio)
    entries = {"source": [], "file": [], "chunks": [], "frames": []}
    rows = None
    for f in range(num_files):
        if f % sources_per_file == 0:
            rows = {"source": [], "chunk": [], "start_s": [], "frames": [], "rave": [], "tokens": [], "features": []}
        name = f"latents/{f // sources_per_file:08x}.parquet"
        for k, v in (("source", f"dir/file_{f:02d}.wav"), ("file", name), ("chunks", chunks_per_file),
                     ("frames", chunks_per_file * frames)):
            entries[k].append(v)
        for c in range(chunks_per_file):
            x = np.empty((frames, quantizers), dtype=np.int64)
            x[0] = rng.integers(0, vocab, quantizers)
            steps = np.arange(1, quantizers + 1)
            for t in range(1, frames):
                noise = rng.random(quantizers) > p
                x[t] = np.where(noise, rng.integers(0, vocab, quantizers), (x[t - 1] + steps) % vocab)
            rows["source"].append(f"dir/file_{f:02d}.wav")
            rows["chunk"].append(c)
            rows["start_s"].append(c * frames * 2048 / 44100)
            rows["frames"].append(frames)
            rows["rave"].append(x.astype(np.int16).reshape(-1))
            rows["tokens"].append((x[::ratio, 0] % cond_vocab).astype(np.int16))
            rows["features"].append(rng.standard_normal((clen, features)).astype(np.float32).reshape(-1))
        if (f + 1) % sources_per_file and f + 1 < num_files:
            continue  # more sources go into this data file
        table = pa.table({
            "source": pa.array(rows["source"], pa.string()),
            "chunk": pa.array(rows["chunk"], pa.int32()),
            "start_s": pa.array(rows["start_s"], pa.float64()),
            "frames": pa.array(rows["frames"], pa.int32()),
            "rave": pa.array(rows["rave"], pa.list_(pa.int16())),
            "tokens": pa.array(rows["tokens"], pa.list_(pa.int16())),
            "features": pa.array(rows["features"], pa.list_(pa.float32())),
        })
        pq.write_table(table, root / name)
    if index:
        from msprior.data.table import INDEX_SCHEMA, write_index

        write_index(str(root), pa.table(entries, schema=INDEX_SCHEMA))
    manifest = {
        "format_version": 1, "msprior_version": "0.1.0", "created": "2026-01-01T00:00:00Z",
        "rave": {"file": "rave.ts", "original_name": "synthetic.ts", "sha256": "0" * 64, "sr": 44100,
                 "ratio": 2048, "latent_size": quantizers, "num_quantizers": quantizers, "vocab_size": vocab,
                 "continuous": False, "resolution": None},
        "chunk": {"num_secs": frames * 2048 / 44100, "frames": frames},
        "conditioning": {"ratio": ratio,
                         "features": {"names": list(feature_names or [f"f{i}" for i in range(features)]),
                                      "size": features,
                                      "mean": [0.0] * features, "std": [1.0] * features},
                         "tokens": {"vocab_size": cond_vocab, "centroids": "centroids.npy"}},
        "counts": {"files_ok": num_files, "files_skipped": 0, "chunks": num_files * chunks_per_file,
                   "frames": num_files * chunks_per_file * frames,
                   "seconds": num_files * chunks_per_file * frames * 2048 / 44100},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (root / "report.json").write_text(json.dumps({"skipped": []}))
    return manifest
