"""Report and finish: report.json, index.parquet and manifest.json from the ledger records alone.

Part of the table contract: nothing re-reads the table. `index.parquet` is compiled from the ledger,
then `report.json` (every listed file not in the table, with its reason; `files_retry` those a
re-run retries), then `manifest.json` last: its presence means the table is done. Feature mean/std
come from the records' float64 moments; counts from their sources and counters. The kill points
`finish.after_index` and `finish.after_report` sit between these writes (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import replace
from typing import Dict, List, Tuple

from msprior import __version__, storage
from msprior.conditioning import NONE, ConditioningSpec
from msprior.data import faults
from msprior.data import table as tbl
from msprior.data.request import PreprocessError


def nothing_encoded(audio: str, out_path: str, skipped: List[dict]) -> PreprocessError:
    reasons: Dict[str, int] = defaultdict(int)
    for s in skipped:
        reasons[s["reason"].split(":")[0]] += 1
    top = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    return PreprocessError(f"nothing could be encoded from {audio}: {len(skipped)} files skipped "
                           f"({top or 'none listed'}); see {storage.join(out_path, tbl.REPORT)}")


def build_report(req, intent, corpus, entries, returns, pending) -> Dict:
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


def build_manifest(intent: Dict, entries: List[Dict], report: Dict) -> Dict:
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
    cond = ConditioningSpec.from_manifest(intent)  # the intent's, plus the table's feature statistics
    if cond.kind != NONE:
        mean, std = tbl.mean_std(tbl.merge_moments([e.get("features") for e in entries]))
        cond = replace(cond, mean=tuple(float(v) for v in mean), std=tuple(float(v) + 1e-6 for v in std))
    return {"format_version": tbl.FORMAT_VERSION, "msprior_version": __version__, "created": intent["created"],
            "audio": intent["audio"], "rave": rave, "chunk": intent["chunk"], "conditioning": cond.to_manifest(),
            "counts": counts, "shuffle_seed": intent.get("shuffle_seed"),  # how files were grouped (plan.py)
            "content_sha256": tbl.index_digest(tbl.index_from_ledger(entries))}


def finish(req, intent, corpus, entries, returns, pending) -> Tuple[Dict, Dict]:
    """index.parquet, report.json, then manifest.json (last: its presence means the table is done)."""
    out = storage.Location.of(req.out_path)
    tbl.write_index(out, tbl.index_from_ledger(entries))
    faults.point("finish.after_index")
    report = build_report(req, intent, corpus, entries, returns, pending)
    out.join(tbl.REPORT).write_bytes(json.dumps(report, indent=1).encode())
    faults.point("finish.after_report")
    stop_if_storage_full(report, out)
    if not report["counts"]["files_ok"]:
        raise nothing_encoded(req.audio, out, report["skipped"])
    manifest = build_manifest(intent, entries, report)
    out.join(tbl.MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())
    return report, manifest


def stop_if_storage_full(report: Dict, out_path: str) -> None:
    """A full disk is a storage error that stops the run (one line), never a bad audio file."""
    full = [s for s in report["skipped"] if storage.STORAGE_FULL in s["reason"]]
    if full:
        raise PreprocessError(f"{len(full)} file(s) not encoded: {full[0]['reason'].splitlines()[0][:200]}; free "
                              f"space (the temp folder or {out_path}) and run the same command again to resume them")


def summary(req, t0, ray_init_s, run_id, entries, report, manifest, already, echo) -> Dict:
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
