"""Fault-injection points of the write path: a named point where a test makes a real process die
or stop, so every kill point of the table contract is tried for real (docs/RELIABILITY.md).

    MSPRIOR_FAULT_KILL=commit.after_data     SIGKILL this process there (and the run's driver,
                                             when the point is in a Ray worker)
    MSPRIOR_FAULT_STOP=commit.after_fence    SIGSTOP this process there (a GC or VM pause: the test
                                             sends SIGCONT when it wants the process back)
    MSPRIOR_FAULT_MARK=/path/file            append the point's name there first (the test knows it fired)
    MSPRIOR_FAULT_CLOCK_SKEW_S=-3600         this process's wall clock is that far off (lease records)
    MSPRIOR_FAULT_DUPLICATE=1                write tasks commit some files twice (see commit_bundle)

Unset (the normal case), `point()` costs one dict lookup. Ray workers do not inherit the driver's
environment: the driver captures `spec()` into the task settings and workers pass it back in.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, Optional

KILL_ENV = "MSPRIOR_FAULT_KILL"
STOP_ENV = "MSPRIOR_FAULT_STOP"
MARK_ENV = "MSPRIOR_FAULT_MARK"
SKEW_ENV = "MSPRIOR_FAULT_CLOCK_SKEW_S"
DUPLICATE_ENV = "MSPRIOR_FAULT_DUPLICATE"  # a write task also commits its first file alone (a retried
# write with another grouping): the table then holds duplicates for the dedup to remove


def spec() -> Dict[str, str]:
    """The fault settings of this process (empty normally), plus the driver's pid: for task settings."""
    out = {k: os.environ[k] for k in (KILL_ENV, STOP_ENV, MARK_ENV, DUPLICATE_ENV) if os.environ.get(k)}
    if out:
        out["driver_pid"] = str(os.getpid())
    return out


def point(name: str, settings: Optional[Dict[str, str]] = None) -> None:
    """A named point: kill or stop this process here when the fault settings name it."""
    env = settings if settings is not None else os.environ
    kill, stop = env.get(KILL_ENV), env.get(STOP_ENV)
    if name not in (kill, stop):
        return
    if env.get(MARK_ENV):
        with open(env[MARK_ENV], "a") as f:
            f.write(name + "\n")
    if name == stop:
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    driver = int(env.get("driver_pid") or 0)
    if driver and driver != os.getpid():  # a worker's point: the whole run dies, as on a host crash
        try:
            os.kill(driver, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)
