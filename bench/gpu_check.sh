#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, then the benchmarks, results under $OUT, a short table last.
#   bash bench/gpu_check.sh [tests|ladder|triton|all] [extra pytest args]
# Results come back as $OUT/results.tar.gz (bench/results/ layout) plus logs; the machine keeps nothing.
set -uo pipefail
mode=${1:-all}
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT" /tmp/res
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TILEMOE_CACHE_DIR=/tmp/tilemoe-cache
tm() { python3 -m tilemoe "$@"; }
log=$OUT/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw,power.limit --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$log"

if [[ $mode == tests || $mode == all ]]; then
  # -n 8: Triton compilation is CPU-bound; parallel workers also warm the on-disk kernel cache.
  python3 -m pytest -m gpu -q -x -n 8 -p no:cacheprovider tests "${@:2}" 2>&1 | tee -a "$log" | tail -n 30
fi

if [[ $mode == ladder || $mode == all ]]; then
  tm journey --model qwen3-30b-a3b --num-tokens 2048 8192 16384 32768 --dtype bf16 --max-naive-tokens 2048 \
    --output-file /tmp/res/h100-journey 2>&1 | tee -a "$log"
  for model in qwen3-30b-a3b mixtral-8x7b; do
    tm bench --model $model --dtype bf16 --num-tokens 1 16 128 1024 4096 --cuda-graph \
      --output-format all --output-file /tmp/res/h100-bench-$model 2>&1 | tee -a "$log"
  done
fi

if [[ $mode == triton || $mode == all ]]; then
  for model in qwen3-30b-a3b mixtral-8x7b deepseek-v2-lite gpt-oss-120b; do
    tm bench --model $model --dtype bf16 --impl triton torch_grouped_mm grouped --baseline torch_grouped_mm \
      --num-tokens 1 8 64 256 1024 4096 16384 --scenarios random imbalanced --imbalance-factor 3.0 --cuda-graph \
      --output-format all --output-file /tmp/res/h100-triton-$model 2>&1 | tee -a "$log"
  done
fi
tar -czf "$OUT/results.tar.gz" -C /tmp/res . 2>/dev/null
echo "== summary =="
grep -h -E "^\|" /tmp/res/*.md 2>/dev/null | head -n 0
ls -la /tmp/res
