#!/usr/bin/env bash
# Session 18's device call: on an H200, the H200 table's Gluon entries first (bench/session17_h200.sh); on either
# card, bench/session18_layer.sh (the bench's layer against its parts, and ncu at qwen3-30b-a3b T=1024).
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "== $gpu"
if [[ $gpu == *H200* ]]; then
  BUDGET=${BUDGET:-360} bash bench/session17_h200.sh
fi
bash bench/session18_layer.sh
