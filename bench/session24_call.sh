#!/usr/bin/env bash
# Session 24's device calls (results under $OUT):
#   bash bench/session24_call.sh align   the align's and the routing's tests on the GPU, then bench/align_probe.py by chunk, with and
#                                        without the fused scan, at the layer's T = 1024 / 4096 / 16384 points (graphs
#                                        in turn, per-kernel times). Ran first (call 2) with three
#                                        ways to rank a step's slots; the sort won at every point and is the only one
#                                        kept, so this step now times the chunks and the fused scan of the sort;
#                                        then the route tests and bench/route_program_probe.py (tokens a program)
#   TRITON_MODELS="..." bash bench/session24_call.sh bench   the issue-4 bench (bench/gpu_check.sh triton)
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
start=$(date +%s)
case ${1:?step: align or bench} in
align)
  timeout -k 5 "${T_TESTS:-120}" python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_align.py \
    tests/ops/test_route.py 2>&1 | tail -n 3
  timeout -k 5 90 python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_fused_experts.py -k "align_clears or zeros" \
    2>&1 | tail -n 2
  echo "== tests: $(($(date +%s) - start)) s"
  cd bench || exit 1
  probe() { timeout -k 5 "${T_PROBE:-100}" python3 align_probe.py --rounds "${ROUNDS:-10}" "$@" 2>&1 | grep -v -i warn \
    | tee -a "$OUT/align_forms.txt"; }
  probe --points ${ALIGN_POINTS:-qwen3-30b-a3b:4096 deepseek-v2-lite:4096} --chunks 128 256
  timeout -k 5 60 python3 route_program_probe.py 2>&1 | grep -v -i warn | tee "$OUT/route_program.txt"
  ;;
bench)
  TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b deepseek-v2-lite"} T_TRITON=${T_TRITON:-150} \
    bash bench/gpu_check.sh triton 2>&1 | tail -n 40
  ;;
*)
  echo "session24_call.sh: unknown step $1 (align or bench)"
  exit 2
  ;;
esac
echo "== session24 $1: $(($(date +%s) - start)) s"
