#!/usr/bin/env bash
# Session 20's device calls (results under $OUT):
#   bash bench/session20_call.sh skip   what each expert GEMM's epilogue costs where it is exposed: this checkout's
#                                       src against bench/skip_trees.py's trees (GEMM 1 without its activation, GEMM 1
#                                       without its epilogue, GEMM 2 without its atomics), in turn (bench/ab_probe.py);
#                                       carry bench/.trees (python3 bench/skip_trees.py first); then the kernels of
#                                       mixtral-8x7b T = 64 / 256 and deepseek-v2-lite T=1024 one by one, and the
#                                       router + routing against route_tokens (bench/route_tokens_probe.py)
#   bash bench/session20_call.sh ab     the GPU tests of session 20's code, async_act1 against the Gluon GEMM 1
#                                       entries, the fast sigmoid against the default in turn (python3
#                                       bench/skip_trees.py fastsig first; carry bench/.trees), the router parts
#                                       re-timed. Ran in session 21 at cfd2834; async_act1 and the fastsig tree are
#                                       reverted since (e365b08), so this step no longer runs on main
#   TRITON_MODELS="..." bash bench/session20_call.sh bench     the issue-4 bench (gpu_check.sh triton)
#   bash bench/session20_call.sh h200   on an H200 only: the H200 table's Gluon entries (bench/session17_h200.sh), then
#                                       the functional GPU tests on the table as merged
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "== $gpu"
start=$(date +%s)
case ${1:?step: skip, ab, bench or h200} in
skip)
  # the router GEMM + routing: route_tokens' GPU tests, then cuBLAS + route_fast against route_tokens
  timeout -k 5 120 python3 -m pytest -q -n 8 -p no:cacheprovider -m gpu tests/ops/test_route.py \
    tests/ops/test_router.py 2>&1 | tail -n 4
  timeout -k 5 100 python3 bench/route_tokens_probe.py 2>&1 | grep -v Warning | tee "$OUT/route_tokens.txt"
  trees="main=src"
  for name in noact1 noepi1 noepi2; do trees+=" $name=bench/.trees/$name/src"; done
  # shellcheck disable=SC2086  # several trees and points
  timeout -k 5 "${T_SKIP:-280}" python3 bench/ab_probe.py --trees $trees --probe-options=--allow-wrong \
    --rounds "${AB_ROUNDS:-2}" --points ${SKIP_POINTS:-qwen3-30b-a3b:4096 mixtral-8x7b:1024 mixtral-8x7b:4096 \
    qwen3-30b-a3b:16384 gpt-oss-120b:16384} 2>&1 | grep -v Warning | tee "$OUT/skip_probe.txt"
  # where the memory-bound near misses spend their time, kernel by kernel
  timeout -k 5 80 python3 bench/kernel_probe.py --points mixtral-8x7b:256 deepseek-v2-lite:1024 mixtral-8x7b:64 \
    --no-stats 2>&1 | grep -v Warning >"$OUT/breakdown.txt"
  grep -E "^## |^triton|^torch_grouped|^ +[0-9.]+ us|^dense" "$OUT/breakdown.txt"
  ;;
ab)
  # the GPU tests of session 20's code (run again with TILEMOE_FAST_SIGMOID=1 exported for the fast sigmoid's)
  timeout -k 5 "${T_TESTS:-170}" python3 -m pytest -q -n 12 -p no:cacheprovider -m gpu tests/ops/test_route.py \
    tests/ops/test_router.py tests/ops/test_gluon_experts.py tests/impls/test_triton.py \
    -k "route or router or gluon or sweep or graph or compile or atomic or decode" 2>&1 | tail -n 4
  # async_act1 against each Gluon GEMM 1 entry (one process, the variant after the entry)
  timeout -k 5 "${T_ACT:-80}" python3 bench/kernel_probe.py --no-breakdown --no-stats --variants async_act1=1 \
    --points ${ACT_POINTS:-qwen3-30b-a3b:4096 mixtral-8x7b:1024 mixtral-8x7b:4096 deepseek-v2-lite:4096} 2>&1 \
    | grep -v Warning | tee "$OUT/async_act.txt" | grep -E "^## |base|async"
  # shellcheck disable=SC2086  # several points
  timeout -k 5 "${T_AB:-170}" python3 bench/ab_probe.py --trees main=src fastsig=bench/.trees/fastsig/src --rounds 2 \
    --points ${AB_POINTS:-qwen3-30b-a3b:4096 mixtral-8x7b:1024 gpt-oss-120b:16384 qwen3-30b-a3b:1024} 2>&1 \
    | grep -v Warning | tee "$OUT/ab_sigmoid.txt" | tail -n 12
  timeout -k 5 "${T_ROUTE:-80}" python3 bench/route_tokens_probe.py --tokens ${ROUTE_TOKENS:-16 256 1024 2048 4096 16384} \
    2>&1 | grep -v Warning \
    | tee "$OUT/route_tokens.txt"
  ;;
bench)
  # the issue-4 bench (gpu_check.sh triton) of TRITON_MODELS
  TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b deepseek-v2-lite"} T_TRITON=${T_TRITON:-150} \
    bash bench/gpu_check.sh triton 2>&1 | tail -n 40
  ;;
h200)
  if [[ $gpu != *H200* ]]; then
    echo "session20_call.sh h200: not an H200, nothing run"
    exit 0
  fi
  BUDGET=${BUDGET:-330} bash bench/session17_h200.sh
  echo "== tune: $(($(date +%s) - start)) s"
  timeout -k 5 170 python3 -m pytest -q -n 12 -p no:cacheprovider -m gpu tests/test_functional.py tests/impls \
    >"$OUT/tests_h200.txt" 2>&1
  tail -n 3 "$OUT/tests_h200.txt"
  ;;
*)
  echo "session20_call.sh: unknown step $1 (skip, ab, bench or h200)"
  exit 2
  ;;
esac
echo "== $1: $(($(date +%s) - start)) s"
