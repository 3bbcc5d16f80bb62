"""Residual MLP for low-dimensional data (2-D toys, user point clouds of any dimension)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..autodiff import dual
from ..autodiff.dual import Dual
from .embeddings import MeanFlowConditioning
from .registry import Family, register


class ResidualBlock(nn.Module):
    """LayerNorm -> FiLM from the conditioning -> Linear -> SiLU -> Linear, added back."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = dual.LayerNorm(width, elementwise_affine=False)
        self.film = dual.Linear(width, 2 * width)
        self.net = nn.Sequential(dual.Linear(width, width), dual.SiLU(), dual.Dropout(dropout), dual.Linear(width, width))

    def forward(self, h: torch.Tensor | Dual, c: torch.Tensor | Dual) -> torch.Tensor | Dual:
        scale, shift = self.film(c).chunk(2, dim=-1)  # (B, W) each
        return h + self.net(dual.addcmul(shift, self.norm(h), 1 + scale))


class FourierFeatures(nn.Module):
    """Random Fourier features of the input: z (B, D) -> [z, sin(2 pi z F), cos(2 pi z F)] (B, D + 2 k).

    F (D, k) is drawn once from N(0, scale^2) with a fixed seed and kept as a buffer (saved with the
    weights). A one-step map onto thin or tight structures must be sharp in z; an MLP fed raw
    coordinates learns high frequencies last (spectral bias), features at frequency ~ scale let it
    represent them from the start. The tangent of a Dual input rides along:
    d sin(a) = cos(a) (dz 2 pi F), d cos(a) = -sin(a) (dz 2 pi F).
    """

    def __init__(self, dim: int, count: int, scale: float):
        super().__init__()
        if count < 1 or not scale > 0:
            raise ValueError(f"Fourier features need count >= 1 and scale > 0, got {count}, {scale}")
        freqs = torch.randn(dim, count, generator=torch.Generator().manual_seed(0)) * (2 * math.pi * scale)
        self.register_buffer("freqs", freqs)  # (D, k)

    def forward(self, z: torch.Tensor | Dual) -> torch.Tensor | Dual:
        x = dual.primal(z)  # (B, D)
        args = x @ self.freqs.to(x.dtype)  # (B, k)
        sin, cos = torch.sin(args), torch.cos(args)
        out = torch.cat([x, sin, cos], dim=-1)  # (B, D + 2k)
        if not isinstance(z, Dual):
            return out
        n = z.rows
        with torch.no_grad():
            slope = z.tangent @ self.freqs.to(x.dtype)  # (n, k)
            tangent = torch.cat([z.tangent, cos[:n] * slope, -sin[:n] * slope], dim=-1)
        return Dual(out, tangent)


class MLP(nn.Module):
    """u(z, r, t, labels): (B, dim) -> (B, dim), conditioned on emb_t(t) + emb_h(t - r).

    ``time_input`` changes what the network is told about time ("t,h" default; "t,r", "h" = t - r
    only and "t,r,h" for the paper's Table 1c ablation, see ``embeddings.TIME_INPUTS``).
    ``fourier_features`` > 0 feeds z through :class:`FourierFeatures` (that many frequencies of
    scale ``fourier_scale``) before the first layer; 0 feeds z as it is.
    z and t may be :class:`meanflow.autodiff.dual.Dual` values (the MeanFlow JVP rides along the forward).
    """

    supports_dual = True

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0,
                 time_input: str = "t,h", fourier_features: int = 0, fourier_scale: float = 1.0):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, width, depth >= 1, got {dim}, {width}, {depth}")
        self.dim = dim
        self.num_classes = num_classes
        self.cond = MeanFlowConditioning(width, num_classes, frequency_dim=min(256, 4 * width), time_input=time_input)
        self.features = FourierFeatures(dim, fourier_features, fourier_scale) if fourier_features else nn.Identity()
        self.inp = dual.Linear(dim + 2 * fourier_features, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, dropout) for _ in range(depth))
        self.out = nn.Sequential(dual.LayerNorm(width), dual.SiLU(), dual.Linear(width, dim))

    def forward(
        self, z: torch.Tensor | Dual, r: torch.Tensor, t: torch.Tensor | Dual, labels: torch.Tensor | None = None
    ) -> torch.Tensor | Dual:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"MLP built for data of shape (B, {self.dim}) got input of shape {tuple(z.shape)}")
        c = dual.silu(self.cond(r, t, labels))  # (B, W)
        h = self.inp(self.features(z))  # (B, W)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)  # (B, dim)


FAMILY = Family(MLP, input_kind="points", example={"dim": 2, "num_classes": 0})


@register("mlp", FAMILY)
def mlp(**kwargs) -> MLP:
    return MLP(**kwargs)
