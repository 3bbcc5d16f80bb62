"""Samplers: plain functions of a model and noise (one batch, no seeds, no devices).

* :func:`sample` - MeanFlow 1-NFE / k-NFE: z <- z - (t_i - t_{i+1}) u(z, t_{i+1}, t_i).
* :func:`ode_sample` - Euler or Heun integration of the instantaneous velocity u(z, t, t), the
  Flow Matching way (many NFE), from t = 1 (noise) to t = 0 (data).

Noise is standard normal; a model trained with another prior scale says so in its ``noise_scale``
attribute (pMF models, whose official prior is N(0, s^2) with s = 1, 2 or 4), and the samplers
multiply the noise by it (:func:`prior_scale`).

Guidance as an input (iMF-style models, ``guidance_input = True``): both samplers take the
guidance scale ``omega`` and the guidance interval ``(t_min, t_max)`` and hand them to every
network call (:func:`guidance_inputs`). MeanFlow models trained with guidance in the target have
it in their weights and take neither.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Model = Callable[..., torch.Tensor]
ODE_METHODS = ("euler", "heun")
METHODS = ("meanflow", *ODE_METHODS)  # sampler names: MeanFlow jumps, or the ODE on u(z, t, t)
NO_GUIDANCE = (1.0, (0.0, 1.0))  # omega = 1 on [0, 1]: the conditional velocity, unguided


def guidance_inputs(model: Model, steps: int, omega: float | None = None,
                    interval: tuple[float, float] | None = None) -> dict[str, float]:
    """The keyword inputs ``omega``, ``t_min``, ``t_max`` of every network call; {} for models without them.

    For a model with ``guidance_input = True`` an omitted value comes from its
    ``default_guidance(steps)`` (the official settings of the released iMF checkpoints, see
    :data:`meanflow.models.imf_dit.RECOMMENDED_GUIDANCE`), else from omega 1 on [0, 1] (no guidance).
    omega must be > 0 and 0 <= t_min <= t_max <= 1. Passing either to another model is an error.
    """
    net = getattr(model, "module", model)
    if not getattr(net, "guidance_input", False):
        if omega is not None or interval is not None:
            raise ValueError(
                f"omega / interval are inputs of iMF-style models (guidance_input = True); {type(net).__name__} has its guidance "
                "in its weights (set at training time by objective.omega / kappa): sample it without omega and interval"
            )
        return {}
    default_omega, default_interval = net.default_guidance(steps) if hasattr(net, "default_guidance") else NO_GUIDANCE
    omega = default_omega if omega is None else float(omega)
    t_min, t_max = (float(x) for x in (default_interval if interval is None else interval))
    if not math.isfinite(omega) or omega <= 0:
        raise ValueError(f"omega must be a number > 0 (1 = no guidance); got {omega}")
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"the guidance interval must satisfy 0 <= t_min <= t_max <= 1; got ({t_min}, {t_max})")
    return {"omega": omega, "t_min": t_min, "t_max": t_max}


def prior_scale(model: Model) -> float:
    """The standard deviation of the model's prior: its ``noise_scale`` attribute, else 1."""
    return float(getattr(getattr(model, "module", model), "noise_scale", 1.0))


def time_grid(steps: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform grid 1 = t_0 > t_1 > ... > t_steps = 0 of shape (steps + 1,)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample(model: Model, noise: torch.Tensor, steps: int = 1, labels: torch.Tensor | None = None,
           omega: float | None = None, interval: tuple[float, float] | None = None) -> torch.Tensor:
    """MeanFlow sampling with ``steps`` network evaluations. noise: (B, ...) standard normal -> samples (B, ...).

    One step is x = e - u(e, r=0, t=1), with e the noise times :func:`prior_scale`. For a
    CFG-trained MeanFlow model guidance lives in the weights: pass class labels only. An iMF-style model also takes the guidance scale ``omega`` and
    interval ``(t_min, t_max)`` (see :func:`guidance_inputs` for defaults and checks).
    """
    guidance = guidance_inputs(model, steps, omega, interval)
    grid = time_grid(steps, noise.device, noise.dtype)
    z = noise * prior_scale(model)
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        u = model(z, ones * t_next, ones * t_cur, labels, **guidance)
        z = z - (t_cur - t_next) * u.to(z.dtype)
    return z


@torch.no_grad()
def ode_sample(model: Model, noise: torch.Tensor, steps: int = 100, labels: torch.Tensor | None = None, method: str = "euler",
               omega: float | None = None, interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Integrate dz/dt = u(z, t, t) from t = 1 (the noise times :func:`prior_scale`) to 0.

    NFE: ``steps`` (Euler) or ``2 steps - 1`` (Heun).

    ``omega`` / ``interval``: as in :func:`sample`, for iMF-style models only.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"ODE method must be one of {', '.join(ODE_METHODS)}, got {method!r}")
    guidance = guidance_inputs(model, steps, omega, interval)
    grid = time_grid(steps, noise.device, noise.dtype)
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(z, ones * t, ones * t, labels, **guidance).to(z.dtype)

    z = noise * prior_scale(model)
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

