#!/usr/bin/env bash
# Session 14, call 3: the Gluon GPU tests (ping-pong, gluon1 / gluon2, the gather), then run 19 (`tilemoe bench`,
# issue 4's command) for the models given (default: qwen3-30b-a3b deepseek-v2-lite mixtral-8x7b).
PYTHONPATH=$PWD/src timeout -k 5 "${T_TESTS:-110}" python3 -m pytest -q -n 12 -p no:cacheprovider tests/ops/test_gluon_experts.py 2>&1 |
  tail -n 8 | tee /tmp/gluon_tests.txt
TRITON_MODELS=${TRITON_MODELS:-"qwen3-30b-a3b deepseek-v2-lite mixtral-8x7b"} T_TRITON=${T_TRITON:-125} \
  bash bench/gpu_check.sh triton > /tmp/bench.txt 2>&1
cp /tmp/gluon_tests.txt "${OUT:-/tmp}/" 2>/dev/null
tail -n 70 /tmp/bench.txt
cat /tmp/gluon_tests.txt
