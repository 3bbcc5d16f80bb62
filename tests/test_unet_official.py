"""The official CIFAR-10 U-Net details: FIR resampling, the shared time MLP, augmentation labels.

References are written out independently: the [1, 3, 3, 1] filter as explicit sums over pixels in
float64, the sinusoidal features from their formula, and the dual / forward-mode JVP paths of the
loss against the plain reference computation when augmentation labels ride along.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from meanflow.models import create
from meanflow.models.embeddings import sinusoidal_embedding
from meanflow.models.unet import fir_kernel, resample
from meanflow.objectives import MeanFlowLoss

TAPS = (1.0, 3.0, 3.0, 1.0)


def fir_down_reference(x: torch.Tensor) -> torch.Tensor:
    """out[i, j] = sum_ab f_a f_b x[2i - 1 + a, 2j - 1 + b] / 64 with zeros outside the image."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h // 2, w // 2, dtype=x.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            for a in range(4):
                for bb in range(4):
                    y, xx = 2 * i - 1 + a, 2 * j - 1 + bb
                    if 0 <= y < h and 0 <= xx < w:
                        out[:, :, i, j] += TAPS[a] * TAPS[bb] / 64 * x[:, :, y, xx]
    return out


def fir_up_reference(x: torch.Tensor) -> torch.Tensor:
    """Each input pixel (i, j) spreads 4 f_a f_b / 64 of itself to output pixel (2i - 1 + a, 2j - 1 + b)."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, 2 * h, 2 * w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(4):
                for bb in range(4):
                    y, xx = 2 * i - 1 + a, 2 * j - 1 + bb
                    if 0 <= y < 2 * h and 0 <= xx < 2 * w:
                        out[:, :, y, xx] += 4 * TAPS[a] * TAPS[bb] / 64 * x[:, :, i, j]
    return out


def test_fir_resampling_matches_explicit_sums():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernel = fir_kernel(TAPS).double()
    assert torch.allclose(resample(x, "down", kernel), fir_down_reference(x), atol=1e-12)
    assert torch.allclose(resample(x, "up", kernel), fir_up_reference(x), atol=1e-12)


def test_two_tap_filter_is_average_pooling_and_nearest_upsampling():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kernel = fir_kernel((1, 1)).double()
    assert torch.allclose(resample(x, "down", kernel), F.avg_pool2d(x, 2), atol=1e-12)
    assert torch.allclose(resample(x, "up", kernel), F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-12)


@pytest.mark.parametrize("taps", [(1, 3, 3), (1,), (0, 0)])
def test_bad_resample_filter_is_refused(taps):
    with pytest.raises(ValueError, match="resample_filter"):
        create("unet-tiny", in_channels=1, input_size=8, resample_filter=taps)


def test_endpoint_sin_first_features_follow_their_formula():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    n = 16
    freqs = torch.tensor([10_000.0 ** (-k / (n // 2 - 1)) for k in range(n // 2)], dtype=torch.float64)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    assert torch.allclose(sinusoidal_embedding(t, n, endpoint=True, sin_first=True), expected, atol=1e-12)
    assert math.isclose(freqs[-1].item(), 1e-4, rel_tol=1e-12)


def test_shared_time_mlp_concatenates_both_embeddings():
    """The conditioning is W1 silu(W0 [f(t), f(t - r)] + b0) + b1: check it against that formula."""
    torch.manual_seed(0)
    unet = create("unet-tiny", in_channels=1, input_size=8).double()
    cond = unet.cond
    r, t = torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([0.7, 0.4], dtype=torch.float64)
    feats = torch.cat([sinusoidal_embedding(t, 64, endpoint=True, sin_first=True), sinusoidal_embedding(t - r, 64, endpoint=True, sin_first=True)], 1)
    hidden = F.silu(feats @ cond.layer0.weight.T + cond.layer0.bias)
    assert torch.allclose(cond(r, t), hidden @ cond.layer1.weight.T + cond.layer1.bias, atol=1e-12)
    assert cond.layer0.in_features == 2 * 2 * 32 and cond.layer1.out_features == 4 * 32


def test_separate_time_mlp_keeps_the_earlier_layout():
    unet = create("unet-tiny", in_channels=1, input_size=8, time_mlp="separate")
    names = {name.split(".")[1] for name, _ in unet.named_parameters() if name.startswith("cond.")}
    assert names == {"t_embed", "h_embed"}
    with pytest.raises(ValueError, match="time_mlp"):
        create("unet-tiny", in_channels=1, input_size=8, time_mlp="sum")


def test_augment_labels_change_the_output_and_none_means_zero():
    torch.manual_seed(0)
    unet = create("unet-tiny", in_channels=1, input_size=8, augment_dim=6).double().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    r, t = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    plain = unet(z, r, t)
    assert torch.equal(plain, unet(z, r, t, augment_labels=torch.zeros(2, 6, dtype=torch.float64)))
    assert not torch.allclose(plain, unet(z, r, t, augment_labels=torch.ones(2, 6, dtype=torch.float64)))
    with pytest.raises(ValueError, match="augment_labels must have shape"):
        unet(z, r, t, augment_labels=torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="augment_dim"):
        create("unet-tiny", in_channels=1, input_size=8)(z.float(), r.float(), t.float(), augment_labels=torch.ones(2, 6))


@pytest.mark.parametrize("jvp", ["dual", "forward_ad"])
def test_loss_passes_augment_labels_row_by_row(jvp):
    """Every JVP path must give each row its own augmentation labels: compare with the full reference."""
    torch.manual_seed(0)
    unet = create("unet-tiny", in_channels=1, input_size=8, num_classes=3, augment_dim=6).double()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cond = {"augment_labels": torch.randn(6, 6, dtype=torch.float64)}
    options = dict(ratio=0.5, omega=2.0, kappa=0.3, label_drop=0.3)
    ref = MeanFlowLoss(jvp="full", **options).targets(unet, x, labels, generator=torch.Generator().manual_seed(1), cond=cond)
    out = MeanFlowLoss(jvp=jvp, **options).targets(unet, x, labels, generator=torch.Generator().manual_seed(1), cond=cond)
    assert torch.allclose(out.u, ref.u, atol=1e-10) and torch.allclose(out.target, ref.target, atol=1e-10)
    without = MeanFlowLoss(jvp=jvp, **options).targets(unet, x, labels, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(without.u, ref.u)
    with pytest.raises(ValueError, match="one row per sample"):
        MeanFlowLoss(jvp=jvp)(unet, x, labels, cond={"augment_labels": torch.zeros(5, 6, dtype=torch.float64)})
