"""A table writer process for the fault tests: the preprocess driver's write path without Ray or audio.

    python tests/_table_writer.py TABLE SOURCES [--ttl S] [--per_bundle N] [--stop_bundle K] [--hold]

Takes the lease, seals and sweeps (as `preprocess` does), commits the sources that the ledger does not
hold yet in bundles of N (synthetic rows: 2 chunks of 3 frames per source, counters per chunk) with
`msprior.data.commit.commit_bundle`, removes duplicates, writes the index, releases. The faults come
from the environment (msprior.data.faults): MSPRIOR_FAULT_KILL / _STOP (from bundle K on, with
--stop_bundle) / _DUPLICATE. `--hold` only holds the lease until killed. Exit 3 with one line when
the lease was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from msprior import storage
from msprior.data import commit as commit_mod
from msprior.data import faults
from msprior.data import table as tbl
from msprior.data.lease import Lease, LeaseLost
from msprior.data.encode import rows_table
from msprior.data.plan import pending as pending_files
from msprior.data.request import Settings


def rows(sources):
    chunk = lambda i: {"start_s": float(i), "frames": 3, "rave": np.arange(6, dtype=np.int16) + i,  # noqa: E731
                       "tokens": np.zeros(0, np.int16), "features": np.zeros(0, np.float32), "counts": {"hits": 1}}
    return rows_table([(s, "") for s in sources], {s: {0: chunk(0), 1: chunk(1)} for s in sources}, {})


def settings(table, lease) -> Settings:
    return Settings(audio_root="", out_path=table, run_id=lease.run_id, sr=44100, ratio=1024, chunk_samples=1,
                    min_frames=1, resolution=64, batch_size=1, condition_ratio=0, centroids=None, scale=None,
                    epoch=lease.epoch, faults=faults.spec() or None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("sources")
    ap.add_argument("--ttl", type=float, default=30)
    ap.add_argument("--per_bundle", type=int, default=2)
    ap.add_argument("--stop_bundle", type=int, default=0)
    ap.add_argument("--hold", action="store_true")
    a = ap.parse_args()
    table = storage.Location.of(a.table)  # S3 settings read once, here
    stop = os.environ.pop(faults.STOP_ENV, None) if a.stop_bundle else None
    lease = Lease.acquire(table, a.ttl, what="preprocess")
    print(json.dumps({"epoch": lease.epoch, "run_id": lease.run_id}), flush=True)
    if a.hold:
        while True:
            time.sleep(1)
    try:
        entries = commit_mod.seal(table, lease.epoch)
        commit_mod.sweep(table)
        pending, _ = pending_files([(x, x, 1) for x in a.sources.split(",")], entries)
        todo = [p[0] for p in pending]
        for k in range(0, len(todo), a.per_bundle):
            if stop and k // a.per_bundle + 1 >= a.stop_bundle:
                os.environ[faults.STOP_ENV] = stop
            commit_mod.commit_bundle(rows(todo[k:k + a.per_bundle]), settings(table, lease))
        lease.check()
        entries = commit_mod.drop_duplicates(tbl.read_ledger(table), settings(table, lease))
        lease.check()
        tbl.write_index(table, tbl.index_from_ledger(entries))
        faults.point("finish.after_index")
    except LeaseLost as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
