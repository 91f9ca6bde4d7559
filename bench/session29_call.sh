#!/usr/bin/env bash
# Session 29's device calls (results under $OUT):
#   bash bench/session29_call.sh verify  the flat routing's order-free sums (commit 1f4d8dd: session 28's GPU check
#                                        found the decode GEMM 1's routing a last bit apart from the routing
#                                        kernel's at E = 35): tests/ops/test_route.py, the from_logits tests and
#                                        tests/ops/test_config_fuzz.py on the GPU, then session28_call.sh's fuzz step
#                                        (T_FUZZ, 330 s here, so the call fits its 600 s)
#   bash bench/session29_call.sh fuzz | check | rest | kernels | h200   as session28_call.sh
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session29 ${1:?step: verify, fuzz, check, rest, kernels or h200} on ${gpu:-no GPU}"
case $1 in
verify)
  timeout -k 5 200 python3 -m pytest -v -n 12 -p no:cacheprovider -p no:warnings -rf tests/ops/test_route.py \
    tests/ops/test_config_fuzz.py tests/ops/test_fused_experts.py -k "route or from_logits or fuzz or unwritten" \
    >"$OUT/verify-tests.log" 2>&1
  echo "== verify tests: $(grep -c '] PASSED' "$OUT/verify-tests.log") passed, $(grep -c '] FAILED' "$OUT/verify-tests.log") failed"
  grep -E "^FAILED|^ERROR| passed| failed" "$OUT/verify-tests.log" | tail -n 10
  T_FUZZ=${T_FUZZ:-330} bash bench/session28_call.sh fuzz
  ;;
fuzz | check | rest | kernels | h200)
  bash bench/session28_call.sh "$1"
  ;;
*)
  echo "session29_call.sh: unknown step $1 (verify, fuzz, check, rest, kernels or h200)"
  exit 2
  ;;
esac
echo "== session29 $1: $(($(date +%s) - start)) s"
