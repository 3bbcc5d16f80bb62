"""Samplers: plain functions of a model and noise (one batch, no seeds, no devices).

* :func:`sample` - MeanFlow 1-NFE / k-NFE: z <- z - (t_i - t_{i+1}) u(z, t_{i+1}, t_i).
* :func:`ode_sample` - Euler or Heun integration of the instantaneous velocity u(z, t, t), the
  Flow Matching way (many NFE), from t = 1 (noise) to t = 0 (data).
"""
from __future__ import annotations

from typing import Callable

import torch

Model = Callable[..., torch.Tensor]


def time_grid(steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform grid 1 = t_0 > t_1 > ... > t_steps = 0 of shape (steps + 1,)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, steps: int = 1, labels: torch.Tensor | None = None) -> torch.Tensor:
    """MeanFlow sampling with ``steps`` network evaluations. noise: (B, ...) -> samples (B, ...).

    One step is x = e - u(e, r=0, t=1). For a CFG-trained model guidance lives in the weights:
    pass class labels, no guidance scale.
    """
    grid = time_grid(steps, noise.device, noise.dtype)
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        u = model(z, ones * t_next, ones * t_cur, labels)
        z = z - (t_cur - t_next) * u.to(z.dtype)
    return z


@torch.no_grad()
def ode_sample(model: Model, noise: torch.Tensor, steps: int = 100, labels: torch.Tensor | None = None, method: str = "euler") -> torch.Tensor:
    """Integrate dz/dt = u(z, t, t) from t = 1 to 0. NFE: ``steps`` (Euler) or ``2 steps - 1`` (Heun)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"ODE method must be 'euler' or 'heun', got {method!r}")
    grid = time_grid(steps, noise.device, noise.dtype)
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(z, ones * t, ones * t, labels).to(z.dtype)

    z = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        v = velocity(z, t_cur)
        if method == "heun" and t_next > 0:
            z_pred = z + dt * v
            v = 0.5 * (v + velocity(z_pred, t_next))
        z = z + dt * v
    return z


def nfe(steps: int, method: str = "meanflow") -> int:
    """Network evaluations per sample of a sampler configuration."""
    return 2 * steps - 1 if method == "heun" else steps

