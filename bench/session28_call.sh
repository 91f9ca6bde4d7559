#!/usr/bin/env bash
# Session 28's device calls (results under $OUT). The steps of session 27 (none ran: no GPU came in either session)
# plus the kernel-config fuzzer on the GPU:
#   bash bench/session28_call.sh fuzz   bench/config_fuzz.py in 8 processes and layer_fuzz.py in 4, side by side (each
#                                       its own seeds, the Triton compiles spread over the cores): random kernel configs
#                                       on random layers, and random routings through the layer's own, in bf16 and fp16
#                                       against the float64 reference, the Gluon forms included, which the interpreter
#                                       cannot run; each process's failures to $OUT as they come
#   bash bench/session28_call.sh check | rest | kernels | h200   as session27_call.sh (its header says what each does)
# shellcheck source=bench/call_env.sh
source bench/call_env.sh
echo "== session28 ${1:?step: fuzz, check, rest, kernels or h200} on ${gpu:-no GPU}"
case $1 in
fuzz)
  for job in $(seq 0 11); do  # 8 processes of config_fuzz.py, 4 of layer_fuzz.py (the routings)
    tool=$([[ $job -lt 8 ]] && echo config_fuzz || echo layer_fuzz)
    timeout -k 5 "${T_FUZZ:-420}" python3 -W ignore "bench/$tool.py" --cases "${FUZZ_CASES:-40}" \
      --seed $((${FUZZ_SEED:-$start} + 1000 * job)) >"$OUT/fuzz-$job.log" 2>&1 &
  done
  wait
  # a process cut at T_FUZZ or crashed prints no summary line: counted apart, its log holds what it did
  finished=$(grep -l -E "^(config|layer)_fuzz:" "$OUT"/fuzz-*.log | wc -l)
  echo "== fuzz: $(cat "$OUT"/fuzz-*.log | grep -c "^FAIL") cases failed; $finished of 12 processes finished:"
  grep -h -E "^(config|layer)_fuzz:" "$OUT"/fuzz-*.log | awk '{ok += $2; all += $4} END {print "   ", ok, "of", all, "cases match"}'
  grep -h -A1 "^FAIL" "$OUT"/fuzz-*.log | cut -c1-400 | head -n 20
  ;;
check | rest | kernels | h200)
  bash bench/session27_call.sh "$1"
  ;;
*)
  echo "session28_call.sh: unknown step $1 (fuzz, check, rest, kernels or h200)"
  exit 2
  ;;
esac
echo "== session28 $1: $(($(date +%s) - start)) s"
