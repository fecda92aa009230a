#!/usr/bin/env bash
# The main job: install, then a short training run that writes TensorBoard logs under ./runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
