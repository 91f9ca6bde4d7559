#!/usr/bin/env bash
# What the padding rows cost, in-kernel: bench/kernel_probe.py's table entries on random routing and on balanced
# routing (every expert T*K/E rows, a multiple of 128 at these points: no padding), the two in turn for ROUNDS rounds,
# each a process of its own (both warmed first, in parallel). The "base" lines go to $OUT/padding_probe.txt.
#   bash bench/padding_probe.sh            POINTS="model:T ..." ROUNDS=3
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
points=${POINTS:-"qwen3-30b-a3b:4096 qwen3-30b-a3b:16384 deepseek-v2-lite:4096 gpt-oss-120b:16384 mixtral-8x7b:1024"}
probe() {  # SCENARIO: one kernel_probe process over the points, its point headers and base lines
  # shellcheck disable=SC2086  # a list of points
  timeout -k 5 "${T_PROBE:-150}" python3 bench/kernel_probe.py --points $points --no-breakdown --no-stats \
    --scenario "$1" 2>&1 | grep -E "^## |^  base "
}
probe random >/dev/null & probe balanced >/dev/null & wait  # compiles (CPU-bound) in parallel
for round in $(seq "${ROUNDS:-3}"); do
  for scenario in random balanced; do
    echo "# round $round $scenario"
    probe "$scenario"
  done
done | tee "$OUT/padding_probe.txt"
