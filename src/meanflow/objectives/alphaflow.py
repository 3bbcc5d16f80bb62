"""The AlphaFlow objective (Zhang et al., 2025, arXiv 2510.20771): a curriculum from trajectory Flow
Matching to MeanFlow.

With D = alpha (t - r), 0 < alpha <= 1, the r != t rows regress the alpha-target

    u_tgt = [D v + (t - D - r) sg(u(z_t - D v, r, t - D))] / (t - r)  =  alpha v + (1 - alpha) sg(u_next)

(one forward pass without gradient at the point a step of length D along v takes z_t to), and the
r = t rows regress v. alpha = 1 is trajectory Flow Matching (u(z_t, r, t) regresses v at every
(r, t)); alpha = 0 is MeanFlow's target v - (t - r) du/dt, which the r != t rows then take from the
JVP layer (:func:`meanflow.autodiff.jvp`), as :class:`~meanflow.objectives.meanflow.MeanFlowLoss` does.
In between, as alpha -> 0, u_next = u - D du/dt + O(D^2) along the tangent (v, 0, 1), so

    u + (u_tgt - u) / alpha  =  v - (t - r) du/dt + O(alpha):

the alpha-loss's gradient direction tends to MeanFlow's, scaled by alpha.

Loss (as the released code): per-sample squared errors d_i with MeanFlow's adaptive weight
1 / sg(d_i + c)^p, times alpha on the r != t rows while alpha > 0 (so they fade out as alpha -> 0,
until the schedule's clamp hands them to the exact JVP target with weight 1). The released code
averages d over dimensions where we sum, which only rescales c.

alpha follows a schedule over training (``at_step(step, steps)``, called by the trainer before
every step): from ``alpha_initial`` to ``alpha_final`` between the fractions ``anneal_start`` and
``anneal_end`` of the run, by a sigmoid of sharpness ``alpha_gamma`` (the released headline
recipe: 1 -> 0 over the whole run, gamma 25), linearly, or constant; then values below
``alpha_clamp`` (0.005) become 0 and above 1 - ``alpha_clamp`` become 1. The released ImageNet
recipes: B/2 anneals over all 400k steps (anneal_start 0, anneal_end 1) with half the batch at
r != t; XL/2 between steps 600k and 1M of 1.2M (0.5 and 0.833), and its guided recipes clip the
target to [-4, 4] (``target_clip``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..options import Option
from ..autodiff.per_sample import model_rows
from .base import DeviceStats, Model, Targets, register, target_dtype, weighted_regression
from .meanflow import MeanFlowLoss
from .path import _expand

#: how alpha moves from alpha_initial to alpha_final between anneal_start and anneal_end
ALPHA_SCHEDULES = ("sigmoid", "linear", "constant")


@register
class AlphaFlowLoss(MeanFlowLoss):
    """AlphaFlow loss (module docstring): ``loss, stats = AlphaFlowLoss()(model, x, labels=None)``.

    MeanFlow's options (draws, guidance, label drops, the adaptive weight, ``jvp`` for the alpha = 0
    phase; ``tangent_velocity=model`` steps along the model's own velocity instead of v) plus the
    alpha schedule. Call ``at_step(step, steps)`` before each step to move along the schedule
    (:func:`meanflow.training.trainer.train` does); until then alpha is its value at the start.
    """

    kind = "alphaflow"
    ratio = Option(0.5, low=0.0, high=1.0, doc="fraction of each batch with r != t (released B/2 recipe: 0.5)")
    alpha_schedule = Option("sigmoid", choices=ALPHA_SCHEDULES, doc="how alpha moves from alpha_initial to alpha_final")
    alpha_initial = Option(1.0, low=0.0, high=1.0, doc="alpha before anneal_start (1: trajectory Flow Matching)")
    alpha_final = Option(0.0, low=0.0, high=1.0, doc="alpha after anneal_end (0: MeanFlow's JVP target)")
    anneal_start = Option(0.0, low=0.0, high=1.0, doc="fraction of train.steps where alpha starts to move")
    anneal_end = Option(1.0, low=0.0, high=1.0, doc="fraction of train.steps where alpha reaches alpha_final")
    alpha_gamma = Option(25.0, above=0.0, doc="sharpness of the sigmoid schedule (released: 25)")
    alpha_clamp = Option(0.005, low=0.0, high=0.5, doc="alpha below this is 0 and above 1 - this is 1 (released: 0.005)")
    target_clip = Option(0.0, low=0.0, doc="clip the alpha-target to [-c, c] (released guided recipes: 4); 0 = no clip")

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._progress = 0.0

    @staticmethod
    def relate(values: dict[str, Any]) -> None:
        if values["anneal_start"] > values["anneal_end"]:
            raise ValueError(f"anneal_end ({values['anneal_end']}) must not be below anneal_start ({values['anneal_start']})")
        if values["tangent"] != "v01":
            raise ValueError(f"objective alphaflow steps along (v, 0, 1); tangent={values['tangent']} is a MeanFlow ablation only")

    def at_step(self, step: int, steps: int) -> None:
        """Use alpha of training step ``step`` (0-based) of ``steps`` from now on."""
        self._progress = step / steps

    @property
    def alpha(self) -> float:
        """alpha at the current step (:meth:`at_step`), clamped."""
        return self.alpha_at(self._progress)

    def alpha_at(self, progress: float) -> float:
        """alpha at ``progress`` = step / train.steps in [0, 1]: the schedule, then the clamp to exactly 0 or 1."""
        start, end = self.anneal_start, self.anneal_end
        if self.alpha_schedule == "constant" or progress <= start:
            value = self.alpha_initial
        elif progress >= end:
            value = self.alpha_final
        elif self.alpha_schedule == "linear":
            value = self.alpha_initial + (self.alpha_final - self.alpha_initial) * (progress - start) / (end - start)
        else:
            centred = (progress - (start + end) / 2) / (end - start)  # in [-1/2, 1/2]
            value = self.alpha_initial + (self.alpha_final - self.alpha_initial) / (1.0 + math.exp(-self.alpha_gamma * centred))
        if value < self.alpha_clamp:
            return 0.0
        return 1.0 if value > 1.0 - self.alpha_clamp else value

    def _regress(self, model: Model, z, r, t, v, labels, rows: torch.Tensor, cond: dict[str, torch.Tensor] | None = None, *,
                 tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (with gradient), the target and du/dt (zero unless alpha = 0), all (B, ...): MeanFlow's JVP target at
        alpha = 0, else the alpha-target on ``rows`` (the tangent's velocity steps z), v elsewhere."""
        alpha = self.alpha
        if alpha == 0.0:
            return super()._regress(model, z, r, t, v, labels, rows, cond, tangent=tangent)
        cond = cond or {}
        dtype = target_dtype(z)
        with model_rows(None):
            u = model(z, r, t, labels, **cond).to(dtype)
        target = v.to(dtype).clone()
        if alpha < 1.0:
            target[rows] = alpha_target(model, z, r, t, v, tangent, labels, cond, alpha, rows)
        if self.target_clip:
            target[rows] = target[rows].clamp(-self.target_clip, self.target_clip)
        return u, target.detach(), torch.zeros_like(target)

    def reduce(self, out: Targets) -> tuple[torch.Tensor, DeviceStats]:
        """MeanFlow's weighted regression with the r != t rows' terms times alpha (while alpha > 0); adds ``alpha``."""
        alpha = self.alpha
        scale = torch.ones(out.u.shape[0], dtype=out.target.dtype, device=out.u.device)
        if alpha > 0.0:
            scale[out.draws.jvp_index] = alpha
        loss, stats = weighted_regression(out, lambda d: scale * self.weighted(d))
        return loss, {**stats, "alpha": loss.new_tensor(alpha).detach()}


def alpha_target(model: Model, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
                 labels: torch.Tensor | None, cond: dict[str, torch.Tensor], alpha: float, rows: torch.Tensor) -> torch.Tensor:
    """alpha v + (1 - alpha) u(z - D step, r, t - D) with D = alpha (t - r) on ``rows`` (n,), without gradient; (n, ...).

    z, v, step: (B, ...) (``step``: the velocity the point moves along, v or the model's own); r, t: (B,);
    labels: (B,) or None; cond: per-sample model inputs, each (B, ...). Dropout masks follow the rows
    (:func:`~meanflow.autodiff.per_sample.model_rows`). Target math in float32 (float64 for float64 z).
    """
    dtype = target_dtype(z)
    z, r, t, v, step = z[rows], r[rows], t[rows], v[rows], step[rows]
    d = alpha * (t - r)  # (n,)
    take = {k: c[rows] for k, c in cond.items()}
    with torch.no_grad(), model_rows(rows):
        u_next = model(z - _expand(d, z) * step.to(z.dtype), r, t - d, None if labels is None else labels[rows], **take).to(dtype)
    return (alpha * v.to(dtype) + (1.0 - alpha) * u_next).detach()
