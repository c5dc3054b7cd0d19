"""One writer per run folder, and no training on a table while it is being written.

A training holds `<run folder>/lease.json` (msprior.data.lease: an epoch, a heartbeat judged on the
storage's clock, same-host dead-process takeover) from its start until it ends: a second training
of the same name, or a `--resume` of a live run, is refused in one line naming the holder. A run
whose lease is taken over (paused past its TTL) is interrupted, so two runs never interleave their
checkpoints. The driver's heartbeat cannot see a takeover while the driver itself is paused (a GC or
VM pause, SIGSTOP), and the Ray Train workers go on without it: so rank 0 also fences every
checkpoint (`check_writer`, on the lease's identity the driver hands the workers) and stops the run
with one line, writing nothing, once the lease has moved on. A table whose preprocess lease is live
is refused: its index may change under us.
"""

from __future__ import annotations

import _thread
import sys
from typing import Any, Dict, Optional

from msprior import storage
from msprior.data.lease import Lease, LeaseHeld, LeaseLost, fence, live_owner, read_owner
from msprior.errors import UserError

_HELD: Dict[str, Lease] = {}  # run folder -> the lease this process took on it (`start`)


class RunBusy(UserError):
    """Another process writes this run folder, or the table is being written."""


class RunTakenOver(UserError):
    """Another training took this run's lease over: this one writes no more checkpoints."""


def start(run_dir: str, name: str, db_path: str = "", ttl_s: Optional[float] = None) -> Lease:
    """Take the run folder's lease (released by the caller) after checking that `db_path` is not
    being written. A lease taken over later interrupts the main thread: the training stops."""
    check_table_idle(db_path)
    try:
        lease = Lease.acquire(storage.Location.of(run_dir), ttl_s, what="training")
    except LeaseHeld as e:
        holder = str(e).split("(", 1)[1].split(")")[0] if "(" in str(e) else str(e)
        raise RunBusy(f"run {name!r} is being written by another training ({holder}); wait for it to end, "
                      "or choose another --name") from None

    def lost() -> None:
        sys.stderr.write(f"error: run {name!r}: another training took over {run_dir}; this one stops writing\n")
        _thread.interrupt_main()

    lease.on_lost = lost
    _HELD[run_dir] = lease
    return lease


def identity(run_dir: str) -> Optional[Dict[str, Any]]:
    """The run lease this process holds on `run_dir` for the workers (its folder as a Location, which
    carries the driver's S3 settings as the table's reader does: a worker's environment may hold no
    credentials; lease run id, epoch), or None when it holds none."""
    lease = _HELD.get(run_dir)
    if lease is None:
        return None
    return {"folder": lease.folder, "run_id": lease.run_id, "epoch": lease.epoch}


def check_writer(ident: Optional[Dict[str, Any]], what: str = "a checkpoint") -> None:
    """Rank 0, right before each checkpoint: RunTakenOver (one line) unless the run's lease still
    names this training at its epoch (`identity`). None: a training without a run lease."""
    if not ident:
        return
    folder = ident["folder"]  # a Location made on the driver
    try:
        fence(folder, ident["run_id"], ident["epoch"])
    except LeaseLost:
        owner = read_owner(folder) or {}
        raise RunTakenOver(f"{folder}: another training took this run over (host {owner.get('host')}, pid "
                           f"{owner.get('pid')}, epoch {owner.get('epoch')}; ours was {ident['epoch']}, paused past "
                           f"its lease); this one stops without writing {what}") from None


def check_table_idle(db_path: str) -> None:
    """Refuse a table that a live preprocess is writing (its index and manifest may change)."""
    if not db_path:
        return
    owner = live_owner(storage.Location.of(db_path))
    if owner is not None and owner.get("what", "preprocess") == "preprocess":
        raise RunBusy(f"{db_path}: a preprocess is writing this table (host {owner.get('host')}, pid "
                      f"{owner.get('pid')}, heartbeat {owner['age_s']:.0f} s ago); train once it has finished")
