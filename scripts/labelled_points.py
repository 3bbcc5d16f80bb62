"""Write a labelled 2-D point cloud for class-conditional toy runs (Table 1f at toy scale, docs/ABLATIONS.md).

``checkerboard4``: the built-in checkerboard's distribution (uniform on the 8 dark cells of a 4 x 4
board over [-2, 2]^2), each point labelled by the row of its cell: 4 classes, each the two dark cells
of one row, so every class is itself a two-mode distribution. Seeded; written as .npz with the
points under ``x`` (N, 2) float32 and the labels under ``labels`` (N,) int64 (see data/points.py).

    python scripts/labelled_points.py OUT.npz [--num 20000] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def checkerboard4(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on the dark cells (row + column even) of the 4 x 4 board; labels = cell row 0..3."""
    row = rng.integers(0, 4, n)
    col = 2 * rng.integers(0, 2, n) + row % 2
    x = np.stack([col, row], axis=1) + rng.random((n, 2)) - 2.0
    return x.astype(np.float32), row.astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output .npz file")
    parser.add_argument("--num", type=int, default=20_000, help="number of points")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    x, labels = checkerboard4(np.random.default_rng(args.seed), args.num)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, x=x, labels=labels)
    print(f"wrote {args.out}: {len(x)} points, {labels.max() + 1} classes")


if __name__ == "__main__":
    main()
