#!/usr/bin/env bash
# Session 25's device calls (results under $OUT). Machines came rarely (session 24: 2 of 13 calls ran), so a call
# names nvidia-h200, which takes whichever GPU comes, and this script picks the work by the GPU it finds:
#   bash bench/session25_call.sh auto    on an H100: run 25's half named by TRITON_MODELS (session24_call.sh bench);
#                                        on an H200: the H200 table's first Gluon entries (session21_call.sh h200)
#   bash bench/session25_call.sh align   session24_call.sh align (the sorted align's GPU tests and three probes)
#   bash bench/session25_call.sh zeros   session24_call.sh zeros (align_clears_out off against the entries that took it)
set -uo pipefail
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
echo "== session25 ${1:?step: auto, align or zeros} on ${gpu:-no GPU}"
case $1 in
auto)
  case $gpu in
  *H100*) bash bench/session24_call.sh bench ;;
  *H200*) bash bench/session21_call.sh h200 2>&1 | tail -n 30 ;;
  *) echo "session25_call.sh: no H100 or H200 here (${gpu:-none})"; exit 2 ;;
  esac
  ;;
align | zeros) bash bench/session24_call.sh "$1" ;;
*)
  echo "session25_call.sh: unknown step $1 (auto, align or zeros)"
  exit 2
  ;;
esac
