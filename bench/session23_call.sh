#!/usr/bin/env bash
# Session 23's next device calls, written when its device time was spent (results under $OUT):
#   bash bench/session23_call.sh gather  on an H100: gpt-oss-120b T=16384 without the sorted copy of x (269 us of the
#                                        layer, bench/NOTES.md version 25): the gathering Gluon GEMM 1 (alone, and with
#                                        the async-combine Gluon GEMM 2) and the Gluon GEMM 2 alone against the entry,
#                                        tilemoe tune --variants, random + imbalanced, merged into the H100 table under
#                                        $OUT (all three built for sm_90 with Triton 3.6 in session 23, no spills)
#   bash bench/session23_call.sh zeros   on an H100: the atomic combine's output cleared by the align's scatter programs
#                                        (KernelConfig.align_clears_out, session 23, interpreter-tested only) instead of a
#                                        fill kernel (6-45 us at T >= 4096), tilemoe tune --variants against every entry
#                                        of the four bench models at T = 1024 / 4096 / 16384, random + imbalanced
#   bash bench/session23_call.sh h200    on an H200 only: the H200 table's first Gluon entries (session21_call.sh h200)
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
start=$(date +%s)
case ${1:?step: gather, zeros or h200} in
gather)
  TUNE_TAG=gather BUDGET=${BUDGET:-80} bash bench/gpu_tune.sh --model gpt-oss-120b --num-tokens 16384 --scenarios random imbalanced \
    --variants gluon1=1,gluon_gather=1,sorted_x=0 gluon=1,gluon_gather=1,sorted_x=0,async_combine=1,num_stages2=3 \
    gluon2=1,async_combine=1,num_stages2=3 2>&1 | tail -n 12
  ;;
zeros)
  # gemm1_clears_out=0: the T=1024 entries that clear the output in GEMM 1 take the align's clearing instead
  TUNE_TAG=zeros BUDGET=${BUDGET:-150} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b mixtral-8x7b \
    --num-tokens 1024 4096 16384 --scenarios random imbalanced --variants align_clears_out=1,gemm1_clears_out=0 2>&1 |
    tail -n 12
  ;;
h200)
  bash bench/session21_call.sh h200
  ;;
*)
  echo "session23_call.sh: unknown step $1 (gather, zeros or h200)"
  exit 2
  ;;
esac
echo "== session23 $1: $(($(date +%s) - start)) s"
