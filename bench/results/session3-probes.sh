#!/usr/bin/env bash
# The kernel_probe calls behind bench/results/h100-kernel-probe.md "Probe 5" (session 3), as they were run on
# nvidia-h100-x1 from a copy of the tree: `bash bench/results/session3-probes.sh flatten|bm256|a2`.
#   flatten: both GEMMs' persistent loops flattened (a local edit of that copy: `range(...)` -> `tl.range(...,
#            flatten=True)` in ops/_kernels/_fused_experts.py); bm256: 256-row tiles; a2: the old tree in ./ and the
#            new one (GEMM 2's TMA input, commit 4ef025d) in ./new, point by point in turn.
# Each warms the Triton cache in parallel processes first (16 cores), then times in one process.
set -u
export TRITON_CACHE_DIR=/tmp/tc
L="grouped_mm=0,tma=1,block_m=128,block_n1=128,block_k1=64,num_warps1=8,num_stages1=4,block_n2=256,block_k2=64,num_warps2=8,num_stages2=4"
probe() { PYTHONPATH=$PWD/src python3 bench/kernel_probe.py --no-breakdown --no-stats "$@"; }
case ${1:-} in
flatten)
  V=("grouped_mm=0,tma=1" "grouped_mm=0,tma=1,persistent=1" "grouped_mm=0,tma=1,persistent=1,num_stages1=3,num_stages2=3" "$L,persistent=1")
  P=(qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 qwen3-30b-a3b:1024 deepseek-v2-lite:16384 gpt-oss-120b:4096 mixtral-8x7b:4096 mixtral-8x7b:1024 flashmoe:8192)
  for p in "${P[@]}"; do probe --points "$p" --variants "${V[@]}" >/dev/null 2>&1 & done; wait
  probe --points "${P[@]}" --variants "${V[@]}" ;;
bm256)
  B="grouped_mm=0,tma=1,block_m=256,block_n1=64,block_k1=64,num_warps1=8,block_n2=128,block_k2=64,num_warps2=8"
  V=("$B,num_stages1=3,num_stages2=3" "$B,num_stages1=4,num_stages2=4" "$B,num_stages1=3,num_stages2=3,persistent=1" "$L"
     "grouped_mm=0,tma=1,block_m=256,block_n1=64,block_k1=64,num_warps1=8,num_stages1=4,block_n2=64,block_k2=64,num_warps2=8,num_stages2=4")
  P=(qwen3-30b-a3b:4096 qwen3-30b-a3b:16384 deepseek-v2-lite:4096 deepseek-v2-lite:16384 mixtral-8x7b:1024 mixtral-8x7b:4096 gpt-oss-120b:16384 flashmoe:8192)
  for p in "${P[@]}"; do probe --points "$p" --variants "${V[@]}" >/dev/null 2>&1 & done; wait
  probe --points "${P[@]}" --variants "${V[@]}" ;;
a2)
  V=("persistent=1" "$L" "$L,persistent=1" "$L,num_stages2=3" "$L,block_n2=128,num_warps2=4,num_stages2=4" "$L,block_n2=128,num_warps2=4,num_stages2=4,persistent=1")
  P=(qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 qwen3-30b-a3b:1024 deepseek-v2-lite:16384 deepseek-v2-lite:4096 gpt-oss-120b:4096 gpt-oss-120b:16384 mixtral-8x7b:4096 flashmoe:8192)
  for d in . new; do for p in "${P[@]}"; do (cd $d && probe --points "$p" --variants "${V[@]}" >/dev/null 2>&1) & done; done; wait
  for p in "${P[@]}"; do for d in . new; do echo "### $d"; (cd $d && probe --points "$p" --variants "${V[@]}"); done; done ;;
*) echo "usage: $0 flatten|bm256|a2" >&2; exit 2 ;;
esac
