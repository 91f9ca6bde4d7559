#!/usr/bin/env bash
# Session 21's device calls, written when no device time was left to run them (results under $OUT):
#   bash bench/session21_call.sh diag    on an H100: why async_act1 lost at the entries that gather x (bench/NOTES.md,
#                                        version 23): their GEMM 1 with 3 ring stages instead of 4 (kernel_probe
#                                        --variants num_stages1=3), and with the gathering producer in 2 warps
#                                        instead of 4 (the gather2 tree in turn); then the epilogue probe's rows that
#                                        session 20 lacked (noepi1 / noepi2 of the Triton GEMMs at T=16384). First
#                                        python3 bench/skip_trees.py gather2 noepi1 noepi2; carry bench/.trees
#   bash bench/session21_call.sh ncu     DRAM bytes of qwen3-30b-a3b T=16384's GEMM 2 with and without its atomic adds
#                                        (main's src, then the noepi2 tree), before a column-group tile order
#                                        (bench/NOTES.md, "After session 20"); carry bench/.trees
#   bash bench/session21_call.sh h200    on an H200 only: the H200 table's first Gluon entries (bench/session17_h200.sh
#                                        at T_H200 tokens of H200_MODELS, BUDGET seconds of search); the table comes
#                                        back under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "== $gpu"
start=$(date +%s)
points="qwen3-30b-a3b:4096 mixtral-8x7b:1024 deepseek-v2-lite:4096"
case ${1:?step: diag, ncu or h200} in
diag)
  # shellcheck disable=SC2086  # several points
  timeout -k 5 "${T_STAGES:-80}" python3 bench/kernel_probe.py --no-breakdown --no-stats --variants num_stages1=3 \
    --points $points 2>&1 | grep -v Warning | tee "$OUT/stages3.txt" | grep -E "^## |base|num_stages"
  # shellcheck disable=SC2086
  timeout -k 5 "${T_GATHER:-130}" python3 bench/ab_probe.py --trees main=src gather2=bench/.trees/gather2/src \
    --rounds 2 --points $points 2>&1 | grep -v Warning | tee "$OUT/gather2.txt" | tail -n 8
  timeout -k 5 "${T_SKIP:-150}" python3 bench/ab_probe.py --trees main=src noepi1=bench/.trees/noepi1/src \
    noepi2=bench/.trees/noepi2/src --probe-options=--allow-wrong --rounds 2 \
    --points qwen3-30b-a3b:16384 gpt-oss-120b:16384 2>&1 | grep -v Warning | tee "$OUT/skip16384.txt" | tail -n 8
  ;;
ncu)
  ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
  for name in main noepi2; do
    tree=src
    [[ $name == main ]] || tree=bench/.trees/$name/src
    PYTHONPATH=$PWD/$tree timeout -k 5 "${T_NCU:-90}" "$ncu_bin" --profile-from-start off --clock-control none \
      -k regex:gemm2 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_red.sum,lts__t_sector_hit_rate.pct,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed \
      --section MemoryWorkloadAnalysis_Tables \
      python3 bench/ncu_probe.py --point qwen3-30b-a3b:16384 --scenario random >"$OUT/ncu_gemm2_$name.txt" 2>&1
    echo "== ncu, qwen3 T=16384 GEMM 2, $name"
    grep -E "gpu__time|dram__|lts__" "$OUT/ncu_gemm2_$name.txt" | head -n 12
  done
  ;;
h200)
  # session17_h200.sh's Gluon variants (it checks for an H200 itself) on the points that fit BUDGET
  H200_MODELS=${H200_MODELS:-qwen3-30b-a3b mixtral-8x7b} T_H200=${T_H200:-4096} BUDGET=${BUDGET:-150} \
    bash bench/session17_h200.sh
  ;;
*)
  echo "session21_call.sh: unknown step $1 (diag, ncu or h200)"
  exit 2
  ;;
esac
echo "== $1: $(($(date +%s) - start)) s"
