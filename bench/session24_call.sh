#!/usr/bin/env bash
# Session 24's device calls (results under $OUT):
#   bash bench/session24_call.sh align   the align's, the routing's and align_clears_out's tests on the GPU, then
#                                        bench/align_probe.py by chunk, with and without the fused scan, at qwen3 /
#                                        deepseek T=4096 (graphs in turn, per-kernel times), then
#                                        bench/route_program_probe.py (tokens a routing program) and
#                                        bench/sorted_copy_probe.py (x's sorted copy by token). Its first form (call
#                                        2) timed three ways to rank a chunk's slots; the sort won everywhere and alone
#                                        is kept
#   TRITON_MODELS="..." bash bench/session24_call.sh bench   the issue-4 bench (bench/gpu_check.sh triton)
#   bash bench/session24_call.sh zeros   align_clears_out off against the entries that took it (tuned with the one-hot
#                                        scatter, under whose 33-44 us the zeros hid; the sorted one takes ~7-15 us),
#                                        tilemoe tune --variants, random + imbalanced, the table under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
start=$(date +%s)
case ${1:?step: align, zeros or bench} in
align)
  timeout -k 5 "${T_TESTS:-120}" python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_align.py \
    tests/ops/test_route.py 2>&1 | tail -n 3
  timeout -k 5 90 python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_fused_experts.py -k "align_clears or zeros or sorted_copy" \
    2>&1 | tail -n 2
  echo "== tests: $(($(date +%s) - start)) s"
  cd bench || exit 1
  probe() { timeout -k 5 "${T_PROBE:-100}" python3 align_probe.py --rounds "${ROUNDS:-10}" "$@" 2>&1 | grep -v -i warn \
    | tee -a "$OUT/align_forms.txt"; }
  probe --points ${ALIGN_POINTS:-qwen3-30b-a3b:4096 deepseek-v2-lite:4096} --chunks 128 256
  timeout -k 5 60 python3 route_program_probe.py 2>&1 | grep -v -i warn | tee "$OUT/route_program.txt"
  timeout -k 5 60 python3 sorted_copy_probe.py 2>&1 | grep -v -i warn | tee "$OUT/sorted_copy.txt"
  ;;
zeros)
  TUNE_TAG=zeros BUDGET=${BUDGET:-150} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b \
    mixtral-8x7b --num-tokens 1024 4096 16384 --scenarios random imbalanced --variants align_clears_out=0 2>&1 |
    tail -n 12
  ;;
bench)
  TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b deepseek-v2-lite"} T_TRITON=${T_TRITON:-150} \
    bash bench/gpu_check.sh triton 2>&1 | tail -n 40
  ;;
*)
  echo "session24_call.sh: unknown step $1 (align, zeros or bench)"
  exit 2
  ;;
esac
echo "== session24 $1: $(($(date +%s) - start)) s"
