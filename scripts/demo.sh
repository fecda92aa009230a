#!/usr/bin/env bash
# The main job: install (lit_decay and the examples' packages), then a short training run that writes TensorBoard
# logs under ./runs. Arguments go to examples/quickstart.py (e.g. --fast, --logdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh examples
printf '\n== demo: training the quickstart classifier (examples/quickstart.py)\n'
trained=$SECONDS
.venv/bin/python examples/quickstart.py "$@"
echo "demo: done in $((SECONDS - start)) s (training $((SECONDS - trained)) s)"
