#!/usr/bin/env bash
# Session 29's device calls (results under $OUT):
#   bash bench/session29_call.sh verify  the flat routing's order-free sums (commit 1f4d8dd: session 28's GPU check
#                                        found the decode GEMM 1's routing a last bit apart from the routing
#                                        kernel's at E = 35): tests/ops/test_route.py, the from_logits tests and
#                                        tests/ops/test_config_fuzz.py on the GPU, then session28_call.sh's fuzz step
#                                        (T_FUZZ, 330 s here, so the call fits its 600 s); ROUTE_AB=1: the ab step's
#                                        routing probe in between (carry ["bench/.trees"])
#   bash bench/session29_call.sh ab      the routing kernel of 1f4d8dd (fixed-point sums) against b1a6443's, in turn
#                                        (bench/route_program_probe.py --against; first, here: mkdir -p
#                                        bench/.trees/before && git show b1a6443:src/tilemoe/ops/_kernels/_route.py
#                                        >bench/.trees/before/_route.py; carry ["bench/.trees"]), then the kernels step
#   bash bench/session29_call.sh retune  (an H100) the issue-4 cells left (mixtral-8x7b at T = 1024 / 4096 / 16384,
#                                        qwen3-30b-a3b and gpt-oss-120b at 4096 / 16384) tuned again, random +
#                                        imbalanced, with the rematch resting (REMATCH_REST, now the default): the
#                                        entries were rematched back to back, at the power cap's sustained clock, not
#                                        the bench's (session 29's rest step); the H100 table comes back under $OUT
#                                        (commit it, then `cells`)
#   bash bench/session29_call.sh cells   (an H100) the issue-4 bench (gpu_check.sh triton) of those models at
#                                        T = 1024 / 4096 / 16384, `triton` in turn with its peers, the bmm ceiling too
#   bash bench/session29_call.sh fuzz | check | rest | kernels | h200   as session28_call.sh (fuzz: the logs in one
#                                        file, since a call brings back 8 files at most)
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session29 ${1:?step: verify, ab, retune, cells, fuzz, check, rest, kernels or h200} on ${gpu:-no GPU}"
fuzz() {
  bash bench/session28_call.sh fuzz
  # one file back, not twelve (a call brings back 8 files at most)
  for log in "$OUT"/fuzz-*.log; do echo "### $log"; cat "$log"; done >"$OUT/fuzz.log" && rm -f "$OUT"/fuzz-*.log
}
case $1 in
fuzz)
  fuzz
  ;;
verify)
  timeout -k 5 200 python3 -m pytest -v -n 12 -p no:cacheprovider -p no:warnings -rf tests/ops/test_route.py \
    tests/ops/test_config_fuzz.py tests/ops/test_fused_experts.py -k "route or from_logits or fuzz or unwritten" \
    >"$OUT/verify-tests.log" 2>&1
  log=$OUT/verify-tests.log
  echo "== verify tests: $(grep -c '] PASSED' "$log") passed, $(grep -c '] FAILED' "$log") failed"
  grep -E "^FAILED|^ERROR| passed| failed" "$OUT/verify-tests.log" | tail -n 10
  grep -E "^E  +(Assertion|[A-Za-z]*Error)" "$OUT/verify-tests.log" | cut -c1-700 | head -n 6
  [[ ${ROUTE_AB:-0} == 1 ]] && timeout -k 5 100 python3 bench/route_program_probe.py --against \
    bench/.trees/before/_route.py --points qwen3-30b-a3b:1 qwen3-30b-a3b:1024 qwen3-30b-a3b:16384 gpt-oss-120b:16384 \
    mixtral-8x7b:16384 2>&1 | tee "$OUT/route-ab.log" | tail -n 6
  T_FUZZ=${T_FUZZ:-330} fuzz
  ;;
ab)
  timeout -k 5 120 python3 bench/route_program_probe.py --against bench/.trees/before/_route.py --points \
    qwen3-30b-a3b:1 qwen3-30b-a3b:8 qwen3-30b-a3b:1024 qwen3-30b-a3b:16384 gpt-oss-120b:16384 mixtral-8x7b:16384 \
    2>&1 | tee "$OUT/route-ab.log" | tail -n 8
  bash bench/session28_call.sh kernels
  ;;
retune)
  # the six cells: mixtral at 1024 / 4096 / 16384, qwen3 and gpt-oss at 4096 / 16384 (gpt-oss 4096 is met: it comes
  # with the pair); the table each writes is the package's, which the second starts from
  TUNE_TAG=retune-mixtral BUDGET=${BUDGET_A:-200} bash bench/gpu_tune.sh --model mixtral-8x7b \
    --num-tokens 1024 4096 16384 --scenarios random imbalanced 2>&1 | tail -n 4
  TUNE_TAG=retune-moe BUDGET=${BUDGET_B:-230} bash bench/gpu_tune.sh --model qwen3-30b-a3b gpt-oss-120b \
    --num-tokens 4096 16384 --scenarios random imbalanced 2>&1 | tail -n 4
  grep -h -E " T=[0-9]+: " "$OUT"/gpu_tune-retune-*.log | cut -c1-300 | head -n 20
  ;;
cells)
  TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b gpt-oss-120b mixtral-8x7b"} TRITON_TOKENS="1024 4096 16384" \
    T_TRITON=${T_TRITON:-150} bash bench/gpu_check.sh triton 2>&1 | tail -n 45
  ;;
check | rest | kernels | h200)
  bash bench/session28_call.sh "$1"
  ;;
*)
  echo "session29_call.sh: unknown step $1 (verify, ab, retune, cells, fuzz, check, rest, kernels or h200)"
  exit 2
  ;;
esac
echo "== session29 $1: $(($(date +%s) - start)) s"
