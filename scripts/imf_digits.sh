#!/usr/bin/env bash
# iMF against MeanFlow on the 8x8 digits at equal wall-clock time, then the iMF model sampled at guidance
# scales omega = 1, 2, 4, 8 (1 NFE), and the plot docs/img/imf_digits_omega.png.
#   scripts/imf_digits.sh [OUT_DIR] [SEED] [SECONDS]     (docs/RESULTS.md: runs/imf-digits 0 2130)
# Both trainings start together, one thread each at the same nice level, and both are stopped (SIGINT:
# checkpoint, then exit) after SECONDS of wall-clock time, unless they reach their step caps first
# (iMF: the digits-imf config, 800 steps; MeanFlow: the digits recipe capped at 1200 steps, which is
# equal CPU time: 0.30 s against 0.20 s per step of batch 64, measured with time.process_time).
# Short runs are scored with the raw weights (--raw): an EMA of decay 0.999 has not forgotten the
# initialisation after a few hundred steps. CPU times: OUT_DIR/*.time.
set -euo pipefail
OUT=${1:-runs/imf-digits}
SEED=${2:-0}
SECONDS_BUDGET=${3:-2130}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
timed() { /usr/bin/time -f "TIME user %U s, system %S s, wall %e s" -o "$OUT/$1.time" nice -n 10 "$PY" -m meanflow "${@:2}" > "$OUT/$1.log" 2>&1; }
timed imf train --no-eval --config digits-imf --out "$OUT/imf" seed="$SEED" &
IMF=$!
timed meanflow train --no-eval --config digits --out "$OUT/meanflow" seed="$SEED" train.steps=1200 train.warmup_steps=100 \
  train.sample_every=0 train.checkpoint_every=400 &
MF=$!
sleep "$SECONDS_BUDGET"
for pid in $IMF $MF; do kill -INT $(pgrep -P "$pid") 2> /dev/null || true; done
wait
for w in 1 2 4 8; do
  nice -n 10 "$PY" -m meanflow eval --run "$OUT/imf" --raw --steps 1 --method meanflow --omega "$w" --out "$OUT/imf_omega$w.json" > /dev/null
done
nice -n 10 "$PY" -m meanflow eval --run "$OUT/meanflow" --raw --steps 1 --method meanflow --out "$OUT/meanflow_1nfe.json" > /dev/null
"$PY" scripts/imf_digits_plot.py "$OUT" docs/img/imf_digits_omega.png
