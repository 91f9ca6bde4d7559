#!/usr/bin/env bash
# Session 19's device calls (one H100), reports under $OUT, a short summary last.
#   bash bench/session19_call.sh 1   the fold / swap tests (bf16 on the GPU), then `tilemoe tune --variants`:
#                                    swap_tails1 at the ridge points (qwen3 / deepseek T=4096, mixtral T=1024) in
#                                    their Gluon entries and in the Triton-GEMM-1 form; fold_gemm2 and swap_tails1
#                                    at gpt-oss-120b T=4096
#   bash bench/session19_call.sh 2   gemm1_clears_out / swap_tails1 at qwen3 / deepseek T=1024, swap_tails1 at the
#                                    four models' T=16384 and mixtral T=64 / 256; bench/align_probe.py and
#                                    router_dot_probe.py
# As run at 6f08c4a (bench/results/session19-swap-align.md, calls 1-2). Since that commit's revert the Gluon entries
# refuse swap_tails1, and the tuner drops those variants.
# On an H200 either stage runs bench/session17_h200.sh instead (the H200 table's Gluon entries).
# Every tune times random + imbalanced routing, in turn, and writes nothing into the package: each run's table
# (entries + measured records) comes back as $OUT/tune_<label>.json.
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TILEMOE_CACHE_DIR=/tmp/tilemoe-cache
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

# GEMM 1 in Triton (non-persistent, x gathered by token) behind the entry's Gluon GEMM 2
tri=gluon=0,gluon2=1,gluon_gather=0,persistent1=0

tune() {  # tune LABEL BUDGET_S ARGS...: the variants' times against the entry
  local label=$1 budget=$2
  shift 2
  timeout -k 5 $((budget + 60)) python3 -m tilemoe tune --budget-s "$budget" --scenarios random imbalanced \
    --out "$OUT/tune_$label.json" "$@" >"$OUT/tune_$label.log" 2>&1
  echo "== tune $label: exit $?"
  grep -A12 "^variants" "$OUT/tune_$label.log" | grep -v "^--$"
}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
if [[ $gpu == *H200* ]]; then  # a call may come as an H200: then its table's Gluon entries (never tuned there)
  BUDGET=${BUDGET:-380} bash bench/session17_h200.sh
  exit
fi
case ${1:-1} in
1)
  timeout -k 5 170 python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_fused_experts.py -k "fold or swap" \
    >"$OUT/tests_fold_swap.txt" 2>&1
  echo "== tests fold / swap: exit $?"
  tail -n 3 "$OUT/tests_fold_swap.txt"
  tune ridge4096 110 --model qwen3-30b-a3b deepseek-v2-lite --num-tokens 4096 \
    --variants swap_tails1=1 "$tri" "$tri,swap_tails1=1"
  tune mixtral1024 80 --model mixtral-8x7b --num-tokens 1024 \
    --variants swap_tails1=1 "$tri,sorted_x=0" "$tri,sorted_x=0,swap_tails1=1"
  tune gptoss4096 90 --model gpt-oss-120b --num-tokens 4096 \
    --variants fold_gemm2=0 swap_tails1=1 swap_tails1=1,fold_tails=0
  ;;
2)
  tune t1024 90 --model qwen3-30b-a3b deepseek-v2-lite --num-tokens 1024 \
    --variants gemm1_clears_out=1 swap_tails1=1 swap_tails1=1,split_tail=0
  tune t16384 110 --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b mixtral-8x7b --num-tokens 16384 \
    --variants swap_tails1=1 swap_tails1=1,persistent_tails=1
  tune mixtral_small 60 --model mixtral-8x7b --num-tokens 64 256 --variants swap_tails1=1 swap_tails1=1,split_tail=0
  (cd bench && timeout -k 5 80 python3 align_probe.py >"$OUT/align_probe.txt" 2>&1)
  echo "== align probe: exit $?"
  grep -E "^## |DIFFERS|kernels" "$OUT/align_probe.txt"
  (cd bench && timeout -k 5 80 python3 router_dot_probe.py >"$OUT/router_dot_probe.txt" 2>&1)
  echo "== router dot probe: exit $?"
  cat "$OUT/router_dot_probe.txt"
  ;;
esac
