#!/usr/bin/env bash
# The whole test suite: install, lint and format check, type check, tests, strict docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== ruff" && ruff check . && ruff format --check .
echo "== mypy" && mypy
# No --quiet: with mkdocs 1.6 it also turns off --strict's failure on warnings. Its log is shown only if it fails.
echo "== mkdocs"
docs_log=$(mktemp)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$(mktemp -d)" >"$docs_log" 2>&1 || { cat "$docs_log"; exit 1; }
echo "== pytest" && pytest "$@"
