#!/usr/bin/env bash
# Session 15, call C: the four bench models' T = 1024 / 4096 / 16384 table entries against two async_combine variants
# (tilemoe tune --variants, in turn, random + imbalanced), merged into the device's table; then `tilemoe bench` (run 20)
# for qwen3-30b-a3b and gpt-oss-120b on that table. Results under $OUT (the tuned table, results.tar.gz, logs).
cb="gluon=1,gluon1=0,gluon2=0,tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_m=128,block_n1=128"
cb="$cb,block_k1=64,gluon_gather=1,persistent=1,num_warps2=8,block_n2=256,block_k2=64,num_stages2=3,pingpong2=0"
cb="$cb,async_combine=1,expert_groups=1,group_m1=16,group_m2=16"
cb2="gluon=0,gluon1=0,gluon_gather=0,gluon2=1,tma=1,persistent=1,num_warps2=8,block_n2=256,block_k2=64,num_stages2=3"
cb2="$cb2,pingpong2=0,async_combine=1"
BUDGET=${BUDGET:-180} bash bench/gpu_tune.sh --model qwen3-30b-a3b deepseek-v2-lite gpt-oss-120b mixtral-8x7b \
  --num-tokens 1024 4096 16384 --scenarios random imbalanced --variants "$cb" "$cb2" 2>&1 | tail -n 45
T_TRITON=${T_TRITON:-140} TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b gpt-oss-120b"} bash bench/gpu_check.sh triton \
  2>&1 | tail -n 60
