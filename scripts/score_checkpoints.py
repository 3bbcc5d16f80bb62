"""Score every checkpoint of runs under OUT (1-NFE class accuracy and digits FD, 1000 samples, seed 1)
and plot FD over total training steps. Used by scripts/digits_pretrain_finetune.sh. Scores already in
OUT/scores.json are kept (re-running scores only new checkpoints).

    python scripts/score_checkpoints.py OUT --offset fm=0 finetune=1000 scratch=0 --plot FILE.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from meanflow.evaluation import evaluate_run  # noqa: E402
from meanflow.runtime.distributed import DistInfo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--offset", nargs="+", default=[], help="RUN=STEPS: steps trained before this run (x axis)")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--num", type=int, default=1000)
    args = parser.parse_args()
    out = Path(args.out)
    cache = out / "scores.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    for run, offset in (item.split("=") for item in args.offset):
        rows = {r["step"]: r for r in table.get(run, [])}
        for ckpt in sorted((out / run / "checkpoints").glob("step_*")):
            step = int(offset) + int(ckpt.name.split("_")[1])
            if step in rows or not (ckpt / "COMPLETE").exists():
                continue
            res = evaluate_run(ckpt, steps=[1], num=args.num, seed=1, method="meanflow", info=DistInfo())
            entry = res["results"]["meanflow_1nfe"]
            rows[step] = {"step": step, "class_accuracy": entry["class_accuracy"], "digits_fd": entry["digits_fd"]}
            print(run, rows[step], flush=True)
            table[run] = sorted(rows.values(), key=lambda r: r["step"])
            cache.write_text(json.dumps(table, indent=2))
    if args.plot:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, rows in table.items():
            ax.plot([r["step"] for r in rows], [r["digits_fd"] for r in rows], marker="o", label=run)
        ax.set(xlabel="total training steps", ylabel="1-NFE digits FD (lower is better)", yscale="log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
