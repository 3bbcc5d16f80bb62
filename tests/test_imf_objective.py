"""The iMF objective against an independent float64 reference written from the official formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from meanflow import objectives
from meanflow.autodiff.dual import Dual
from meanflow.config import ConfigError, from_dict, load_config
from meanflow.models import create
from meanflow.objectives import IMFLoss, Shard

f64 = dict(dtype=torch.float64)


class TwoHeadNet(nn.Module):
    """A small two-headed u/v model on the iMF contract: sees h = t - r, omega, t_min, t_max, labels."""

    guidance_input = True

    def __init__(self, dim: int = 3, hidden: int = 24, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.inp = nn.Linear(dim + 4, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden)
        self.trunk = nn.Linear(hidden, hidden)
        self.u_head, self.v_head = nn.Linear(hidden, dim), nn.Linear(hidden, dim)
        self.calls: list[tuple[int, bool]] = []  # (rows, whether z carried a forward-mode tangent)

    def forward(self, z, r, t, labels=None, *, omega=None, t_min=None, t_max=None, return_v=False):
        self.calls.append((z.shape[0], fwAD.unpack_dual(z).tangent is not None))
        one = torch.ones_like(t)
        omega, t_min, t_max = (one if omega is None else omega), (0 * one if t_min is None else t_min), (one if t_max is None else t_max)
        labels = torch.full_like(t, self.num_classes, dtype=torch.long) if labels is None else labels
        h = t - r
        feats = torch.cat([z, torch.sin(3 * h)[:, None], (1 - 1 / omega)[:, None], t_min[:, None], t_max[:, None]], dim=1)
        trunk = torch.tanh(self.trunk(torch.tanh(self.inp(feats) + self.emb(labels))))
        u, v = self.u_head(trunk) * (1 + h[:, None]), self.v_head(trunk)
        return (u, v) if return_v else u


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TwoHeadNet().double()


def _reference(net, x, y, out, eps=0.01, h=1e-6):
    """v_c, v_g, du/dt (finite differences along (v_c, dt = 1)) and the loss, from the official formulas."""
    d, c = out.draws, out.draws.conditioning
    e, t, r = d.noise, d.t, d.r
    z = (1 - t)[:, None] * x + t[:, None] * e
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    w = torch.where((t >= c["t_min"]) & (t <= c["t_max"]), c["omega"], one)
    v_c = net(z, t, t, y, omega=w, t_min=zero, t_max=one, return_v=True)[1]
    v_u = net(z, t, t, torch.full_like(y, 3), omega=one, t_min=zero, t_max=one, return_v=True)[1]
    v_g = (e - x) + (1 - 1 / w)[:, None] * (v_c - v_u)
    v_g = torch.where(d.dropped[:, None], e - x, v_g)
    fed = torch.where(d.dropped, 3, y)
    kw = dict(omega=c["omega"], t_min=c["t_min"], t_max=c["t_max"])
    dudt = (net(z + h * v_c, r, t + h, fed, **kw) - net(z - h * v_c, r, t - h, fed, **kw)) / (2 * h)
    u, v = net(z, r, t, fed, **kw, return_v=True)
    l_u = (u + (t - r)[:, None] * dudt - v_g).pow(2).sum(1)
    l_v = (v - v_g).pow(2).sum(1)
    loss = (l_u / (l_u + eps) + l_v / (l_v + eps)).mean()
    return v_c, v_g, dudt, loss, (l_u.mean() / x.shape[1], l_v.mean() / x.shape[1])


@pytest.mark.parametrize("mode", ["auto", "full"])
def test_target_tangent_and_loss_match_the_official_formulas(net, mode):
    x, y = torch.randn(32, 3, **f64), torch.randint(0, 3, (32,))
    loss_fn = IMFLoss(jvp=mode)
    out = loss_fn.targets(net, x, y, torch.Generator().manual_seed(3))
    loss, stats = loss_fn(net, x, y, torch.Generator().manual_seed(3))
    v_c, v_g, dudt, ref_loss, (loss_u, loss_v) = _reference(net, x, y, out)
    rows = out.draws.jvp_index
    torch.testing.assert_close(out.tangent, v_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.target, v_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.v, v_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.dudt[rows], dudt[rows], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=0)
    assert not out.dudt[out.draws.fm_index].any() and stats["frac_jvp"] == 0.5
    assert stats["loss"] == pytest.approx(ref_loss.item(), rel=1e-8)
    omega = out.draws.conditioning["omega"]
    torch.testing.assert_close(omega, loss_fn.draw(x, torch.Generator().manual_seed(3)).conditioning["omega"], rtol=0, atol=0)
    assert bool((omega[out.draws.jvp_index] > 1).all())
    part = slice(8, 24)  # a shard of the global batch gets its rows of the global batch's targets
    half = loss_fn.targets(net, x[part], y[part], torch.Generator().manual_seed(3), shard=Shard(8, 32))
    torch.testing.assert_close(half.target, out.target[part], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(half.draws.conditioning["omega"], omega[part], rtol=1e-12, atol=0)
    assert stats["loss_u"] == pytest.approx(loss_u.item(), rel=1e-6) and stats["loss_v"] == pytest.approx(loss_v.item(), rel=1e-8)
    # the tangent is the predicted v_c, not e - x: along e - x the derivative differs
    e_x = (out.draws.noise - x)[rows]
    kw = {k: v[rows] for k, v in out.draws.conditioning.items()}
    z, r, t, fed = out.z[rows], out.draws.r[rows], out.draws.t[rows], out.labels[rows]
    wrong = (net(z + 1e-6 * e_x, r, t + 1e-6, fed, **kw) - net(z - 1e-6 * e_x, r, t - 1e-6, fed, **kw)) / 2e-6
    assert (wrong - out.dudt[rows]).abs().max() > 1e-2


def test_unconditional_model_regresses_e_minus_x_along_its_own_v_head():
    torch.manual_seed(1)
    net = TwoHeadNet(num_classes=0).double()
    x = torch.randn(16, 3, **f64)
    out = IMFLoss().targets(net, x, None, torch.Generator().manual_seed(2))
    d, c = out.draws, out.draws.conditioning
    t, r, e = d.t, d.r, d.noise
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    assert torch.equal(c["omega"], one) and out.labels is None
    z = (1 - t)[:, None] * x + t[:, None] * e
    v_c = net(z, t, t, omega=one, t_min=zero, t_max=one, return_v=True)[1]
    torch.testing.assert_close(out.tangent, v_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.target, e - x, rtol=1e-12, atol=1e-12)
    rows, h, kw = d.jvp_index, 1e-6, dict(omega=one, t_min=c["t_min"], t_max=c["t_max"])
    dudt = (net(z + h * v_c, r, t + h, **kw) - net(z - h * v_c, r, t - h, **kw)) / (2 * h)
    torch.testing.assert_close(out.dudt[rows], dudt[rows], rtol=1e-6, atol=1e-8)
    one_class = IMFLoss().targets(TwoHeadNet(num_classes=1).double(), x, None, torch.Generator().manual_seed(2))
    assert bool((one_class.draws.conditioning["omega"] > 1).any())  # one class is class-conditional: guided


def test_guidance_scale_applies_on_the_closed_interval_t_min_to_t_max(net):
    z, v_t = torch.randn(4, 3, **f64), torch.randn(4, 3, **f64)
    t = torch.tensor([0.3, 0.7, 0.5, 0.2], **f64)
    cond = {"omega": torch.full((4,), 3.0, **f64), "t_min": torch.tensor([0.3, 0.1, 0.1, 0.3], **f64),
            "t_max": torch.tensor([0.9, 0.7, 0.4, 0.9], **f64)}
    labels, one, zero = torch.tensor([0, 1, 2, 0]), torch.ones(4, **f64), torch.zeros(4, **f64)
    v_c, v_g = IMFLoss.guided_velocity(net, z, t, v_t, labels, cond, {})
    w = torch.tensor([3.0, 3.0, 1.0, 1.0], **f64)  # t = t_min and t = t_max are inside
    ref_c = net(z, t, t, labels, omega=w, t_min=zero, t_max=one, return_v=True)[1]
    v_u = net(z, t, t, torch.full_like(labels, 3), omega=one, t_min=zero, t_max=one, return_v=True)[1]
    torch.testing.assert_close(v_c, ref_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_g, v_t + (1 - 1 / w)[:, None] * (ref_c - v_u), rtol=1e-12, atol=1e-12)


def test_under_bf16_autocast_the_guided_target_is_combined_in_float32():
    torch.manual_seed(0)
    net = TwoHeadNet()
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = IMFLoss(label_drop=0.0).targets(net, x, y, torch.Generator().manual_seed(3))
        d, c = out.draws, out.draws.conditioning
        one, zero = torch.ones_like(d.t), torch.zeros_like(d.t)
        w = torch.where((d.t >= c["t_min"]) & (d.t <= c["t_max"]), c["omega"], one)
        v_c = net(out.z, d.t, d.t, y, omega=w, t_min=zero, t_max=one, return_v=True)[1]
        v_u = net(out.z, d.t, d.t, torch.full_like(y, 3), omega=one, t_min=zero, t_max=one, return_v=True)[1]
    assert v_c.dtype == torch.bfloat16 and out.tangent.dtype == out.target.dtype == torch.float32
    torch.manual_seed(0)
    dit = create("imf-tiny/2", in_channels=2, input_size=4, num_classes=3)  # its heads give bf16 under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heads = IMFLoss(jvp="forward_ad").targets(dit, torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(3))
    assert heads.u.dtype == heads.v_head.dtype == heads.dudt.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # unconditional: the tangent is the v-head's output in float32
        plain = IMFLoss().targets(TwoHeadNet(num_classes=0), x, None, torch.Generator().manual_seed(3))
    assert plain.tangent.dtype == torch.float32
    v_g = (d.noise - x).double() + (1 - 1 / w.double())[:, None] * (v_c.double() - v_u.double())
    torch.testing.assert_close(out.target.double(), v_g, rtol=1e-6, atol=1e-6)


def test_the_one_pass_dual_path_runs_under_bf16_autocast_and_agrees_with_forward_ad():
    """The attention tangent's in-place sums take bf16 products under autocast (they crashed on mixed dtypes)."""
    torch.manual_seed(0)
    dit = create("imf-tiny/2", in_channels=2, input_size=4, num_classes=3)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0])
    got = {}
    for mode in ("dual", "forward_ad"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[mode] = IMFLoss(jvp=mode).targets(dit, x, y, torch.Generator().manual_seed(3))
    assert got["dual"].dudt.dtype == torch.float32 and got["dual"].dudt.abs().max() > 0
    torch.testing.assert_close(got["dual"].dudt, got["forward_ad"].dudt, rtol=0.05, atol=0.05)
    torch.testing.assert_close(got["dual"].u, got["forward_ad"].u, rtol=0.02, atol=0.02)


def test_draws_follow_the_official_distributions():
    d = IMFLoss().draw(torch.zeros(4000, 2), torch.Generator().manual_seed(0))
    c, fm, mf = d.conditioning, d.fm_index, d.jvp_index
    assert fm.numel() == mf.numel() == 2000 and bool((d.r[fm] == d.t[fm]).all()) and bool((d.r[mf] < d.t[mf]).all())
    assert bool((c["t_min"][fm] == 0).all()) and bool((c["t_max"][fm] == 1).all())
    assert 0 <= float(c["t_min"][mf].min()) and float(c["t_min"][mf].max()) <= 0.5 <= float(c["t_max"][mf].min())
    # t_min ~ U(0, 0.5), t_max ~ U(0.5, 1): means 0.25 and 0.75 (sd of the mean 0.0032)
    assert abs(float(c["t_min"][mf].mean()) - 0.25) < 0.015 and abs(float(c["t_max"][mf].mean()) - 0.75) < 0.015
    omega = c["omega"]
    assert 1.0 <= float(omega.min()) and float(omega.max()) <= 8.0
    # log-uniform on [1, 8]: log(omega) / log(8) is U(0, 1), mean 0.5 (sd of the mean 0.0046)
    assert abs(float((omega.log() / math.log(8)).mean()) - 0.5) < 0.02
    assert not (d.dropped & d.jvp_rows).any() and abs(float(d.dropped.double().mean()) - 0.1) < 0.02
    # cfg_beta family: density ~ omega^-2 on [1, 8] has mean log(8) / (1 - 1/8) = 2.376
    beta2 = IMFLoss(omega_beta=2.0).draw(torch.zeros(20000, 2), torch.Generator().manual_seed(1)).conditioning["omega"]
    assert abs(float(beta2.mean()) - math.log(8) / (7 / 8)) < 0.05


def test_omega_is_the_inverse_cdf_of_its_power_law_in_float64():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], **f64)
    torch.testing.assert_close(IMFLoss().omega_from_uniform(u), 8.0**u, rtol=1e-14, atol=0)  # log-uniform on [1, 8]
    # density ~ omega^-3 on [1, 8]: CDF (1 - omega^-2) / (1 - 8^-2), inverted by hand
    torch.testing.assert_close(IMFLoss(omega_beta=3.0).omega_from_uniform(u), (1 - u * (1 - 8.0**-2)) ** -0.5, rtol=1e-14, atol=0)


def test_only_r_not_t_rows_get_a_jvp(net):
    x, y = torch.randn(16, 3, **f64), torch.randint(0, 3, (16,))
    net.calls.clear()
    IMFLoss(jvp="forward_ad")(net, x, y, torch.Generator().manual_seed(1))
    assert [n for n, tangent in net.calls if tangent] == [8]
    assert sum(n for n, _ in net.calls) == 2 * 16 + 8 + 8  # guidance (v_c and v_u), JVP rows, plain rows


def test_an_odd_batch_has_the_official_count_of_r_not_t_rows():
    """The official sample_tr sets r = t on int(B * 0.5) rows: B - int(B / 2) rows of an odd batch have r != t
    (3 of 5, 4 of 7), and only those get a guidance interval other than (0, 1)."""
    for total in (1, 3, 5, 7, 9):
        draws = IMFLoss().draw(torch.zeros(total, 3, **f64), torch.Generator().manual_seed(total))
        rows, expected = draws.jvp_index, total - int(total * 0.5)
        assert rows.numel() == expected and bool((draws.r[rows] < draws.t[rows]).all()), total
        plain = draws.fm_index
        assert bool((draws.conditioning["t_min"][plain] == 0).all() and (draws.conditioning["t_max"][plain] == 1).all())
        assert bool((draws.conditioning["t_max"][rows] < 1).all())


def _imf_model():
    torch.manual_seed(0)
    model = create("imf-tiny/2", in_channels=2, input_size=4, num_classes=3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised gates and heads too
    return model


def test_loss_and_gradients_are_the_same_for_every_jvp_mode():
    model = _imf_model()
    x, y = torch.randn(8, 2, 4, 4, **f64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    results = {}
    for mode in ("dual", "forward_ad", "full"):
        loss, _ = IMFLoss(jvp=mode)(model, x, y, torch.Generator().manual_seed(4))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[mode] = (loss, torch.cat([g.flatten() for g in grads]))
    for mode in ("forward_ad", "full"):
        for a, b in zip(results["dual"], results[mode]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_dual_path_carries_tangents_of_the_r_not_t_rows_only():
    model, rows = _imf_model(), []
    forward = model.forward

    def spy(z, *args, **kwargs):
        rows.append(z.rows if isinstance(z, Dual) else 0)
        return forward(z, *args, **kwargs)

    model.forward = spy
    IMFLoss(jvp="dual")(model, torch.randn(8, 2, 4, 4, **f64), torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    assert rows == [0, 4]  # guidance call, then one pass over the batch with tangents on the 4 r != t rows


def test_bad_inputs_are_named(net):
    x = torch.randn(4, 3, **f64)
    with pytest.raises(ValueError, match="guidance_input"):
        IMFLoss()(create("mlp", dim=3).double(), x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        IMFLoss()(net, x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="omega_max must be > 0"):
        IMFLoss(omega_max=0.0)
    with pytest.raises(ConfigError, match=r"objective 'imf' does not read option objective\.omega"):
        load_config("toy", ["objective.kind=imf", "objective.omega=2.0"])


def test_the_model_check_looks_through_wrappers(net):
    class Wrapper(nn.Module):  # as DistributedDataParallel wraps a model in .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    x, y = torch.randn(4, 3, **f64), torch.tensor([0, 1, 2, 0])
    IMFLoss()(Wrapper(net), x, y)
    plain = create("mlp", dim=3).double()
    for wrapped in (Wrapper(plain), torch.compile(plain)):  # the message names the wrapped model (nothing is compiled)
        with pytest.raises(ValueError, match="such as model.name=imf-tiny/2; MLP is not one"):
            IMFLoss()(wrapped, x)


def test_registered_with_the_official_defaults():
    loss_fn = objectives.create("imf")
    expected = dict(ratio=0.5, mu=-0.4, sigma=1.0, time_sampler="lognorm", label_drop=0.1, omega_max=7.0, omega_beta=1.0,
                    weight_power=1.0, weight_eps=0.01)
    assert {k: loss_fn.options[k] for k in expected} == expected
    assert from_dict({"objective": {"kind": "imf"}}).objective.resolved() == loss_fn.options


@pytest.mark.parametrize("num_classes", [3, 0])
def test_further_model_inputs_reach_every_call_row_by_row(num_classes):
    seen = []

    class WithAugment(TwoHeadNet):
        def forward(self, z, r, t, labels=None, *, augment, **kw):
            seen.append(torch.equal(augment, fwAD.unpack_dual(z).primal))  # augment is a copy of z: rows must match
            return super().forward(z, r, t, labels, **kw)

    torch.manual_seed(0)
    model, x = WithAugment(num_classes=num_classes).double(), torch.randn(8, 3, **f64)
    y = torch.zeros(8, dtype=torch.long) if num_classes else None
    loss_fn = IMFLoss(jvp="forward_ad")
    d = loss_fn.draw(x, torch.Generator().manual_seed(0))
    z = (1 - d.t)[:, None] * x + d.t[:, None] * d.noise
    loss_fn.targets(model, x, y, torch.Generator().manual_seed(0), cond={"augment": z})
    assert seen == [True, True, True]  # guidance (z and augment both doubled when conditional), JVP rows, plain rows
