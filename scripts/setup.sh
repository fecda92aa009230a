#!/usr/bin/env bash
# Creates ./.venv once and installs lit-decay (editable) with its test, lint and docs tools into it.
# Torch comes first, so that a machine without an NVIDIA GPU never pulls PyPI's multi-GB CUDA build:
#   - a torch already in .venv is kept (install your own CUDA/ROCm/CPU build there first if you prefer);
#   - with an NVIDIA driver (nvidia-smi works), torch from the default index (PyPI's Linux wheels are CUDA builds);
#   - without one, a CPU wheel: torch==$LIT_DECAY_CPU_TORCH (default 2.13.0) if one lies on a local wheel path pip
#     already knows (as on this project's machines), else the newest CPU build from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
cpu_torch=${LIT_DECAY_CPU_TORCH:-2.13.0}
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install --quiet "torch>=2.7"
  elif pip download --quiet --no-index --no-deps --dest "$(mktemp -d)" "torch==${cpu_torch}" >/dev/null 2>&1; then
    # The wheel itself is local; its dependencies (filelock, sympy, ...) come from the package index.
    pip install --quiet "torch==${cpu_torch}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "installed the local CPU build of torch ${cpu_torch}"
  else
    pip install --quiet "torch>=2.7" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# Keep pip's exit status (a failed install must fail the set-up) while dropping its noise about absent mirrors.
pip install --quiet -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
python -c "import lit_decay, torch; print(f'lit_decay {lit_decay.__version__} with torch {torch.__version__} in .venv')"
