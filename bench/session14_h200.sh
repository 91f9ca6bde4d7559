#!/usr/bin/env bash
# Session 14, H200 call: the Gluon GPU tests (ping-pong, gluon1 / gluon2, the gather with H not a multiple of 64),
# then the H200 table's bench-model entries against expert-grouped and Gluon variants (tilemoe tune --variants).
g1="tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_n1=128,gluon_gather=1"
pp2="block_n2=128,pingpong2=1,persistent=1,num_warps2=8"
eg="expert_groups=1,group_m1=16,group_m2=16"
PYTHONPATH=$PWD/src timeout -k 5 "${T_TESTS:-120}" python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_gluon_experts.py 2>&1 |
  tail -n 6
BUDGET=${BUDGET:-200} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b mixtral-8x7b \
  --num-tokens 1024 4096 16384 --scenarios random imbalanced \
  --variants $eg gluon1=1,$g1,$eg gluon=1,$g1,$pp2,num_stages2=6,$eg gluon2=1,$pp2,num_stages2=6,$eg 2>&1 | tail -n 45
