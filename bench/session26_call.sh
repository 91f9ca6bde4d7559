#!/usr/bin/env bash
# Session 26's device calls (results under $OUT; name nvidia-h100-x1):
#   bash bench/session26_call.sh m64   the fixed test_route_tokens_on_the_router_parts on the GPU; then 64-row tiles at
#                                      the ridge points (mixtral-8x7b T=1024 / 4096, qwen3-30b-a3b T=4096): `tilemoe
#                                      tune --variants` of the entries at block_m=64 (the Gluon GEMM 1 on one MMA
#                                      warpgroup, with 4 or 5 stages, or two in ping-pong), random + imbalanced, the
#                                      winner written to the table the call then benches (`tilemoe bench` at T = 1024 /
#                                      4096, triton beside torch_grouped_mm); the table and the CSVs under $OUT
#   bash bench/session26_call.sh rest  the tuner's rematch at mixtral T=1024 / qwen3 T=4096 back to back and with
#                                      --rematch-rest 4 (not yet run): does resting bring the 128-row entry's time
#                                      toward the bench's (bench/NOTES.md, after session 26)?
#   bash bench/session26_call.sh ops   all of tests/ops on the GPU, CPU tests included (not yet run)
# m64 ran once (session 26, bench/results/session26-run26.md): the 64-row tiles lost; the table was not taken.
# Why 64 rows: at mixtral T=1024 a random routing gives each expert 241-272 rows, so 128-row tiles pad to 320 an expert
# on average (25% of the rows are padding; imbalanced: 182-row experts, also 25%); 64-row tiles pad to 288 (12.5%) and
# 3%. A one-warpgroup m64n256 wgmma reads shared memory per MAC as the 128-row tile's two warpgroups do; what it costs
# is the weights' L2 -> SM traffic, twice the 128-row tile's a row.
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session26 ${1:?step: m64, rest or ops} on ${gpu:-no GPU}"
case $1 in
m64)
  timeout -k 5 "${T_TESTS:-90}" python3 -m pytest -q -n 12 -p no:cacheprovider -p no:warnings -rf \
    tests/ops/test_route.py 2>&1 | tail -n 4
  echo "== tests: $(($(date +%s) - start)) s"
  TUNE_TAG=m64 BUDGET=${BUDGET:-150} bash bench/gpu_tune.sh --model mixtral-8x7b qwen3-30b-a3b --num-tokens 1024 4096 \
    --scenarios random imbalanced --variants block_m=64,num_warps1=4 block_m=64,num_warps1=4,num_stages1=5 \
    block_m=64,pingpong1=1 2>&1 | tail -n 6
  grep -E "^variants|in turn|^  variant" "$OUT/gpu_tune-m64.log" | sed -E 's/KernelConfig\((block_m=[0-9]+).*(num_warps1=[0-9]+, num_stages1=[0-9]+).*(pingpong1=[A-Za-z]+).*/\1 \2 \3/'
  echo "== tune: $(($(date +%s) - start)) s"
  for model in ${M64_MODELS:-mixtral-8x7b qwen3-30b-a3b}; do
    timeout -k 5 "${T_BENCH:-120}" python3 -m tilemoe bench --model "$model" --dtype bf16 --impl triton torch_grouped_mm \
      --baseline torch_grouped_mm --num-tokens 1024 4096 --scenarios random imbalanced --imbalance-factor 3.0 \
      --cuda-graph --output-format all --output-file "$OUT/m64-$model" >/dev/null 2>&1
    grep -E "^\| triton|^## " "$OUT/m64-$model.md"
  done
  ;;
rest)
  # the tuner's rematch back to back (as it ran in call 5) and resting 4x each replay: mixtral T=1024 with the 64-row
  # config that won there and lost in the bench, qwen3 T=4096; tables to $OUT (the package's is left as it is)
  for rest in 0 4; do
    timeout -k 5 200 python3 -m tilemoe tune --model mixtral-8x7b qwen3-30b-a3b --num-tokens 1024 4096 \
      --scenarios random imbalanced --variants block_m=64,num_warps1=4,num_stages1=5 --rematch-rest $rest \
      --out "$OUT/rest-$rest.json" --budget-s 150 >"$OUT/tune-rest-$rest.log" 2>&1
    echo "== --rematch-rest $rest: $(($(date +%s) - start)) s"
    grep -E "^variants|in turn" "$OUT/tune-rest-$rest.log" |
      sed -E 's/KernelConfig\((block_m=[0-9]+).*(num_stages1=[0-9]+).*/\1 \2/'
  done
  ;;
ops)
  # every test under tests/ops on the GPU, the CPU tests included: those that place their tensors on DEVICE run on
  # the GPU only this way (-m gpu skips them), and both device mixes of session 26 hid there
  timeout -k 5 "${T_TESTS:-420}" python3 -m pytest -q -n 12 -p no:cacheprovider -p no:warnings -rf tests/ops 2>&1 |
    tail -n 15
  ;;
*)
  echo "session26_call.sh: unknown step $1 (m64, rest or ops)"
  exit 2
  ;;
esac
echo "== session26 $1: $(($(date +%s) - start)) s"
