"""The latent table's commit protocol: data file, fence, ledger record; the seal; the sweep; dedup.

Part of the table contract (docs/ARCHITECTURE.md "Latent table", docs/RELIABILITY.md "Fencing"):

    commit_bundle   data file `latents/<stem>.parquet` (one atomic write) -> fence (the lease still
                    names this run and epoch) -> record `ledger/<stem>.json` (the commit)
    seal            a new lease owner lists the committed records of earlier epochs in
                    `ledger/_seal.json` before anything else: a record a fenced-out writer lands
                    later is never part of the table
    sweep           then deletes what is not committed: ruled-out records, data files without a
                    committed record, temp files
    drop_duplicates a source committed twice keeps one copy; a record is shrunk by writing its
                    replacement (data, then a record naming what it `replaces`) before removing it

Every step is one atomic write or delete, and every state between two steps (a kill point,
`msprior.data.faults`) is a table whose resume gives the uninterrupted run's table: the kill points
and the tests that kill there are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Set, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from msprior import storage
from msprior.data import faults
from msprior.data import features as feat
from msprior.data import table as tbl
from msprior.data.lease import fence


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _point(name: str, s) -> None:
    faults.point(name, getattr(s, "faults", None) or None)


def complete_sources(t: pa.Table) -> Tuple[List[str], List[str]]:
    """(sources whose chunks 0..n-1 are all here, sources with some chunk missing)."""
    seen: Dict[str, set] = defaultdict(set)
    want: Dict[str, int] = {}
    for src, c, n in zip(t["source"].to_pylist(), t["chunk"].to_pylist(), t["n_chunks"].to_pylist()):
        seen[src].add(c)
        want[src] = n
    ok = sorted(s for s in seen if seen[s] == set(range(want[s])))
    return ok, sorted(set(seen) - set(ok))


def file_stats(data: pa.Table, conditioning: bool, counts: Optional[List[str]] = None) -> Dict:
    """A data file's ledger statistics: its sources (source, chunks, frames), frames, float64
    feature moments, summed counters and the counters per source (a dedup keeps them exact)."""
    per: Dict[str, List[int]] = {}
    for src, f in zip(data["source"].to_pylist(), data["frames"].to_pylist()):
        per.setdefault(src, [0, 0])
        per[src][0] += 1
        per[src][1] += f
    out = {"rows": data.num_rows, "frames": int(sum(v[1] for v in per.values())),
           "sources": [[s, c, f] for s, (c, f) in sorted(per.items())], "features": None, "counters": {},
           "source_counters": {}}
    if conditioning and data.num_rows:
        flat = data["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out["features"] = tbl.moments(flat.reshape(-1, len(feat.feature_names())))
    for src, c in zip(data["source"].to_pylist(), counts or []):
        for k, v in json.loads(c).items():
            out["counters"][k] = out["counters"].get(k, 0) + int(v)
            per_src = out["source_counters"].setdefault(src, {})
            per_src[k] = per_src.get(k, 0) + int(v)
    return out


def _write_parquet(data: pa.Table, s) -> bytes:
    buf = io.BytesIO()
    per_row = max(1, data.nbytes // max(1, data.num_rows))
    pq.write_table(data, buf, compression="zstd", row_group_size=max(1, s.row_group_bytes // per_row))
    return buf.getvalue()


def _commit(entry: Dict, stem: str, data: Optional[pa.Table], s, where: str) -> Dict:
    """Data file (if any), fence, record: the one commit sequence of the table."""
    if data is not None:
        blob = _write_parquet(data, s)
        entry.update(file=f"{tbl.LATENTS}/{stem}.parquet", bytes=len(blob))
        path = s.out_path.join(entry["file"])
        storage.retry(lambda: path.write_bytes(blob))
    _point(f"{where}.after_data", s)
    fence(s.out_path, s.run_id, s.epoch)
    _point(f"{where}.after_fence", s)
    entry["epoch"] = s.epoch
    tbl.write_ledger_entry(s.out_path, stem, {k: v for k, v in entry.items() if k not in ("failed", "stem")})
    _point(f"{where}.after_record", s)
    return entry


def commit_bundle(t: pa.Table, s) -> Dict:
    """Write one bundle of encode rows: the complete files' chunks into one Parquet file, then its
    ledger record (the commit). Returns the record plus `failed` (transient failures, not committed:
    a resume retries them). `s` is a preprocess `Settings` (out_path, run_id, epoch, ...)."""
    err = t.filter(pc.not_equal(t["error"], ""))
    good = t.filter(pc.equal(t["error"], ""))
    ok, partial = complete_sources(good)
    failed = [[r["source"], r["error"]] for r in err.to_pylist() if r["transient"]]
    failed += [[src, "not all chunks reached the write task; retried on resume"] for src in partial]
    skipped = [[r["source"], r["error"]] for r in err.to_pylist() if not r["transient"]]
    if partial:
        good = good.filter(pc.is_in(good["source"], pa.array(ok, pa.string())))
    entry: Dict = {"run_id": s.run_id, "file": None, "skipped": skipped, "failed": failed, "created": _now()}
    if not ok and not skipped:
        return entry
    if ok and (getattr(s, "faults", None) or {}).get(faults.DUPLICATE_ENV) and len(ok) > 1:
        # fault: the first file committed alone too, as a write task retried with another grouping does
        commit_bundle(good.filter(pc.equal(good["source"], ok[0])), s)
    stem = tbl.data_file_stem(ok or [src for src, _ in skipped])
    cond = bool(s.condition_ratio)
    data = None
    if ok:
        data = good.sort_by([("source", "ascending"), ("chunk", "ascending")]).select(tbl.data_schema(cond).names)
        entry.update(file_stats(data, cond, good["counts"].to_pylist()))
    return _commit(entry, stem, data, s, "commit")


# --- a new owner: seal, then sweep --------------------------------------------------------------


def seal(out: storage.Where, epoch: int) -> List[Dict]:
    """Record which ledger records are committed as this owner (lease `epoch`) takes the table;
    returns them. Done before the sweep and before any commit of this epoch."""
    out = storage.Location.of(out)
    entries = tbl.read_ledger(out)
    body = {"epoch": int(epoch), "stems": sorted(e["stem"] for e in entries), "created": _now()}
    storage.retry(lambda: out.join(tbl.LEDGER, tbl.SEAL).write_bytes(json.dumps(body).encode()))
    faults.point("seal.after_seal")
    return entries


def sweep(out: storage.Where) -> int:
    """Delete what is not committed: records the seal rules out, data files without a committed
    record, temp files a killed run left (the caller holds the lease and sealed the ledger)."""
    out = storage.Location.of(out)
    seal_ = tbl.read_seal(out)
    committed: Set[str] = set()
    n = 0
    for e in tbl.read_ledger(out, everything=True):
        if tbl.is_committed(e, seal_):
            committed.add(e.get("file") or "")
        else:
            tbl.ledger_path(out, e["stem"]).delete()
            n += 1
    fs, root = out.fs()
    for sub in (tbl.LATENTS, tbl.LEDGER):
        d = f"{root}/{sub}"
        if not fs.exists(d):
            continue
        for p in fs.find(d):
            rel = p[len(root) + 1:].replace(os.sep, "/")
            name = rel.rsplit("/", 1)[-1]
            if name.startswith(".tmp-") or (sub == tbl.LATENTS and rel not in committed):
                fs.rm_file(p)
                n += 1
    return n


# --- duplicates: a source committed twice keeps one copy ---------------------------------------


def _uncommit(e: Dict, s) -> None:
    """Remove a record (the uncommit), then its data file (an orphan from then on)."""
    fence(s.out_path, s.run_id, s.epoch)
    storage.retry(tbl.ledger_path(s.out_path, e["stem"]).delete)
    _point("dedup.after_unrecord", s)
    if e.get("file"):
        storage.retry(s.out_path.join(e["file"]).delete)


def _rewrite(e: Dict, keep: Set[str], s) -> Dict:
    """The replacement of record `e` holding only the sources `keep` (plus its skipped files): a new
    data file and record that name `e` in `replaces`."""
    stem = "part-" + hashlib.sha1(("replaces " + e["stem"] + "\n" + "\n".join(sorted(keep))).encode()).hexdigest()[:20]
    entry: Dict = {"run_id": s.run_id, "file": None, "skipped": e.get("skipped", []), "created": _now(),
                   "replaces": e["stem"]}
    data = None
    if keep:
        fs, root = s.out_path.pyarrow()
        t = pq.read_table(f"{root}/{e['file']}", filesystem=fs)
        data = t.filter(pc.is_in(t["source"], pa.array(sorted(keep), pa.string())))
        entry.update(file_stats(data, bool(s.condition_ratio)))
        per = e.get("source_counters") or {}
        entry["source_counters"] = {k: v for k, v in per.items() if k in keep}
        entry["counters"] = {}
        for v in entry["source_counters"].values():
            for k, n in v.items():
                entry["counters"][k] = entry["counters"].get(k, 0) + n
    out = _commit(entry, stem, data, s, "dedup")
    out["stem"] = stem
    return out


def drop_duplicates(entries: List[Dict], s) -> List[Dict]:
    """Every source in exactly one record: the first record (by name) holding it keeps it, the
    others are rewritten without it (or removed when nothing is left). A record already replaced
    (a dedup killed after writing the replacement) is removed first."""
    stems = {e["stem"] for e in entries}
    replaced = {e["replaces"] for e in entries if e.get("replaces") in stems}
    for e in entries:
        if e["stem"] in replaced:
            _uncommit(e, s)
    entries = sorted((e for e in entries if e["stem"] not in replaced), key=lambda e: e["stem"])
    owner: Dict[str, str] = {}
    for e in entries:
        for src, _, _ in e.get("sources", []):
            owner.setdefault(src, e["stem"])
    out = []
    for e in entries:
        srcs = [src for src, _, _ in e.get("sources", [])]
        keep = {src for src in srcs if owner[src] == e["stem"]}
        if len(keep) == len(srcs):
            out.append(e)
            continue
        new = _rewrite(e, keep, s) if keep or e.get("skipped") else None
        _uncommit(e, s)
        if new:
            out.append(new)
    return out
