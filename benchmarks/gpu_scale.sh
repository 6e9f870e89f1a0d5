#!/usr/bin/env bash
# Recovery throughput on GPUs (issue 18): CE and KD tokens/s, MFU and peak memory for SmolLM2's
# 135M and 1.7B shapes in bf16, one process, or DDP then FSDP2 under torchrun with --nproc N.
# Sized to finish within 8 minutes on one H200 (hard stop at 7.5 min). --dry-run: the same code
# on a tiny model on CPU (seconds; what the tests run). Other flags go to benchmarks/gpu_scale.py.
#   bash benchmarks/gpu_scale.sh                  # one GPU
#   bash benchmarks/gpu_scale.sh --nproc 8        # 8 GPUs: DDP and FSDP2, same global batch
#   bash benchmarks/gpu_scale.sh --dry-run        # here, on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
NPROC=1
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --nproc=*) NPROC="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
case "$NPROC" in ''|*[!0-9]*|0) echo "error: --nproc $NPROC is not a number of processes — use --nproc 1 or more" >&2; exit 2 ;; esac
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if [ "$NPROC" -gt 1 ]; then
  exec timeout 450 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" benchmarks/gpu_scale.py ${ARGS[@]+"${ARGS[@]}"}
fi
exec timeout 450 "$PY" benchmarks/gpu_scale.py ${ARGS[@]+"${ARGS[@]}"}
