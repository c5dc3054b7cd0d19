"""One writer per latent table: a lease object `<table>/lease.json` with its owner and a heartbeat.

    with Lease.acquire(table, s3, ttl_s=60) as lease:   # raises LeaseHeld naming the live owner
        ...                                              # a thread renews the heartbeat
        lease.check()                                    # raises LeaseLost if another run took it

Acquire is a conditional create (`If-None-Match: *` on S3, O_EXCL locally). A lease whose heartbeat
is older than its TTL belongs to a dead run: it is taken over with a compare-and-swap on the exact
version we read (`If-Match` on S3), so of two runs that both see it stale only one wins. Every
renewal is a compare-and-swap on our own last version too: a run that lost its lease (paused past
its TTL, then taken over) finds out at its next heartbeat and stops before committing anything.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from msprior import storage
from msprior.errors import UserError

LEASE = "lease.json"


class LeaseHeld(UserError):
    """Another live run writes this table."""


class LeaseLost(UserError):
    """This run's lease was taken over (its heartbeat stopped for longer than the TTL)."""


def _now() -> float:
    return time.time()


class Lease:
    def __init__(self, table: str, s3: Optional[storage.S3Options], ttl_s: float, run_id: str):
        self.path = storage.join(table, LEASE)
        self.table, self.s3, self.ttl_s, self.run_id = table, s3, ttl_s, run_id
        self.tag = ""
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.took_over: Optional[dict] = None  # the dead owner's record, when we took it over

    def record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                "started": getattr(self, "_started", _now()), "heartbeat": _now(), "ttl_s": self.ttl_s}

    @classmethod
    def acquire(cls, table: str, s3: Optional[storage.S3Options] = None, ttl_s: Optional[float] = None,
                run_id: Optional[str] = None) -> "Lease":
        ttl = float(ttl_s if ttl_s is not None else os.environ.get("MSPRIOR_LEASE_TTL_S", 60))
        lease = cls(table, s3, ttl, run_id or uuid.uuid4().hex[:12])
        lease._started = _now()
        lease._take()
        lease._thread = threading.Thread(target=lease._beat, name="msprior-lease", daemon=True)
        lease._thread.start()
        return lease

    def _take(self) -> None:
        for _ in range(3):  # create; or take over a stale lease; a lost race is re-examined
            try:
                self.tag = storage.retry(lambda: storage.create_exclusive(
                    self.path, json.dumps(self.record()).encode(), self.s3))
                return
            except storage.Conflict:
                pass
            try:
                data, tag = storage.retry(lambda: storage.read_versioned(self.path, self.s3))
            except FileNotFoundError:
                continue  # released between our create and our read: create again
            owner = _parse(data)
            age = _now() - float(owner.get("heartbeat", 0))
            if age <= float(owner.get("ttl_s", self.ttl_s)):
                raise LeaseHeld(f"{self.path}: another preprocess holds this table (host "
                                f"{owner.get('host')}, pid {owner.get('pid')}, run {owner.get('run_id')}, "
                                f"heartbeat {age:.0f} s ago); wait for it, or use another --out_path")
            try:
                self.tag = storage.replace_if(self.path, json.dumps(self.record()).encode(), tag, self.s3)
                self.took_over = owner
                return
            except storage.Conflict:
                continue  # another run took it first: look again (it is live now)
        raise LeaseHeld(f"{self.path}: could not take the lease (another run keeps taking it); retry later")

    def renew(self) -> bool:
        """One heartbeat: a compare-and-swap on our last version. False (and `lost` set) when another
        run took the lease over; a storage error is let through (the next beat tries again)."""
        try:
            self.tag = storage.replace_if(self.path, json.dumps(self.record()).encode(), self.tag, self.s3)
            return True
        except storage.Conflict:
            self.lost = "another run took the lease over"
            return False

    def _beat(self) -> None:
        period = max(0.2, self.ttl_s / 6)
        while not self._stop.wait(period):
            try:
                if not self.renew():
                    return
            except Exception:  # storage unreachable for a moment: try again next period
                continue

    def check(self) -> None:
        """Raise LeaseLost if a heartbeat found the lease taken over."""
        if self.lost:
            raise LeaseLost(f"{self.path}: {self.lost} (this run's heartbeat was late by more than "
                            f"{self.ttl_s:.0f} s); nothing more is committed by this run")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:  # delete only our own lease
            data, _ = storage.read_versioned(self.path, self.s3)
            if _parse(data).get("run_id") == self.run_id:
                storage.delete(self.path, self.s3)
        except Exception:
            pass  # it expires by itself

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError:  # a torn local write cannot happen (O_EXCL then one write); be safe anyway
        return {"heartbeat": 0}


def read_owner(table: str, s3: Optional[storage.S3Options] = None) -> Optional[dict]:
    """The lease record of `table`, or None when nobody holds it."""
    try:
        return _parse(storage.read_versioned(storage.join(table, LEASE), s3)[0])
    except FileNotFoundError:
        return None
