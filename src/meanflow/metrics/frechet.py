"""Frechet distance between Gaussians fitted to features, and reference statistics files.

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Everything is computed in float64 (NumPy). The trace of the matrix square root uses the identity
Tr (S1 S2)^{1/2} = Tr (A S2 A)^{1/2} with A = S1^{1/2}: A S2 A is symmetric positive semi-definite, so
two symmetric eigendecompositions give the answer without complex arithmetic, and rank-deficient
(N < D) or near-singular covariances need no eps*I offset. Eigenvalues under the round-off floor
(including round-off negatives) count as zero, which keeps rank-deficient inputs exact instead of
biased by square roots of round-off; a matrix with clearly negative eigenvalues is not a covariance
and raises ValueError. For full-rank inputs this agrees with the scipy.linalg.sqrtm route of
pytorch-fid and the ADM evaluator to round-off.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Negative eigenvalues larger than this fraction of the largest one mean the input is not a covariance.
_PSD_RTOL = 1e-8
# Keys of reference statistics we accept; ADM reference batches also hold ``arr_0`` (images)
# and ``mu_s`` / ``sigma_s`` (spatial features), which we ignore.
_STATS_KEYS = ("mu", "sigma")


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Any array-like -> float64 NumPy array (tensors are detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_eigenvalues(matrix: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD (D, D) matrix, round-off eigenvalues set to 0.

    Returns (eigenvalues (D,), eigenvectors (D, D)). Raises ValueError when an eigenvalue is
    negative beyond round-off, i.e. the matrix is not a covariance.
    """
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    scale = max(float(np.abs(values).max(initial=0.0)), np.finfo(np.float64).tiny)
    if values.min(initial=0.0) < -_PSD_RTOL * scale * matrix.shape[0]:
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {values.min():.3e}, "
            f"largest {values.max():.3e}); pass a covariance matrix"
        )
    # Eigenvalues below the round-off floor (numpy.linalg.matrix_rank's tolerance) are zero: their
    # square roots (~1e-8 each) would otherwise add up to a visible bias for rank-deficient inputs.
    floor = scale * matrix.shape[0] * np.finfo(np.float64).eps
    return np.where(values > floor, values, 0.0), vectors


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S1 S2)^{1/2} for symmetric PSD S1, S2 of shape (D, D), in float64."""
    values1, vectors1 = _psd_eigenvalues(sigma1, "sigma1")
    root1 = (vectors1 * np.sqrt(values1)) @ vectors1.T  # S1^{1/2}, (D, D)
    middle = root1 @ sigma2 @ root1  # (D, D), symmetric PSD, same spectrum as S1 S2
    values, _ = _psd_eigenvalues(middle, "sigma1^1/2 sigma2 sigma1^1/2")
    return float(np.sqrt(values).sum())


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (what "FID" reports).

    mu1, mu2: (D,); sigma1, sigma2: (D, D) covariances. Computed in float64.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(f"means must both have shape (D,), got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"covariances must have shape ({dim}, {dim}), got {sigma1.shape} and {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # Identical inputs can land a hair below zero through round-off.
    return max(float(distance), 0.0)


class RunningStatistics:
    """Streaming mean and covariance of features, accumulated in float64.

    ``update(features (B, D))`` any number of times, then ``compute() -> (mu (D,), sigma (D, D))``.
    Features are centred on the first batch's mean before accumulation so that the sums stay
    well-conditioned; memory is O(D^2) whatever the number of samples.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch of features (B, D)."""
        x = _as_float64(features)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"features must have shape (B, D) with B > 0, got {x.shape}")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self._shift.shape[0]} to {x.shape[1]}")
        centred = x - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += x.shape[0]

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) with the unbiased (N - 1) covariance, as numpy.cov."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        mean_centred = self._sum / self.count
        sigma = (self._outer - self.count * np.outer(mean_centred, mean_centred)) / (self.count - 1)
        return self._shift + mean_centred, sigma


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), both float64."""
    stats = RunningStatistics()
    stats.update(features)
    return stats.compute()


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **info: str | int | float) -> None:
    """Write reference statistics to an ``.npz`` with keys ``mu`` (D,) and ``sigma`` (D, D).

    ``info`` (e.g. ``feature="inception"``, ``num_samples=50000``) is stored alongside as scalars so
    that the conventions travel with the numbers; :func:`load_stats` ignores it.
    """
    mu, sigma = _as_float64(mu), _as_float64(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    clash = set(info) & {*_STATS_KEYS, "arr_0"}
    if clash:
        raise ValueError(f"info keys {sorted(clash)} are reserved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a file handle keeps numpy from appending ".npz"
        np.savez(handle, mu=mu, sigma=sigma, **{key: np.asarray(value) for key, value in info.items()})


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu (D,), sigma (D, D)) float64 from an ``.npz``.

    Accepts files written by :func:`save_stats` and the ADM reference batches used by the MeanFlow
    papers (e.g. ``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images, ``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``); keys other than ``mu`` and ``sigma`` are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in _STATS_KEYS if key not in data.files]
        if missing:
            raise ValueError(
                f"{path} has no {' / '.join(missing)} (keys: {data.files}); compute statistics with "
                "`meanflow fid-stats SOURCE --out FILE.npz`"
            )
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma
