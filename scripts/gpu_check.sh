#!/usr/bin/env bash
# The GPU check of lit_decay in one command, written as ONE markdown report:
#
#   bash scripts/gpu_check.sh [REPORT.md] [--cpu-dry-run]
#
# REPORT.md defaults to gpu_report.md; when $OUT is set, the report is also copied to "$OUT/gpu_report.md".
# Sections: the machine (nvidia-smi, torch), the CUDA tests (pytest -m cuda tests/test_cuda.py), then the many-tensor
# benchmarks on the gpt2-small and 1b shape sets: bench_optimizer.py (optimizer step table) and bench_monitor.py
# (logging-step tables, the statistics both eager and compiled: their first logging step, compile included, and
# their steady state, which decide whether lit_decay compiles anything on a GPU). Every command runs under its own
# `timeout`, so the whole stays under 8 minutes on one GPU.
# --cpu-dry-run (or LIT_DECAY_GPU_CHECK_DRY_RUN=1) runs the same pipeline on CPU with smoke sizes (the CUDA tests
# then skip): for machines without a GPU, and what tests/test_benchmarks.py runs.
# Python: $PYTHON if set, else .venv/bin/python, else python3, the first whose torch sees CUDA (any that imports
# torch, lightning and pytest in a dry run); if none does, scripts/setup.sh makes .venv (reusing a system CUDA torch).
# Exit status: 0 when every step passed; 1 when a step failed or timed out, or no GPU was found (the report says so).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

report="" dry_run=${LIT_DECAY_GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,16p' "$0" | cut -c3- && exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2 && exit 2 ;;
    *) report=$arg ;;
  esac
done
report=${report:-gpu_report.md}
# Seconds allowed to each step: 60 + 3 x 20 (probes) + 140 + 110 + 110 = 480 at the very worst (8 minutes).
limit_setup=60 limit_probe=20 limit_tests=140 limit_bench=110

body=$(mktemp)
trap 'rm -f "$body"' EXIT
failures=0
summary_rows=()

say() { printf '%s\n' "$@" >>"$body"; }
fence() { say '```text' && cat "$1" >>"$body" && say '```' ""; }

write_report() {
  mkdir -p "$(dirname "$report")"
  cp "$body" "$report"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    [ "$(realpath -m "$OUT/gpu_report.md")" = "$(realpath -m "$report")" ] || cp "$body" "$OUT/gpu_report.md"
  fi
  echo "gpu_check.sh: report written to $report${OUT:+ (and $OUT/gpu_report.md)}" >&2
}

# Prints "cuda" or "cpu" when $1 imports what the check needs (torch, lightning, pytest, lit_decay), else nothing.
probe() {
  [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 || return 0
  PYTHONPATH="$root" timeout "$limit_probe" "$1" -c \
    'import torch, lightning, pytest, lit_decay; print("cuda" if torch.cuda.is_available() else "cpu")' \
    2>/dev/null | tail -n 1
}

choose_python() {
  local candidate kind
  for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    kind=$(probe "$candidate")
    if [ "$kind" = cuda ] || { [ "$dry_run" = 1 ] && [ -n "$kind" ]; }; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

mode="GPU"
[ "$dry_run" = 1 ] && mode="CPU dry run (smoke sizes, no GPU needed)"
say "# lit_decay GPU check" ""
say "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
say "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
say "- Mode: $mode"
say "- Command: \`bash scripts/gpu_check.sh $*\`" ""

say "## Machine" ""
smi=$(mktemp)
if command -v nvidia-smi >/dev/null 2>&1; then
  echo '$ nvidia-smi --query-gpu=name,memory.total --format=csv' >"$smi"
  timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv >>"$smi" 2>&1 || echo "(nvidia-smi failed: $?)" >>"$smi"
else
  echo "nvidia-smi: not found on this machine" >"$smi"
fi
fence "$smi"
rm -f "$smi"

gpu_visible=0
command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1 && gpu_visible=1
setup_note=""
# scripts/setup.sh only where it can help: a GPU the driver sees (or a dry run) and no usable interpreter yet.
if ! py=$(choose_python) && { [ "$gpu_visible" = 1 ] || [ "$dry_run" = 1 ]; }; then
  # No interpreter with a CUDA torch and the test tools: make .venv. A system torch that sees CUDA is reused
  # (setup.sh keeps a torch that .venv can import) rather than downloading another.
  if [ ! -x .venv/bin/python ] && [ "$(timeout "$limit_probe" python3 -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" = True ]; then
    python3 -m venv --system-site-packages .venv
  fi
  setup_log=$(mktemp)
  timeout "$limit_setup" bash scripts/setup.sh >"$setup_log" 2>&1
  setup_rc=$?
  setup_note="scripts/setup.sh ran (exit status $setup_rc, limit $limit_setup s); its last lines:"
  py=$(choose_python) || py=""
fi
[ -n "${py:-}" ] && [ -n "$(probe "$py")" ] || py=""

if [ -z "$py" ]; then
  say "## Result: no GPU found" ""
  say "No Python here has a torch that sees a CUDA device together with lightning and pytest (tried \$PYTHON," \
    ".venv/bin/python, python3$([ -n "$setup_note" ] && echo ', then scripts/setup.sh'))." \
    "Nothing was run. On a machine without a GPU, \`bash scripts/gpu_check.sh --cpu-dry-run\` checks the pipeline." ""
  if [ -n "$setup_note" ]; then
    say "$setup_note" ""
    tail -n 20 "$setup_log" >"$setup_log.tail" && fence "$setup_log.tail" && rm -f "$setup_log.tail"
  fi
  write_report
  exit 1
fi

torch_info=$(mktemp)
PYTHONPATH="$root" timeout 60 "$py" - >"$torch_info" 2>&1 <<'EOF'
import platform

import torch

import lit_decay

print(f"- Python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"lit_decay {lit_decay.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"- torch sees {torch.cuda.device_count()} CUDA device(s); device 0: {props.name}, "
          f"{props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}")
else:
    print("- torch sees no CUDA device")
EOF
cat "$torch_info" >>"$body"
rm -f "$torch_info"
say "- Interpreter: \`$py\`${setup_note:+ (after scripts/setup.sh)}" ""

# run_step TITLE LIMIT KIND COMMAND...: KIND "text" puts the whole output in a text block (the tests), "markdown"
# appends stdout as it is (the benchmarks print markdown) and, on failure, the end of stderr.
run_step() {
  local title=$1 limit=$2 kind=$3
  shift 3
  local out err start rc took status
  out=$(mktemp) err=$(mktemp) start=$SECONDS
  echo "gpu_check.sh: $title (limit $limit s)" >&2
  if [ "$kind" = text ]; then
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
  else
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$limit" "$@" >"$out" 2>"$err"
  fi
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) status="passed" ;;
    124 | 137) status="TIMED OUT (limit $limit s)" ;;
    *) status="FAILED (exit status $rc)" ;;
  esac
  [ "$rc" = 0 ] || failures=$((failures + 1))
  summary_rows+=("| $title | $status | $took |")
  say "## $title" "" "Command: \`$*\`" "" "Result: $status in $took s." ""
  if [ "$kind" = text ]; then
    fence "$out"
  else
    cat "$out" >>"$body"
    say ""
    if [ "$rc" != 0 ]; then
      say "Last lines of stderr:" ""
      tail -n 30 "$err" >"$err.tail" && fence "$err.tail" && rm -f "$err.tail"
    fi
  fi
  rm -f "$out" "$err"
}

if [ "$dry_run" = 1 ]; then
  device=(--device cpu) shapes=20x64 timing=(--smoke)
else
  device=(--device cuda) shapes=gpt2-small,1b timing=(--rebuilds 2 --repetitions 5 --warmup 2 --min-sample-ms 10)
fi
run_step "CUDA tests" "$limit_tests" text "$py" -m pytest -m cuda tests/test_cuda.py -q -rA -p no:cacheprovider
run_step "Optimizer step, many tensors" "$limit_bench" markdown \
  "$py" benchmarks/bench_optimizer.py "${device[@]}" --shapes "$shapes" --parts step "${timing[@]}"
run_step "Monitor logging step, many tensors, eager and compiled statistics" "$limit_bench" markdown \
  "$py" benchmarks/bench_monitor.py "${device[@]}" --shapes "$shapes" --forms eager,compiled "${timing[@]}"

say "## Summary" "" "| step | result | seconds |" "| --- | --- | --- |" "${summary_rows[@]}" ""
if [ "$failures" = 0 ]; then
  say "All steps passed."
else
  say "$failures step(s) did not pass."
fi
write_report
[ "$failures" = 0 ]
