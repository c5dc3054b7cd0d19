"""One writer per latent table (or run folder): a lease object `<folder>/lease.json` with an epoch.

    with Lease.acquire(table, ttl_s=60) as lease:       # raises LeaseHeld naming the live owner
        ...                                              # a thread renews the heartbeat
        fence(table, lease.run_id, lease.epoch)          # raises LeaseLost once another run took it

Part of the table contract (docs/RELIABILITY.md, "Fencing"):

- The record holds an `epoch`, raised by one at every acquisition, and a `beat` counter. Acquire is
  a conditional create (`If-None-Match: *` on S3, a hard link locally), or a compare-and-swap
  (`If-Match`) on the exact version read: of two runs that both see the lease free only one wins.
- Expiry is judged on the storage's clock: the age of the record is the storage's "now" (the S3
  answer's `Date`, a probe file's mtime locally) minus the record's last-modified time, both stamped
  by the same server. The holder's wall clock (`heartbeat`) is shown to people, never compared.
- A holder on this host whose process is gone (pid and start time no longer match: kill -9, OOM
  killer) is taken over at once, not after a TTL.
- Every commit is fenced: `fence()` re-reads the lease and refuses unless it still names this run
  and epoch; a new owner seals the ledger records of earlier epochs (`msprior.data.commit.seal`), so
  a record that a paused old owner lands after the seal is never part of the table.
- Release is a compare-and-swap on our own last version to a `released` record (the epoch stays, so
  epochs only grow): a run that lost its lease never deletes or frees another's.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from msprior import storage
from msprior.data import faults
from msprior.errors import UserError

LEASE = "lease.json"


class LeaseHeld(UserError):
    """Another live run writes this folder."""


class LeaseLost(UserError):
    """This run's lease was taken over (its heartbeat stopped for longer than the TTL)."""


def _wall() -> float:
    """The holder's wall clock, for people only; a fault hook skews it to show it is never compared."""
    return time.time() + float(os.environ.get(faults.SKEW_ENV, 0) or 0)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> Optional[str]:
    """The start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _dead_here(owner: dict) -> bool:
    """True when the owner ran on this host (same name and boot) and its process is gone."""
    if owner.get("host") != socket.gethostname() or owner.get("boot_id") != _boot_id() or not owner.get("pid"):
        return False
    return process_start(int(owner["pid"])) != owner.get("pid_start")


class Lease:
    def __init__(self, folder: storage.Location, ttl_s: float, run_id: str, what: str):
        self.path = folder.join(LEASE)
        self.folder, self.ttl_s, self.run_id, self.what = folder, ttl_s, run_id, what
        self.tag, self.epoch, self.beat = "", 0, 0
        self.lost: Optional[str] = None
        self._sent: Optional[bytes] = None  # a heartbeat whose answer may have been lost
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.took_over: Optional[dict] = None  # the previous owner's record, when we replaced a held one
        self.on_lost: Optional[Callable[[], None]] = None  # called by the heartbeat thread on a takeover

    def record(self, state: str = "held") -> dict:
        return {"state": state, "what": self.what, "host": socket.gethostname(), "boot_id": _boot_id(),
                "pid": os.getpid(), "pid_start": process_start(os.getpid()), "run_id": self.run_id,
                "epoch": self.epoch, "beat": self.beat, "ttl_s": self.ttl_s, "heartbeat": _wall()}

    @classmethod
    def acquire(cls, folder: storage.Where, ttl_s: Optional[float] = None,
                run_id: Optional[str] = None, what: str = "preprocess") -> "Lease":
        ttl = float(ttl_s if ttl_s is not None else os.environ.get("MSPRIOR_LEASE_TTL_S", 60))
        lease = cls(storage.Location.of(folder), ttl, run_id or uuid.uuid4().hex[:12], what)
        lease._take()
        lease._thread = threading.Thread(target=lease._beat, name="msprior-lease", daemon=True)
        lease._thread.start()
        return lease

    def _take(self) -> None:
        for _ in range(5):  # create; or replace a released/expired/dead one; a lost race is re-examined
            self.epoch = 1
            try:
                self.tag = storage.retry(lambda: self.path.create_exclusive(self._data()))
                return
            except storage.Conflict:
                pass
            try:
                data, tag, age = storage.retry(self.path.read_aged)
            except FileNotFoundError:
                continue  # released and removed between our create and our read: create again
            owner = _parse(data)
            held = owner.get("state", "held") == "held"
            if held and age <= float(owner.get("ttl_s", self.ttl_s)) and not _dead_here(owner):
                raise LeaseHeld(f"{self.path}: another {owner.get('what', 'preprocess')} holds this "
                                f"{'table' if owner.get('what', 'preprocess') == 'preprocess' else 'folder'} "
                                f"(host {owner.get('host')}, pid {owner.get('pid')}, run {owner.get('run_id')}, "
                                f"heartbeat {age:.0f} s ago); wait for it, or use another "
                                f"{'--out_path' if self.what == 'preprocess' else '--name'}")
            faults.point("lease.before_takeover")
            self.epoch = int(owner.get("epoch", 0)) + 1
            try:
                self.tag = self.path.replace_if(self._data(), tag)
                self.took_over = owner if held else None
                return
            except storage.Conflict:
                continue  # another run took it first: look again (it is live now)
        raise LeaseHeld(f"{self.path}: could not take the lease (other runs keep taking it); retry later")

    def _data(self, state: str = "held") -> bytes:
        self._sent = json.dumps(self.record(state)).encode()
        return self._sent

    def _swap(self, state: str) -> None:
        """One compare-and-swap on our last version; an answer lost in transit (the PUT landed, the
        next one finds our own bytes there) is recognised as ours, not as a lost lease."""
        prev = self._sent
        try:
            self.tag = self.path.replace_if(self._data(state), self.tag)
        except storage.Conflict:
            data, tag = self.path.read_versioned()
            if prev is None or data != prev:
                raise
            self.tag = tag  # our previous write landed: swap again on its version
            self.tag = self.path.replace_if(self._data(state), self.tag)

    def renew(self) -> bool:
        """One heartbeat. False (and `lost` set) when another run took the lease over; a storage
        error is let through (the next beat tries again)."""
        self.beat += 1
        try:
            self._swap("held")
            return True
        except (storage.Conflict, FileNotFoundError):
            self.lost = "another run took the lease over"
            return False

    def _beat(self) -> None:
        period = max(0.2, self.ttl_s / 6)
        while not self._stop.wait(period):
            try:
                if not self.renew():
                    if self.on_lost is not None:
                        self.on_lost()
                    return
            except Exception:  # storage unreachable for a moment: try again next period
                continue

    def check(self) -> None:
        """Raise LeaseLost if a heartbeat found the lease taken over, or the lease no longer names us."""
        if not self.lost:
            try:
                fence(self.folder, self.run_id, self.epoch)
            except LeaseLost as e:
                self.lost = str(e)
        if self.lost:
            raise LeaseLost(f"{self.path}: {self.lost.split(': ', 1)[-1]} (this run's heartbeat was late by "
                            f"more than {self.ttl_s:.0f} s); nothing more is committed by this run")

    def release(self) -> None:
        """Mark the lease released, only if it is still ours (a compare-and-swap on our version)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            self._swap("released")
        except Exception:
            pass  # taken over, or storage away: it expires by itself

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError:  # a torn local write cannot happen (link/rename of a whole file); be safe anyway
        return {"epoch": 0}


def read_owner(folder: storage.Where) -> Optional[dict]:
    """The lease record of `folder` while someone holds it (released or absent: None)."""
    try:
        owner = _parse(storage.Location.of(folder).join(LEASE).read_versioned()[0])
    except FileNotFoundError:
        return None
    return owner if owner.get("state", "held") == "held" else None


def live_owner(folder: storage.Where) -> Optional[dict]:
    """The holder of `folder`'s lease if it is live (held, heartbeat within its TTL by the storage's
    clock, process not known dead), with `age_s`; else None."""
    try:
        data, _, age = storage.Location.of(folder).join(LEASE).read_aged()
    except FileNotFoundError:
        return None
    owner = _parse(data)
    if owner.get("state", "held") != "held" or age > float(owner.get("ttl_s", 60)) or _dead_here(owner):
        return None
    return {**owner, "age_s": age}


def fence(folder: storage.Where, run_id: str, epoch: int) -> None:
    """Refuse (LeaseLost) unless the lease still names `run_id` at `epoch`: the check every commit
    makes right before its ledger record."""
    try:
        data = storage.retry(storage.Location.of(folder).join(LEASE).read_bytes)
    except FileNotFoundError:
        data = b"{}"
    owner = _parse(data)
    if owner.get("run_id") != run_id or int(owner.get("epoch", -1)) != int(epoch) or owner.get("state") != "held":
        raise LeaseLost(f"{folder}: another run took this lease over (epoch {owner.get('epoch')}, run "
                        f"{owner.get('run_id')}; ours {epoch}, {run_id}); nothing more is committed by this run")
