"""The (r, t) samplers' parameters reach the draws: moments of drawn t and r against closed forms.

Closed forms used (X, Y independent normals, Phi / phi the standard normal CDF / density):
  max of two standard normals: mean 1 / sqrt(pi), variance 1 - 1 / pi (min: minus the mean);
  min(X, Y) with X ~ N(a, s^2), Y ~ N(b, q^2), theta = sqrt(s^2 + q^2), d = (b - a) / theta:
      E min = a Phi(d) + b Phi(-d) - theta phi(d)                                 (Clark, 1961);
  r = min(U1, U2), t = max(U1, U2) of uniforms: E t = 2/3, E r = 1/3, Var = 1/18, E[r t] = 1/4.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meanflow import MeanFlowLoss

N = 200_000


def _draw(**options) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) of N samples, all with r != t (ratio 1), in float64."""
    loss = MeanFlowLoss(ratio=1.0, **options)
    x = torch.zeros(N, 1, dtype=torch.float64)
    draws = loss.draw(x, generator=torch.Generator().manual_seed(0))
    return draws.r, draws.t


def _close(sample: torch.Tensor, expected: float, spread: float) -> None:
    """Sample mean within 5 standard errors of ``expected`` (``spread``: the population std)."""
    assert abs(float(sample.mean()) - expected) < 5 * spread / math.sqrt(sample.numel()), (float(sample.mean()), expected)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def test_uniform():
    r, t = _draw(time_sampler="uniform")
    assert bool((r <= t).all()) and float(r.min()) >= 0 and float(t.max()) <= 1
    _close(t, 2 / 3, math.sqrt(1 / 18))
    _close(r, 1 / 3, math.sqrt(1 / 18))
    _close((t - 2 / 3) ** 2, 1 / 18, 0.05)
    _close(r * t, 1 / 4, 0.25)


@pytest.mark.parametrize("mu, sigma", [(-0.4, 1.0), (0.7, 0.5)])
def test_lognorm(mu, sigma):
    r, t = _draw(time_sampler="lognorm", mu=mu, sigma=sigma)
    lt, lr = _logit(t), _logit(r)
    spread = sigma * math.sqrt(1 - 1 / math.pi)
    _close(lt, mu + sigma / math.sqrt(math.pi), spread)
    _close(lr, mu - sigma / math.sqrt(math.pi), spread)
    _close((lt - mu - sigma / math.sqrt(math.pi)) ** 2, spread**2, 2 * spread**2)
    # the pair is (min, max) of two independent draws: E[logit r + logit t] = 2 mu
    _close(lr + lt, 2 * mu, sigma * math.sqrt(2))


@pytest.mark.parametrize("mu, sigma, r_mu, r_sigma", [(-0.6, 1.6, -4.0, 1.6), (0.2, 0.8, -1.0, 0.5)])
def test_cifar_v1(mu, sigma, r_mu, r_sigma):
    r, t = _draw(time_sampler="cifar_v1", mu=mu, sigma=sigma, r_mu=r_mu, r_sigma=r_sigma)
    lt, lr = _logit(t), _logit(r)
    _close(lt, mu, sigma)
    _close((lt - mu) ** 2, sigma**2, 2 * sigma**2)
    theta = math.hypot(sigma, r_sigma)
    d = (mu - r_mu) / theta
    phi = math.exp(-d * d / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(d / math.sqrt(2)))
    _close(lr, r_mu * cdf + mu * (1 - cdf) - theta * phi, max(sigma, r_sigma))


def test_ratio_sets_the_share_of_r_equal_t():
    loss = MeanFlowLoss(ratio=0.3)
    draws = loss.draw(torch.zeros(1000, 2), generator=torch.Generator().manual_seed(1))
    assert int((draws.r != draws.t).sum()) == 300 and draws.jvp_index.numel() == 300


def test_samplers_map_each_normal_draw():
    """Draw by draw (not only in distribution): a sample's times follow its own normals."""
    from scipy.special import expit
    from scipy.stats import norm

    from meanflow.objectives.time_samplers import TimeSampler

    n1, n2 = torch.tensor([-1.5, 0.2, 2.0], dtype=torch.float64), torch.tensor([0.5, -0.3, 1.0], dtype=torch.float64)
    a, b = n1.numpy(), n2.numpy()
    cases = {
        TimeSampler("uniform", mu=0.0, sigma=1.0): (norm.cdf(a), norm.cdf(b)),
        TimeSampler("lognorm", mu=-0.4, sigma=1.3): (expit(-0.4 + 1.3 * a), expit(-0.4 + 1.3 * b)),
    }
    for sampler, (first, second) in cases.items():
        r, t = sampler(n1, n2)
        np.testing.assert_allclose(t.numpy(), np.maximum(first, second), rtol=1e-12)
        np.testing.assert_allclose(r.numpy(), np.minimum(first, second), rtol=1e-12)
    t_only = expit(0.2 + 0.8 * a)
    r, t = TimeSampler("cifar_v1", mu=0.2, sigma=0.8, r_mu=-1.0, r_sigma=0.5)(n1, n2)
    np.testing.assert_allclose(t.numpy(), t_only, rtol=1e-12)
    np.testing.assert_allclose(r.numpy(), np.minimum(expit(-1.0 + 0.5 * b), t_only), rtol=1e-12)
    for half in ({"r_mu": -1.0}, {"r_sigma": 0.5}):  # without both r parameters, t only (r = t)
        r, t = TimeSampler("cifar_v1", mu=0.2, sigma=0.8, **half)(n1, n2)
        np.testing.assert_allclose(r.numpy(), t_only, rtol=1e-12)


def test_label_drops_go_to_r_equal_t_rows_unless_independent():
    x = torch.zeros(400, 1)
    placed = MeanFlowLoss(ratio=0.5, label_drop=0.3).draw(x, generator=torch.Generator().manual_seed(0))
    assert not bool(placed.dropped[placed.jvp_index].any()) and int(placed.dropped.sum()) > 80
    independent = MeanFlowLoss(ratio=0.5, label_drop=0.3, independent_label_drop=True).draw(x, generator=torch.Generator().manual_seed(0))
    assert 0.2 < float(independent.dropped[independent.jvp_index].double().mean()) < 0.4


def test_unknown_sampler_kind_is_named():
    from meanflow.objectives.time_samplers import TimeSampler

    with pytest.raises(ValueError, match="time sampler kind must be one of .*got 'gauss'"):
        TimeSampler("gauss", mu=0.0, sigma=1.0)
