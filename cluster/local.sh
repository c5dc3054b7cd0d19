#!/usr/bin/env bash
# A local msprior stack on 127.0.0.1: a Ray head (token auth, its own ports), SeaweedFS S3 and an
# MLflow server (sqlite backend, artifacts on S3). State, logs and data in .msprior-stack/.
#
#   eval "$(cluster/local.sh up)"     # start (or re-attach) and export the variables it prints
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/pipeline.py ...
#   cluster/local.sh env              # print the exports again;  cluster/local.sh status
#   cluster/local.sh down [--purge]   # stop exactly what `up` started (--purge: delete the data)
#   cluster/local.sh runtime-env      # cluster/runtime_env.yaml + MLFLOW_TRACKING_URI, NCCL_* etc. as JSON
#
# A thin wrapper over `python -m msprior.devstack`; extra flags: --dir, --bucket, --num_cpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The venv's `ray`, `mlflow` and `weed` are found next to its python.
export PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
cmd="${1:-}"
[ -n "$cmd" ] || { echo "usage: cluster/local.sh up|down|env|status|runtime-env [--dir DIR] [--purge]" >&2; exit 2; }
shift
# The job's runtime env: cluster/runtime_env.yaml + this shell's deployment, storage and NCCL/FI_*
# settings, never credentials (cluster/job_env.py).
[ "$cmd" != runtime-env ] || exec "$PY" cluster/job_env.py "$@"
exec "$PY" -m msprior.devstack "$cmd" --dir "${MSPRIOR_STACK_DIR:-.msprior-stack}" "$@"
