#!/usr/bin/env bash
# One device call: `tilemoe tune` for every preset on this GPU, merged into the package table of this device,
# which comes back under $OUT (the machine keeps nothing) with the log; a short summary is printed last.
#   bash bench/gpu_tune.sh [extra tilemoe tune args]     BUDGET=480 (seconds of search) by default; TUNE_ARGS more
# The whole call stays under 9 minutes: the search stops at BUDGET, a hard limit 40 s later kills a hung run
# (the table is written after each shape, so what was found is kept).
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# One cache for the warm-up workers and the timing process; a fresh one on a fresh machine.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
log=$OUT/gpu_tune${TUNE_TAG:+-$TUNE_TAG}.log  # TUNE_TAG: one log per step of a call
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw,power.limit --format=csv
  python3 -c 'import os, torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "triton", triton.__version__, "cpus", os.cpu_count())'
} 2>&1 | tee "$log"

start=$(date +%s)
# TUNE_ARGS: more tune arguments, after the caller's (a step of another script passes its own through it)
# shellcheck disable=SC2086  # TUNE_ARGS: a list
timeout -k 5 $((BUDGET + 40)) python3 -m tilemoe tune --model all --write --budget-s "$BUDGET" "$@" ${TUNE_ARGS:-} 2>&1 |
  tee -a "$log"
rc=${PIPESTATUS[0]}
wall=$(($(date +%s) - start))

table=$(python3 -c 'import torch; from tilemoe.tuning import table_path; print(table_path(torch.cuda.get_device_name()))' \
  2>/dev/null)
[[ -f $table ]] && cp "$table" "$OUT/"
echo "== gpu_tune: exit $rc, ${wall} s wall (budget ${BUDGET} s) =="
grep -A2 "^== tune summary ==" "$log" | tail -n +2
grep -E "^warm-up: |first calls compiled in the timing loop" "$log"
if [[ -f $table ]]; then
  python3 - "$table" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print(f"table {sys.argv[1].rsplit('/', 1)[-1]}: {len(data['configs'])} configs, device {data['device']!r}, "
      f"torch {data.get('torch')}, triton {data.get('triton')}, {data.get('date')}")
PY
else
  echo "no table written ($table)"
fi
exit "$rc"
