"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter, He, arXiv 2512.02012), as the official
JAX code (``imf.py``, branch ``main`` of Lyy-iiis/imeanflow) computes it.

The network has two heads from one trunk: u (average velocity) and an auxiliary v (instantaneous
velocity), and takes the guidance scale omega and the guidance interval (t_min, t_max) as
inputs; it sees time only as h = t - r (the model contract ``model(z, r, t, labels, *, omega,
t_min, t_max, return_v)``, ``guidance_input = True``). Per sample:

* times: t, r logit-normal(mu, sigma) drawn independently, t = max, r = min; a fixed share
  1 - ``ratio`` of each batch (50%) has r = t.
* omega on [1, 1 + ``omega_max``] with density ~ omega^-``omega_beta`` (beta = 1, the default:
  log-uniform on [1, 8]); t_min ~ U(0, 0.5), t_max ~ U(0.5, 1), set to (0, 1) on the r = t rows.
* guided field from the v-head without gradient, at h = 0 and interval (0, 1):

      w   = omega if t_min <= t <= t_max else 1
      v_c = v-head(z, y,    omega = w)        v_u = v-head(z, null, omega = 1)
      v_g = (e - x) + (1 - 1/w) (v_c - v_u);  v_g = e - x on rows whose label is dropped

  The official code feeds omega = 1 to the unconditional v_u, which is what this module does;
  the paper's Algorithm 2 is written differently for v_u (the official repository's issue 8).
* label drops (probability ``label_drop``) on r = t rows (:mod:`~meanflow.objectives.draws`),
  as the official code puts them on the first rows of its batch, which are its r = t rows.
* one JVP of u along the tangent (v_c, dt = 1, dr = 0), i.e. dh = 1: the *predicted*
  conditional velocity, not e - x; only the r != t rows need it (the term vanishes at r = t).
  The network inputs there are the sampled omega (not w), t_min, t_max and the fed labels.
* compound prediction V = u + (t - r) sg(du/dt) and the loss

      L_u = ||V - sg(v_g)||^2,   L_v = ||v - sg(v_g)||^2   (sums over dimensions)
      loss = mean_i  L_u / sg(L_u + c)^p + L_v / sg(L_v + c)^p     (c = 0.01, p = 1)
"""
from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch

from ..autodiff import Tangent, jvp
from ..options import Option
from .base import (DeviceStats, JVPOptions, LabelDropOptions, Model, Objective, Targets, WeightOptions, checked_labels,
                   drop_labels, error_stats, num_classes, register, scatter_rows, target_dtype)
from .draws import BatchRandom, Draws, Shard, draw_batch
from .path import _expand, conditional_velocity, interpolate
from .time_samplers import PairTimeOptions

T_MIN_RANGE = (0.0, 0.5)  # official: t_min ~ U(0, 0.5)
T_MAX_RANGE = (0.5, 1.0)  # official: t_max ~ U(0.5, 1)


@register
class IMFLoss(Objective, JVPOptions, WeightOptions, LabelDropOptions, PairTimeOptions):
    """Improved MeanFlow loss as the official code computes it: ``loss, stats = IMFLoss()(model, x, labels)``.

    For two-headed iMF-style models (``guidance_input = True``, e.g. ``imf-tiny/2``); see the
    module docstring for the method and ``IMFLoss.option_set()`` for the options.
    """

    kind = "imf"
    #: the r = t rows' t is one draw (pMF) rather than the larger of two (iMF); see :func:`draw_batch`
    single_time_at_r_eq_t: ClassVar[bool] = False
    ratio = Option(0.5, low=0.0, high=1.0, doc="fraction of each batch with r != t (official: 0.5)")
    omega_max = Option(7.0, above=0.0, doc="s_max: the guidance scale omega is drawn on [1, 1 + s_max] (official: 7)")
    omega_beta = Option(1.0, low=0.0, doc="cfg_beta: omega has density ~ omega^-beta; 1 is log-uniform (official: 1)")
    weight_eps = Option(0.01, above=0.0, doc="c of the adaptive weight 1 / (L + c)^p (official: 0.01)")

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None, shard: Shard | None = None,
             guided: bool = True) -> Draws:
        """MeanFlow's draws plus omega, t_min, t_max (each (B,)) in ``conditioning``; omega = 1 unless ``guided``."""
        return self.draw_more(x, generator, shard, guided)[0]

    def draw_more(self, x: torch.Tensor, generator: torch.Generator | None, shard: Shard | None,
                  guided: bool) -> tuple[Draws, BatchRandom]:
        """:meth:`draw` and the :class:`BatchRandom` that continues after it (for objectives that draw more)."""
        draws, rand = draw_batch(x, generator, shard, ratio=self.ratio, times=self.times(), label_drop=self.label_drop,
                                 single_time_at_r_eq_t=self.single_time_at_r_eq_t)
        fm = (~draws.jvp_rows).to(rand.device)
        t_min = torch.where(fm, 0.0, T_MIN_RANGE[0] + (T_MIN_RANGE[1] - T_MIN_RANGE[0]) * rand.uniform())
        t_max = torch.where(fm, 1.0, T_MAX_RANGE[0] + (T_MAX_RANGE[1] - T_MAX_RANGE[0]) * rand.uniform())
        omega = self.omega_from_uniform(rand.uniform()) if guided else torch.ones_like(t_min)
        to = dict(dtype=x.dtype, device=x.device)
        return replace(draws, conditioning={"omega": omega.to(**to), "t_min": t_min.to(**to), "t_max": t_max.to(**to)}), rand

    def omega_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """omega on [1, 1 + s_max] with density ~ omega^-beta, from U(0, 1) draws u (inverse CDF)."""
        log_top = torch.log1p(torch.as_tensor(self.omega_max, dtype=u.dtype))
        if self.omega_beta == 1.0:
            return torch.exp(u * log_top)
        power = 1.0 - self.omega_beta
        return torch.exp(torch.log1p(u * torch.expm1(power * log_top)) / power)

    def targets(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, *, shard: Shard | None = None,
                cond: dict[str, torch.Tensor] | None = None) -> Targets:
        """u and v-head output (with gradient), target v_g, du/dt along v_c, tangent v_c; all (B, ...).

        ``cond``: further per-sample keyword inputs of the model, each (B, ...), given to every call.
        """
        check_two_headed(model, self.kind)
        draws = self.draw(x, generator, shard, guided=num_classes(model) > 0)
        return self.targets_from(model, x, labels, draws, cond or {})

    def targets_from(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None, draws: Draws,
                     cond: dict[str, torch.Tensor]) -> Targets:
        """:meth:`targets` for given draws; x: (B, ...), labels: (B,) or None, cond: model inputs, each (B, ...)."""
        classes = num_classes(model)
        labels = checked_labels(model, labels, x.shape[0], x.device)
        z = interpolate(x, draws.noise, draws.t)
        v_t = self.path_velocity(x, z, draws)
        v_c, v_g = self.guided_velocity(model, z, draws.t, v_t, labels, draws.conditioning, cond)
        fed = drop_labels(labels, draws.dropped, classes)
        v_g = torch.where(_expand(draws.dropped, v_g).bool(), v_t, v_g)
        rows = draws.jvp_index
        out = jvp(model, z, draws.r, draws.t, fed, rows, Tangent(z=v_c[rows].to(z.dtype)), mode=self.jvp,
                  conditioning={**cond, **draws.conditioning}, return_v=True)
        dtype = target_dtype(z)
        return Targets(
            u=out.u.to(dtype), target=v_g.to(dtype).detach(), dudt=scatter_rows(rows, out.du.to(dtype), x.shape[0]),
            z=z, v=v_g, labels=fed, draws=draws, tangent=v_c, v_head=out.v.to(dtype),
        )

    @staticmethod
    def path_velocity(x: torch.Tensor, z: torch.Tensor, draws: Draws) -> torch.Tensor:
        """v_t = e - x of the path, (B, ...) (x, z: (B, ...)); the target and the guidance start from it."""
        return conditional_velocity(x, draws.noise)

    @staticmethod
    def guided_velocity(model: Model, z: torch.Tensor, t: torch.Tensor, v_t: torch.Tensor, labels: torch.Tensor | None,
                        conditioning: dict[str, torch.Tensor], cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_c, v_g) of the module docstring, each (B, ...), without gradient.

        z, v_t: (B, ...); t: (B,); labels: (B,) before drops, or None (unconditional: v_g = v_t);
        conditioning: the drawn omega, t_min, t_max (B,); cond: further model inputs, each (B, ...).
        """
        ones, zeros = torch.ones_like(t), torch.zeros_like(t)
        with torch.no_grad():
            if labels is None:
                v_c = model(z, t, t, None, omega=ones, t_min=zeros, t_max=ones, return_v=True, **cond)[1].to(v_t.dtype)
                return v_c, v_t
            omega, t_min, t_max = conditioning["omega"], conditioning["t_min"], conditioning["t_max"]
            w = torch.where((t >= t_min) & (t <= t_max), omega, ones)
            null = torch.full_like(labels, num_classes(model))
            two = lambda a, b: torch.cat([a, b])  # noqa: E731
            twice = {k: two(c, c) for k, c in cond.items()}
            v = model(two(z, z), two(t, t), two(t, t), two(labels, null), omega=two(w, ones), t_min=two(zeros, zeros),
                      t_max=two(ones, ones), return_v=True, **twice)[1].to(v_t.dtype)
            v_c, v_u = v.chunk(2)
            return v_c, v_t + _expand(1 - 1 / w, v_t) * (v_c - v_u)

    def reduce(self, out: Targets) -> tuple[torch.Tensor, DeviceStats]:
        """mean_i of the weighted L_u + L_v (module docstring) and diagnostics."""
        d = out.draws
        compound = out.u + _expand(d.t - d.r, out.u).to(out.u.dtype) * out.dudt.detach()  # V, (B, ...)
        sq_u = (compound - out.target.detach()).pow(2).flatten(1)  # (B, D)
        sq_v = (out.v_head - out.target.detach()).pow(2).flatten(1)  # (B, D)
        loss = (self.weighted(sq_u.sum(1)) + self.weighted(sq_v.sum(1))).mean()
        return loss, error_stats(sq_u, d, out.dudt, loss=loss, loss_u=sq_u.mean(), loss_v=sq_v.mean())


def check_two_headed(model: Model, kind: str) -> None:
    """ValueError unless ``model`` is a two-headed iMF-style model (objective ``kind`` needs one)."""
    inner = getattr(model, "module", getattr(model, "_orig_mod", model))
    if not getattr(inner, "guidance_input", False):
        raise ValueError(
            f"objective {kind!r} needs a two-headed iMF-style model (guidance_input = True; model(z, r, t, labels, omega=, "
            f"t_min=, t_max=, return_v=True) -> (u, v)), such as model.name=imf-tiny/2; {type(inner).__name__} is not one"
        )
