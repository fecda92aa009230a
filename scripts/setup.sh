#!/usr/bin/env bash
# Creates ./.venv once and installs lit-decay (editable) into it, showing pip's progress and the time it took.
#
#   bash scripts/setup.sh [examples|dev]
#
# examples: lit_decay and what the examples need (scikit-learn, matplotlib): what scripts/demo.sh uses.
# dev (the default): that plus the test, lint and docs tools: what scripts/test.sh uses.
# Torch comes first, so that a machine without an NVIDIA GPU never pulls PyPI's multi-GB CUDA build:
#   - a torch already in .venv is kept (install your own CUDA/ROCm/CPU build there first if you prefer);
#   - with an NVIDIA driver (nvidia-smi works), torch from the default index (PyPI's Linux wheels are CUDA builds);
#   - without one, a CPU wheel: torch==$LIT_DECAY_CPU_TORCH (default 2.13.0) if one lies on a local wheel path pip
#     already knows (as on this project's machines), else the newest CPU build from PyTorch's CPU index.
# A second run finds the stamp left in .venv and installs nothing (delete .venv/.lit_decay-setup to force it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
case $extras in
  examples | dev) ;;
  *) echo "setup.sh: unknown extras '$extras' (examples or dev)" >&2 && exit 2 ;;
esac
python=${PYTHON:-python3}
stamp=.venv/.lit_decay-setup
start=$SECONDS

elapsed() { printf '%d min %02d s' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }
# pip's own lines (and its progress bars, on a terminal) are the progress; this says what a step is for.
step() { printf '\n== setup: %s\n' "$*"; }

installed() {
  # dev includes examples; a pyproject.toml newer than the stamp may ask for other packages.
  [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ -x .venv/bin/python ] || return 1
  [ "$(cat "$stamp")" = dev ] || [ "$extras" = examples ]
}

# Versions from the installed metadata: importing torch would cost seconds on every run of the scripts. Where they
# are missing (a package removed by hand), the install below runs again.
if installed && .venv/bin/python -c "from importlib.metadata import version as v
print(f\"lit_decay {v('lit-decay')} with torch {v('torch')} in .venv (already set up)\")" 2>/dev/null; then
  exit 0
fi

# Keep pip's exit status (a failed install must fail the set-up) while dropping its noise about absent mirrors.
pip_install() { pip install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Measured on a fresh clone of a 2-core machine with the wheels at hand (README.md): examples 63 s, dev 63 + 49 s.
if [ "$extras" = examples ]; then
  expected="about 1 minute (~320 MB of wheels)"
elif [ -f "$stamp" ]; then
  expected="about 1 minute (the test, lint and docs tools: ~90 MB of wheels)"
else
  expected="about 2 minutes (~410 MB of wheels)"
fi
echo "== setup: installing into .venv: $expected, longer where the wheels must be downloaded over a slow link"
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
cpu_torch=${LIT_DECAY_CPU_TORCH:-2.13.0}
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    step "installing torch with CUDA (an NVIDIA GPU was found): a few GB to download, minutes on a fast link"
    pip_install "torch>=2.7"
  elif pip download --quiet --no-index --no-deps --dest "$(mktemp -d)" "torch==${cpu_torch}" >/dev/null 2>&1; then
    # The wheel itself is local; its dependencies (filelock, sympy, ...) come from the package index.
    step "installing the local CPU build of torch ${cpu_torch} (no NVIDIA GPU found)"
    pip_install "torch==${cpu_torch}"
  else
    step "installing a CPU build of torch from PyTorch's CPU index (no NVIDIA GPU found): about 200 MB"
    pip_install "torch>=2.7" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ "$extras" = dev ]; then
  step "installing lit_decay with Lightning, TensorBoard, the examples' packages and the test, lint and docs tools"
else
  step "installing lit_decay with Lightning, TensorBoard and the examples' packages (scikit-learn, matplotlib)"
fi
pip_install -e ".[$extras]"
echo "$extras" >"$stamp"
python -c "import lit_decay, torch; print(f'lit_decay {lit_decay.__version__} with torch {torch.__version__} in .venv')"
echo "setup: done in $(elapsed)"
