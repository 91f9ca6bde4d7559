#!/usr/bin/env bash
# Session 23's next device calls, written when its device time was spent (results under $OUT):
#   bash bench/session23_call.sh gather  on an H100: gpt-oss-120b T=16384 without the sorted copy of x (269 us of the
#                                        layer, bench/NOTES.md version 25): the gathering Gluon GEMM 1 (alone, and with
#                                        the async-combine Gluon GEMM 2) and the Gluon GEMM 2 alone against the entry,
#                                        tilemoe tune --variants, random + imbalanced, merged into the H100 table under
#                                        $OUT (all three built for sm_90 with Triton 3.6 in session 23, no spills)
#   bash bench/session23_call.sh h200    on an H200 only: the H200 table's first Gluon entries (session21_call.sh h200)
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
start=$(date +%s)
case ${1:?step: gather or h200} in
gather)
  BUDGET=${BUDGET:-80} bash bench/gpu_tune.sh --model gpt-oss-120b --num-tokens 16384 --scenarios random imbalanced \
    --variants gluon1=1,gluon_gather=1,sorted_x=0 gluon=1,gluon_gather=1,sorted_x=0,async_combine=1,num_stages2=3 \
    gluon2=1,async_combine=1,num_stages2=3 2>&1 | tail -n 12
  ;;
h200)
  bash bench/session21_call.sh h200
  ;;
*)
  echo "session23_call.sh: unknown step $1 (gather or h200)"
  exit 2
  ;;
esac
echo "== session23 $1: $(($(date +%s) - start)) s"
