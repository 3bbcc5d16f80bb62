"""Models written the way users write them (plain torch, nothing from meanflow), for the row-tangent tests.

A small U-Net (GroupNorm, SiLU, strided-conv down / nearest up sampling, skip concatenation,
one self-attention at the bottom through ``bmm`` on (B heads, N, d)) and an MLP with RMSNorm,
the times concatenated to the input. The DiT lives in ``benchmarks/plain_dit.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim) sin/cos features."""
    freqs = torch.exp(torch.arange(dim // 2, dtype=t.dtype, device=t.device) * (-math.log(1000.0) / (dim // 2)))
    angles = t.unsqueeze(-1) * freqs
    return torch.cat((angles.sin(), angles.cos()), -1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class BottomAttention(nn.Module):
    """Self-attention over pixels with heads merged into the batch: (B heads, HW, d) and bmm."""

    def __init__(self, channels: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b * self.heads, 3 * c // self.heads, h * w).chunk(3, dim=1)
        attn = torch.bmm(q.transpose(1, 2), k) / math.sqrt(c // self.heads)  # (B heads, HW, HW)
        y = torch.bmm(v, attn.softmax(-1).transpose(1, 2))  # (B heads, d, HW)
        return x + self.out(y.reshape(b, c, h, w))


class UserUNet(nn.Module):
    """u(z, r, t, labels=None) for (B, C, H, W) images, H and W divisible by 4."""

    def __init__(self, channels: int = 3, width: int = 8, dropout: float = 0.0):
        super().__init__()
        emb = 4 * width
        self.num_classes = 0
        self.time = nn.Sequential(nn.Linear(2 * width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.width = width
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down1 = ResBlock(width, width, emb, dropout)
        self.pool1 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.down2 = ResBlock(width, 2 * width, emb, dropout)
        self.mid = BottomAttention(2 * width)
        self.up2 = ResBlock(4 * width, width, emb, dropout)
        self.up1 = ResBlock(2 * width, width, emb, dropout)
        self.outp = nn.Sequential(nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        emb = self.time(torch.cat([time_features(t, self.width), time_features(t - r, self.width)], dim=1))
        h0 = self.inp(z)
        h1 = self.down1(h0, emb)
        h2 = self.down2(F.avg_pool2d(self.pool1(h1), 1), emb)
        h = self.mid(h2)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.outp(h)


class UserMLP(nn.Module):
    """u(z, r, t) for (B, dim) points: [z, t, t - r] -> Linear/RMSNorm/SiLU -> (B, dim)."""

    def __init__(self, dim: int = 3, width: int = 32, depth: int = 3):
        super().__init__()
        self.num_classes = 0
        layers, cin = [], dim + 2
        for _ in range(depth):
            layers += [nn.Linear(cin, width), nn.RMSNorm(width), nn.SiLU()]
            cin = width
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        return self.net(torch.cat([z, t[:, None], (t - r).unsqueeze(1)], dim=-1))


class BatchNormMLP(nn.Module):
    """u(z, r, t) for (B, 3) points through BatchNorm1d: rows mix in training mode (a RowMixingError for the row tangent)."""

    num_classes = 0

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        return self.net(z) * t[:, None]
