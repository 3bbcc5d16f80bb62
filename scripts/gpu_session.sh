#!/usr/bin/env bash
# The GPU checks and benchmarks of one short GPU session, most wanted first, in one call.
#
#   bash scripts/gpu_session.sh [OUT_DIR]       (default: $OUT, else ./gpu_out)
#
# Each step has its own time limit, so a slow step costs only its own figures; everything it
# prints goes to OUT_DIR/<step>.txt (benchmarks also write <step>.json). About 7 minutes on an
# H200 from a cold start; record the figures with device, commit and date in docs/BENCHMARKS.md.
set -u
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
bench="python3 benchmarks/bench_step.py --device cuda --warmup 2 --repeats 5"

run() {  # run NAME SECONDS COMMAND...: the command under a time limit, its output kept
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? after ${SECONDS}s in all"
}

nvidia-smi -L > "$out/device.txt" 2>&1
git log -1 --format='%H %cd' >> "$out/device.txt" 2>/dev/null
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/device.txt" 2>&1

# 1. correctness: every attention backend against the math path, three precisions
run gpu_checks 120 python3 scripts/gpu_checks.py --steps 3 --models dit-b/4
# 2. the row tangent of a user's DiT, compiled with the model (bf16), against compiled Flow Matching
run rows_compile 240 $bench --preset gpu-rows --models plain-dit-b/4,plain-dit-b/2 --amp bf16 --compile \
  --variants mf25,mf75 --json "$out/rows_compile.json"
# 3. the same at DiT-XL/2 (long compile)
run rows_compile_xl 150 $bench --preset gpu-rows --models plain-dit-xl/2 --amp bf16 --compile \
  --variants mf25 --json "$out/rows_compile_xl.json"
