#!/usr/bin/env bash
# The one GPU check: bash scripts/gpu_check.sh RESULTS_DIR [--dry-run]
# At most 8 minutes (the Python side budgets 440 s of them); writes RESULTS_DIR/gpu_check.json (after every
# step) and RESULTS_DIR/gpu_check.log. --dry-run runs on CPU and lists what it would run. See docs/gpu.md.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_check.sh RESULTS_DIR [--dry-run]" >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)  # the script runs from the repository root below
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
cd "$root"
# $PYTHON, else the first of python, python3 that is Python 3: many GPU images have only python3, and an old
# image's `python` may be Python 2
py=${PYTHON:-}
if [ -z "$py" ]; then
  for c in python python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[0] != 3)' 2>/dev/null; then
      py=$c
      break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "gpu_check: no python3 or python on PATH (set PYTHON=/path/to/python)" | tee "$out/gpu_check.log" >&2
  exit 127
fi
timeout --kill-after=10 480 "$py" scripts/gpu_check.py "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "gpu_check: stopped at the 8-minute limit; $out/gpu_check.json holds the steps done" \
  | tee -a "$out/gpu_check.log"
exit "$rc"
