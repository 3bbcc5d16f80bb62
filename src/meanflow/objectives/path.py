"""The linear (rectified) probability path used by MeanFlow and Flow Matching.

Time convention, fixed across the package: t = 0 is data, t = 1 is noise.

    z_t = (1 - t) x + t e,        v_t = dz_t / dt = e - x
"""
from __future__ import annotations

import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like`` of shape (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x + t e.  x, noise: (B, ...); t: (B,). Returns (B, ...)."""
    tt = _expand(t, x)
    return (1 - tt) * x + tt * noise


def conditional_velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v_t = e - x, the velocity of the conditional path (independent of t). Shapes (B, ...)."""
    return noise - x
