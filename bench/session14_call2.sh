g1="tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,block_n1=128,gluon_gather=1"
pp2="block_n2=128,pingpong2=1,persistent=1,num_warps2=8"
timeout -k 5 130 python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_gluon_experts.py 2>&1 | tail -n 6
BUDGET=${BUDGET:-360} bash bench/gpu_tune.sh --num-tokens 1024 2048 4096 8192 16384 --scenarios random imbalanced \
  --variants gluon1=1,$g1 gluon=1,$g1,$pp2,num_stages2=6 gluon=1,$g1,$pp2,num_stages2=4 \
  gluon2=1,$pp2,num_stages2=6 gluon_gather=1 2>&1 | tail -n 60
