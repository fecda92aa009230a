#!/usr/bin/env bash
# The whole test suite: install, lint and format check, type check, tests, strict docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff" && ruff check . && ruff format --check .
echo "== mypy" && mypy
echo "== mkdocs" && mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
echo "== pytest" && pytest "$@"
