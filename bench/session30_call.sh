#!/usr/bin/env bash
# Session 30's device calls (results under $OUT):
#   bash bench/session30_call.sh retune  (an H100) session 29's retune step (the issue-4 cells left tuned again,
#                                        random + imbalanced, the rematch resting), with the rematch taking the
#                                        screening's five fastest (--rematch-top 5), not three: the screening still runs
#                                        back to back, where the power cap reorders configs at the compute-bound
#                                        points (session 29's rest step); the H100 table comes back under $OUT
#   bash bench/session30_call.sh screen  (an H100) the ridge points (mixtral-8x7b and qwen3-30b-a3b at T = 1024 /
#                                        4096) searched with the screening resting too (--screen-rest 4): each
#                                        point's line says whether its winner differs from the table's entry (the
#                                        config in use); into $OUT/screened.json, not the package's table
#   bash bench/session30_call.sh h200    (an H200) session 27's h200 step with --rematch-top 5
#   bash bench/session30_call.sh cells | kernels | fuzz | check   as session29_call.sh
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session30 ${1:?step: retune, screen, cells, kernels, h200, fuzz or check} on ${gpu:-no GPU}"
case $1 in
screen)
  timeout -k 5 400 python3 -m tilemoe tune --model mixtral-8x7b qwen3-30b-a3b --num-tokens 1024 4096 \
    --scenarios random imbalanced --screen-rest 4 --rematch-top 5 --budget-s "${BUDGET:-340}" \
    --out "$OUT/screened.json" >"$OUT/screen.log" 2>&1
  grep -E " T=[0-9]+: " "$OUT/screen.log" | cut -c1-300
  ;;
retune | h200 | cells | kernels | fuzz | check)
  TUNE_ARGS="--rematch-top 5" bash bench/session29_call.sh "$1"  # TUNE_ARGS: gpu_tune.sh's (retune, h200)
  ;;
*)
  echo "session30_call.sh: unknown step $1 (retune, screen, cells, kernels, h200, fuzz or check)"
  exit 2
  ;;
esac
echo "== session30 $1: $(($(date +%s) - start)) s"
