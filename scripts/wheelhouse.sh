#!/usr/bin/env bash
# Build a wheelhouse for an offline GPU machine that already has torch, transformers, accelerate, numpy and
# safetensors (e.g. a cluster image) but no internet: `scripts/wheelhouse.sh [DIR] [PYTHON_VERSION] [PLATFORM]`.
# Install there with:  pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
# (or `pip install --no-index --find-links DIR kvbench-buzz` into a venv that has torch already).
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
plat=${3:-x86_64}
mkdir -p "$dir"
# Pure-Python or manylinux wheels, one version each, resolved for the target interpreter. Versions follow this
# project's tested environment; pandas/matplotlib/datasets/wandb are left out on purpose: tables are rendered on a
# workstation, the offline loaders read JSONL directly, and wandb degrades to local records when missing.
binary=(
  hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 submitit==1.5.4 cloudpickle==3.1.3
  rouge==1.0.1 nltk==3.10.4 absl-py==2.5.1 click==8.5.1 joblib==1.6.0 regex==2026.11.19 six==1.17.0
  gguf==0.19.0 PyYAML==6.0.4 tqdm==4.70.1
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform "manylinux_2_28_$plat" --platform "manylinux_2_17_$plat" --platform "manylinux2014_$plat" \
  -d "$dir" "${binary[@]}"
# Published only as source distributions: build pure-Python wheels here.
python3 -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3 rouge-score==0.1.2
# The project itself, so `import buzz` works without the checkout on PYTHONPATH.
python3 -m pip wheel -q --no-deps -w "$dir" "$(cd "$(dirname "$0")/.." && pwd)"
ls "$dir"
