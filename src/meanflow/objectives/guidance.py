"""Classifier-free guidance inside the regression target, as the MeanFlow paper trains it.

For samples whose label was kept and whose t lies in [t_start, t_end] the velocity field v is
replaced (in the target, and for MeanFlow in the JVP tangent too) by

    v_g = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null)

computed without gradient; omega = 1, kappa = 0 is no guidance.
"""
from __future__ import annotations

from typing import Any

import torch

from ..options import Option
from .base import Model, num_classes
from .path import _expand


class GuidanceOptions:
    """Options and computation of the guided field v_g (module docstring); mixin of objectives."""

    omega = Option(1.0, above=0.0, doc="guidance scale omega of the guided target")
    kappa = Option(0.0, doc="weight kappa of the conditional prediction in the guided target")
    t_start = Option(0.0, low=0.0, high=1.0, doc="guidance applies for t >= t_start")
    t_end = Option(1.0, low=0.0, high=1.0, doc="guidance applies for t <= t_end")

    @staticmethod
    def relate(values: dict[str, Any]) -> None:
        if values["t_start"] > values["t_end"]:
            raise ValueError(f"guidance option t_end ({values['t_end']}) must not be below t_start ({values['t_start']})")

    @property
    def guided(self) -> bool:
        return not (self.omega == 1.0 and self.kappa == 0.0)

    def check_guidance(self, model: Model) -> None:
        if self.guided and num_classes(model) == 0:
            raise ValueError("guidance (omega != 1 or kappa != 0) needs a class-conditional model")

    def guided_velocity(self, model: Model, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, labels: torch.Tensor | None,
                        cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """v_g of the module docstring, (B, ...); equals v where no guidance applies.

        z, v: (B, ...); t: (B,); labels: (B,) as fed to the network (null where dropped); cond: further
        per-sample keyword inputs of the model, each (B, ...).
        """
        cond = cond or {}
        if not self.guided:
            return v
        null = torch.full_like(labels, num_classes(model))
        with torch.no_grad():
            if self.kappa != 0.0:
                twice = {k: torch.cat([c, c]) for k, c in cond.items()}
                u_both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, null]), **twice).to(v.dtype)
                u_cond, u_null = u_both.chunk(2)
            else:
                u_cond, u_null = 0.0, model(z, t, t, null, **cond).to(v.dtype)
            v_g = self.omega * v + self.kappa * u_cond + (1.0 - self.omega - self.kappa) * u_null
        apply = (labels != null) & (t >= self.t_start) & (t <= self.t_end)
        return torch.where(_expand(apply, v).bool(), v_g, v)
