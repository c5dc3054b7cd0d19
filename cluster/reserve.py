"""Scale a Ray cluster's pools up before a job, and give them back after (Ray's `request_resources`).

msprior checks the cluster's GPUs before it starts Train workers or encoders (a request that can
never be met would otherwise wait forever), so on an autoscaling cluster that idles at 0 workers
the GPUs must be there first. This asks Ray's autoscaler for them, by pool, and waits until they
have joined:

    ray job submit --working-dir . -- python cluster/reserve.py --train 64     # 8 gpu_8x nodes
    ray job submit --working-dir . --runtime-env-json "$(cluster/local.sh runtime-env)" -- \
      python -m msprior train ... --gpu 0 --num_workers 64
    ray job submit --working-dir . -- python cluster/reserve.py --release      # idle nodes go after 10 min

The request stays in the cluster (Ray's GCS) after this script exits, and keeps the nodes up,
until `--release` or a new request replaces it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

# One bundle per GPU of each pool: the custom resource makes Ray's autoscaler pick that pool's node
# type (cluster/aws.yaml, cluster/kuberay/raycluster.yaml); CPU-only shapes pick cpu_decode.
POOLS = {
    "train": {"GPU": 1, "msprior_train": 1},   # gpu_8x: 8 per node
    "encode": {"GPU": 1, "msprior_encode": 1},  # gpu_encode: 4 per node
    "gpus": {"GPU": 1},                         # the default 1-GPU pool
    "decode_cpus": {"CPU": 1},                  # cpu_decode
}


def bundles(counts: Dict[str, int]) -> List[Dict[str, float]]:
    """The resource shapes to request: `counts[pool]` copies of that pool's bundle."""
    out = []
    for pool, n in counts.items():
        if n < 0:
            raise SystemExit(f"reserve.py: --{pool} {n}: give a count >= 0")
        out += [dict(POOLS[pool]) for _ in range(n)]
    return out


def totals(shapes: List[Dict[str, float]]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for b in shapes:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def wait_for(need: Dict[str, float], timeout_s: float, every_s: float = 15.0) -> bool:
    """Until the cluster holds `need` (totals), printing what is still missing."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        have = ray.cluster_resources()
        missing = {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        if not missing:
            print(f"reserve.py: the cluster holds {need}", flush=True)
            return True
        if time.monotonic() > deadline:
            print(f"reserve.py: still missing {missing} after {timeout_s:.0f} s (see `ray status`)", file=sys.stderr)
            return False
        print(f"reserve.py: waiting for {missing}", flush=True)
        time.sleep(max(0.0, min(every_s, deadline - time.monotonic())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cluster/reserve.py", description=__doc__.splitlines()[0])
    for pool, shape in POOLS.items():
        ap.add_argument(f"--{pool}", type=int, default=0, help=f"bundles of {shape}")
    ap.add_argument("--release", action="store_true", help="drop the request: idle nodes go back")
    ap.add_argument("--wait", type=float, default=1800.0, help="seconds to wait for the nodes (0: don't)")
    a = ap.parse_args(argv)
    shapes = [] if a.release else bundles({p: getattr(a, p) for p in POOLS})
    if not shapes and not a.release:
        ap.error("give --train/--encode/--gpus/--decode_cpus N, or --release")

    import ray
    from ray.autoscaler.sdk import request_resources

    if not ray.is_initialized():  # a Ray job's driver: the job's cluster
        ray.init(address="auto", log_to_driver=False)
    request_resources(bundles=shapes)
    print(f"reserve.py: requested {totals(shapes) or 'nothing (released)'}", flush=True)
    ok = a.release or a.wait <= 0 or wait_for(totals(shapes), a.wait)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
