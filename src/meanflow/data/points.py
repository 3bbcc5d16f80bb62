"""User point clouds of any dimension (.npy, .npz, .csv) and scatter plots of point samples.

Points are used exactly as given: nothing is centred or rescaled. MeanFlow starts from N(0, I)
noise, so data far from unit scale (coordinates in the thousands, say) train poorly; standardise
such data yourself before saving it (and undo it on generated samples).

File formats (N points of dimension D, optional integer class labels 0..K-1):

* ``.npy``: one (N, D) array.
* ``.npz``: the array under key ``x``, ``data`` or ``points`` (else the first array in the file);
  labels, if any, under ``labels`` or ``y``.
* ``.csv``: comma separated numbers, one point per line, an optional header line; with a header,
  a column named ``label`` holds the class labels. The first line is a header when none of its
  cells is a number.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .arrays import check_labels, read_array_file

POINT_SUFFIXES = (".npy", ".npz", ".csv")
POINT_KEYS = ("x", "data", "points")


def load_points(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a point cloud file; returns x (N, D) float32 and labels (N,) int64 or None.

    Raises FileNotFoundError for a missing file and ValueError for an unsupported suffix, an empty
    file or array, non-numeric entries, NaN/inf values, an array that is not (N, D), or bad labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point cloud file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in POINT_SUFFIXES:
        raise ValueError(f"unsupported point cloud file {str(path)!r}: the suffix must be one of {', '.join(POINT_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise ValueError(f"point cloud file {str(path)!r} is empty")
    x, labels = _read_csv(path) if suffix == ".csv" else read_array_file(path, POINT_KEYS)
    x = check_points(x, repr(str(path)))
    return torch.from_numpy(x), None if labels is None else check_labels(labels, x.shape[0], repr(str(path)))


def check_points(x: np.ndarray, source: str) -> np.ndarray:
    """Validate a numeric (N, D) array (finite, non-empty); returns it as float32."""
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{source}: points must be numeric, got an array of dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{source}: points must be a 2-D array of shape (N, D), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{source}: the point array is empty (shape {x.shape})")
    bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad_rows.size:
        count = int((~np.isfinite(x)).sum())
        raise ValueError(f"{source}: {count} NaN or inf values in {bad_rows.size} rows; the first is row {bad_rows[0]} (0-based)")
    return np.ascontiguousarray(x, dtype=np.float32)


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{str(path)!r} is empty: no data rows")
    header = [cell.strip() for cell in rows[0]] if not any(_is_number(cell) for cell in rows[0]) else None
    body = rows[1:] if header else rows
    if not body:
        raise ValueError(f"{str(path)!r} has a header line but no data rows")
    width = len(header) if header else len(body[0])
    first_line = 2 if header else 1
    for offset, row in enumerate(body):
        if len(row) != width:
            raise ValueError(f"{str(path)!r} line {first_line + offset}: expected {width} columns, got {len(row)}")
    table = np.array([[_parse_cell(cell, path, first_line + i, j) for j, cell in enumerate(row)] for i, row in enumerate(body)])
    if header and "label" in header:
        col = header.index("label")
        return np.delete(table, col, axis=1), table[:, col]
    return table, None


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _parse_cell(cell: str, path: Path, line: int, column: int) -> float:
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{str(path)!r} line {line}, column {column + 1}: non-numeric value {cell.strip()!r}") from None


def save_points_plot(
    samples: torch.Tensor | np.ndarray,
    path: str | Path,
    reference: torch.Tensor | np.ndarray | None = None,
    title: str | None = None,
) -> None:
    """Scatter plot PNG of ``samples`` (N, D), next to ``reference`` (M, D) when given.

    Points of dimension D > 2 are shown by their first two coordinates; both panels share axes.
    """
    panels = [(f"samples (n={len(samples)})", samples)]
    if reference is not None:
        panels.insert(0, (f"reference data (n={len(reference)})", reference))
    save_point_panels(panels, path, title)


def save_point_panels(panels: list[tuple[str, torch.Tensor | np.ndarray]], path: str | Path, title: str | None = None) -> None:
    """PNG of scatter plots side by side on shared axes: ``panels`` is a list of (caption, points (N, D))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (caption, points) in zip(axes, panels):
        points = _first_two(points)
        ax.scatter(points[:, 0], points[:, 1], s=1.0, alpha=0.5, linewidths=0)
        ax.set_title(caption)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _first_two(points: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2) float numpy array of the first two coordinates (a 1-D cloud gets y = 0)."""
    array = points.detach().cpu().float().numpy() if isinstance(points, torch.Tensor) else np.asarray(points, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"points to plot must have shape (N, D), got {array.shape}")
    if array.shape[1] == 1:
        return np.concatenate([array, np.zeros_like(array)], axis=1)
    return array[:, :2]
