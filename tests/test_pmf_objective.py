"""The pMF objective against an independent float64 re-implementation of the official ``pmf.py`` formulas."""
from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.config import ConfigError, load_config
from meanflow.models import create
from meanflow.objectives import IMFLoss, PMFLoss, Shard
from meanflow.objectives.draws import BatchRandom
from meanflow.objectives.perceptual import (PerceptualDistances, PerceptualWeightsMissing, convnext_v2_base, crop_boxes,
                                            lpips_vgg, resized_crops)

f64 = dict(dtype=torch.float64)
CLASSES = 3


class XPredNet(nn.Module):
    """A two-headed x-prediction model on the iMF contract, as the official pMF network: each head predicts
    the clean image and returns (z - x_net) / clip(t, 0.05, 1); sees h = t - r, omega, t_min, t_max, labels."""

    guidance_input = True
    num_classes = CLASSES

    def __init__(self, channels: int = 3, noise_scale: float = 2.0):
        super().__init__()
        self.noise_scale = noise_scale
        self.inp = nn.Conv2d(channels + 4, 8, 3, padding=1)
        self.emb = nn.Embedding(CLASSES + 1, 8)
        self.u_head, self.v_head = nn.Conv2d(8, channels, 3, padding=1), nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, z, r, t, labels=None, *, omega, t_min, t_max, return_v=False):
        h = t - r
        maps = torch.stack([torch.sin(3 * h), 1 - 1 / omega, t_min, t_max], 1)[:, :, None, None].expand(-1, -1, *z.shape[2:])
        trunk = torch.tanh(self.inp(torch.cat([z, maps], 1)) + self.emb(labels)[:, :, None, None])
        scale = t.clamp(0.05, 1.0)[:, None, None, None]
        u, v = (z - self.u_head(trunk) * (1 + h[:, None, None, None])) / scale, (z - self.v_head(trunk)) / scale
        return (u, v) if return_v else u


class TinyConvNeXtFeatures(nn.Module):
    """A random ConvNeXt V2 of ``transformers`` small enough for the tests (same output type as the official one)."""

    def __new__(cls):
        import transformers
        config = transformers.ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], layer_norm_eps=1e-6)
        torch.manual_seed(5)
        model = transformers.ConvNextV2Model(config)
        with torch.no_grad():  # GRN starts at zero: give it weight so that its formula is exercised
            for name, p in model.named_parameters():
                if "grn" in name:
                    p.normal_(0, 0.5)
        return model


@pytest.fixture(scope="module")
def distances():
    pytest.importorskip("lpips")
    pytest.importorskip("transformers")
    torch.manual_seed(4)
    return PerceptualDistances(lpips_vgg(pretrained=False), TinyConvNeXtFeatures(), size=32)


def _official(net, x, y, out, loss_fn, aux_fn=None):
    """The loss of the official ``pixelMeanFlow.forward`` on the draws of ``out``, in plain torch (float64).

    Written from the official formulas: two v passes (omega for the r = t rows, omega clipped to the
    interval for the others), the predicted conditional v as the JVP tangent (torch.func.jvp over
    all rows), adaptive weights, perceptual terms on z - t u below the bound.
    """
    d, c = out.draws, out.draws.conditioning
    e, t, r = d.noise, d.t, d.r
    b = lambda s: s[:, None, None, None]  # noqa: E731
    z = (1 - b(t)) * x + b(t) * e
    v_t = (z - x) / b(t.clamp(0.05, 1.0))
    one, zero, null = torch.ones_like(t), torch.zeros_like(t), torch.full_like(y, CLASSES)
    omega, fm = c["omega"], ~d.jvp_rows
    with torch.no_grad():
        v_c0 = net(z, t, t, y, omega=omega, t_min=zero, t_max=one, return_v=True)[1]
        v_u = net(z, t, t, null, omega=one, t_min=zero, t_max=one, return_v=True)[1]
        v_g_fm = v_t + b(1 - 1 / omega) * (v_c0 - v_u)
        w = torch.where((t >= c["t_min"]) & (t <= c["t_max"]), omega, one)
        v_c = net(z, t, t, y, omega=w, t_min=zero, t_max=one, return_v=True)[1]
        v_g = torch.where(b(fm), v_g_fm, v_t + b(1 - 1 / w) * (v_c - v_u))
    labels = torch.where(d.dropped, CLASSES, y)
    v_g = torch.where(b(d.dropped), v_t, v_g)
    kw = dict(omega=omega, t_min=c["t_min"], t_max=c["t_max"])
    with sdpa_kernel(SDPBackend.MATH):  # forward AD through attention needs the math kernel on the CPU
        _, du = torch.func.jvp(lambda z_, t_, r_: net(z_, r_, t_, labels, **kw), (z, t, r), (v_c, one, zero))
    u, v = net(z, r, t, labels, **kw, return_v=True)
    V = u + b(t - r) * du.detach()
    adp = lambda l: l / (l.detach() + loss_fn.weight_eps) ** loss_fn.weight_power  # noqa: E731
    loss = adp((V - v_g).pow(2).sum((1, 2, 3))) + adp((v - v_g).pow(2).sum((1, 2, 3)))
    if aux_fn is not None:
        d_l, d_c = aux_fn(z - b(t) * u, x, out.boxes)
        below = t < loss_fn.perceptual_max_t
        d_l, d_c = torch.where(below, d_l, 0.0), torch.where(below, d_c, 0.0)
        loss = loss + adp(d_l) * loss_fn.lpips_weight + adp(d_c) * loss_fn.convnext_weight
    return loss.mean(), v_t, v_c, v_g, du


def _batch(n=8, size=8):
    torch.manual_seed(1)
    return torch.rand(n, 3, size, size, **f64) * 2 - 1, torch.randint(0, CLASSES, (n,))


@pytest.mark.parametrize("mode", ["auto", "forward_ad"])
def test_loss_and_gradients_equal_the_official_formulas(mode):
    torch.manual_seed(0)
    net = XPredNet().double()
    x, y = _batch()
    loss_fn = PMFLoss(jvp=mode, uniform_fraction=0.3, mu=0.8, sigma=0.8)
    out = loss_fn.targets(net, x, y, torch.Generator().manual_seed(3))
    loss, stats = loss_fn(net, x, y, torch.Generator().manual_seed(3))
    ref, v_t, v_c, v_g, du = _official(net, x, y, out, loss_fn)
    rows = out.draws.jvp_index
    torch.testing.assert_close(out.tangent, v_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.target, v_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.dudt[rows], du[rows], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert stats["loss"] == pytest.approx(ref.item(), rel=1e-12)


def test_the_pmf_network_trains_with_the_official_loss_and_gradients():
    """The pMF MiT (x-prediction, its own noise_scale) on the one-pass row tangent against the reference."""
    torch.manual_seed(0)
    net = create("pmf-tiny/4", in_channels=3, input_size=8, num_classes=CLASSES, noise_scale=2.0).double()
    with torch.no_grad():  # the official zero-initialised output layers would make u = z / t: give them weight
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = _batch()
    loss_fn = PMFLoss(mu=0.8, sigma=0.8)
    out = loss_fn.targets(net, x, y, torch.Generator().manual_seed(3))
    loss = loss_fn.reduce(out)[0]
    ref, *_, du = _official(net, x, y, out, loss_fn)
    rows = out.draws.jvp_index
    assert abs(float(out.draws.noise.std()) - 2.0) < 0.2
    torch.testing.assert_close(out.dudt[rows], du[rows], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for g, r in zip(torch.autograd.grad(loss, list(net.parameters())), torch.autograd.grad(ref, list(net.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_perceptual_terms_and_their_gradients_equal_the_official_formulas(distances):
    torch.manual_seed(0)
    net = XPredNet().double()
    x, y = _batch(size=16)
    loss_fn = PMFLoss(lpips_weight=0.4, convnext_weight=0.1, perceptual_max_t=0.6).use_perceptual(distances)
    out = loss_fn.targets(net, x, y, torch.Generator().manual_seed(5))
    below = out.draws.t < 0.6
    assert bool(below.any()) and bool((~below).any())  # the bound cuts this batch
    loss, stats = loss_fn.reduce(out)
    ref = _official(net, x, y, out, loss_fn, aux_fn=distances)[0]
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    plain = _official(net, x, y, out, loss_fn)[0]
    assert float(ref.detach() - plain.detach()) > 1e-3  # the perceptual terms count
    for g, r in zip(torch.autograd.grad(loss, list(net.parameters())), torch.autograd.grad(ref, list(net.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert stats["lpips"] > 0 and stats["convnext"] > 0


def test_the_distances_are_lpips_and_squared_feature_distances_of_the_same_crops(distances):
    import lpips as lpips_package
    torch.manual_seed(2)
    a, b = torch.rand(3, 3, 20, 24, **f64) * 2 - 1, torch.rand(3, 3, 20, 24, **f64) * 2 - 1
    boxes = torch.tensor([[0, 0, 20, 24], [3, 5, 10, 7], [10, 2, 9, 20]])
    d = distances.to(torch.float64)
    d_l, d_c = d(a, b, boxes)
    ca, cb = resized_crops(a, boxes, 32), resized_crops(b, boxes, 32)
    # the crops are each box bicubically resampled on its own
    torch.testing.assert_close(ca[1:2], F.interpolate(a[1:2, :, 3:13, 5:12], size=(32, 32), mode="bicubic", antialias=True))
    assert isinstance(d.lpips, lpips_package.LPIPS)
    torch.testing.assert_close(d_l, d.lpips(ca, cb).reshape(-1), rtol=1e-12, atol=0)
    fa, fb = d.convnext(ca).pooler_output, d.convnext(cb).pooler_output
    torch.testing.assert_close(d_c, (fa - fb).pow(2).sum(1), rtol=1e-10, atol=0)
    # pooled features: LayerNorm(eps 1e-6) of the spatial mean of the last stage
    last = d.convnext(ca).last_hidden_state.mean((2, 3))
    torch.testing.assert_close(fa, F.layer_norm(last, (8,), d.convnext.layernorm.weight, d.convnext.layernorm.bias, 1e-6))
    assert torch.equal(d(a, a, boxes)[0], torch.zeros(3, **f64))


def test_crop_boxes_follow_the_official_random_resized_crop():
    x = torch.zeros(20000, 1)
    boxes = crop_boxes(BatchRandom(x, torch.Generator().manual_seed(0), None), 1000, 800)
    top, left, h, w = boxes.T
    assert bool((h >= 1).all() & (w >= 1).all() & (top + h <= 1000).all() & (left + w <= 800).all() & (top >= 0).all() & (left >= 0).all())
    area = (h * w).double() / (1000 * 800)
    # area fraction s ~ U(0.08, 1); below 0.6 no box is clipped (s a <= 0.8 < 1): P = 0.52 / 0.92, mean 0.34
    small = area < 0.6
    assert abs(float(small.double().mean()) - 0.52 / 0.92) < 0.01 and abs(float(area[small].mean()) - 0.34) < 0.005
    assert float(area.min()) > 0.079
    ratio = (w.double() / h.double())[small]  # log aspect ~ U(log 3/4, log 4/3): mean 0, sd log(16/9) / sqrt(12)
    assert abs(float(ratio.log().mean())) < 0.005 and float(ratio.min()) > 0.74 and float(ratio.max()) < 1.34
    assert abs(float(ratio.log().std()) - math.log(16 / 9) / 12**0.5) < 0.003
    # the corner is uniform over the free positions: mean relative position 1/2
    assert abs(float((top[small].double() / (1000 - h[small]).double()).mean()) - 0.5) < 0.01
    assert abs(float((left[small].double() / (800 - w[small]).double()).mean()) - 0.5) < 0.01
    # a shard gets its rows of the global batch's boxes
    g = BatchRandom(x[:10], torch.Generator().manual_seed(0), Shard(10, 20000))
    assert torch.equal(crop_boxes(g, 1000, 800), boxes[10:20])


def test_the_velocity_clips_t_at_0_05_and_the_prior_is_the_models():
    torch.manual_seed(0)
    net = XPredNet(noise_scale=4.0).double()
    x, y = _batch(n=4000, size=1)
    out = PMFLoss(mu=-4.0, sigma=1.0, label_drop=1.0).targets(net, x, y, torch.Generator().manual_seed(1))
    d, b = out.draws, (lambda s: s[:, None, None, None])
    small = d.t < 0.05
    assert 100 < int(small.sum()) < 3900
    # labels all dropped: the target is v_t itself
    torch.testing.assert_close(out.target[~small], (d.noise - x)[~small], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.target[small], (b(d.t) * (d.noise - x) / 0.05)[small], rtol=1e-12, atol=1e-12)
    assert abs(float(d.noise.std()) - 4.0) < 0.15  # e ~ N(0, noise_scale^2)


def test_uniform_share_replaces_t_and_r_by_uniform_times():
    x = torch.zeros(40000, 2)
    base = PMFLoss(mu=3.0, sigma=0.1).draw(x, torch.Generator().manual_seed(0))
    mixed = PMFLoss(mu=3.0, sigma=0.1, uniform_fraction=0.1).draw(x, torch.Generator().manual_seed(0))
    changed = mixed.t != base.t
    assert abs(float(changed.double().mean()) - 0.1) < 0.006  # logit-normal(3, 0.1) is never near a uniform draw
    mf = mixed.jvp_rows
    assert torch.equal(mixed.r[~mf], mixed.t[~mf]) and bool((mixed.r[mf] <= mixed.t[mf]).all())
    # on the r != t rows the uniform pair is (min, max) of two U(0, 1): means 1/3 and 2/3
    assert abs(float(mixed.r[mf & changed].mean()) - 1 / 3) < 0.02 and abs(float(mixed.t[mf & changed].mean()) - 2 / 3) < 0.02
    assert abs(float(mixed.t[~mf & changed].mean()) - 0.5) < 0.02
    assert torch.equal(mixed.t[~changed], base.t[~changed]) and torch.equal(mixed.noise, base.noise)
    for key in ("omega", "t_min", "t_max"):
        assert torch.equal(mixed.conditioning[key], base.conditioning[key])


def test_times_at_r_eq_t_are_one_draw_and_the_rest_is_imf():
    x = torch.zeros(40000, 2)
    pmf, imf = PMFLoss(mu=0.0).draw(x, torch.Generator().manual_seed(0)), IMFLoss(mu=0.0).draw(x, torch.Generator().manual_seed(0))
    mf, fm = pmf.jvp_rows, ~pmf.jvp_rows
    assert torch.equal(pmf.t[mf], imf.t[mf]) and torch.equal(pmf.r[mf], imf.r[mf]) and torch.equal(pmf.r[fm], pmf.t[fm])
    # sigmoid(N(0, 1)) has mean 1/2; the larger of two has mean 1/2 + E|n1 - n2| / 2 * 0.21 (about 0.62)
    assert abs(float(pmf.t[fm].mean()) - 0.5) < 0.005 and float(imf.t[fm].mean()) > 0.6
    assert bool((pmf.t[fm] <= imf.t[fm]).all())  # one of the two draws whose larger iMF takes
    for key in ("omega", "t_min", "t_max"):
        assert torch.equal(pmf.conditioning[key], imf.conditioning[key])


def test_without_its_additions_pmf_is_imf_on_the_same_draws_above_the_clip():
    torch.manual_seed(0)
    net = create("imf-tiny/2", in_channels=3, input_size=4, num_classes=3).double()
    x, y = torch.randn(16, 3, 4, 4, **f64), torch.randint(0, 3, (16,))
    loss_fn = PMFLoss()
    out = loss_fn.targets(net, x, y, torch.Generator().manual_seed(2))
    assert float(out.draws.t.min()) > 0.05
    same = IMFLoss().targets_from(net, x, y, out.draws, {})
    assert loss_fn.reduce(out)[0].item() == pytest.approx(IMFLoss().reduce(same)[0].item(), rel=1e-12)


def test_perceptual_terms_are_off_by_default_and_the_backbone_choice_is_checked():
    loss_fn = PMFLoss()
    assert not loss_fn.perceptual and loss_fn.lpips_weight == 0.0 and loss_fn.convnext_weight == 0.0
    with pytest.raises(ConfigError, match="perceptual_weights"):
        load_config(None, ["objective.kind=pmf", "objective.perceptual_weights=imagenet"])


def test_missing_vgg_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PerceptualWeightsMissing, match=r"vgg16-397923af\.pth.*IMAGENET1K_V1"):
        PMFLoss(lpips_weight=0.4).distances(torch.zeros(1))


def test_missing_convnext_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PerceptualWeightsMissing, match="facebook/convnextv2-base-22k-224.*huggingface-cli download"):
        convnext_v2_base(pretrained=True)


def test_random_official_backbones_run_through_the_same_path():
    pytest.importorskip("lpips")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    d = PerceptualDistances.official(lpips=True, convnext=True, pretrained=False)
    assert sum(p.numel() for p in d.convnext.parameters()) > 80_000_000  # ConvNeXt V2 Base
    assert not any(p.requires_grad for p in d.parameters())
    d.size = 64
    a = torch.rand(2, 3, 40, 40, requires_grad=True)
    d_l, d_c = d(a * 2 - 1, torch.zeros(2, 3, 40, 40), torch.tensor([[0, 0, 40, 40], [5, 5, 20, 30]]))
    (d_l.sum() + d_c.sum()).backward()
    assert d_l.shape == d_c.shape == (2,) and a.grad.abs().sum() > 0
    assert math.isfinite(float(d_c.sum()))
