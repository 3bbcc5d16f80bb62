#!/usr/bin/env bash
# Flow Matching pretraining then MeanFlow fine-tuning (--init) against MeanFlow from scratch, on digits,
# at equal total steps; every checkpoint scored (1-NFE class accuracy and digits FD). docs/RESULTS.md.
# Usage: bash scripts/digits_pretrain_finetune.sh [OUT_DIR] [TOTAL_STEPS] [SEED]
set -euo pipefail
out=${1:-runs/pretrain-finetune}; total=${2:-2000}; seed=${3:-0}; half=$((total / 2))
common="seed=$seed train.checkpoint_every=250 train.keep_checkpoints=100 train.sample_every=0"
mkdir -p "$out"
timed() {  # NAME CMD...: run CMD into OUT/NAME.log, append its wall-clock seconds to OUT/wallclock.txt
  local name=$1; shift; local t0; t0=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1 || { echo "$name failed, see $out/$name.log" >&2; return 1; }
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >> "$out/wallclock.txt"
}
rm -f "$out/wallclock.txt"
# A: MeanFlow from scratch, all steps.                B: Flow Matching (no guidance), then MeanFlow from its EMA weights.
mf="meanflow train --config digits --no-eval"
timed scratch $mf --out "$out/scratch" $common train.steps=$total &
( timed fm_pretrain $mf --out "$out/fm" $common train.steps=$half objective.kind=flow_matching objective.omega=1.0 \
  && timed mf_finetune $mf --out "$out/finetune" --init "$out/fm" $common train.steps=$half ) &
wait
python scripts/score_checkpoints.py "$out" --offset fm=0 finetune=$half scratch=0 --plot docs/img/digits_pretrain_finetune_fd.png
