"""The runtime env of a job, as JSON for `ray job submit --runtime-env-json` (`cluster/local.sh runtime-env`).

cluster/runtime_env.yaml plus settings of the submitting shell that every node of the job needs:
- deployment settings (FORWARDED_ENV: MLflow and S3 endpoints, the region), URIs without user-info
  or secret query parameters;
- the shared storage path `MSPRIOR_STORAGE` (where runs and checkpoints live);
- the collective-communication settings of multi-node training: `NCCL_*` (NCCL_SOCKET_IFNAME,
  NCCL_IB_DISABLE, NCCL_DEBUG, ...), `FI_*` (libfabric: FI_PROVIDER=efa, FI_EFA_USE_DEVICE_RDMA),
  `TORCH_NCCL_*` and `GLOO_SOCKET_IFNAME`, passed through as set.
Never credentials: runtime envs show in the dashboard and the job logs. A forwarded name that reads
like a secret (KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL, AUTH) is dropped, and values pass through
msprior.redact (any value of a secret variable of this shell is masked).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from cluster/local.sh

from msprior.redact import redact_text, redact_uri  # noqa: E402

NETWORK_ENV = re.compile(r"^(NCCL_|FI_|TORCH_NCCL_|GLOO_SOCKET_IFNAME$)[A-Z0-9_]*$")
STORAGE_ENV = ("MSPRIOR_STORAGE",)
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.I)
# Deployment settings a job needs on every node, forwarded from the submitting shell. Credentials
# are left out on purpose: runtime envs show in the dashboard and logs; nodes get credentials from
# their own environment (instance role, k8s Secret, the local stack).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION")


def runtime_env(path: str = "cluster/runtime_env.yaml", environ: Optional[Mapping[str, str]] = None) -> Dict:
    """`path` plus the FORWARDED_ENV variables set in `environ`. URIs travel without user-info or
    secret query parameters: a tracking URI's password would otherwise show in the dashboard and
    job logs (nodes read credentials from their own environment)."""
    import yaml

    environ = os.environ if environ is None else environ
    env = yaml.safe_load(Path(path).read_text()) or {}
    env.setdefault("env_vars", {}).update({k: redact_uri(environ[k]) for k in FORWARDED_ENV if environ.get(k)})
    return env


def job_env(path: str = "cluster/runtime_env.yaml", environ: Optional[Mapping[str, str]] = None) -> Dict:
    """The runtime env for `path`, with this shell's deployment, storage and NCCL/libfabric settings."""
    environ = os.environ if environ is None else environ
    env = runtime_env(path, dict(environ))
    extra = {k: redact_uri(v) for k, v in environ.items() if k in STORAGE_ENV and v}
    extra.update({k: redact_text(v) for k, v in sorted(environ.items())
                  if NETWORK_ENV.match(k) and not SECRET_NAME.search(k)})
    env.setdefault("env_vars", {}).update(extra)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cluster/local.sh runtime-env", description=__doc__.splitlines()[0])
    ap.add_argument("--file", default="cluster/runtime_env.yaml", help="the runtime env YAML to extend")
    print(json.dumps(job_env(ap.parse_args(argv).file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
