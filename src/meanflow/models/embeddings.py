"""Conditioning embeddings shared by every model family.

MeanFlow networks are conditioned on the pair (t, t - r) (paper Table 1c) through two
sinusoidal timestep embedders whose outputs are summed, and optionally on a class label
with an extra *null* class used for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..autodiff import dual
from ..autodiff.dual import Dual


def sinusoidal_embedding(
    t: torch.Tensor | Dual, dim: int, max_period: float = 10_000.0, scale: float = 1.0, endpoint: bool = False, sin_first: bool = False
) -> torch.Tensor | Dual:
    """Sinusoidal features of continuous times.

    Args:
        t: (B,) times in [0, 1], or a Dual; its tangent rows get d/dt of the features,
            ``scale w_k [-sin(w_k scale t), cos(w_k scale t)] dt``.
        dim: feature width (even or odd; an odd width gets one zero column).
        scale: multiplies t before the sinusoids. MeanFlow differentiates the network in t, and
            d/dt sin(w scale t) grows with ``scale``: the diffusion habit of scale = 1000 makes
            du/dt, hence the target v - (t - r) du/dt, up to a thousand times larger, and training
            diverged on a Gaussian even with exact velocities; scale = 1 converged (see
            tests/test_objective.py, the closed-form training test).
        endpoint: frequencies w_k = max_period^(-k / (half - 1)), so the last one is exactly
            1 / max_period (EDM's ``PositionalEmbedding(endpoint=True)``, the official CIFAR-10
            U-Net); otherwise w_k = max_period^(-k / half) (DiT, the official JAX code).
        sin_first: order ``[sin, cos]`` (the official CIFAR-10 U-Net swaps EDM's halves);
            otherwise ``[cos, sin]``.

    Returns:
        (B, dim) features ``[cos(w_k scale t), sin(w_k scale t)]`` (or sin first), k = 0 .. dim/2 - 1.
    """
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    steps = max(half - 1, 1) if endpoint else half
    freqs = scale * torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / steps)  # (half,)
    times = dual.primal(t)  # (B,)
    out_dtype = times.dtype if times.is_floating_point() else dtype
    args = times.to(dtype)[:, None] * freqs[None]  # (B, half)
    cos, sin = torch.cos(args), torch.sin(args)
    halves = [sin, cos] if sin_first else [cos, sin]
    emb = _pad_odd(torch.cat(halves, dim=-1), dim).to(out_dtype)  # (B, dim)
    if not isinstance(t, Dual):
        return emb
    n, dt = t.rows, t.tangent.to(dtype)[:, None]  # (n, 1)
    slopes = [cos[:n] * freqs, -sin[:n] * freqs] if sin_first else [-sin[:n] * freqs, cos[:n] * freqs]
    tangent = torch.cat(slopes, dim=-1) * dt  # (n, 2 half)
    return Dual(emb, _pad_odd(tangent, dim).to(out_dtype))


def _pad_odd(features: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 2 * (dim // 2)) -> (B, dim): one zero column when dim is odd."""
    return torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1) if dim % 2 else features


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by a two-layer MLP: (B,) -> (B, hidden)."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(dual.Linear(frequency_dim, hidden), dual.SiLU(), dual.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor | Dual) -> torch.Tensor | Dual:
        freq = sinusoidal_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row for the null (dropped) label.

    Labels are integers in [0, num_classes]; ``num_classes`` itself is the null class.
    """

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


#: what the network is told about time (paper Table 1c); h = t - r. "t,h" is the paper's choice and
#: our default; the others exist for the ablation (configs/sweeps/table1c-time-input.yaml).
TIME_INPUTS = {"t,h": ("t", "h"), "t,r": ("t", "r"), "h": ("h",), "t,r,h": ("t", "r", "h")}


class MeanFlowConditioning(nn.Module):
    """Embeds (r, t, label) into one vector: emb_t(t) + emb_h(t - r) [+ emb_y(label)].

    ``time_input`` chooses the time embeddings that are summed (:data:`TIME_INPUTS`): "t,h"
    (default, emb_t(t) + emb_h(t - r)), "t,r", "h" (t - r only) or "t,r,h". ``labels=None`` (or a
    model without classes) means unconditional; for a class-conditional model ``labels=None`` is
    read as "all null", i.e. the unconditional branch of CFG.
    """

    def __init__(self, hidden: int, num_classes: int = 0, frequency_dim: int = 256, time_input: str = "t,h"):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {', '.join(repr(k) for k in TIME_INPUTS)} (h = t - r), got {time_input!r}")
        self.num_classes = num_classes
        self.time_input = time_input
        for name in TIME_INPUTS[time_input]:
            self.add_module(f"{name}_embed", TimestepEmbedder(hidden, frequency_dim))
        self.y_embed = LabelEmbedder(num_classes, hidden) if num_classes > 0 else None

    def forward(self, r: torch.Tensor, t: torch.Tensor | Dual, labels: torch.Tensor | None = None) -> torch.Tensor | Dual:
        """r, t: (B,); labels: (B,) int64 or None. Returns (B, hidden) (a Dual for a Dual t)."""
        times = {"t": t, "r": r, "h": t - r}
        names = TIME_INPUTS[self.time_input]
        c = getattr(self, f"{names[0]}_embed")(times[names[0]])
        for name in names[1:]:
            c = c + getattr(self, f"{name}_embed")(times[name])
        if self.y_embed is not None:
            if labels is None:
                labels = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            c = c + self.y_embed(labels)
        return c
