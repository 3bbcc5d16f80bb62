"""The one reader of numeric array files (.npy, .npz) and the label check shared by every source
that reads them (points, images); pickled content is refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LABEL_KEYS = ("labels", "y")


def check_labels(labels: np.ndarray, n: int, source: str) -> torch.Tensor:
    """Validate class labels: shape (n,), integers in 0..K-1; returns (n,) int64."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{source}: labels must have shape ({n},) to match the data, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isfinite(labels)):
        raise ValueError(f"{source}: labels must be finite numbers, got dtype {labels.dtype}")
    if np.any(labels != np.round(labels)) or labels.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative integers 0..K-1")
    return torch.from_numpy(labels.astype(np.int64))


def read_array_file(path: Path, keys: tuple[str, ...], label_keys: tuple[str, ...] = LABEL_KEYS) -> tuple[np.ndarray, np.ndarray | None]:
    """Data array and labels (or None) of a .npy file (the array) or a .npz archive.

    In a .npz archive the data is under the first of ``keys`` present (else the first array) and the
    labels under the first of ``label_keys`` present. Unreadable or pickled content raises ValueError.
    """
    loaded = _load_numpy(path)
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded as archive:
        names = list(archive.files)
        if not names:
            raise ValueError(f"{str(path)!r} holds no arrays")
        key = next((k for k in keys if k in names), names[0])
        label_key = next((k for k in label_keys if k in names and k != key), None)
        try:
            return archive[key], None if label_key is None else archive[label_key]
        except ValueError as err:
            raise ValueError(f"{str(path)!r}: the arrays must be numeric ({err})") from err


def _load_numpy(path: Path):
    """``np.load`` without pickles; a file numpy cannot read becomes a ValueError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a readable numeric {path.suffix} file: {err}") from err


__all__ = ["LABEL_KEYS", "check_labels", "read_array_file"]
