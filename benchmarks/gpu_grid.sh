#!/usr/bin/env bash
# One grid cell's work on a GPU, measured: calibrate / prune / evaluate / fine-tune throughput,
# memory and MFU for a Phi-1.5-sized model (random init, synthetic tokens: the GPU box has no hub).
# Sized to finish well within 10 minutes on one H200 (hard stop at 9.5 min). Pass --tiny for a
# CPU smoke run of the same code path; other flags go to benchmarks/gpu_grid.py (--help).
#   bash benchmarks/gpu_grid.sh                    # on the GPU box
#   bash benchmarks/gpu_grid.sh --json out.json    # also keep the numbers
#   bash benchmarks/gpu_grid.sh --tiny             # here, on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 570 "$PY" benchmarks/gpu_grid.py "$@"
