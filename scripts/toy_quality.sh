#!/usr/bin/env bash
# MeanFlow vs Flow Matching on the default toy config, same budget; prints a table for docs/RESULTS.md.
# Usage: bash scripts/toy_quality.sh [OUT_DIR] [extra key=value overrides...]
set -euo pipefail
out=${1:-runs/toy-quality}; shift || true
for kind in meanflow flow_matching; do
  rm -rf "$out/$kind"
  meanflow train --out "$out/$kind" objective.kind=$kind "$@" > "$out.$kind.log" 2>&1
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print("| objective | sampler | NFE | sliced W2 | energy distance |")
print("|---|---|---|---|---|")
for kind in ("meanflow", "flow_matching"):
    m = json.load(open(f"{out}/{kind}/metrics.json"))
    for name, r in m["results"].items():
        print(f"| {kind} | {r['method']} | {r['nfe']} | {r['sliced_w2']:.4f} | {r['energy_distance']:.4f} |")
PY
