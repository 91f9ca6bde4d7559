#!/usr/bin/env bash
# Expert parallelism on nvidia-h200-x2, one call: the distributed GPU tests, then the EP benchmark
# (FlashMoE's shape, qwen3-30b-a3b, deepseek-v2-lite; T = 128, 1024, 8192 per rank; random and imbalanced;
# single-GPU all experts vs epmoe vs epmoe in a CUDA graph; flashmoe-fused adds fused and fused-graph). Results under $OUT/results/ (bench/results layout),
# logs in $OUT, a short table last. Budget: under 9 minutes (every step has its own timeout).
#   bash bench/gpu_check_ep.sh [EP_SIZE]      # EP_SIZE default 2 (4 and 8 on the bigger machines, issue 6)
#   EP_TESTS=tests/distributed/test_fused_gpu.py EP_BENCHES=flashmoe-fused EP_TOKENS="1024 8192" bash ...
#   EP_BENCH_TIMEOUT (default 95): seconds for each of the flashmoe / qwen3 / deepseek runs
#   EP_PLAN=session4 bash bench/gpu_check_ep.sh 2   # issue 5, session 4: ONE call of <= 480 s (see below)
set -uo pipefail
ep=${1:-2}
if [[ ${EP_PLAN:-} == session4 ]]; then
  # test_fused_gpu.py only; FlashMoE's shape, qwen3-30b-a3b, deepseek-v2-lite at T = 1024 and 8192 per rank,
  # random routing; one GPU / epmoe / fused and the fused variants (FusedTiles overrides, rows fused[...] and
  # fused[...]-graph) side by side in each run. Any of these may still be set to change the plan.
  # T = 8192 first in each run: a run its timeout cuts short keeps the cases already written
  export EP_TESTS=${EP_TESTS:-tests/distributed/test_fused_gpu.py} EP_TESTS_TIMEOUT=${EP_TESTS_TIMEOUT:-85}
  export EP_TOKENS=${EP_TOKENS:-8192 1024} EP_SCENARIOS=${EP_SCENARIOS:-random}
  export EP_BENCHES=${EP_BENCHES:-flashmoe-fused qwen3-30b-a3b deepseek-v2-lite}
  export EP_FUSED_VARIANTS=${EP_FUSED_VARIANTS:-tma=1 num_put=64 num_put=128 put_split=4 tma=1,num_put=128 tma=1,put_split=4}
  export EP_BENCH_TIMEOUT=${EP_BENCH_TIMEOUT:-130} EP_FUSED_TIMEOUT=${EP_FUSED_TIMEOUT:-125}
  export EP_DEADLINE_S=${EP_DEADLINE_S:-470}
  export EP_NUM_PUT_SWEEP=${EP_NUM_PUT_SWEEP-} EP_TAIL=${EP_TAIL:-4}
fi
OUT=${OUT:-/tmp/tilemoe-ep-out}
# At most 8 files come back from $OUT: results and per-step logs go to /tmp, then into one tarball.
res=/tmp/tilemoe-ep/results
logs=/tmp/tilemoe-ep/logs
mkdir -p "$res" "$logs" "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TILEMOE_CACHE_DIR=/tmp/tilemoe-cache TILEMOE_EP_TIMEOUT_S=120
log=$OUT/gpu_check_ep.log
start=$(date +%s)
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m | head -n 4
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "triton", triton.__version__, "gpus", torch.cuda.device_count())'
} 2>&1 | tee "$log"

echo "== GPU tests (distributed) ==" | tee -a "$log"
# EP_TESTS picks the test files or ids (default: every distributed GPU test)
# shellcheck disable=SC2086
timeout "${EP_TESTS_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider ${EP_TESTS:-tests/distributed} 2>&1 \
  | tee "$logs/tests.log" | tail -n 40
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$log"

# EP_TOKENS / EP_SCENARIOS: tokens per rank and scenarios of every bench run
# shellcheck disable=SC2206
tokens=(${EP_TOKENS:-128 1024 8192})
# shellcheck disable=SC2206
scenarios=(${EP_SCENARIOS:-random imbalanced})
common=(--dtype bf16 --num-tokens "${tokens[@]}" --scenarios "${scenarios[@]}" --imbalance-factor 3.0
  --ep-size "$ep" --cuda-graph --warmup-iters 5 --benchmark-iters 30 --output-format both --verbose)
# EP_FUSED_VARIANTS: FusedTiles overrides timed beside the plain fused rows of every run with fused in it
# shellcheck disable=SC2206
variants=(${EP_FUSED_VARIANTS:-})
# EP_BENCHES picks the runs (default all), to fit what is left of a device budget.
benches=" ${EP_BENCHES:-flashmoe qwen3-30b-a3b deepseek-v2-lite flashmoe-fused flashmoe-fused-nvshmem} "
post=()  # flags after the common ones (they win): a smaller run
bench() {  # seconds, name, then model flags
  local limit=$1 name=$2; shift 2
  [[ $benches == *" $name "* ]] || return 0
  if [[ -n ${EP_DEADLINE_S:-} ]]; then  # the whole script ends by EP_DEADLINE_S seconds (10 kept for the summary)
    local left=$(( EP_DEADLINE_S - 10 - ($(date +%s) - start) ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then echo "bench $name skipped: ${left} s left of EP_DEADLINE_S" | tee -a "$log"; return 0; fi
  fi
  echo "== bench $name (ep $ep) ==" | tee -a "$log"
  local extra=()
  [[ " $* " == *" fused "* && ${#variants[@]} -gt 0 ]] && extra=(--fused-variants "${variants[@]}")
  timeout -k 10 "$limit" python3 -m tilemoe bench "$@" "${common[@]}" "${post[@]}" "${extra[@]}" \
    --output-file "$res/${ep}xh200-ep-$name" \
    2>&1 | tee "$logs/bench-$name.log" | tail -n "${EP_TAIL:-16}"
  echo "bench $name exit: ${PIPESTATUS[0]} ($(( $(date +%s) - start )) s so far)" | tee -a "$log"
  tar -czf "$OUT/ep_results.tar.gz" -C /tmp/tilemoe-ep results logs  # a call cut short keeps what ran
}
flashmoe=(--manual-config --num-experts 32 --num-experts-per-tok 2 --hidden-size 2048 --intermediate-size 2048)
flashmoe_fused() {
  # EP_NUM_PUT_SWEEP: put-program counts whose communication-only dispatch/combine are also printed (the log)
  TILEMOE_EP_NUM_PUT_SWEEP="${EP_NUM_PUT_SWEEP-32 64 128}" \
    bench "${EP_FUSED_TIMEOUT:-120}" flashmoe-fused "${flashmoe[@]}" --impl epmoe fused
}
[[ ${EP_PLAN:-} == session4 ]] && flashmoe_fused  # the issue's headline shape first
bench "${EP_BENCH_TIMEOUT:-95}" flashmoe "${flashmoe[@]}" --impl epmoe
bench "${EP_BENCH_TIMEOUT:-95}" qwen3-30b-a3b --model qwen3-30b-a3b --impl epmoe fused
bench "${EP_BENCH_TIMEOUT:-95}" deepseek-v2-lite --model deepseek-v2-lite --impl epmoe fused
# the fused backend (symmetric-memory puts, flag-waiting GEMMs, stores back) vs epmoe vs one GPU: its own run,
# so a failure there cannot cost the rows above
[[ ${EP_PLAN:-} == session4 ]] || flashmoe_fused
# the same on NVSHMEM symmetric memory (one host: no remote transport); EP_NVSHMEM_TOKENS / _SCENARIOS
# shellcheck disable=SC2206
post=(--num-tokens ${EP_NVSHMEM_TOKENS:-${tokens[*]}} --scenarios ${EP_NVSHMEM_SCENARIOS:-${scenarios[*]}})
TILEMOE_SYMM_MEM_BACKEND=nvshmem NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo \
  NVSHMEM_SYMMETRIC_SIZE=4G bench "${EP_NVSHMEM_TIMEOUT:-90}" flashmoe-fused-nvshmem "${flashmoe[@]}" --impl epmoe fused

[[ ${EP_PLAN:-} == session4 ]] || {
echo "== summary: p50 ms (slowest rank), speedup vs one GPU with all experts, dispatch+combine GB/s =="
python3 - "$res" "$ep" <<'PY'
import csv, glob, os, sys
res, ep = sys.argv[1], sys.argv[2]
for path in sorted(glob.glob(os.path.join(res, f"{ep}xh200-ep-*.csv"))):
    rows = list(csv.DictReader(open(path)))
    print(os.path.basename(path))
    print(f"  {'scenario':<11}{'T':>6}  {'impl':<12}{'status':<8}{'p50 ms':>9}{'vs single':>10}{'d+c GB/s':>10}"
          f"{'nccl GB/s':>10}{'d GB/s':>9}{'c GB/s':>9}")
    for r in rows:
        print(f"  {r['scenario']:<11}{r['num_tokens']:>6}  {r['implementation']:<12}{r['status']:<8}"
              f"{r['latency_p50_ms']:>9}{r['speedup_vs_single'][:6]:>10}{r['dispatch_combine_gbps'][:7]:>10}"
              f"{r['nccl_a2a_gbps'][:7]:>10}{r.get('dispatch_gbps', '')[:7]:>9}{r.get('combine_gbps', '')[:7]:>9}")
PY
}
[[ ${EP_PLAN:-} == session4 ]] || grep -h "num_put" "$logs"/bench-*.log 2>/dev/null | head -n 40
echo "== per model, scenario, T: one GPU = faster of single / single-graph; p50 ms (slowest rank); x = graph / one GPU =="
python3 - "$res" "$ep" <<'PY'
import csv, glob, os, sys
res, ep = sys.argv[1], sys.argv[2]
num = lambda v: float(v) if v not in ("", None) else float("nan")
for path in sorted(glob.glob(os.path.join(res, f"{ep}xh200-ep-*.csv"))):
    rows = list(csv.DictReader(open(path)))
    for key in dict.fromkeys((r["scenario"], r["num_tokens"]) for r in rows):
        case = {r["implementation"]: r for r in rows if (r["scenario"], r["num_tokens"]) == key}
        ones = [num(case[n]["latency_p50_ms"]) for n in ("single", "single-graph") if n in case and case[n]["status"] == "OK"]
        one = min(ones) if ones else float("nan")
        ep_ms = [num(case[n]["latency_p50_ms"]) for n in ("epmoe", "epmoe-graph") if n in case and case[n]["status"] == "OK"]
        nccl = num(case["epmoe"]["nccl_a2a_gbps"]) if "epmoe" in case else float("nan")
        print(f"{os.path.basename(path)[:-4]} {key[0]} T={key[1]}: one GPU {one:.3f} ms, epmoe {min(ep_ms, default=float('nan')):.3f} ms, NCCL a2a {nccl:.0f} GB/s")
        for name, r in case.items():  # one line per fused configuration: eager, CUDA graph, graph / one GPU
            if not name.startswith("fused") or name.endswith("-graph"):
                continue
            g = case.get(name + "-graph", {})
            ms, gms = num(r["latency_p50_ms"]), num(g.get("latency_p50_ms"))
            print(f"    {name:<28}{r['status']:<7}eager {ms:>6.3f}  graph {gms:>6.3f} ms  x{gms / one:>5.2f}"
                  f"  dispatch {num(r['dispatch_gbps']):>4.0f}  combine {num(r['combine_gbps']):>4.0f} GB/s")
PY
tar -czf "$OUT/ep_results.tar.gz" -C /tmp/tilemoe-ep results logs
echo "elapsed $(( $(date +%s) - start )) s; results in $OUT/ep_results.tar.gz"
