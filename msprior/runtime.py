"""The one place msprior starts or joins a Ray runtime.

`ensure_ray()` joins the cluster named by RAY_ADDRESS (inside a Ray job Ray sets it to the GCS
address) or starts a local Ray; every stage calls it instead of `ray.init` so that all of them run
with the same settings.

A local Ray listens on 127.0.0.1 only. Left to itself, Ray 2.60 binds its GCS, raylet, workers and
dashboard agent to every interface and its two metrics servers to 0.0.0.0:44217/44227, where they
answer without the token. Asking for a cluster (RAY_ADDRESS) is the only way off loopback.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def _loopback_settings() -> dict:
    """Environment (read by the Ray processes ray.init spawns) and init arguments that keep every
    listener of a local Ray on 127.0.0.1 (checked with `ss -ltnp`: tests/test_security.py)."""
    from msprior.devstack import free_port

    from ray._private import ray_constants

    # Ray then treats the node as local-only: loopback for GCS, raylet, workers, agents, metrics.
    # Ray's processes read the variable; this process read it when it imported ray, so the constant
    # is set too (without it the node address is the host's: services.get_node_ip_address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
    # The metrics servers default to fixed ports (44217, 44227): a second local Ray lost them.
    for var in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        os.environ.setdefault(var, str(free_port()))
    return {"dashboard_host": LOOPBACK}


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray (on 127.0.0.1); True when this call started it."""
    import ray

    from msprior.redact import install_log_redaction

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    local = address in (None, "local")
    # The dashboard serves Ray's State API: without it, Ray Train's PlacementGroupCleaner actor
    # fails to query its controller once per second for the whole run and logs a warning each time.
    ray.init(address=address, log_to_driver=log_to_driver, include_dashboard=True,
             configure_logging=True, logging_level="WARNING",
             **(_loopback_settings() if local else {"dashboard_host": LOOPBACK}))
    install_log_redaction()  # Ray's handlers exist now
    return True
