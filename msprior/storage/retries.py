"""Transient storage errors, retried with backoff; a full disk, never blamed on the input."""

from __future__ import annotations

import os
from typing import Optional

# --- transient errors: retried with backoff, never turned into a permanent skip ---------------------

_TRANSIENT_WORDS = ("timeout", "timed out", "throttl", "slowdown", "slow down", "too many requests",
                    "connection", "connect", "service unavailable", "internal error", "bad gateway",
                    "requesttimeout", "broken pipe", "reset by peer", "temporarily", "out of memory")


STORAGE_FULL = "storage full (no space left on device)"


def is_storage_full(e: Optional[BaseException]) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain: our disk, never the input's fault."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def is_transient(e: BaseException) -> bool:
    """An error that may pass on retry: network/S3 trouble, throttling, GPU out of memory."""
    while e is not None:
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        name = type(e).__name__.lower()
        if any(w in name for w in ("timeout", "connection", "throttl", "outofmemory", "endpoint")):
            return True
        if any(w in str(e).lower() for w in _TRANSIENT_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry(fn, what: str = "", deadline_s: Optional[float] = None, first_wait_s: float = 0.5):
    """Call `fn()`; on a transient error wait (0.5 s, doubling, at most 8 s) and try again until
    `deadline_s` (default 90 s, env MSPRIOR_RETRY_S) has passed; then re-raise."""
    import time

    deadline_s = float(os.environ.get("MSPRIOR_RETRY_S", 90)) if deadline_s is None else deadline_s
    end, wait = time.monotonic() + deadline_s, first_wait_s
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + wait > end:
                raise
        time.sleep(wait)
        wait = min(wait * 2, 8.0)
