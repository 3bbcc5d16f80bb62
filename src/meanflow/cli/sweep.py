"""``meanflow sweep SPEC``: a grid of config overrides x seeds, one run after another, then one table.

Finished runs (those with ``metrics.json``) are skipped, interrupted ones resumed, so the same
command continues a stopped sweep. The table (``summary.md``/``summary.csv``: mean ± std over
seeds and the raw values, and with a baseline the paired differences against it; ``runs.csv``: one
row per run) and one PNG per metric go to the output directory. See :mod:`meanflow.training.sweep` for the spec format; shipped specs: configs/sweeps/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..training import sweep


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of configs x seeds and tabulate the metrics", description=__doc__)
    p.add_argument("spec", nargs="+", metavar="SPEC [key=value ...]",
                   help="sweep spec (a shipped name, configs/sweeps/NAME.yaml, or a YAML file), then overrides applied "
                   "to every run after the spec's own")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/sweeps/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument("--table-only", action="store_true", help="only (re)write the table and plots from the finished runs")
    p.add_argument("--rescore", action="store_true", help="evaluate finished runs again (after the evaluation changed)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run only runs I, I+N, I+2N, ... (N processes share a sweep)")
    p.add_argument("--baseline", action="append", default=None, metavar="VARIANT|AXIS=VALUE",
                   help="compare every point with this one, paired by seed (a variant name, or axis=value, repeated for "
                   "several axes); replaces the spec's baseline; works with --table-only")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="train only these of the spec's seeds (e.g. --seeds 0 for a first pass); the table shows every finished run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec, path = sweep.load_spec(args.spec[0])
    if args.baseline:
        spec = sweep.with_baseline(spec, args.baseline)
    args.overrides = args.spec[1:]
    out = Path(args.out or Path("runs") / "sweeps" / path.stem)
    if args.dry_run:
        for item in sweep.plan(spec):
            sweep.run_config(spec, item, args.overrides)
            state = "finished" if (item.directory(out) / "metrics.json").exists() else "to run"
            print(f"{item.label} seed {item.seed}: {state} ({item.directory(out)})")
        return 0
    if not args.table_only:
        seeds = None if args.seeds is None else _seeds(args.seeds)
        sweep.run_sweep(spec, out, args.overrides, shard=_shard(args.shard), rescore=args.rescore, seeds=seeds)
    paths = sweep.write_summary(spec, out, title=spec.description or path.stem)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise ValueError(f"--shard must look like I/N (for example 0/2), got {text!r}")
    return int(index), int(count)


def _seeds(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--seeds must be comma-separated seeds of the spec (for example 0 or 1,2), got {text!r}")
    return [int(p) for p in parts]
