"""The one place msprior starts or joins a Ray runtime.

`ensure_ray()` joins the cluster named by RAY_ADDRESS (inside a Ray job Ray sets it to the GCS
address) or starts a local Ray; every stage calls it instead of `ray.init` so that all of them run
with the same settings.

A local Ray listens on 127.0.0.1 only. Left to itself, Ray 2.60 binds its GCS, raylet, workers and
dashboard agent to every interface and its two metrics servers to 0.0.0.0:44217/44227, where they
answer without the token. Asking for a cluster (RAY_ADDRESS) is the only way off loopback.
"""

from __future__ import annotations

import contextlib
import os

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _loopback():
    """While ray.init starts a local Ray: every listener on 127.0.0.1 (tests/test_security.py reads
    them as `ss -ltnp` shows them). Ray's local-only mode (what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    sets when ray is imported) makes 127.0.0.1 the node's address, which GCS, raylet, workers,
    agents and metrics servers bind; without it ray.init takes the host's address and most bind
    every interface. Switched back afterwards: a later ray.init in this process may join a cluster."""
    from ray._private import ray_constants

    # The metrics servers default to fixed ports (44217, 44227): a second local Ray lost them.
    for var in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        os.environ.setdefault(var, str(_free_port()))
    before, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray (on 127.0.0.1); True when this call started it.
    Ray's logging (driver and workers) is `msprior.console.ray_init_kwargs`: during a command, what
    Ray and its workers print lands in the command's log file, redacted."""
    import ray

    from msprior import console

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    # The dashboard serves Ray's State API: without it, Ray Train's PlacementGroupCleaner actor
    # fails to query its controller once per second for the whole run and logs a warning each time.
    with _loopback() if address in (None, "local") else contextlib.nullcontext():
        ray.init(address=address, include_dashboard=True, dashboard_host=LOOPBACK,
                 **console.ray_init_kwargs(log_to_driver))
    console.adopt_handlers()  # Ray's handlers exist now: into the log, redacted
    return True
