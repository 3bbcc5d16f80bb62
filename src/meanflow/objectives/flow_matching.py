"""Flow Matching (Lipman et al., 2023; the rectified path): regress the velocity, no JVP.

    z = (1 - t) x + t e,    loss = mean_i  w_i ||u(z, t, t) - v_i||^2,    v = e - x

(or the guided field v_g, :mod:`~meanflow.objectives.guidance`). Its times and label drops are
drawn as MeanFlow's with every sample at r = t, so it is MeanFlow's r = t part exactly.
"""
from __future__ import annotations

import torch

from ..options import Option
from .base import (DeviceStats, LabelDropOptions, Model, Objective, Targets, WeightOptions, checked_labels, drop_labels,
                   num_classes, register, target_dtype, weighted_regression)
from .draws import Shard, draw_batch
from .guidance import GuidanceOptions
from .path import VelocityOptions, interpolate
from .time_samplers import TimeOptions


@register
class FlowMatchingLoss(Objective, WeightOptions, LabelDropOptions, GuidanceOptions, TimeOptions, VelocityOptions):
    """Flow Matching baseline: ``loss, stats = FlowMatchingLoss()(model, x, labels=None)``.

    Defaults to plain squared error (``weight_power = 0``): a fair baseline does not inherit
    MeanFlow's adaptive weighting. Models it trains are sampled as ODEs.
    """

    kind = "flow_matching"
    few_step = False
    weight_power = Option(0.0, low=0.0, doc="p of the adaptive weight 1 / (d + c)^p; 0 (the default here) is plain squared error")

    def targets(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, *, shard: Shard | None = None,
                cond: dict[str, torch.Tensor] | None = None) -> Targets:
        """u = model(z, t, t) with gradient; target v (no gradient); dudt zero. All (B, ...).

        ``cond``: further per-sample keyword inputs of the model, each (B, ...).
        """
        cond = cond or {}
        draws, _ = draw_batch(x, generator, shard, ratio=0.0, times=self.times(), label_drop=self.label_drop)
        labels = drop_labels(checked_labels(model, labels, x.shape[0], x.device), draws.dropped, num_classes(model))
        self.check_guidance(model)
        z = interpolate(x, draws.noise, draws.t)
        v_path = self.path_velocity(x, draws.noise, draws.t, labels, num_classes(model), shard)
        v = self.guided_velocity(model, z, draws.t, v_path, labels, cond)
        dtype = target_dtype(z)
        u = model(z, draws.t, draws.t, labels, **cond).to(dtype)
        target = v.to(dtype).detach()
        return Targets(u=u, target=target, dudt=torch.zeros_like(target), z=z, v=v, labels=labels, draws=draws)

    def reduce(self, out: Targets) -> tuple[torch.Tensor, DeviceStats]:
        return weighted_regression(out, self.weighted)
