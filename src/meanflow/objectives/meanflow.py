"""The MeanFlow objective (Geng et al., 2025).

A network u(z, r, t) predicts the average velocity between times r <= t. Differentiating
(t - r) u = int_r^t v ds with respect to t gives the MeanFlow identity and the target

    u_tgt = v - (t - r) * du/dt,     du/dt = v . d_z u + d_t u   (one JVP, tangent (v, 0, 1))
    loss  = mean_i  sg(w_i) * d_i,   d_i = ||u_i - sg(u_tgt_i)||^2,   w_i = 1 / (d_i + c)^p

Samples with r = t have u_tgt = v (the factor t - r vanishes), so du/dt is needed only for the
r != t part of the batch, a fixed count per batch; the JVP layer
(:func:`meanflow.autodiff.jvp`, option ``jvp``) computes it for those rows only. With
classifier-free guidance (:mod:`~meanflow.objectives.guidance`) v is replaced by the guided
field v_g in the target *and* in the tangent. ``velocity="batch"`` replaces e - x by the
batch estimate of the marginal velocity E[e - x | z_t] (:func:`~meanflow.objectives.path.marginal_velocity`),
in the target and the tangent alike.

``tangent_velocity="model"`` takes the tangent's velocity from the network itself, v_hat =
u(z, t, t) without gradient (as improved MeanFlow does with its v-head), and keeps v (or v_g) in
the target: u_tgt = v - (t - r) du/dt along (v_hat, 0, 1). The JVP is linear in its tangent and
v_hat estimates E[v | z_t], so the target's mean is unchanged once v_hat is right, while the noise
that the per-sample conditional velocity e - x puts into du/dt is gone. It costs one forward pass
without gradient over the r != t rows.
"""
from __future__ import annotations

import torch

from ..autodiff import Tangent, jvp
from ..options import Option
from ..autodiff.per_sample import model_rows
from .base import (DeviceStats, JVPOptions, LabelDropOptions, Model, Objective, Targets, WeightOptions, checked_labels,
                   drop_labels, num_classes, register, scatter_rows, target_dtype, weighted_regression)
from .draws import Draws, Shard, draw_batch
from .guidance import GuidanceOptions
from .path import VelocityOptions, _expand, interpolate
from .time_samplers import PairTimeOptions

#: JVP tangents (dr, dt) beside v on z: the MeanFlow identity needs (v, 0, 1); the others are ablations
TANGENTS = {"v01": (0.0, 1.0), "v00": (0.0, 0.0), "v10": (1.0, 0.0)}
#: where the tangent's velocity on z comes from: the (guided) conditional velocity, or the model's u(z, t, t)
TANGENT_VELOCITIES = ("conditional", "model")


@register
class MeanFlowLoss(Objective, JVPOptions, WeightOptions, LabelDropOptions, GuidanceOptions, PairTimeOptions, VelocityOptions):
    """MeanFlow loss: ``loss, stats = MeanFlowLoss(ratio=0.25)(model, x, labels=None)``.

    Options (keyword arguments; the same names as the config's ``objective.*``): ``ratio``,
    the time sampler (``time_sampler``, ``mu``, ``sigma``, ``r_mu``, ``r_sigma``), guidance
    (``omega``, ``kappa``, ``t_start``, ``t_end``), ``label_drop``,
    ``independent_label_drop``, ``tangent`` (ablation only), ``tangent_velocity``, ``velocity``, the adaptive weight (``weight_power``, ``weight_eps``) and
    ``jvp``. ``MeanFlowLoss.option_set()`` lists them with defaults and ranges.

    The model must be callable as ``model(z, r, t, labels)`` and, when labels are used, expose
    ``num_classes`` (the null label is ``num_classes``).
    """

    kind = "meanflow"
    ratio = Option(0.25, low=0.0, high=1.0, doc="fraction of each batch with r != t (paper: 0.25 on ImageNet, 0.75 on CIFAR-10)")
    independent_label_drop = Option(
        False, doc="drop labels on any row, independently of r != t (older behaviour, for comparison; the official "
        "codes drop on r = t rows only)",
    )
    tangent = Option(
        "v01", choices=tuple(TANGENTS), doc="JVP tangent on (z, r, t): v01 = (v, 0, 1) is MeanFlow's; v00 and v10 are "
        "deliberately wrong, for the tangent ablation only",
    )
    tangent_velocity = Option(
        "conditional", choices=TANGENT_VELOCITIES, doc="velocity of the JVP tangent: conditional = e - x (or guided "
        "v_g; the paper's), model = the network's own u(z, t, t) without gradient (improved MeanFlow's; lower-variance "
        "targets for one more forward pass over the r != t rows)",
    )

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None, shard: Shard | None = None) -> Draws:
        """Noise, (r, t), label drops and r != t rows for the batch x of shape (B, ...)."""
        draws, _ = draw_batch(x, generator, shard, ratio=self.ratio, times=self.times(), label_drop=self.label_drop,
                              drop_anywhere=self.independent_label_drop)
        return draws

    def targets(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, *, shard: Shard | None = None,
                cond: dict[str, torch.Tensor] | None = None) -> Targets:
        """Network output u (with gradient), the target u_tgt and du/dt (no gradient), all (B, ...).

        ``cond``: further per-sample keyword inputs of the model, each (B, ...), given row by row.
        """
        draws = self.draw(x, generator, shard)
        labels = drop_labels(checked_labels(model, labels, x.shape[0], x.device), draws.dropped, num_classes(model))
        self.check_guidance(model)
        z = interpolate(x, draws.noise, draws.t)
        v_path = self.path_velocity(x, draws.noise, draws.t, labels, num_classes(model), shard)
        v = self.guided_velocity(model, z, draws.t, v_path, labels, cond)
        rows = draws.jvp_index
        tangent = v if self.tangent_velocity == "conditional" else model_velocity(model, z, draws.t, labels, rows, cond, v)
        u, target, dudt = self._regress(model, z, draws.r, draws.t, v, labels, rows, cond, tangent=tangent)
        return Targets(u=u, target=target, dudt=dudt, z=z, v=v, labels=labels, draws=draws, tangent=tangent)

    def jvp_target(self, model: Model, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (with gradient), u_tgt = v - (t - r) du/dt (no gradient) and du/dt for every row, all (n, ...).

        The tangent (v, 0, 1) of (z, r, t) makes the JVP the total derivative d/dt u along the path.
        """
        return self._regress(model, z, r, t, v, labels, torch.arange(z.shape[0], device=z.device), tangent=v)

    def _regress(self, model: Model, z, r, t, v, labels, rows: torch.Tensor, cond: dict[str, torch.Tensor] | None = None, *,
                 tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u, target and du/dt (B, ...) with the JVP on ``rows`` along ``tangent`` (B, ...) on z;
        target math in float32 (float64 for float64 z)."""
        dr, dt = TANGENTS[self.tangent]
        along = Tangent(z=tangent[rows].to(z.dtype), t=dt, r=dr)
        out = jvp(model, z, r, t, labels, rows, along, mode=self.jvp, conditioning=cond)
        dtype = target_dtype(z)
        u, du = out.u.to(dtype), out.du.to(dtype)
        target = v.to(dtype).clone()
        target[rows] = mean_flow_target(v[rows], r[rows], t[rows], du)
        return u, target.detach(), scatter_rows(rows, du, z.shape[0])

    def reduce(self, out: Targets) -> tuple[torch.Tensor, DeviceStats]:
        return weighted_regression(out, self.weighted)


def model_velocity(model: Model, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, rows: torch.Tensor,
                   cond: dict[str, torch.Tensor] | None, v: torch.Tensor) -> torch.Tensor:
    """v with its ``rows`` replaced by the model's instantaneous velocity u(z, t, t), without gradient; (B, ...).

    z, v: (B, ...); t: (B,); labels: (B,) as fed to the network, or None; rows: (n,) indices (dropout masks follow
    them, :func:`~meanflow.autodiff.per_sample.model_rows`).
    """
    take = {k: c[rows] for k, c in (cond or {}).items()}
    with torch.no_grad(), model_rows(rows):
        u_tt = model(z[rows], t[rows], t[rows], None if labels is None else labels[rows], **take)
    return v.index_put((rows,), u_tt.to(v.dtype))


def mean_flow_target(v: torch.Tensor, r: torch.Tensor, t: torch.Tensor, dudt: torch.Tensor) -> torch.Tensor:
    """u_tgt = v - (t - r) du/dt in du/dt's dtype, without gradient. v, dudt: (n, ...); r, t: (n,)."""
    h = _expand((t - r).clamp(0, 1), dudt).to(dudt.dtype)  # (n, 1, ...)
    return (v.to(dudt.dtype) - h * dudt).detach()
