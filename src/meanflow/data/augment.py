"""EDM's non-leaking augmentation, the subset the official MeanFlow CIFAR-10 recipe enables.

The official recipe (Gsunshine/py-meanflow, ``--use_edm_aug``) builds EDM's ``AugmentPipe`` with
p = 0.12 and four transformations switched on; the network is told what was done through six
augmentation labels (``augment_dim = 6``) and sees zero labels at sampling time, so it learns the
data distribution and, separately, the augmented ones ("non-leaking", Karras et al. 2022, app. C):

=============  ==================================  ================================  ===========
transform      probability per image               parameter                         labels
=============  ==================================  ================================  ===========
x-flip         always eligible (multiplier 1e8)    w in {0, 1}, flip if w = 1        w
scale          p                                   w ~ N(0, 1), s = 2^(0.2 w)        w
anisotropy     p (axis rotated with prob. 0.5)     w ~ N(0, 1), angle r ~ U(-pi, pi) w cos r, w sin r
translation    p                                   w ~ N(0, 1)^2, shift 0.125 w H    w_x, w_y
=============  ==================================  ================================  ===========

The geometric part (scale, anisotropy, translation) is one inverse affine map per image,
executed as in StyleGAN2-ADA / EDM: reflect-pad, 2x upsample with the ``sym6`` wavelet low-pass
filter, bilinear resampling, filter and 2x downsample. Every image goes through this filtering,
including the ones drawn with zero parameters (as in the official pipeline). Integer
translation, rotation and the colour transformations of the full pipeline are off in the
official recipe and not implemented here. The official data loader also flips images at random
before the pipeline (``data.flip``), independently of the labelled x-flip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LABEL_DIM = 6
# Daubechies symlet-6 low-pass filter (sums to sqrt(2)); the interpolation filter of ADA / EDM.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
    0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
    0.0017677118642428036, -0.007800708325034148,
)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters, N images: flip (N,) in {0, 1}; scale, aniso, aniso_angle (N,); translate (N, 2)."""

    flip: torch.Tensor
    scale: torch.Tensor
    aniso: torch.Tensor
    aniso_angle: torch.Tensor
    translate: torch.Tensor

    def labels(self) -> torch.Tensor:
        """(N, 6) float32 augmentation labels: [flip, scale, aniso cos, aniso sin, translate x, translate y]."""
        cols = [self.flip.float(), self.scale, self.aniso * self.aniso_angle.cos(), self.aniso * self.aniso_angle.sin()]
        return torch.stack(cols + [self.translate[:, 0], self.translate[:, 1]], dim=1).float()

    def take(self, index: slice | torch.Tensor) -> "AugmentParams":
        """The parameters of a subset of the images (a shard of a global batch)."""
        return AugmentParams(*(getattr(self, f)[index] for f in ("flip", "scale", "aniso", "aniso_angle", "translate")))


class EDMAugment:
    """``params = aug.draw(n, generator)``, ``images = aug.apply(x, params)``, labels ``params.labels()``.

    Args:
        p: probability of each geometric transformation (official CIFAR-10: 0.12).
        scale_std, aniso_std: log2 standard deviations of the isotropic / anisotropic scalings (0.2).
        translate_std: standard deviation of the translation relative to the image size (0.125).
        aniso_rotate_prob: probability that the anisotropy axis is rotated (0.5).
    """

    def __init__(self, p: float = 0.12, scale_std: float = 0.2, aniso_std: float = 0.2, translate_std: float = 0.125,
                 aniso_rotate_prob: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability p must lie in [0, 1], got {p}")
        self.p, self.scale_std, self.aniso_std = p, scale_std, aniso_std
        self.translate_std, self.aniso_rotate_prob = translate_std, aniso_rotate_prob

    def draw(self, n: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Parameters for n images from ``generator`` (CPU, float32)."""
        def gate(values: torch.Tensor, prob: float) -> torch.Tensor:
            keep = torch.rand(n, generator=generator) < prob
            return values * keep.reshape(-1, *([1] * (values.ndim - 1)))

        flip = torch.randint(2, (n,), generator=generator)
        scale = gate(torch.randn(n, generator=generator), self.p)
        aniso = gate(torch.randn(n, generator=generator), self.p)
        angle = gate((torch.rand(n, generator=generator) * 2 - 1) * math.pi, self.aniso_rotate_prob)
        translate = gate(torch.randn(n, 2, generator=generator), self.p)
        return AugmentParams(flip, scale, aniso, angle, translate)

    def inverse_maps(self, params: AugmentParams, height: int, width: int) -> torch.Tensor:
        """(N, 3, 3) maps from output to input pixel coordinates (origin at the image centre)."""
        s = torch.exp2(params.scale.double() * self.scale_std)
        g = _scaling(1 / s, 1 / s)
        a, r = torch.exp2(params.aniso.double() * self.aniso_std), params.aniso_angle.double()
        g = g @ _rotation(-r) @ _scaling(1 / a, a) @ _rotation(r)
        shift = params.translate.double() * self.translate_std
        return g @ _translation(-shift[:, 0] * width, -shift[:, 1] * height)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """(N, C, H, W) images -> augmented images of the same shape and dtype."""
        images = torch.where(params.flip.to(images.device).bool()[:, None, None, None], images.flip(3), images)
        return _warp(images, self.inverse_maps(params, *images.shape[2:]).to(images.device))


def _matrices(rows: list[list[torch.Tensor | float]], n: int) -> torch.Tensor:
    """(N, 3, 3) from a 3x3 layout of scalars and (N,) tensors."""
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(n) for v in row], -1) for row in rows], -2)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrices([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], sx.numel())


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    return _matrices([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], theta.numel())


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrices([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], tx.numel())


def _warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample each image (N, C, H, W) at G_inv (N, 3, 3) applied to its output pixel grid."""
    n, c, h, w = images.shape
    taps = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    pad = len(SYM6) // 4
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1.0], [cx, -cy, 1.0], [cx, cy, 1.0], [-cx, cy, 1.0]], dtype=g_inv.dtype, device=g_inv.device)
    reach = (g_inv @ corners.T)[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, N * 4): x and y of the mapped corners
    margin = torch.cat([-reach, reach]).amax(dim=1)  # [x0, y0, x1, y1]
    margin = margin + torch.tensor([2 * pad - cx, 2 * pad - cy] * 2, dtype=margin.dtype, device=margin.device)
    limit = torch.tensor([w - 1, h - 1] * 2, dtype=margin.dtype, device=margin.device)
    mx0, my0, mx1, my1 = (int(v) for v in torch.minimum(margin.clamp(min=0), limit).ceil().tolist())
    x = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    g = _translation(torch.tensor([(mx0 - mx1) / 2]), torch.tensor([(my0 - my1) / 2])).to(g_inv) @ g_inv
    x = _upsample2x(x, taps)
    double = _scaling(torch.tensor([2.0]), torch.tensor([2.0])).to(g)
    half_shift = _translation(torch.tensor([-0.5]), torch.tensor([-0.5])).to(g)
    g = double @ g @ torch.linalg.inv(double)
    g = half_shift @ g @ torch.linalg.inv(half_shift)
    out_h, out_w = (h + 2 * pad) * 2, (w + 2 * pad) * 2
    to_unit = _scaling(torch.tensor([2 / x.shape[3]]), torch.tensor([2 / x.shape[2]])).to(g)
    from_unit = _scaling(torch.tensor([out_w / 2]), torch.tensor([out_h / 2])).to(g)
    g = to_unit @ g @ from_unit
    grid = F.affine_grid(g[:, :2, :].to(x.dtype), [n, c, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(x, taps)[:, :, pad:-pad, pad:-pad]


def _upsample2x(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W): zero insertion, then the reversed filter along each axis."""
    n, c = x.shape[:2]
    k, pad = taps.flip(0), (len(taps) + 1) // 2
    x = torch.stack([x, torch.zeros_like(x)], dim=4).reshape(n, c, x.shape[2], -1)[..., :-1]
    x = F.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c, padding=(0, pad))
    x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(n, c, -1, x.shape[3])[:, :, :-1]
    return F.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c, padding=(pad, 0))


def _downsample2x(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H/2, W/2): the filter along each axis with stride 2."""
    c, pad = x.shape[1], (len(taps) - 1) // 2
    x = F.conv2d(x, taps.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c, stride=(1, 2), padding=(0, pad))
    return F.conv2d(x, taps.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c, stride=(2, 1), padding=(pad, 0))
