"""The per-shape table of docs/RESULTS.md from the runs.csv files of three sweeps.

    python scripts/recipe_table.py runs/sweeps/recipe-toys runs/sweeps/recipe-shapes [runs/sweeps/recipe-fm-constant]

MeanFlow and Flow Matching runs of the same recipe (``recipe-toys``, ``recipe-shapes``), optionally
a second Flow Matching baseline (``recipe-fm-constant``). Per shape: mean +- standard deviation
over the seeds of each metric; the ratio MeanFlow 1 NFE / Flow Matching 100 Euler steps (sliced
W2) of the seed means, and seed by seed; the ratio of the means to the better of the two Flow
Matching baselines (the lower mean over the seeds both have).
"""
from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

SHAPES = ("checkerboard", "spirals", "strokes_cluster", "letters", "blob_grid", "ring_dot")


def shape_of(row: dict[str, str]) -> str:
    """The shape a run trained on: a built-in toy's name or a point file's stem."""
    path = row.get("data.path") or ""
    return Path(path).stem if path else row.get("data.name") or row["variant"]


def read(folder: Path) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(variant kind, shape): {seed: metrics}} from ``folder/runs.csv``."""
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    with open(folder / "runs.csv") as f:
        for row in csv.DictReader(f):
            metrics = {k: float(v) for k, v in row.items() if "." in k and k.split(".")[0] not in ("data",) and v}
            kind = row["variant"] if row["variant"] in ("meanflow", "flow_matching") else "flow_matching"
            table[kind, shape_of(row)][int(row["seed"])] = metrics
    return table


def spread(values: list[float], digits: int = 4) -> str:
    """'mean +- std' (sample std over seeds, n - 1, as the sweep tables; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def line(shape: str, mf: dict[int, dict[str, float]], fm: dict[int, dict[str, float]],
         other: dict[int, dict[str, float]]) -> str:
    """One markdown row for a shape."""
    seeds = sorted(set(mf) & set(fm))
    col = lambda runs, key: [runs[s][key] for s in seeds]  # noqa: E731
    one_step = statistics.mean(col(mf, "meanflow_1nfe.sliced_w2"))
    ratios = ", ".join(f"{mf[s]['meanflow_1nfe.sliced_w2'] / fm[s]['euler_100nfe.sliced_w2']:.2f}" for s in seeds)
    ratio = one_step / statistics.mean(col(fm, "euler_100nfe.sliced_w2"))
    both = [s for s in seeds if s in other]
    if both:
        mean_of = lambda runs: statistics.mean(runs[s]["euler_100nfe.sliced_w2"] for s in both)  # noqa: E731
        best = statistics.mean(mf[s]["meanflow_1nfe.sliced_w2"] for s in both) / min(mean_of(fm), mean_of(other))
        other_cells = (f"{spread([other[s]['euler_100nfe.sliced_w2'] for s in both])} ({len(both)})", f"{best:.2f}")
    else:
        other_cells = ("", "")
    return (f"| {shape} | {len(seeds)} | {spread(col(mf, 'meanflow_1nfe.sliced_w2'))} / "
            f"{spread(col(mf, 'meanflow_1nfe.histogram_tv'), 3)} | {spread(col(mf, 'meanflow_2nfe.sliced_w2'))} | "
            f"{spread(col(mf, 'euler_100nfe.sliced_w2'))} | {spread(col(fm, 'euler_100nfe.sliced_w2'))} / "
            f"{spread(col(fm, 'euler_100nfe.histogram_tv'), 3)} | **{ratio:.2f}** ({ratios}) | "
            f"{other_cells[0]} | {other_cells[1]} | {spread(col(mf, 'data_floor.sliced_w2'))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("same_recipe", nargs=2, type=Path, help="the recipe-toys and recipe-shapes sweep folders")
    parser.add_argument("other_baseline", nargs="?", type=Path, help="the recipe-fm-constant sweep folder")
    args = parser.parse_args()
    runs: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for folder in args.same_recipe:
        runs.update(read(folder))
    other = read(args.other_baseline) if args.other_baseline else {}
    print("| shape | seeds | MeanFlow 1 NFE sliced W2 / hist. TV | MeanFlow 2 NFE | MeanFlow own ODE (100 Euler) "
          "| Flow Matching 100 Euler / hist. TV | ratio of the means (per seed) | other Flow Matching baseline (seeds) "
          "| ratio to the better baseline | data floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        mf, fm = runs.get(("meanflow", shape)), runs.get(("flow_matching", shape))
        if mf and fm and set(mf) & set(fm):
            print(line(shape, mf, fm, other.get(("flow_matching", shape), {})))


if __name__ == "__main__":
    main()
