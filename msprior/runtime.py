"""The one place msprior starts or joins a Ray runtime.

`ensure_ray()` joins the cluster named by RAY_ADDRESS (inside a Ray job Ray sets it to the GCS
address) or starts a local Ray; every stage calls it instead of `ray.init` so that all of them run
with the same settings.
"""

from __future__ import annotations

import os


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # The dashboard serves Ray's State API: without it, Ray Train's PlacementGroupCleaner actor
    # fails to query its controller once per second for the whole run and logs a warning each time.
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver, include_dashboard=True,
             dashboard_host="127.0.0.1", configure_logging=True, logging_level="WARNING")
    return True
