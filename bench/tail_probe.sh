#!/usr/bin/env bash
# What an expert's tail block costs against a full one: one table entry (ENTRY_T's) at balanced routings whose every
# expert holds exactly C rows, C = 256 (two full 128-row blocks), 257 (and a tail tile of one real row), 272, 288,
# 320 (a tail of 64), 321, 384 (three full blocks); T = C * E / K. The points in turn for ROUNDS rounds, each round a
# process per model (all warmed first, in parallel); the "base" lines go to $OUT/tail_probe.txt.
#   bash bench/tail_probe.sh          ROUNDS=3; qwen3-30b-a3b (E128 K8, ENTRY_T 4096) and mixtral-8x7b (E8 K2, 1024)
# t(257) - t(256) is 128 (8) tail tiles of one row, t(384) - t(256) as many full tiles, t(320) - t(257) 63 real rows
# added to each tail tile: whether folding a tail into its expert's previous block can pay (bench/NOTES.md, version 18).
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
rows="256 257 272 288 320 321 384"
points() {  # MODEL E K: MODEL:T for each row count
  local c
  for c in $rows; do echo -n "$1:$((c * $2 / $3)) "; done
}
probe() {  # MODEL E K ENTRY_T
  # shellcheck disable=SC2046  # a list of points
  timeout -k 5 "${T_PROBE:-150}" python3 bench/kernel_probe.py --points $(points "$1" "$2" "$3") --scenario balanced \
    --entry-tokens "$4" --no-breakdown --no-stats 2>&1 | grep -E "^## |^  base "
}
models=("qwen3-30b-a3b 128 8 4096" "mixtral-8x7b 8 2 1024")
for model in "${models[@]}"; do
  # shellcheck disable=SC2086  # MODEL E K ENTRY_T
  probe $model >/dev/null &
done
wait  # compiles (CPU-bound) in parallel
for round in $(seq "${ROUNDS:-3}"); do
  for model in "${models[@]}"; do
    echo "# round $round"
    # shellcheck disable=SC2086
    probe $model
  done
done | tee "$OUT/tail_probe.txt"
