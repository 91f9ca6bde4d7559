#!/usr/bin/env bash
# Session 22's device calls (results under $OUT):
#   bash bench/session22_call.sh l2      on an H100: is the ridge points' GEMM bound by the L2? Nsight Compute's speed of
#                                        light and memory tables of the table entries' GEMMs at qwen3-30b-a3b T=4096 and
#                                        mixtral-8x7b T=1024 (random routing), and of cuBLAS's batched GEMMs on the same
#                                        rows (the bench's bmm ceiling) beside them (bench/NOTES.md, version 24)
#   bash bench/session22_call.sh window  on an H100: GEMM 2's atomic adds at T=16384 with an L2 persisting window over the
#                                        output (bench/l2_window_probe.py), qwen3-30b-a3b and gpt-oss-120b, in turn
#   bash bench/session22_call.sh tune    deeper weight pipelines at the memory-bound cells near their line (deepseek-v2-lite
#                                        and qwen3-30b-a3b T=1024: GEMM 2 streams its weights at ~77% of the copy rate,
#                                        GEMM 1 at ~85%; mixtral-8x7b T=256): tilemoe tune --variants of 32-wide k steps
#                                        and more stages, random + imbalanced, merged into the H100 table under $OUT
#   bash bench/session22_call.sh diag|ncu|h200     session21_call.sh's steps
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
start=$(date +%s)
case ${1:?step: l2, window, tune, diag, ncu or h200} in
l2)
  points=${L2_POINTS:-"qwen3-30b-a3b:4096 mixtral-8x7b:1024"}
  for p in $points; do  # compile first, all at once (CPU-bound), unprofiled
    timeout -k 5 120 python3 bench/ncu_probe.py --point "$p" >/dev/null 2>&1 &
  done
  wait
  ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
  for p in $points; do
    report=$OUT/ncu_l2_${p/:/_}.txt
    timeout -k 5 "${T_NCU:-100}" "$ncu_bin" --profile-from-start off --clock-control none -k regex:"gemm|nvjet|xmma|cutlass" \
      --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,lts__t_bytes.sum,lts__t_sector_hit_rate.pct \
      python3 bench/ncu_probe.py --point "$p" --bmm >"$report" 2>&1
    echo "== $p (entry's GEMMs, then cuBLAS's two bmm)"
    grep -E "^  [A-Za-z_0-9]*(gemm|nvjet|xmma|cutlass)|^profiled|Duration|SM Frequency|Compute \(SM\) Throughput|\
DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|dram__bytes_read|lts__t_bytes|lts__t_sector_hit" \
      "$report" | head -n 60
  done
  ;;
tune)
  BUDGET=${BUDGET1:-150} bash bench/gpu_tune.sh --model deepseek-v2-lite qwen3-30b-a3b --num-tokens 1024 \
    --scenarios random imbalanced --variants block_k2=32,num_stages2=6 block_k2=32,num_stages2=8 \
    block_k1=32,num_stages1=8 block_k1=32,num_stages1=8,block_k2=32,num_stages2=6 2>&1 | tail -n 12
  mv "$OUT/gpu_tune.log" "$OUT/gpu_tune_t1024.log"
  BUDGET=${BUDGET2:-100} bash bench/gpu_tune.sh --model mixtral-8x7b --num-tokens 256 --scenarios random imbalanced \
    --variants num_stages2=5 num_stages2=8 block_k2=32,num_stages2=8 block_k1=32,num_stages1=10 2>&1 | tail -n 12
  ;;
window)
  # shellcheck disable=SC2086  # several points
  timeout -k 5 "${T_WINDOW:-150}" python3 bench/l2_window_probe.py \
    --points ${WINDOW_POINTS:-qwen3-30b-a3b:16384 gpt-oss-120b:16384} 2>&1 | grep -v Warning | tee "$OUT/window.txt"
  ;;
diag | ncu | h200)
  bash bench/session21_call.sh "$1"
  ;;
*)
  echo "session22_call.sh: unknown step $1 (l2, window, tune, diag, ncu or h200)"
  exit 2
  ;;
esac
echo "== session22 $1: $(($(date +%s) - start)) s"
