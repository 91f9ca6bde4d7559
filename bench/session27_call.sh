#!/usr/bin/env bash
# Session 27's device calls (results under $OUT; name nvidia-h100-x1, an H200 does for `check`):
#   bash bench/session27_call.sh check  all of tests/ops on the GPU, CPU tests included (session26_call.sh ops), then
#                                       the -m gpu tests of tests/bench/test_graph_timing.py and test_report.py
#   bash bench/session27_call.sh rest   the duty-cycle test of bench/NOTES.md (after session 26), from both sides:
#                                       the tuner's rematch back to back and with --rematch-rest 4 (session26_call.sh
#                                       rest), then `tilemoe bench` of mixtral-8x7b T=1024 with `triton` alone and in
#                                       turn with torch_grouped_mm and grouped. If the GPU's duty cycle sets the
#                                       clock, `triton` alone runs slower than in turn, and the resting rematch
#                                       times the 128-row entry nearer the bench's.
#   bash bench/session27_call.sh kernels  the layer's kernels under random and imbalanced routing at qwen3-30b-a3b and
#                                       gpt-oss-120b T=16384 (bench/layer_probe.py --scenarios): at gpt-oss the padding
#                                       (11% of GEMM rows random, 1.5% imbalanced, bench/padding_report.py) explains the
#                                       routings' 11% apart; at qwen3 (6% against 1.5%) it leaves ~6% of the 11% unexplained
#   bash bench/session27_call.sh h200   on an H200 only: the four bench models at T = 1024 / 4096 / 16384 re-tuned
#                                       (random + imbalanced) with every candidate and the H100 table's entries, the
#                                       Gluon ones included, which the H200 table has never had; merged into the H200
#                                       table, which comes back under $OUT
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session27 ${1:?step: check, rest, kernels or h200} on ${gpu:-no GPU}"
case $1 in
check)
  # each test's outcome goes to $OUT as it ends (-v), so a call cut at its limit still brings back what ran: session
  # 27's only call came with 348 s left and was cut inside the tests/ops run, whose summary (tail) never printed.
  # The short -m gpu tests run first.
  timeout -k 5 120 python3 -m pytest -v -m gpu -p no:cacheprovider -p no:warnings -rf tests/bench/test_graph_timing.py \
    tests/bench/test_report.py >"$OUT/check-gpu-tests.log" 2>&1
  grep -E "^FAILED|^ERROR| passed| failed| error" "$OUT/check-gpu-tests.log" | tail -n 8
  timeout -k 5 "${T_TESTS:-400}" python3 -m pytest -v -n 12 -p no:cacheprovider -p no:warnings -rf tests/ops \
    >"$OUT/check-ops.log" 2>&1
  echo "== tests/ops: $(grep -c '] PASSED' "$OUT/check-ops.log") passed, $(grep -c '] FAILED' "$OUT/check-ops.log") failed"
  grep -E "^FAILED|^ERROR| passed| failed" "$OUT/check-ops.log" | tail -n 15
  ;;
rest)
  bash bench/session26_call.sh rest
  for impls in "triton" "triton torch_grouped_mm grouped"; do
    tag=$(echo "$impls" | tr ' ' '-')
    timeout -k 5 "${T_BENCH:-120}" python3 -m tilemoe bench --model mixtral-8x7b --dtype bf16 --impl $impls \
      --num-tokens 1024 --scenarios random imbalanced --imbalance-factor 3.0 --cuda-graph --graph-calls 10 --output-format all \
      --output-file "$OUT/rest-bench-$tag" >/dev/null 2>&1
    echo "== bench --impl $impls: $(($(date +%s) - start)) s"
    grep -E "gpu state|^\| triton|^## " "$OUT/rest-bench-$tag.md"
  done
  ;;
kernels)
  timeout -k 5 "${T_PROBE:-300}" python3 bench/layer_probe.py --points qwen3-30b-a3b:16384 gpt-oss-120b:16384 \
    --scenarios random imbalanced --rounds 5 2>&1 | tee "$OUT/layer_probe.txt" | cut -c1-150
  ;;
h200)
  if [[ $gpu != *H200* ]]; then
    echo "session27_call.sh h200: this GPU is ${gpu:-none}, not an H200: nothing tuned"
    exit 0
  fi
  TUNE_TAG=h200 BUDGET=${BUDGET:-420} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b \
    mixtral-8x7b --num-tokens ${T_H200:-1024 4096 16384} --scenarios random imbalanced 2>&1 | tail -n 8
  grep -E "^[a-z0-9./-]+ T=[0-9]+: " "$OUT/gpu_tune-h200.log" | sed -E "s/ KernelConfig\(.*\)( \[the config)/\1/" | head -n 24
  ;;
*)
  echo "session27_call.sh: unknown step $1 (check, rest, kernels or h200)"
  exit 2
  ;;
esac
echo "== session27 $1: $(($(date +%s) - start)) s"
