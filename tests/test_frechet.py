"""Frechet distance against independent float64 references, and the statistics file format."""
import numpy as np
import pytest
import scipy.linalg
import torch

from meanflow.metrics.frechet import RunningStatistics, feature_statistics, frechet_distance, load_stats, save_stats


def _random_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _random_covariance(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    factor = rng.standard_normal((rank, dim))
    return factor.T @ factor / rank


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    d1, d2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rank", [12, 5, 0])
def test_commuting_rank_deficient_closed_form(rank):
    # S_i = Q diag(d_i) Q^T commute, so Tr sqrt(S1 S2) = sum sqrt(d1 d2) even when both are singular.
    rng = np.random.default_rng(1)
    dim = 12
    q = _random_orthogonal(rng, dim)
    d1 = np.concatenate([rng.uniform(0.5, 2.0, rank), np.zeros(dim - rank)])
    d2 = np.concatenate([np.zeros(dim - rank), rng.uniform(0.5, 2.0, rank)])[::-1]
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_two_dimensional_closed_form_non_commuting_singular():
    # For 2x2, Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) when M = S1 S2 has non-negative eigenvalues.
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.outer([1.0, 2.0], [1.0, 2.0])  # rank 1, not commuting with s1
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(max(np.linalg.det(m), 0.0)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n1,n2", [(10, 7), (64, 3), (200, 300)])
def test_low_rank_against_nuclear_norm(n1, n2):
    # S1 = A^T A, S2 = B^T B: the non-zero eigenvalues of S1 S2 are the squared singular values of
    # A B^T, so Tr sqrt(S1 S2) is the nuclear norm of A B^T (independent of any matrix square root).
    rng = np.random.default_rng(2)
    dim = 40
    a, b = rng.standard_normal((n1, dim)) / np.sqrt(n1), rng.standard_normal((n2, dim)) / np.sqrt(n2)
    s1, s2 = a.T @ a, b.T @ b
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_full_rank_against_scipy_sqrtm():
    rng = np.random.default_rng(3)
    dim = 64
    s1, s2 = _random_covariance(rng, dim, 200), _random_covariance(rng, dim, 150)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_identical_inputs_give_zero_and_tensors_are_accepted():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((50, 80))  # rank-deficient covariance (N < D)
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    mu_t, sigma_t = torch.from_numpy(mu).float(), torch.from_numpy(sigma).float()
    assert abs(frechet_distance(mu_t, sigma_t, mu, sigma)) < 1e-4


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_statistics_match_numpy_and_stream():
    rng = np.random.default_rng(5)
    features = 100.0 + rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    mu, sigma = feature_statistics(torch.from_numpy(features))
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10)
    running = RunningStatistics()
    for chunk in np.array_split(features, 7):
        running.update(chunk)
    mu_r, sigma_r = running.compute()
    np.testing.assert_allclose(mu_r, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_r, sigma, rtol=1e-10, atol=1e-12)


def test_save_and_load_stats(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = feature_statistics(rng.standard_normal((20, 4)))
    save_stats(tmp_path / "ref.npz", mu, sigma, feature="inception", num_samples=20)
    mu_l, sigma_l = load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu_l, mu)
    np.testing.assert_array_equal(sigma_l, sigma)


def test_load_adm_reference_batch(tmp_path):
    # ADM reference batches: arr_0 uint8 images (N, H, W, 3) plus mu/sigma and spatial mu_s/sigma_s.
    rng = np.random.default_rng(7)
    mu, sigma = feature_statistics(rng.standard_normal((30, 8)))
    path = tmp_path / "VIRTUAL_fake256_labeled.npz"
    np.savez(
        path,
        arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        mu=mu.astype(np.float32),
        sigma=sigma,
        mu_s=np.zeros(3),
        sigma_s=np.eye(3),
    )
    mu_l, sigma_l = load_stats(path)
    assert mu_l.dtype == np.float64 and sigma_l.shape == (8, 8)
    np.testing.assert_allclose(mu_l, mu, rtol=1e-6)
    np.testing.assert_array_equal(sigma_l, sigma)


def test_load_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="fid-stats"):
        load_stats(tmp_path / "images_only.npz")


def _precision_recall_bruteforce(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(queries, support, r):
        d = np.linalg.norm(queries[:, None] - support[None], axis=-1)
        return np.mean((d <= r[None]).any(axis=1))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_against_bruteforce():
    from meanflow.metrics import precision_recall

    rng = np.random.default_rng(8)
    real = rng.standard_normal((120, 5))
    fake = 0.6 * rng.standard_normal((90, 5)) + 0.8  # narrower and shifted: precision != recall
    precision, recall = precision_recall(real, torch.from_numpy(fake), k=3)
    expected = _precision_recall_bruteforce(real, fake, 3)
    assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < recall < precision < 1.0
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
