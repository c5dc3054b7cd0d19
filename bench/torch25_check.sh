#!/usr/bin/env bash
# Opt-in check: do msprior's nn~ exports load and run in torch 2.5.1, the libtorch nn~ 1.6 ships?
# Creates a separate venv (PyPI's torch 2.5.1 wheel is the CUDA build: ~5 GB on disk) unless
# MSPRIOR_TORCH25_VENV points at one, then runs the marked test: every config exported by torch
# 2.13, driven by the emulated nn~ host (tests/nn_host.py) under the old torch, without msprior.
#   bash bench/torch25_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MSPRIOR_TORCH25_VENV:-/tmp/torch25}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, numpy" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.5.1" "numpy<2.5"
fi
"$VENV/bin/python" -c "import torch; print('old torch:', torch.__version__)"
MSPRIOR_TORCH25_PYTHON="$VENV/bin/python" exec .venv/bin/python -m pytest tests/test_export.py -m torch25 -q -rA
