#!/usr/bin/env bash
# Creates ./.venv once and installs lit-decay (editable) with its test, lint and docs tools into it.
# Torch is installed first so that a CPU-only machine never pulls PyPI's multi-GB CUDA build:
#   - a torch already in .venv is kept (install your own CUDA/ROCm/CPU build there first if you prefer);
#   - with an NVIDIA driver (nvidia-smi), the default torch from the index (a CUDA build);
#   - without one, torch==${LIT_DECAY_CPU_TORCH:-2.13.0}, which this project's machines hold as a CPU wheel.
#     Elsewhere, point pip at PyTorch's CPU wheel index (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install --quiet "torch>=2.7"
  else
    pip install --quiet "torch==${LIT_DECAY_CPU_TORCH:-2.13.0}"
  fi
fi
pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
python -c "import lit_decay, torch; print(f'lit_decay {lit_decay.__version__} with torch {torch.__version__} in .venv')"
