"""Sliced W2 and energy distance against closed forms and scipy."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from meanflow.metrics import pointcloud
from meanflow.metrics.pointcloud import energy_distance, sliced_wasserstein


def _w2_1d_by_quantile_grid(a: np.ndarray, b: np.ndarray, levels: int = 200_000) -> float:
    """Independent reference: W2 between 1-D empirical laws by midpoint quadrature of numpy's inverse CDFs."""
    u = (np.arange(levels) + 0.5) / levels
    qa = np.quantile(a, u, method="inverted_cdf")
    qb = np.quantile(b, u, method="inverted_cdf")
    return float(np.sqrt(np.mean((qa - qb) ** 2)))


def test_sliced_w2_in_1d_is_exact_w2_equal_sizes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.exponential(size=300)
    expected = math.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2))
    assert sliced_wasserstein(a[:, None], b[:, None], num_projections=3) == pytest.approx(expected, rel=1e-12)


def test_sliced_w2_in_1d_is_exact_w2_unequal_sizes():
    # grid of 200k levels is a multiple of 250 and 400, so the quadrature is exact too.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=250), 2.0 + 0.5 * rng.standard_t(3, size=400)
    expected = _w2_1d_by_quantile_grid(a, b)
    assert sliced_wasserstein(a[:, None], b[:, None], num_projections=1) == pytest.approx(expected, rel=1e-9)


def test_sliced_w2_of_two_gaussians_matches_closed_form():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    g = torch.Generator().manual_seed(0)
    x = 1.0 + 0.5 * torch.randn(40_000, 1, generator=g, dtype=torch.float64)
    y = -0.5 + 2.0 * torch.randn(30_000, 1, generator=g, dtype=torch.float64)
    expected = math.sqrt(1.5**2 + 1.5**2)
    assert sliced_wasserstein(x, y, num_projections=1) == pytest.approx(expected, rel=0.02)


def test_sliced_w2_of_shifted_cloud():
    # every projection sees the same cloud moved by c.theta, so SW2^2 = mean (c.theta)^2, E = |c|^2 / D
    dim = 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, dim, generator=g)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    value = sliced_wasserstein(x, x + shift, num_projections=4096, generator=torch.Generator().manual_seed(1))
    assert value == pytest.approx(shift.norm().item() / math.sqrt(dim), rel=0.04)


def test_sliced_w2_identical_zero_deterministic_and_blockwise(monkeypatch):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(150, 3, generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein(x, x) == 0.0
    whole = sliced_wasserstein(x, y)
    assert whole == sliced_wasserstein(x, y) > 0
    monkeypatch.setattr(pointcloud, "_BLOCK_ENTRIES", 1000)  # a few projections per block
    assert sliced_wasserstein(x, y) == pytest.approx(whole, rel=1e-12)


def test_energy_distance_matches_scipy_in_1d():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=700), 1.0 + 2.0 * rng.normal(size=300)
    assert energy_distance(a[:, None], b[:, None]) == pytest.approx(scipy.stats.energy_distance(a, b), rel=1e-10)


def test_energy_distance_matches_direct_formula_in_2d_and_blocks(monkeypatch):
    monkeypatch.setattr(pointcloud, "_BLOCK_ENTRIES", 1000)  # several blocks of rows
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(120, 2)), rng.uniform(size=(90, 2))

    def mean_dist(p, q):
        return np.linalg.norm(p[:, None] - q[None], axis=-1).mean()

    expected = math.sqrt(2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b))
    assert energy_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-10)


def test_energy_distance_zero_for_identical_positive_otherwise():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    assert energy_distance(x, x) == 0.0
    assert energy_distance(x, x + 0.3) > energy_distance(x, x + 0.1) > 0


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        energy_distance(torch.zeros(3), torch.zeros(3, 1))
