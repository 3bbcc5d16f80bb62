"""Samplers on a flow whose average velocity is known in closed form.

Data x ~ N(m, s^2 I) and noise e ~ N(0, I) on the linear path z_t = (1 - t) x + t e (t = 0 data,
t = 1 noise). Every marginal z_t is N(mu_t, sigma_t^2 I) with mu_t = (1 - t) m and
sigma_t^2 = (1 - t)^2 s^2 + t^2, and the probability-flow ODE moves each point along its standard
score xi = (z - mu_t) / sigma_t, which it keeps. Hence the exact flow map and average velocity

    z_r = mu_r + (sigma_r / sigma_t) (z_t - mu_t),      u(z, r, t) = (z - z_r) / (t - r),

and the instantaneous velocity v(z, t) = u(z, t, t) = -m + sigma_t' / sigma_t (z - mu_t), with
sigma_t sigma_t' = t - (1 - t) s^2. Any k-step MeanFlow sampler fed the exact u lands exactly on
m + s e; Euler and Heun converge to it at orders 1 and 2.
"""
from __future__ import annotations

import pytest
import torch

from meanflow.sampling import nfe, ode_sample, sample, time_grid

M = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)


class GaussianFlow(torch.nn.Module):
    """model(z, r, t, labels) -> exact u of the Gaussian flow above; counts its calls."""

    num_classes = 0

    def __init__(self, mean: torch.Tensor, std: float):
        super().__init__()
        self.mean, self.std, self.calls = mean, std, 0

    def moments(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu_t (B, D) and sigma_t (B, 1) for t of shape (B,)."""
        t = t[:, None]
        return (1 - t) * self.mean, ((1 - t) ** 2 * self.std**2 + t**2).sqrt()

    def forward(self, z, r, t, labels=None):
        self.calls += 1
        assert z.dtype == torch.float64 and r.shape == t.shape == (z.shape[0],)
        assert bool((r <= t).all()), "samplers must call u(z, r, t) with r <= t"
        mu_t, sigma_t = self.moments(t)
        same = (t - r)[:, None] == 0
        tt = t[:, None]
        velocity = -self.mean + (tt - (1 - tt) * self.std**2) / sigma_t**2 * (z - mu_t)
        mu_r, sigma_r = self.moments(r)
        z_r = mu_r + sigma_r / sigma_t * (z - mu_t)
        average = (z - z_r) / torch.where(same, torch.ones_like(tt), tt - r[:, None])
        return torch.where(same, velocity, average)


def _noise(n: int = 64) -> torch.Tensor:
    return torch.randn(n, M.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_reference_flow_is_consistent():
    """The closed form is what it claims: u(z, r, t) -> v(z, t) as r -> t, and the map is a flow."""
    flow, z = GaussianFlow(M, 0.7), _noise(8)
    t = torch.full((8,), 0.6, dtype=torch.float64)
    near = flow(z, t - 1e-7, t)
    torch.testing.assert_close(near, flow(z, t, t), rtol=1e-5, atol=1e-6)
    # composing two jumps equals one: z(0.6 -> 0.3 -> 0.1) == z(0.6 -> 0.1)
    r1, r2 = torch.full_like(t, 0.3), torch.full_like(t, 0.1)
    z1 = z - (t - r1)[:, None] * flow(z, r1, t)
    two = z1 - (r1 - r2)[:, None] * flow(z1, r2, r1)
    one = z - (t - r2)[:, None] * flow(z, r2, t)
    torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
@pytest.mark.parametrize("std", [0.0, 0.4, 1.3])
def test_k_step_sampling_with_exact_average_velocity_lands_exactly(steps, std):
    flow, e = GaussianFlow(M, std), _noise()
    x = sample(flow, e, steps=steps)
    torch.testing.assert_close(x, M + std * e, rtol=1e-12, atol=1e-12)
    assert flow.calls == steps == nfe(steps)


def test_a_wrong_step_size_would_miss():
    """The check above has teeth: z - u (no step size) or the times swapped land elsewhere at k = 2."""
    flow, e = GaussianFlow(M, 0.4), _noise()
    half = torch.full((e.shape[0],), 0.5, dtype=torch.float64)
    ones, zeros = torch.ones_like(half), torch.zeros_like(half)
    z = e - flow(e, half, ones)
    wrong = z - flow(z, zeros, half)
    assert (wrong - (M + 0.4 * e)).abs().max() > 0.1


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_on_straight_paths_is_exact(method):
    """s = 0 (all data at m): every trajectory is a straight line, which Euler and Heun follow exactly."""
    flow, e = GaussianFlow(M, 0.0), _noise()
    for steps in (1, 3, 10):
        flow.calls = 0
        torch.testing.assert_close(ode_sample(flow, e, steps=steps, method=method), M.expand_as(e), rtol=1e-12, atol=1e-12)
        assert flow.calls == nfe(steps, method)


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_ode_converges_to_the_exact_flow_at_its_order(method, order):
    flow, e = GaussianFlow(M, 0.5), _noise()
    exact = M + 0.5 * e
    errors = [float((ode_sample(flow, e, steps=n, method=method) - exact).abs().max()) for n in (16, 32, 64)]
    assert errors[0] < 0.2
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.85 < coarse / fine < 2**order * 1.15, (method, errors)


def test_ode_uses_instantaneous_velocity_from_noise_to_data():
    """One Euler step from t = 1 is z - v(z, 1): at t = 1, v = -m + z."""
    flow, e = GaussianFlow(M, 0.5), _noise()
    torch.testing.assert_close(ode_sample(flow, e, steps=1, method="euler"), e - (-M + e), rtol=1e-12, atol=1e-12)


# ---- the sampler's inputs (killers of mutants that the closed-form checks above cannot see) --------


def test_time_grid_defaults_dtype_and_bad_steps():
    grid = time_grid(4)
    assert grid.dtype == torch.float32 and grid.device.type == "cpu" and grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(3, dtype=torch.float64).dtype == torch.float64 and abs(time_grid(3, dtype=torch.float64)[1].item() - 2 / 3) < 1e-15
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            time_grid(bad)


class GuidedFlow(GaussianFlow):
    """The Gaussian flow as an iMF-style model: takes omega, t_min, t_max (and ignores them), records them."""

    guidance_input = True

    def forward(self, z, r, t, labels=None, *, omega=None, t_min=None, t_max=None):
        self.seen = [float(torch.as_tensor(x).flatten()[0]) for x in (omega, t_min, t_max)]
        return super().forward(z, r, t, labels)


class Wrapped(torch.nn.Module):
    """A wrapper that exposes the inner model as ``.module`` (as DistributedDataParallel does)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_guidance_inputs_reach_iMF_style_models_only():
    e = _noise(4)
    flow = GuidedFlow(M, 0.4)
    sample(Wrapped(flow), e, steps=1)  # no default_guidance: omega 1 on [0, 1]
    assert flow.seen == [1.0, 0.0, 1.0]
    sample(Wrapped(flow), e, steps=2, omega=2.5, interval=(0.3, 0.3))  # through .module; an empty interval is allowed
    assert flow.seen == pytest.approx([2.5, 0.3, 0.3])
    with pytest.raises(ValueError, match="0 <= t_min <= t_max <= 1"):
        sample(flow, e, interval=(0.6, 0.4))
    with pytest.raises(ValueError, match="GaussianFlow has its guidance in its weights .* sample it without omega and interval"):
        sample(GaussianFlow(M, 0.4), e, omega=2.0)
