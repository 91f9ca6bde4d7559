#!/usr/bin/env bash
# Session 30's device calls (results under $OUT):
#   bash bench/session30_call.sh retune  (an H100) session 29's retune step (the issue-4 cells left tuned again,
#                                        random + imbalanced, the rematch resting), with the rematch taking the
#                                        screening's five fastest (--rematch-top 5), not three: the screening still runs
#                                        back to back, where the power cap reorders configs at the compute-bound
#                                        points (session 29's rest step); the H100 table comes back under $OUT
#   bash bench/session30_call.sh screen  (an H100) the ridge points (mixtral-8x7b T = 1024 / 4096, qwen3-30b-a3b
#                                        T = 4096) searched with the screening resting too (--screen-rest 4): each
#                                        point's line says whether its winner differs from the table's entry (the
#                                        config in use); into $OUT/screened.json, not the package's table
#   bash bench/session30_call.sh cells | kernels | h200 | fuzz | check   as session29_call.sh (h200: --rematch-top 5)
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session30 ${1:?step: retune, screen, cells, kernels, h200, fuzz or check} on ${gpu:-no GPU}"
case $1 in
retune)
  TUNE_TAG=retune-mixtral BUDGET=${BUDGET_A:-200} bash bench/gpu_tune.sh --model mixtral-8x7b \
    --num-tokens 1024 4096 16384 --scenarios random imbalanced --rematch-top 5 2>&1 | tail -n 4
  TUNE_TAG=retune-moe BUDGET=${BUDGET_B:-230} bash bench/gpu_tune.sh --model qwen3-30b-a3b gpt-oss-120b \
    --num-tokens 4096 16384 --scenarios random imbalanced --rematch-top 5 2>&1 | tail -n 4
  grep -h -E " T=[0-9]+: " "$OUT"/gpu_tune-retune-*.log | cut -c1-300 | head -n 20
  ;;
screen)
  timeout -k 5 400 python3 -m tilemoe tune --model mixtral-8x7b qwen3-30b-a3b --num-tokens 1024 4096 \
    --scenarios random imbalanced --screen-rest 4 --rematch-top 5 --budget-s "${BUDGET:-340}" \
    --out "$OUT/screened.json" >"$OUT/screen.log" 2>&1
  grep -E " T=[0-9]+: " "$OUT/screen.log" | cut -c1-300
  ;;
h200)
  if [[ $gpu != *H200* ]]; then
    echo "session30_call.sh h200: this GPU is ${gpu:-none}, not an H200: nothing tuned"
    exit 0
  fi
  TUNE_TAG=h200 BUDGET=${BUDGET:-420} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b \
    mixtral-8x7b --num-tokens ${T_H200:-1024 4096 16384} --scenarios random imbalanced --rematch-top 5 2>&1 | tail -n 8
  grep -E "^[a-z0-9./-]+ T=[0-9]+: " "$OUT/gpu_tune-h200.log" | sed -E "s/ KernelConfig\(.*\)( \[the config)/\1/" | head -n 24
  ;;
cells | kernels | fuzz | check)
  bash bench/session29_call.sh "$1"
  ;;
*)
  echo "session30_call.sh: unknown step $1 (retune, screen, cells, kernels, h200, fuzz or check)"
  exit 2
  ;;
esac
echo "== session30 $1: $(($(date +%s) - start)) s"
