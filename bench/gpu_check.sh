#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, then the benchmarks, results under $OUT, a short table last.
#   bash bench/gpu_check.sh MODE...   MODE: tests (TEST_PATHS: a subset of tests/), ladder (journey + issue-3
#   benches), triton (issue-4 benches), all;
#   forms (not in all): the session-6 kernels (GEMM 1 dense forms, routing in the decode GEMM 1, one launch): GPU tests
#   and the structure probe of bench/ws_probe.py --gemm1 (dense shapes, each form against the plain one);
#   unrun (not in all): the GPU tests of what was written without a device (session 13's review: the one-program
#   align dropping bad ids, one-launch and the sweep with expert_groups, which passed on an H100 in session 14's
#   pingpong call; earlier: persistent tails, split tails, the routing kernels' non-finite logits, GEMM 1 clearing
#   the combine's output, which passed on an H100 in session 12);
#   gluon (not in all): the Gluon GEMMs' GPU tests and the randomized sweep (which forces two Gluon configs)
#   pingpong (not in all): session 14's GPU tests (ping-pong Gluon GEMMs, gluon2, and unrun's) and the kernel probe
#   of those forms against the table's entries (PP_POINTS, PP_VARIANTS; each point warmed in a process of its own
#   first, all at once: Triton's compiles are CPU-bound)
#   combine (not in all): session 15's GPU tests (GEMM 2's combine in warps of its own, async_combine, and the Gluon
#   file) and the kernel probe of that form against the table's entries and the cooperative GEMM 2 without it
#   (CB_POINTS, CB_VARIANTS; warmed as pingpong's are)
#   fold (not in all): the fold_tails GPU tests (bf16 among them) and the kernel probe of fold_tails against the
#   table's entries and the Triton forms of the Gluon entries (FOLD_POINTS, FOLD_VARIANTS; warmed as pingpong's are)
#   padding (not in all): what the padding rows cost, in-kernel: the table entries on random and on balanced routing
#   (every expert T*K/E rows, a multiple of 128 at PAD_POINTS: no padding), in turn (bench/ab_probe.py --arms)
#   tails (not in all): a tail tile priced against a full one: qwen3-30b-a3b's T=4096 and mixtral-8x7b's T=1024 entry
#   (--entry-tokens) at balanced routings of 256, 257, 272, 288, 320, 321, 384 rows per expert (T = rows * E / K):
#   t(257) - t(256) is a tail tile of one row per expert, t(384) - t(256) a full tile, t(320) - t(257) 63 real rows
#   added to each tail tile
#   ab (not in all): bench/ab_probe.py, source trees' kernels timed in turn
#   (AB_TREES="main=src old=bench/.trees/old/src", made by bench/ab_tree.sh and carried to the device; AB_POINTS,
#   AB_ROUNDS)
# Each mode fits one 10-minute device call on an H100; give several to run them in one call.
# Results come back as $OUT/results.tar.gz (bench/results/ layout) plus logs; the machine keeps nothing.
set -uo pipefail
modes=" ${*:-all} "
has() { [[ $modes == *" $1 "* || $modes == *" all "* ]]; }
OUT=${OUT:-/tmp/tilemoe-out}
mkdir -p "$OUT" /tmp/res
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TILEMOE_CACHE_DIR=/tmp/tilemoe-cache
# Per-step limits (seconds) keep each mode inside one 10-minute call, so the results always come back.
T_TESTS=${T_TESTS:-170} T_JOURNEY=${T_JOURNEY:-200} T_BENCH=${T_BENCH:-110} T_TRITON=${T_TRITON:-140}
tm() { local limit=$1; shift; timeout -k 5 "$limit" python3 -m tilemoe "$@"; }
# pytest over the given files / options within LIMIT seconds (12 workers: Triton's compiles are CPU-bound)
run_tests() { local limit=$1; shift; timeout -k 5 "$limit" python3 -m pytest -q -n 12 -p no:cacheprovider "$@" 2>&1 |
  tee -a "$log" | tail -n 30; }
# bench/kernel_probe.py at POINTS with VARIANTS (space-separated lists): each point warmed first in a process of its
# own, all at once, within WARM seconds (Triton's compiles are CPU-bound), then all timed in one process within PROBE
# seconds; the table goes to $OUT/NAME_probe.txt and the log.
probe_points() {
  local name=$1 points=$2 variants=$3 warm=$4 probe=$5 point
  for point in $points; do
    # shellcheck disable=SC2086  # lists
    timeout -k 5 "$warm" python3 bench/kernel_probe.py --points $point --variants $variants --no-breakdown \
      --no-stats >/dev/null 2>&1 &
  done
  wait
  # shellcheck disable=SC2086
  timeout -k 5 "$probe" python3 bench/kernel_probe.py --points $points --variants $variants --no-breakdown \
    --no-stats 2>&1 | grep -v Warning | tee "$OUT/${name}_probe.txt" | tee -a "$log"
}
# bench/ab_probe.py ARGS... within LIMIT seconds, AB_ROUNDS rounds in turn; its table added to $OUT/NAME.txt and the log
ab_probe() { local limit=$1 name=$2; shift 2; timeout -k 5 "$limit" python3 bench/ab_probe.py "$@" \
  --rounds "${AB_ROUNDS:-3}" 2>&1 | grep -v Warning | tee -a "$OUT/$name.txt" | tee -a "$log"; }
log=$OUT/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw,power.limit --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$log"

if has tests; then
  # The workers also warm the on-disk kernel cache for the benchmarks after. All 182 GPU tests take longer than one
  # 170 s step: give T_TESTS=450 a call of their own, or split them over calls with TEST_PATHS (files or folders under
  # tests/). Session 16 on an H100 (-n 12): test_triton, test_gluon_experts, test_align and test_combine (90 tests) in
  # 267 s, the other 92 (8 of them two-GPU, skipped on one) in 51 s.
  # shellcheck disable=SC2086  # TEST_PATHS: several paths
  run_tests "$T_TESTS" -m gpu -rfE ${TEST_PATHS:-tests}
fi

if [[ $modes == *" forms "* ]]; then
  run_tests "${T_FORMS_TESTS:-330}" tests/ops/test_fused_experts.py tests/impls/test_triton.py \
    -k "dense_forms or randomized_sweep or from_logits or one_launch"
  # qwen3 T=4096-like GEMM 1 (M=S, N=2I, K=H) and mixtral T=1024-like; tiles as in the H100 table
  timeout -k 5 "${T_PROBE:-220}" python3 bench/ws_probe.py --gemm1 --shapes 32768,1536,2048 2048,28672,4096 \
    --configs 128,128,64,8,4 128,64,64,4,4 2>&1 | grep -v Warning | tee -a "$log"
fi

if [[ $modes == *" unrun "* ]]; then
  run_tests "${T_UNRUN_TESTS:-330}" tests/ops/test_fused_experts.py tests/impls/test_triton.py tests/ops/test_route.py \
    tests/ops/test_align.py \
    -k "dense_forms or randomized_sweep or split_tail or non_finite or clears or expert_groups or one_launch or align"
fi

if [[ $modes == *" gluon "* ]]; then
  run_tests "${T_GLUON_TESTS:-300}" tests/ops/test_gluon_experts.py tests/impls/test_triton.py \
    -k "gluon or randomized_sweep"
fi

if [[ $modes == *" pingpong "* ]]; then
  run_tests "${T_PP_TESTS:-300}" tests/ops/test_gluon_experts.py tests/ops/test_fused_experts.py \
    tests/impls/test_triton.py tests/ops/test_route.py tests/ops/test_align.py \
    -k "gluon or ping_pong or randomized_sweep or non_finite or expert_groups or one_launch or align"
  g1="gluon=1,gluon2=0,tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,persistent=1,num_warps2=8"
  pp_variants=${PP_VARIANTS:-"gluon2=1,pingpong2=1,block_n2=128,persistent=1,num_warps2=8,num_stages2=4 \
gluon2=1,pingpong2=1,block_n2=128,persistent=1,num_warps2=8,num_stages2=6 gluon2=1,persistent=1,num_warps2=8 \
$g1,gluon_gather=1,block_n1=128,block_n2=256,num_stages2=4 \
$g1,gluon_gather=1,block_n1=128,block_n2=128,num_stages2=4,pingpong2=1 \
$g1,gluon_gather=1,block_n1=64,block_n2=128,num_stages2=4,pingpong1=1,pingpong2=1 \
$g1,gluon_gather=0,block_n1=64,block_n2=128,num_stages2=4,pingpong1=1,pingpong2=1"}
  pp_points=${PP_POINTS:-"qwen3-30b-a3b:4096 deepseek-v2-lite:4096 gpt-oss-120b:16384 mixtral-8x7b:1024 \
qwen3-30b-a3b:16384"}
  probe_points pingpong "$pp_points" "$pp_variants" "${T_PP_WARM:-150}" "${T_PP_PROBE:-200}"
fi

if [[ $modes == *" combine "* ]]; then
  run_tests "${T_CB_TESTS:-200}" tests/ops/test_gluon_experts.py
  g1="gluon=1,gluon1=0,gluon2=0,tma=1,gate_up_dot=1,persistent1=1,num_warps1=8,num_stages1=4,persistent=1,num_warps2=8"
  g1="$g1,block_m=128,block_n1=128,block_k1=64,block_k2=64,gluon_gather=1,pingpong2=0"
  g2="gluon=0,gluon1=0,gluon_gather=0,gluon2=1,tma=1,persistent=1,num_warps2=8,block_m=128,block_k2=64,pingpong2=0"
  cb_variants=${CB_VARIANTS:-"$g1,block_n2=256,num_stages2=3 $g1,block_n2=256,num_stages2=3,async_combine=1 \
$g1,block_n2=128,num_stages2=4,async_combine=1 $g2,block_n2=256,num_stages2=3,async_combine=1"}
  cb_points=${CB_POINTS:-"qwen3-30b-a3b:4096 deepseek-v2-lite:4096 gpt-oss-120b:16384 mixtral-8x7b:1024 \
qwen3-30b-a3b:16384 mixtral-8x7b:4096"}
  probe_points combine "$cb_points" "$cb_variants" "${T_CB_WARM:-150}" "${T_CB_PROBE:-220}"
fi

if [[ $modes == *" fold "* ]]; then
  run_tests "${T_FOLD_TESTS:-200}" tests/ops/test_fused_experts.py -k "fold_tails or split_tail"
  triton_form="gluon=0,gluon1=0,gluon2=0,gluon_gather=0,pingpong1=0,pingpong2=0,async_combine=0"
  fold_variants=${FOLD_VARIANTS:-"fold_tails=1 $triton_form $triton_form,fold_tails=1 \
$triton_form,fold_tails=1,persistent=0,persistent1=0"}
  fold_points=${FOLD_POINTS:-"qwen3-30b-a3b:4096 deepseek-v2-lite:4096 mixtral-8x7b:1024 qwen3-30b-a3b:16384 \
gpt-oss-120b:16384 mixtral-8x7b:4096"}
  probe_points fold "$fold_points" "$fold_variants" "${T_FOLD_WARM:-150}" "${T_FOLD_PROBE:-220}"
fi

if [[ $modes == *" padding "* ]]; then
  # shellcheck disable=SC2086  # a list of points
  ab_probe "${T_PAD:-450}" padding_probe --arms random="--scenario random" balanced="--scenario balanced" \
    --points ${PAD_POINTS:-qwen3-30b-a3b:4096 qwen3-30b-a3b:16384 deepseek-v2-lite:4096 gpt-oss-120b:16384 \
    mixtral-8x7b:1024}
fi

if [[ $modes == *" tails "* ]]; then
  for model in "qwen3-30b-a3b 128 8 4096" "mixtral-8x7b 8 2 1024"; do
    read -r name experts top_k entry <<<"$model"
    points=$(for rows in 256 257 272 288 320 321 384; do echo -n "$name:$((rows * experts / top_k)) "; done)
    # shellcheck disable=SC2086  # a list of points
    ab_probe "${T_TAILS:-220}" tail_probe --arms "$name=--scenario balanced --entry-tokens $entry" --points $points
  done
fi

if [[ $modes == *" ab "* ]]; then
  # shellcheck disable=SC2086  # several trees and points
  ab_probe "${T_AB:-450}" ab_probe --trees ${AB_TREES:?AB_TREES: NAME=SRC ...} \
    --points ${AB_POINTS:-qwen3-30b-a3b:4096 deepseek-v2-lite:4096 mixtral-8x7b:1024}
fi

if has ladder; then
  tm "$T_JOURNEY" journey --model qwen3-30b-a3b --num-tokens 2048 8192 16384 32768 --dtype bf16 --max-naive-tokens 2048 \
    --output-file /tmp/res/h100-journey 2>&1 | tee -a "$log"
  for model in qwen3-30b-a3b mixtral-8x7b; do
    tm "$T_BENCH" bench --model $model --dtype bf16 --num-tokens 1 16 128 1024 4096 --cuda-graph \
      --output-format all --output-file /tmp/res/h100-bench-$model 2>&1 | tee -a "$log"
  done
fi

# Triton's compiles for one model's triton benches, every token count in a process of its own, all at once (the
# compiles are CPU-bound and serial within a process; the timed bench then reads the on-disk cache): an eager call or
# two of triton and triton_deterministic per T, nothing written. gpt-oss-120b's bench alone ran past 150 s on a machine
# whose cache held none of its kernels (session 18; in run 22, last of four models, it took under 130). WARM_TRITON=0
# skips it.
warm_triton() {
  local model=$1 t
  [[ ${WARM_TRITON:-1} == 1 ]] || return 0
  for t in $TRITON_TOKENS; do
    tm "${T_WARM_TRITON:-100}" bench --model "$model" --dtype bf16 \
      --impl triton triton_deterministic --num-tokens "$t" --scenarios random --warmup-iters 1 --benchmark-iters 1 \
      --rounds 1 >/dev/null 2>&1 &
  done
  wait
}

if has triton; then
  TRITON_TOKENS=${TRITON_TOKENS:-"1 8 64 256 1024 4096 16384"}
  # TRITON_MODELS splits the four models over calls (TRITON_TOKENS the tokens); GRAPH_CALLS layer calls per CUDA graph
  # at T <= 256
  for model in ${TRITON_MODELS:-qwen3-30b-a3b mixtral-8x7b deepseek-v2-lite gpt-oss-120b}; do
    warm_triton "$model"
    # shellcheck disable=SC2086  # TRITON_TOKENS: a list
    tm "$T_TRITON" bench --model $model --dtype bf16 --impl triton triton_deterministic torch_grouped_mm grouped \
      --baseline torch_grouped_mm --num-tokens $TRITON_TOKENS --scenarios random imbalanced \
      --imbalance-factor 3.0 --cuda-graph --graph-calls "${GRAPH_CALLS:-10}" --bmm-ceiling \
      --output-format all --output-file /tmp/res/h100-triton-$model 2>&1 | tee -a "$log"
    tar -czf "$OUT/results.tar.gz" -C /tmp/res . 2>/dev/null  # after each model: a call cut short keeps the finished
  done
fi
tar -czf "$OUT/results.tar.gz" -C /tmp/res . 2>/dev/null
cp "$log" "$OUT/" 2>/dev/null
echo "== summary: implementation, scenario, tokens, mean ms, status =="
for f in /tmp/res/*.csv; do
  [[ -f $f ]] || continue
  echo "-- $(basename "$f")"
  python3 - "$f" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    print(row.get("implementation"), row.get("scenario"), row.get("num_tokens"), row.get("latency_mean_ms"),
          row.get("pct_roofline", ""), row.get("status", ""), sep="\t")
PY
done
