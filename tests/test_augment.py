"""EDM augmentation subset: labels, probabilities and the geometry of each transformation.

References: exact pixel shifts for integer translations, the second moment of a Gaussian blob
for scalings (it grows by s^2), the mirror image for x-flips, and the binomial spread of the
per-image probabilities.
"""
from __future__ import annotations

import math

import pytest
import torch

from meanflow.config import load_config
from meanflow.data.augment import LABEL_DIM, AugmentParams, EDMAugment
from meanflow.training.trainer import train

SIZE = 32


def params(n: int = 1, flip=0, scale=0.0, aniso=0.0, angle=0.0, translate=(0.0, 0.0)) -> AugmentParams:
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return AugmentParams(torch.full((n,), int(flip)), full(scale), full(aniso), full(angle), torch.tensor([translate] * n, dtype=torch.float32))


def blob(sigma: float = 3.0) -> torch.Tensor:
    """(1, 1, SIZE, SIZE) Gaussian centred in the image."""
    c = (SIZE - 1) / 2
    y, x = torch.meshgrid(torch.arange(SIZE) - c, torch.arange(SIZE) - c, indexing="ij")
    return torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2)).double()[None, None]


def moments(img: torch.Tensor) -> tuple[float, float, float]:
    """Centroid x and y and the mean squared radius of a non-negative image (1, 1, H, W)."""
    w = img[0, 0].clamp(min=0)
    y, x = torch.meshgrid(torch.arange(SIZE).double(), torch.arange(SIZE).double(), indexing="ij")
    m = w.sum()
    cx, cy = (w * x).sum() / m, (w * y).sum() / m
    return cx.item(), cy.item(), ((w * ((x - cx) ** 2 + (y - cy) ** 2)).sum() / m).item()


def test_zero_parameters_leave_the_image_and_flip_mirrors_it():
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).double()
    aug = EDMAugment()
    assert (aug.apply(x, params(3)) - x).abs().max() < 1e-4
    assert (aug.apply(x, params(3, flip=1)) - x.flip(3)).abs().max() < 1e-4


def test_translation_moves_content_by_the_labelled_amount():
    """w = 0.5 at std 0.125 is 2 pixels at size 32: to the right for x, down for y."""
    x = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).double()
    out = EDMAugment().apply(x, params(translate=(0.5, -0.25)))
    assert (out[..., 4:-4, 6:-6] - x[..., 5:-3, 4:-8]).abs().max() < 1e-4


@pytest.mark.parametrize("w", [-1.5, 1.0])
def test_isotropic_scaling_grows_the_second_moment_by_s_squared(w):
    out = EDMAugment().apply(blob(), params(scale=w))
    s = 2 ** (0.2 * w)
    cx, cy, r2 = moments(out)
    _, _, r2_ref = moments(blob())
    assert abs(r2 / r2_ref - s ** 2) < 0.01 and abs(cx - 15.5) < 0.02 and abs(cy - 15.5) < 0.02  # sym6 is not symmetric


def test_anisotropic_scaling_stretches_one_axis_and_squeezes_the_other():
    out = EDMAugment().apply(blob(), params(aniso=1.0))
    a = 2 ** 0.2
    w = out[0, 0].clamp(min=0)
    c = torch.arange(SIZE).double() - 15.5
    var_x = (w.sum(0) * c ** 2).sum() / w.sum()
    var_y = (w.sum(1) * c ** 2).sum() / w.sum()
    assert abs(math.sqrt(var_x / var_y) - a ** 2) < 0.02


def test_draw_probabilities_and_label_layout():
    aug = EDMAugment(p=0.12)
    p = aug.draw(20_000, torch.Generator().manual_seed(0))
    labels = p.labels()
    assert labels.shape == (20_000, LABEL_DIM)
    tolerance = 4 * math.sqrt(0.12 * 0.88 / 20_000)
    assert abs((labels[:, 0] == 1).float().mean() - 0.5) < 0.02
    for col in (1, 2, 4):
        assert abs((labels[:, col] != 0).float().mean() - 0.12) < tolerance
    assert torch.equal(labels[:, 4] != 0, labels[:, 5] != 0)  # one gate for both translation axes
    assert torch.allclose(labels[:, 2], p.aniso * p.aniso_angle.cos()) and torch.allclose(labels[:, 3], p.aniso * p.aniso_angle.sin())
    sub = p.take(slice(10, 20))
    assert torch.equal(sub.labels(), labels[10:20])


def test_probability_out_of_range_is_refused():
    with pytest.raises(ValueError, match="probability"):
        EDMAugment(p=1.5)


def test_training_with_augmentation_builds_a_unet_that_takes_the_labels(tmp_path):
    cfg = load_config("digits", ["train.steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.sample_every=0",
                                 "data.augment=0.12"])
    run = train(cfg, tmp_path / "run")
    meta = (run / "checkpoints" / "step_00000002" / "meta.json").read_text()
    assert '"augment_dim": 6' in meta
    bad = load_config("digits", ["train.steps=2", "train.batch_size=8", "data.augment=0.12", "model.name=dit-tiny/2"])
    with pytest.raises(ValueError, match="augmentation labels"):
        train(bad, tmp_path / "bad")
