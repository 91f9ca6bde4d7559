#!/usr/bin/env bash
# Session 25's device calls (results under $OUT). Machines come rarely (session 24: 2 of 13 calls ran; session 25: 3
# of 11), and a call naming nvidia-h200 takes whichever GPU comes (but costs 180 s where none starts, against 90 for
# nvidia-h100-x1), so `auto` picks the work by the GPU it finds:
#   bash bench/session25_call.sh auto    on an H100: run 25's half named by TRITON_MODELS (session24_call.sh bench);
#                                        on an H200: the H200 table's first Gluon entries (session21_call.sh h200)
#   bash bench/session25_call.sh align   session24_call.sh align (the sorted align's GPU tests and three probes)
#   bash bench/session25_call.sh zeros   align_clears_out off against the entries that took it (tuned while the one-hot
#                                        scatter's 33-44 us hid the zeros; the sorted one takes ~7-15 us), alone and with
#                                        gemm1_clears_out (the zeros under a Triton GEMM 1's loads instead), random +
#                                        imbalanced, the table under $OUT
#   bash bench/session25_call.sh ab256   mixtral-8x7b T=256 (met in run 21 at 0.983 ms, 1.024-1.035 ms since): HEAD
#                                        against run 21's tree (c2a39e4) and HEAD with run 21's H100 table, in turn
#                                        (bench/ab_probe.py, kernel times); first, here: bash bench/ab_tree.sh r21 c2a39e4
#                                        && bash bench/ab_tree.sh r21table c2a39e4
#                                        src/tilemoe/tuning_tables/nvidia_h100_80gb_hbm3.json; carry ["bench/.trees"]
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
echo "== session25 ${1:?step: auto, align, zeros or ab256} on ${gpu:-no GPU}"
case $1 in
auto)
  case $gpu in
  *H100*) bash bench/session24_call.sh bench ;;
  *H200*) bash bench/session21_call.sh h200 2>&1 | tail -n 30 ;;
  *) echo "session25_call.sh: no H100 or H200 here (${gpu:-none})"; exit 2 ;;
  esac
  ;;
align) bash bench/session24_call.sh align ;;
ab256)
  export PYTHONPATH=$PWD/src TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
  timeout -k 5 "${T_AB:-240}" python3 bench/ab_probe.py --trees main=src r21=bench/.trees/r21/src \
    r21table=bench/.trees/r21table/src --points mixtral-8x7b:256 mixtral-8x7b:64 --rounds "${ROUNDS:-5}" \
    --timeout 120 2>&1 | tail -n 20
  ;;
zeros)
  TUNE_TAG=zeros BUDGET=${BUDGET:-150} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b \
    mixtral-8x7b --num-tokens 1024 4096 16384 --scenarios random imbalanced \
    --variants align_clears_out=0 align_clears_out=0,gemm1_clears_out=1 2>&1 | tail -n 12
  ;;
*)
  echo "session25_call.sh: unknown step $1 (auto, align, zeros or ab256)"
  exit 2
  ;;
esac
