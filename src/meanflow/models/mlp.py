"""Residual MLP for low-dimensional data (2-D toys, user point clouds of any dimension)."""
from __future__ import annotations

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


class MLP(nn.Module):
    """u(z, r, t, labels): (B, dim) -> (B, dim), conditioned on emb_t(t) + emb_h(t - r).

    ``time_input`` changes what the network is told about time ("t,h" default; "t,r", "h" = t - r
    only and "t,r,h" for the paper's Table 1c ablation, see ``embeddings.TIME_INPUTS``).
    z and t may be :class:`meanflow.autodiff.dual.Dual` values (the MeanFlow JVP rides along the forward).
    """

    supports_dual = True

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0,
                 time_input: str = "t,h"):
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, width, depth >= 1, got {dim}, {width}, {depth}")
        self.dim = dim
        self.num_classes = num_classes
        self.cond = MeanFlowConditioning(width, num_classes, frequency_dim=min(256, 4 * width), time_input=time_input)
        self.inp = dual.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, dropout) for _ in range(depth))
        self.out = nn.Sequential(dual.LayerNorm(width), dual.SiLU(), dual.Linear(width, dim))

    def forward(
        self, z: torch.Tensor | Dual, r: torch.Tensor, t: torch.Tensor | Dual, labels: torch.Tensor | None = None
    ) -> torch.Tensor | Dual:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"MLP built for data of shape (B, {self.dim}) got input of shape {tuple(z.shape)}")
        c = dual.silu(self.cond(r, t, labels))  # (B, W)
        h = self.inp(z)  # (B, W)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)  # (B, dim)


FAMILY = Family(MLP, input_kind="points", example={"dim": 2, "num_classes": 0})


@register("mlp", FAMILY)
def mlp(**kwargs) -> MLP:
    return MLP(**kwargs)
