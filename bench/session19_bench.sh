#!/usr/bin/env bash
# Session 19's last device call: on an H100, the align GPU tests and the issue-4 bench of qwen3-30b-a3b and
# deepseek-v2-lite (gpu_check.sh triton, whose T=1024 cells the align's chunk and the new entries touch); on an H200,
# the H200 table's Gluon entries instead (bench/session17_h200.sh). Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "== $gpu"
if [[ $gpu == *H200* ]]; then
  BUDGET=${BUDGET:-380} bash bench/session17_h200.sh
  exit
fi
timeout -k 5 60 python3 -m pytest -q -p no:cacheprovider tests/ops/test_align.py -m gpu 2>&1 | tail -n 2
TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b deepseek-v2-lite"} T_TRITON=${T_TRITON:-150} bash bench/gpu_check.sh triton \
  2>&1 | tail -n 70
