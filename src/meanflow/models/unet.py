"""DDPM++ U-Net (Song et al. 2021, as configured in EDM, Karras et al. 2022) for MeanFlow.

The design: a 3x3 stem convolution, then per resolution level a stack of residual blocks
(GroupNorm, SiLU, 3x3 conv; the conditioning vector adds a per-channel shift, or a scale and
shift, around the second GroupNorm; SiLU, dropout, zero-initialised 3x3 conv; residual sum
scaled by sqrt(1/2)),
with self-attention at chosen resolutions and 2x down/up sampling between levels. The decoder
mirrors the encoder, concatenating the encoder's skip activations, and ends with GroupNorm,
SiLU and a zero-initialised 3x3 conv, so the untrained network outputs u = 0.

The conditioning vector is silu(emb_t(t) + emb_h(t - r) [+ emb_y(label)]) of width
``emb_mult * model_channels``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..autodiff import dual
from .attention import attention
from .dit import check_image
from ..autodiff.dual import Dual
from .embeddings import MeanFlowConditioning
from .registry import register

SKIP_SCALE = math.sqrt(0.5)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, channels / 4) groups."""
    return dual.GroupNorm(max(1, min(32, channels // 4)), channels, eps=1e-6)


def conv(cin: int, cout: int, kernel: int, zero: bool = False) -> nn.Conv2d:
    """'Same'-padded convolution, Xavier-uniform (or zero) weights, zero bias."""
    layer = dual.Conv2d(cin, cout, kernel, padding=kernel // 2)
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def resample(x: torch.Tensor | Dual, mode: str | None) -> torch.Tensor | Dual:
    """(B, C, H, W) -> 2x average-pooled ("down"), 2x nearest-upsampled ("up") or unchanged (None)."""
    if mode is None:
        return x
    if mode == "down":
        op = lambda a: F.avg_pool2d(a, 2)  # noqa: E731  (B, C, H/2, W/2)
    else:
        op = lambda a: F.interpolate(a, scale_factor=2, mode="nearest")  # noqa: E731  (B, C, 2H, 2W)
    return x.map(op) if isinstance(x, Dual) else op(x)


class SpatialAttention(nn.Module):
    """Residual multi-head self-attention over the H * W positions of a feature map."""

    def __init__(self, channels: int, heads: int = 1, backend: str | None = None):
        super().__init__()
        if channels % heads:
            raise ValueError(f"U-Net attention: {channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.backend = backend
        self.norm = group_norm(channels)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj = conv(channels, channels, 1, zero=True)

    def forward(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, N, d) each
        out = attention(q, k, v, self.backend)  # (B, heads, N, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return (x + self.proj(out)) * SKIP_SCALE  # (B, C, H, W)


class UNetBlock(nn.Module):
    """Residual block (B, cin, H, W) -> (B, cout, H', W') conditioned on emb, with optional attention.

    ``mode`` "down" / "up" halves / doubles the resolution (H' = H / 2 or 2 H), None keeps it.
    The embedding gives a per-channel shift added before the second GroupNorm (DDPM++), or with
    ``adaptive_scale`` a scale and shift applied after it: norm(h) * (1 + scale) + shift (ADM).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        mode: str | None = None,
        attend: bool = False,
        dropout: float = 0.0,
        adaptive_scale: bool = False,
        heads: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        self.mode, self.adaptive_scale = mode, adaptive_scale
        self.norm0 = group_norm(cin)
        self.conv0 = conv(cin, cout, 3)
        self.affine = dual.Linear(emb_channels, 2 * cout if adaptive_scale else cout)
        self.norm1 = group_norm(cout)
        self.dropout = dual.Dropout(dropout)
        self.conv1 = conv(cout, cout, 3, zero=True)
        self.skip = conv(cin, cout, 1) if cin != cout or mode is not None else nn.Identity()
        self.attn = SpatialAttention(cout, heads, backend) if attend else nn.Identity()
        nn.init.xavier_uniform_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor | Dual, emb: torch.Tensor | Dual) -> torch.Tensor | Dual:
        h = self.conv0(resample(dual.silu(self.norm0(x)), self.mode))  # (B, cout, H', W')
        params = self.affine(emb)[:, :, None, None]  # (B, 2 cout or cout, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)  # (B, cout, 1, 1) each
            h = dual.addcmul(shift, self.norm1(h), 1 + scale)  # (B, cout, H', W')
        else:
            h = self.norm1(h + params)  # (B, cout, H', W')
        h = self.conv1(self.dropout(dual.silu(h)))  # (B, cout, H', W')
        x = (h + self.skip(resample(x, self.mode))) * SKIP_SCALE  # (B, cout, H', W')
        return self.attn(x)  # (B, cout, H', W')


class UNet(nn.Module):
    """u(z, r, t, labels): (B, C, H, W) -> (B, C, H, W), a DDPM++ U-Net conditioned on (t, t - r) and a label.

    Args:
        in_channels: C, channels of the input (and output).
        input_size: H = W, or (H, W); each divisible by 2^(len(channel_mult) - 1).
        num_classes: number of classes, 0 for unconditional; label ``num_classes`` is the null class
            and ``labels=None`` means null for a class-conditional model.
        model_channels: width of the first level; level i has model_channels * channel_mult[i].
        channel_mult: per-level width multipliers (one level per entry; 2x downsampling between).
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: feature-map sizes (H at that level) that get self-attention.
        dropout: dropout probability inside every residual block.
        adaptive_scale: condition each block by scale and shift (ADM) instead of shift only (DDPM++).
        attn_heads: attention heads (DDPM++ uses one).
        emb_mult: conditioning width is emb_mult * model_channels.
        attention_backend: see :mod:`meanflow.models.attention`; None follows $MEANFLOW_ATTENTION.

    z and t may be :class:`meanflow.autodiff.dual.Dual` values (the MeanFlow JVP rides along the forward).
    """

    supports_dual = True

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int | tuple[int, int] = 32,
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        adaptive_scale: bool = False,
        attn_heads: int = 1,
        emb_mult: int = 4,
        attention_backend: str | None = None,
    ):
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        levels = len(channel_mult)
        if min(in_channels, height, width, model_channels, num_blocks, emb_mult, levels, *channel_mult) < 1:
            raise ValueError("U-Net sizes (in_channels, input_size, model_channels, channel_mult, num_blocks, emb_mult) must be >= 1")
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"U-Net input size {height}x{width} must be divisible by 2^{levels - 1} for {levels} levels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_channels, self.input_size, self.num_classes = in_channels, (height, width), num_classes
        emb_channels = emb_mult * model_channels
        self.cond = MeanFlowConditioning(emb_channels, num_classes, frequency_dim=model_channels)
        block = dict(
            emb_channels=emb_channels, dropout=dropout, adaptive_scale=adaptive_scale, heads=attn_heads, backend=attention_backend
        )

        self.stem = conv(in_channels, model_channels, 3)
        self.encoder = nn.ModuleList()
        skips, cout = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            res = height >> level
            if level > 0:
                self.encoder.append(UNetBlock(cout, cout, mode="down", **block))
                skips.append(cout)
            for _ in range(num_blocks):
                self.encoder.append(UNetBlock(cout, model_channels * mult, attend=res in attn_resolutions, **block))
                cout = model_channels * mult
                skips.append(cout)

        self.middle = nn.ModuleList([UNetBlock(cout, cout, attend=True, **block), UNetBlock(cout, cout, **block)])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = height >> level
            if level < levels - 1:
                self.decoder.append(UNetBlock(cout, cout, mode="up", **block))
            for index in range(num_blocks + 1):
                attend = index == num_blocks and res in attn_resolutions
                self.decoder.append(UNetBlock(cout + skips.pop(), model_channels * mult, attend=attend, **block))
                cout = model_channels * mult
        self.out_norm = group_norm(cout)
        self.out_conv = conv(cout, in_channels, 3, zero=True)

    def forward(
        self, z: torch.Tensor | Dual, r: torch.Tensor, t: torch.Tensor | Dual, labels: torch.Tensor | None = None
    ) -> torch.Tensor | Dual:
        check_image(z, self.in_channels, self.input_size, "U-Net")
        emb = dual.silu(self.cond(r, t, labels))  # (B, E)
        x = self.stem(z)  # (B, C0, H, W)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)  # (B, C_l, H_l, W_l)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)  # (B, C_L, H_L, W_L)
        for block in self.decoder:
            if block.mode != "up":
                x = dual.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H_l, W_l)
            x = block(x, emb)  # (B, C_l, H_l, W_l)
        return self.out_conv(dual.silu(self.out_norm(x)))  # (B, C, H, W)


# name: (model_channels, channel_mult, num_blocks, attn_resolutions, dropout)
UNET_PRESETS = {
    "unet-tiny": (32, (1, 2), 1, (8,), 0.0),
    "unet-small": (64, (1, 2, 2), 2, (16,), 0.0),
    "unet-cifar10": (128, (2, 2, 2), 4, (16,), 0.2),
}


def _register_preset(name: str, channels: int, mult: tuple[int, ...], blocks: int, attn: tuple[int, ...], dropout: float) -> None:
    def build(**kwargs) -> UNet:
        size = dict(model_channels=channels, channel_mult=mult, num_blocks=blocks, attn_resolutions=attn, dropout=dropout)
        return UNet(**{**size, **kwargs})

    build.__doc__ = f"{name}: DDPM++ U-Net, {channels} channels x {mult}, {blocks} blocks per level, attention at {attn}."
    register(name)(build)


for _name, _size in UNET_PRESETS.items():
    _register_preset(_name, *_size)
