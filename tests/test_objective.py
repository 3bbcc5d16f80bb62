"""The MeanFlow objective against independent references: finite differences and a closed form."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meanflow import FlowMatchingLoss, MeanFlowLoss, sample
from meanflow.models import create
from meanflow.objectives import Shard, jvp_count, jvp_mask


class TanhNet(nn.Module):
    """A random nonlinear u(z, r, t) that mixes z, r and t (independent of the package's models)."""

    def __init__(self, dim: int = 3, hidden: int = 16, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.l1 = nn.Linear(dim + 2, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, dim)
        self.emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None

    def forward(self, z, r, t, labels=None):
        h = torch.tanh(self.l1(torch.cat([z, r[:, None], t[:, None] ** 2], dim=1)))
        if self.emb is not None:
            h = h + self.emb(labels)
        return self.l3(torch.tanh(self.l2(h)) * (1 + t[:, None] - r[:, None]))


def _fd_total_derivative(model, z, r, t, v, labels=None, h=1e-5):
    """Central differences of u along (z + h v, r, t + h)."""
    plus = model(z + h * v, r, t + h, labels)
    minus = model(z - h * v, r, t - h, labels)
    return (plus - minus) / (2 * h)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TanhNet().double()


@pytest.mark.parametrize("subset", [True, False])
def test_target_matches_finite_differences(net, subset):
    x = torch.randn(32, 3, dtype=torch.float64)
    loss_fn = MeanFlowLoss(ratio=0.5, jvp=("auto" if subset else "full"), time_sampler="uniform")
    out = loss_fn.targets(net, x, generator=torch.Generator().manual_seed(3))
    d = out.draws
    # t stays away from 0/1 by construction of the draws; clip anyway for the FD stencil
    dudt_fd = _fd_total_derivative(net, out.z, d.r, d.t, out.v)
    expected = out.v - (d.t - d.r)[:, None] * dudt_fd
    torch.testing.assert_close(out.target, expected, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(out.u, net(out.z, d.r, d.t), rtol=1e-12, atol=1e-12)
    assert int((d.r != d.t).sum()) == 16


def test_subset_and_full_batch_agree_in_loss_and_gradients(net):
    x = torch.randn(40, 3, dtype=torch.float64)
    grads, losses = [], []
    for subset in (True, False):
        net.zero_grad()
        loss, _ = MeanFlowLoss(ratio=0.25, jvp=("auto" if subset else "full"))(net, x, generator=torch.Generator().manual_seed(5))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_loss_is_adaptively_weighted_squared_error_with_stop_gradient(net):
    x = torch.randn(16, 3, dtype=torch.float64)
    loss_fn = MeanFlowLoss(ratio=0.5, weight_power=0.75, weight_eps=1e-2)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    out = loss_fn.targets(net, x, generator=gen())
    d = (out.u - out.target).pow(2).sum(1)
    loss, _ = loss_fn(net, x, generator=gen())
    torch.testing.assert_close(loss, (d / (d.detach() + 1e-2) ** 0.75).mean())
    # stop-gradient: the gradient equals that of mean(sg(w) * ||u - sg(target)||^2) with target constant
    net.zero_grad()
    loss.backward()
    g_loss = torch.cat([p.grad.flatten() for p in net.parameters()])
    net.zero_grad()
    u = net(out.z, out.draws.r, out.draws.t)
    d2 = (u - out.target.detach()).pow(2).sum(1)
    (d2 / (d2.detach() + 1e-2) ** 0.75).mean().backward()
    torch.testing.assert_close(g_loss, torch.cat([p.grad.flatten() for p in net.parameters()]))


@pytest.mark.parametrize("ratio", [0.25, 0.0, 1.0])
def test_stats_are_the_errors_of_each_kind_of_row(net, ratio):
    x = torch.randn(16, 3, dtype=torch.float64)
    loss_fn = MeanFlowLoss(ratio=ratio)
    out = loss_fn.targets(net, x, generator=torch.Generator().manual_seed(2))
    loss, stats = loss_fn(net, x, generator=torch.Generator().manual_seed(2))
    per_dim, mf = (out.u - out.target).pow(2).mean(1), out.draws.r != out.draws.t
    expected = {"loss": loss, "mse": per_dim.mean(), "mse_fm": per_dim[~mf].mean(), "mse_mf": per_dim[mf].mean(),
                "dudt_abs": out.dudt.abs()[mf].mean(), "frac_jvp": torch.tensor(ratio)}  # empty means are nan
    assert list(stats) == list(expected)
    assert out.draws.jvp_index.dtype == out.draws.fm_index.dtype == torch.long  # also when empty
    assert out.draws.noise.dtype == torch.float64 and (out.draws.noise.float().double() != out.draws.noise).any()
    for key, value in expected.items():
        torch.testing.assert_close(torch.tensor(stats[key], dtype=torch.float64), value.double(), equal_nan=True, msg=key)


def test_flow_matching_is_meanflow_without_jvp(net):
    x = torch.randn(16, 3, dtype=torch.float64)
    fm = FlowMatchingLoss().targets(net, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fm.draws.r, fm.draws.t)
    torch.testing.assert_close(fm.target, fm.v)
    mf = MeanFlowLoss(ratio=0.0, weight_power=0.0)(net, x, generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(FlowMatchingLoss()(net, x, generator=torch.Generator().manual_seed(1))[0], mf)


def test_flow_matching_guided_conditional_and_sharded_against_hand_arithmetic():
    torch.manual_seed(0)
    net = TanhNet(num_classes=4).double()
    x, y = torch.randn(48, 3, dtype=torch.float64), torch.randint(0, 4, (48,))
    loss_fn = FlowMatchingLoss(omega=2.0, kappa=0.5, label_drop=0.3, t_start=0.4, t_end=0.7)
    full = loss_fn.targets(net, x, y, generator=torch.Generator().manual_seed(6))
    part = slice(8, 32)
    half = loss_fn.targets(net, x[part], y[part], generator=torch.Generator().manual_seed(6), shard=Shard(8, 48))
    torch.testing.assert_close(half.draws.t, full.draws.t[part], rtol=1e-12, atol=0)
    assert torch.equal(half.draws.noise, full.draws.noise[part]) and torch.equal(half.draws.dropped, full.draws.dropped[part])
    for out, xs, ys in ((full, x, y), (half, x[part], y[part])):
        d, null = out.draws, torch.full_like(ys, 4)
        assert torch.equal(d.r, d.t) and d.dropped.any() and (~d.dropped).any()
        z = (1 - d.t[:, None]) * xs + d.t[:, None] * d.noise
        fed = torch.where(d.dropped, null, ys)
        plain = d.noise - xs
        guided = 2.0 * plain + 0.5 * net(z, d.t, d.t, ys) + (1 - 2.0 - 0.5) * net(z, d.t, d.t, null)
        apply = ~d.dropped & (d.t >= 0.4) & (d.t <= 0.7)
        assert apply.any() and (~apply & ~d.dropped).any()
        v = torch.where(apply[:, None], guided, plain)
        torch.testing.assert_close(out.z, z)
        assert torch.equal(out.labels, fed)
        torch.testing.assert_close(out.u, net(z, d.t, d.t, fed))
        torch.testing.assert_close(out.target, v)
        assert torch.equal(out.dudt, torch.zeros_like(v))
        loss, _ = loss_fn.reduce(out)
        torch.testing.assert_close(loss, (out.u - v).pow(2).sum(1).mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the target math stays in float32 under autocast
        out = loss_fn.targets(net.float(), x.float(), y, generator=torch.Generator().manual_seed(6))
    assert out.u.dtype == out.target.dtype == torch.float32


def test_fixed_jvp_count_and_shards_reassemble_global_batch():
    mask = jvp_mask(0.25, 0, 64, 64)
    assert sum(mask) == 16
    assert jvp_mask(0.25, 0, 32, 64) + jvp_mask(0.25, 32, 32, 64) == mask
    x = torch.randn(64, 2, dtype=torch.float64)
    loss_fn = MeanFlowLoss(ratio=0.25)
    full = loss_fn.draw(x, torch.Generator().manual_seed(2))
    half = loss_fn.draw(x[32:], torch.Generator().manual_seed(2), Shard(32, 64))
    assert full.jvp_rows.tolist() == mask and half.jvp_rows.tolist() == mask[32:]  # r != t rows placed by jvp_mask
    torch.testing.assert_close(full.noise[32:], half.noise)
    torch.testing.assert_close(full.r[32:], half.r)
    torch.testing.assert_close(full.t[32:], half.t)


@pytest.mark.parametrize("ratio, data_proportion", [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (0.9, 0.1), (0.7, 0.3)])
def test_the_r_neq_t_count_is_the_official_codes_for_every_batch_size(ratio, data_proportion):
    """Both official JAX codes set r = t on the first int(B * data_proportion) rows (data_proportion = 1 - ratio:
    0.75 in MeanFlow's, 0.5 in iMF's), so B - int(B * data_proportion) rows have r != t: 3 of 5 at ratio 0.5."""
    for total in range(1, 42):
        expected = total - int(total * data_proportion + 1e-9)  # the official expression, on the decimal proportion
        assert jvp_count(ratio, total) == expected, (ratio, total)
        assert sum(jvp_mask(ratio, 0, total, total)) == expected
        draws = MeanFlowLoss(ratio=ratio).draw(torch.zeros(total, 2), torch.Generator().manual_seed(0))
        assert draws.jvp_index.numel() == expected and bool((draws.r[draws.jvp_index] < draws.t[draws.jvp_index]).all())
    assert [jvp_count(0.5, b) for b in (1, 3, 5, 7)] == [1, 2, 3, 4]  # rounding half to even would give 0, 2, 2, 4


@pytest.mark.parametrize("kind", ["uniform", "lognorm", "cifar_v1"])
def test_time_samplers_order_and_range(kind):
    loss_fn = MeanFlowLoss(ratio=0.5, time_sampler=kind)
    d = loss_fn.draw(torch.zeros(4000, 1), torch.Generator().manual_seed(0))
    assert bool((d.r <= d.t).all()) and float(d.r.min()) >= 0 and float(d.t.max()) <= 1
    if kind == "lognorm":  # t = max of two logit-normals: median of sigmoid(N(-0.4, 1)) max is above sigmoid(-0.4)
        assert float(d.t.median()) > 1 / (1 + math.exp(0.4))


# ---- closed form: Gaussian data ---------------------------------------------------------------

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = torch.tensor([0.5, 0.2], dtype=torch.float64)


def _moments(t):
    m = (1 - t)[:, None] * MU
    sd = torch.sqrt((1 - t)[:, None] ** 2 * S**2 + t[:, None] ** 2)
    return m, sd


class GaussianAverageVelocity(nn.Module):
    """Exact u(z, r, t) for data N(MU, diag(S^2)): z_r = m_r + (sd_r / sd_t)(z_t - m_t)."""

    num_classes = 0

    def forward(self, z, r, t, labels=None):
        m_t, sd_t = _moments(t)
        m_r, sd_r = _moments(r)
        z_r = m_r + sd_r / sd_t * (z - m_t)
        return (z - z_r) / (t - r)[:, None]


def _marginal_velocity(z, t):
    m_t, sd_t = _moments(t)
    dsd = ((1 - t)[:, None] * -(S**2) + t[:, None]) / sd_t
    return -MU + dsd / sd_t * (z - m_t)


def test_closed_form_average_velocity_satisfies_identity_through_our_jvp():
    torch.manual_seed(0)
    r = torch.rand(64, dtype=torch.float64) * 0.5
    t = r + 0.05 + torch.rand(64, dtype=torch.float64) * 0.45
    z = torch.randn(64, 2, dtype=torch.float64)
    v = _marginal_velocity(z, t)
    u, target, _ = MeanFlowLoss().jvp_target(GaussianAverageVelocity(), z, r, t, v)
    torch.testing.assert_close(target, u, rtol=1e-10, atol=1e-10)
    # the wrong tangent (v, 1, 0) breaks the identity: the test can tell
    wrong = v - (t - r)[:, None] * torch.func.jvp(lambda a, b, c: GaussianAverageVelocity()(a, b, c), (z, r, t), (v, torch.ones_like(r), torch.zeros_like(t)))[1]
    assert (wrong - u).abs().max() > 1e-2


@pytest.mark.heavy
def test_short_training_approaches_closed_form_one_step_map():
    """Trained on N(MU, S^2) samples, the 1-NFE map x = e - u(e, 0, 1) approaches the exact MU + S e.

    Mapping every e to the mean (what a Flow Matching model does in one step) has error 0.54.
    """
    import copy

    from meanflow.models import create

    torch.manual_seed(0)
    model = create("mlp", dim=2, width=64, depth=2)
    ema = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    loss_fn = MeanFlowLoss(ratio=0.75)
    e = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    exact = (MU + S * e.double()).float()

    def error(net):
        return float((sample(net, e, steps=1) - exact).pow(2).sum(1).mean().sqrt())

    before = error(model)
    for step in range(800):
        x = (MU + S * torch.randn(256, 2, dtype=torch.float64)).float()
        loss, _ = loss_fn(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 0.02)
    after = error(ema)
    assert before > 0.9 and after < 0.3, (before, after)


# ---- classifier-free guidance inside the target --------------------------------------------------


def test_guidance_reduces_to_plain_target_with_omega_one_kappa_zero():
    torch.manual_seed(0)
    net = TanhNet(num_classes=4).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 4, (16,))
    plain = MeanFlowLoss(ratio=0.5, label_drop=0.3).targets(net, x, y, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(plain.v, plain.draws.noise - x)


def test_guided_velocity_formula_and_dropped_labels_use_plain_velocity():
    torch.manual_seed(0)
    net = TanhNet(num_classes=4).double()
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 4, (64,))
    loss_fn = MeanFlowLoss(ratio=0.5, omega=2.0, kappa=0.5, label_drop=0.3, t_start=0.0, t_end=1.0)
    out = loss_fn.targets(net, x, y, generator=torch.Generator().manual_seed(4))
    d, plain = out.draws, out.draws.noise - x
    null = torch.full_like(y, 4)
    guided = 2.0 * plain + 0.5 * net(out.z, d.t, d.t, y) + (1 - 2.0 - 0.5) * net(out.z, d.t, d.t, null)
    assert d.dropped.any() and (~d.dropped).any()
    torch.testing.assert_close(out.v[d.dropped], plain[d.dropped])
    torch.testing.assert_close(out.v[~d.dropped], guided[~d.dropped])
    assert torch.equal(out.labels[d.dropped], null[d.dropped])
    # the guided field is also the JVP tangent: target = v_g - (t - r) d/dt u along v_g
    dudt = _fd_total_derivative(net, out.z, d.r, d.t, out.v, out.labels)
    torch.testing.assert_close(out.target, out.v - (d.t - d.r)[:, None] * dudt, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0])
def test_guided_field_with_kappa_is_combined_in_float32_under_bf16_autocast(kappa):
    torch.manual_seed(0)
    net = create("mlp", dim=3, width=32, depth=2, num_classes=4)
    x, y = torch.randn(64, 3), torch.randint(0, 4, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FlowMatchingLoss(omega=2.5, kappa=kappa, label_drop=0.0).targets(net, x, y, generator=torch.Generator().manual_seed(4))
        t = out.draws.t
        u_c, u_null = net(out.z, t, t, y), net(out.z, t, t, torch.full_like(y, 4))
    assert u_c.dtype == torch.bfloat16 and out.target.dtype == torch.float32
    # 1 - omega - kappa = -1.5 or -2.5: products a bf16 value cannot hold exactly
    expected = 2.5 * (out.draws.noise - x).double() + kappa * u_c.double() + (1 - 2.5 - kappa) * u_null.double()
    torch.testing.assert_close(out.target.double(), expected, rtol=1e-6, atol=1e-6)


def test_guidance_interval_limits_where_guidance_applies():
    torch.manual_seed(0)
    net = TanhNet(num_classes=4).double()
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 4, (64,))
    out = MeanFlowLoss(omega=3.0, label_drop=0.0, t_start=0.3, t_end=0.6).targets(net, x, y, generator=torch.Generator().manual_seed(4))
    outside = (out.draws.t < 0.3) | (out.draws.t > 0.6)
    assert outside.any() and (~outside).any()
    torch.testing.assert_close(out.v[outside], (out.draws.noise - x)[outside])
    assert not torch.allclose(out.v[~outside], (out.draws.noise - x)[~outside])


def test_guidance_interval_is_closed():
    torch.manual_seed(0)
    net = TanhNet(num_classes=4).double()
    z, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t, labels = torch.tensor([0.3, 0.6, 0.2, 0.7], dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    v_g = FlowMatchingLoss(omega=3.0, t_start=0.3, t_end=0.6).guided_velocity(net, z, t, v, labels)
    guided = 3.0 * v + (1 - 3.0) * net(z, t, t, torch.full_like(labels, 4))
    torch.testing.assert_close(v_g[:2], guided[:2])  # t = t_start and t = t_end are inside
    torch.testing.assert_close(v_g[2:], v[2:])


@pytest.mark.parametrize(
    "options, words",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"time_sampler": "beta"}, "time sampler"),
        ({"sigma": 0.0}, "sigma"),
        ({"weight_eps": 0.0}, "weight_eps"),
        ({"label_drop": -0.1}, "label_drop"),
        ({"t_start": 0.8, "t_end": 0.2}, "t_end"),
        ({"omega": 0.0}, "omega"),
    ],
)
def test_invalid_options_are_named(options, words):
    with pytest.raises(ValueError, match=words):
        MeanFlowLoss(**options)
    assert MeanFlowLoss(t_start=0.5, t_end=0.5).t_end == 0.5  # an interval of one point is allowed


def test_label_errors(net):
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^labels were given but the model is unconditional \(num_classes = 0\)$"):
        MeanFlowLoss()(net, x, torch.zeros(4, dtype=torch.long))
    cond = TanhNet(num_classes=3).double()
    with pytest.raises(ValueError, match=r"^labels must have shape \(4,\), got \(4, 1\)$"):
        MeanFlowLoss()(cond, x, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        MeanFlowLoss()(cond, x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"^guidance \(omega != 1 or kappa != 0\) needs a class-conditional model$"):
        MeanFlowLoss(omega=2.0)(net, x)


def test_a_plain_function_is_an_unconditional_model(net):
    def plain(z, r, t, labels=None):  # no num_classes attribute: unconditional, never given labels
        assert labels is None
        return net(z, r, t)

    x = torch.randn(8, 3, dtype=torch.float64)
    loss, _ = MeanFlowLoss()(plain, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, MeanFlowLoss()(net, x, generator=torch.Generator().manual_seed(0))[0])
