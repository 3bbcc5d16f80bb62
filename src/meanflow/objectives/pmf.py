"""Pixel MeanFlow (pMF; Lu, Lu, Sun, Zhao, Jiang, Wang, Li, Geng, He, arXiv 2601.22158), as the official
JAX code (``pmf.py``, Lyy-iiis/pMF; the ``hsdp`` branch for the H models) computes it.

pMF trains the two-headed iMF model contract (:mod:`~meanflow.objectives.imf`) directly on pixels
and shares iMF's draws (times, r = t share, omega, interval, label drops on r = t rows), guided
field from the v-head, predicted-v tangent, compound V = u + (t - r) sg(du/dt) and adaptive weights;
that part is :class:`~meanflow.objectives.imf.IMFLoss`'s code. It differs in:

* the prior: e ~ N(0, s^2) with s the model's ``noise_scale`` (1, 2 or 4 in the official recipes;
  the sampler starts from the same prior);
* the velocity the target starts from: v_t = (z_t - x) / clip(t, 0.05, 1) (= e - x for t >= 0.05);
* the times: on the r = t rows t is one logit-normal draw (the official code sets r = t before it
  orders the pair; MeanFlow and iMF order first, so there t is the larger of two draws);
* an optional share ``uniform_fraction`` of the samples (official ``tr_uniform``: 10%) whose t and
  r are two U(0, 1) values a, b instead (t = max, r = min; t = a on the r = t rows);
* perceptual terms on the predicted image x_hat = z_t - t u (u with gradient), for t below
  ``perceptual_max_t``: per-sample LPIPS d_l and ConvNeXt feature distance d_c
  (:mod:`~meanflow.objectives.perceptual`, both zero where t >= the bound), each under its own
  adaptive weight:

      loss = mean_i  L_u / sg(L_u + c)^p + L_v / sg(L_v + c)^p
                     + lambda_l d_l / sg(d_l + c)^p + lambda_c d_c / sg(d_c + c)^p

Who owns x-prediction: the official network predicts the clean image and returns
u = (z_t - x_net) / clip(t, 0.05, 1) (and v likewise) itself, so the objective sees u and v as for
iMF and never x_net (the pMF network, ``models/mit.py``, does the same); x_hat = z_t - t u equals
x_net for t >= 0.05.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..options import Option
from .base import DeviceStats, Model, Targets, num_classes, register
from .draws import BatchRandom, Draws, Shard
from .imf import IMFLoss, check_two_headed
from .path import _expand
from .perceptual import PerceptualDistances, crop_boxes

T_CLIP = 0.05  # official: v_t = (z_t - x) / clip(t, 0.05, 1)
PERCEPTUAL_WEIGHTS = ("pretrained", "random")


@dataclass(frozen=True)
class PMFTargets(Targets):
    """iMF's :class:`~meanflow.objectives.base.Targets` plus what the perceptual terms need.

    x: the data batch (B, C, H, W); boxes: (B, 4) crop boxes of the perceptual terms, or None without them.
    """

    x: torch.Tensor | None = None
    boxes: torch.Tensor | None = None

    @property
    def x_hat(self) -> torch.Tensor:
        """The predicted image z_t - t u, (B, ...), with u's gradient."""
        return self.z - _expand(self.draws.t, self.u) * self.u


@register
class PMFLoss(IMFLoss):
    """Pixel MeanFlow loss as the official code computes it: ``loss, stats = PMFLoss()(model, x, labels)``.

    For two-headed iMF-style models (``guidance_input = True``: the pMF MiT, or ``imf-tiny/2``); see
    the module docstring and ``PMFLoss.option_set()``. The perceptual backbones are built on first
    use (:meth:`PerceptualDistances.official`) or set with :meth:`use_perceptual`.
    """

    kind = "pmf"
    single_time_at_r_eq_t = True  # official: r = t is set before (t, r) is ordered
    uniform_fraction = Option(0.0, low=0.0, high=1.0,
                              doc="share of samples with uniform (t, r) instead of logit-normal (official tr_uniform: 0.1)")
    lpips_weight = Option(0.0, low=0.0, doc="lambda of the LPIPS (VGG) term on x_hat = z - t u; 0 = off (official: 0.4)")
    convnext_weight = Option(0.0, low=0.0, doc="lambda of the ConvNeXt feature term on x_hat; 0 = off (official: 0.1)")
    perceptual_max_t = Option(1.0, low=0.0, high=1.0,
                              doc="the perceptual terms apply where t < this bound (official: 0.8; 0.6 for L/32, H)")
    perceptual_weights = Option("pretrained", choices=PERCEPTUAL_WEIGHTS,
                                doc="backbones of the perceptual terms: pretrained (downloaded once, cached) or random (smoke tests)")

    def __init__(self, **options):
        super().__init__(**options)
        self.__dict__["_perceptual"] = None

    @property
    def perceptual(self) -> bool:
        """Whether any perceptual term is on."""
        return self.lpips_weight > 0 or self.convnext_weight > 0

    def use_perceptual(self, distances: PerceptualDistances) -> "PMFLoss":
        """Use ``distances`` (e.g. small random backbones) instead of the official backbones; returns self."""
        self.__dict__["_perceptual"] = distances
        return self

    def distances(self, like: torch.Tensor) -> PerceptualDistances:
        """The perceptual backbones (built on first use) on ``like``'s device, in float64 for float64 input else float32."""
        if self.__dict__["_perceptual"] is None:
            pretrained = self.perceptual_weights == "pretrained"
            self.use_perceptual(PerceptualDistances.official(self.lpips_weight > 0, self.convnext_weight > 0, pretrained))
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self.__dict__["_perceptual"].to(device=like.device, dtype=dtype)

    def draw_more(self, x: torch.Tensor, generator: torch.Generator | None, shard: Shard | None,
                  guided: bool) -> tuple[Draws, BatchRandom]:
        """iMF's draws with the uniform (t, r) share; the noise stays N(0, 1) (the model's scale is applied in targets)."""
        draws, rand = super().draw_more(x, generator, shard, guided)
        if self.uniform_fraction == 0.0:
            return draws, rand
        use = (rand.uniform() < self.uniform_fraction).to(draws.t.device)
        a, b = (rand.uniform().to(draws.t) for _ in range(2))
        t = torch.where(use, torch.where(draws.jvp_rows, torch.maximum(a, b), a), draws.t)
        r = torch.where(draws.jvp_rows, torch.where(use, torch.minimum(a, b), draws.r), t)
        return replace(draws, t=t, r=r), rand

    def targets(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, *, shard: Shard | None = None,
                cond: dict[str, torch.Tensor] | None = None) -> PMFTargets:
        """iMF's targets on the pMF path and prior, with the data and the perceptual crop boxes; all (B, ...)."""
        check_two_headed(model, self.kind)
        draws, rand = self.draw_more(x, generator, shard, guided=num_classes(model) > 0)
        draws = replace(draws, noise=draws.noise * noise_scale(model))
        boxes = crop_boxes(rand, x.shape[-2], x.shape[-1]) if self.perceptual else None
        out = self.targets_from(model, x, labels, draws, cond or {})
        return PMFTargets(**{f.name: getattr(out, f.name) for f in fields(Targets)}, x=x, boxes=boxes)

    @staticmethod
    def path_velocity(x: torch.Tensor, z: torch.Tensor, draws: Draws) -> torch.Tensor:
        """v_t = (z_t - x) / clip(t, 0.05, 1), (B, ...)."""
        return (z - x) / _expand(draws.t.clamp(T_CLIP, 1.0), z)

    def reduce(self, out: PMFTargets) -> tuple[torch.Tensor, DeviceStats]:
        """iMF's weighted L_u + L_v plus the weighted perceptual terms (module docstring), and diagnostics."""
        loss, stats = super().reduce(out)
        if not self.perceptual:
            return loss, stats
        if out.x.ndim != 4 or out.x.shape[1] != 3:
            raise ValueError(f"the pMF perceptual terms (lpips_weight, convnext_weight) compare RGB images (B, 3, H, W); this data "
                             f"is {tuple(out.x.shape)}: set objective.lpips_weight=0 objective.convnext_weight=0")
        x_hat = out.x_hat
        lpips, convnext = self.distances(x_hat)(x_hat, out.x.to(x_hat.dtype), out.boxes)
        below = out.draws.t < self.perceptual_max_t  # (B,)
        lpips, convnext = torch.where(below, lpips, 0.0), torch.where(below, convnext, 0.0)
        aux = (self.lpips_weight * self.weighted(lpips) + self.convnext_weight * self.weighted(convnext)).mean()
        return loss + aux, {**stats, "loss": (loss + aux).detach(), "lpips": lpips.detach().mean(),
                            "convnext": convnext.detach().mean()}


def noise_scale(model: Model) -> float:
    """The model's prior standard deviation s (attribute ``noise_scale``, default 1): e ~ N(0, s^2)."""
    inner = getattr(model, "module", getattr(model, "_orig_mod", model))
    return float(getattr(inner, "noise_scale", 1.0))
