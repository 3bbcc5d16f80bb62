"""Write the 2-D point clouds used to validate the point-cloud recipe (docs/RESULTS.md) as .npy files.

None of them is a built-in toy: each mixes thin structures with dense or sparse parts, the case
where MeanFlow defaults tuned on the checkerboard failed. 40,000 points each, seeded, coordinates
within about [-3, 3].

    python scripts/point_shapes.py OUT_DIR [--num 40000] [--seed 0]

Shapes: ``strokes_cluster`` (three thin line segments and a thin circle around a dense Gaussian
cluster holding 30% of the points), ``letters`` (the strokes of "MF", thin), ``blob_grid``
(a 4 x 4 grid of tight Gaussians with weights 1..16), ``ring_dot`` (a thin ring, a dense dot in its
centre and a sparse uniform background).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def segments(rng: np.random.Generator, n: int, ends: list[tuple[float, float, float, float]], noise: float) -> np.ndarray:
    """n points uniform along the segments (x0, y0, x1, y1), chosen by length, plus Gaussian noise."""
    ends_a = np.asarray(ends, dtype=np.float64)
    lengths = np.hypot(ends_a[:, 2] - ends_a[:, 0], ends_a[:, 3] - ends_a[:, 1])
    which = rng.choice(len(ends_a), size=n, p=lengths / lengths.sum())
    s = rng.random(n)[:, None]
    start, stop = ends_a[which, :2], ends_a[which, 2:]
    return start + s * (stop - start) + noise * rng.standard_normal((n, 2))


def circle(rng: np.random.Generator, n: int, radius: float, noise: float, centre=(0.0, 0.0)) -> np.ndarray:
    angle = 2 * math.pi * rng.random(n)
    return np.stack([np.cos(angle), np.sin(angle)], 1) * radius + np.asarray(centre) + noise * rng.standard_normal((n, 2))


def strokes_cluster(rng: np.random.Generator, n: int) -> np.ndarray:
    dense = int(0.3 * n)
    ring = int(0.25 * n)
    lines = segments(rng, n - dense - ring, [(-2.8, -2.5, 2.8, -2.5), (-2.8, 2.5, -0.5, 0.6), (0.8, 0.8, 2.8, 2.6)], 0.02)
    return np.concatenate([0.15 * rng.standard_normal((dense, 2)) + [0.6, -0.8], circle(rng, ring, 1.6, 0.02, (0.6, -0.8)), lines])


def letters(rng: np.random.Generator, n: int) -> np.ndarray:
    m = [(-2.8, -2.0, -2.8, 2.0), (-2.8, 2.0, -1.6, 0.0), (-1.6, 0.0, -0.4, 2.0), (-0.4, 2.0, -0.4, -2.0)]
    f = [(0.8, -2.0, 0.8, 2.0), (0.8, 2.0, 2.8, 2.0), (0.8, 0.2, 2.2, 0.2)]
    return segments(rng, n, m + f, 0.03)


def blob_grid(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = np.array([(x, y) for x in (-2.25, -0.75, 0.75, 2.25) for y in (-2.25, -0.75, 0.75, 2.25)])
    weights = np.arange(1, 17, dtype=np.float64)
    which = rng.choice(16, size=n, p=weights / weights.sum())
    return centres[which] + 0.08 * rng.standard_normal((n, 2))


def ring_dot(rng: np.random.Generator, n: int) -> np.ndarray:
    dot, background = int(0.3 * n), int(0.05 * n)
    return np.concatenate([0.1 * rng.standard_normal((dot, 2)), rng.uniform(-3, 3, (background, 2)),
                           circle(rng, n - dot - background, 2.4, 0.03)])


SHAPES = {"strokes_cluster": strokes_cluster, "letters": letters, "blob_grid": blob_grid, "ring_dot": ring_dot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, make) in enumerate(SHAPES.items()):
        points = make(np.random.default_rng([args.seed, i]), args.num)
        points = points[np.random.default_rng([args.seed, i, 1]).permutation(len(points))].astype(np.float32)
        np.save(args.out / f"{name}.npy", points)
        print(f"{args.out / name}.npy: {points.shape}, std {points.std(0).round(2).tolist()}")


if __name__ == "__main__":
    main()
