#!/usr/bin/env bash
# iMF against MeanFlow on the 8x8 digits at equal CPU time (one core each), then the iMF model sampled
# at guidance scales omega = 1, 2, 4, 8 (1 NFE), and the plot docs/img/imf_digits_omega.png.
#   scripts/imf_digits.sh [OUT_DIR] [SEED]          (docs/RESULTS.md: OUT_DIR=runs/imf-digits, SEED=0)
# CPU time per training step, measured with time.process_time at batch 64: iMF (imf-tiny/2 with its
# v-head, guidance passes and JVP) 0.30 s, MeanFlow (the digits recipe, unet-tiny) 0.20 s, so 800 iMF
# steps (the digits-imf config) meet 1200 MeanFlow steps. Both runs start together at the same nice level
# and each records its CPU time (TIME lines in OUT_DIR/*.time).
set -euo pipefail
OUT=${1:-runs/imf-digits}
SEED=${2:-0}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
timed() { /usr/bin/time -f "TIME user %U s, system %S s, wall %e s" -o "$OUT/$1.time" nice -n 10 "$PY" -m meanflow "${@:2}" > "$OUT/$1.log" 2>&1; }
timed imf train --config digits-imf --out "$OUT/imf" seed="$SEED" &
timed meanflow train --config digits --out "$OUT/meanflow" seed="$SEED" train.steps=1200 train.warmup_steps=100 \
  train.sample_every=0 train.checkpoint_every=400 eval.baseline_ode_steps=10 &
wait
for w in 1 2 4 8; do
  nice -n 10 "$PY" -m meanflow eval --run "$OUT/imf" --steps 1 --method meanflow --omega "$w" --out "$OUT/imf_omega$w.json" > /dev/null
done
nice -n 10 "$PY" -m meanflow eval --run "$OUT/meanflow" --steps 1 --method meanflow --out "$OUT/meanflow_1nfe.json" > /dev/null
"$PY" scripts/imf_digits_plot.py "$OUT" docs/img/imf_digits_omega.png
