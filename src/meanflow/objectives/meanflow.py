"""The MeanFlow objective (Geng et al., 2025) and Flow Matching as its r = t special case.

A network u(z, r, t) predicts the average velocity between times r <= t. Differentiating
(t - r) u = int_r^t v ds with respect to t gives the MeanFlow identity and the target

    u_tgt = v - (t - r) * du/dt,     du/dt = v . d_z u + d_t u   (one JVP, tangent (v, 0, 1))
    loss  = mean_i  sg(w_i) * d_i,   d_i = ||u_i - sg(u_tgt_i)||^2,   w_i = 1 / (d_i + c)^p

Samples with r = t have u_tgt = v (the factor t - r vanishes), so du/dt is needed only for the
r != t part of the batch, a fixed count per batch. How it is computed (``jvp``):

* ``"dual"``: our models (``supports_dual``) run one ordinary forward pass over the whole batch,
  r != t rows first, on :class:`meanflow.models.dual.Dual` values that carry the tangent of
  those rows beside the primal, outside autograd: a Flow Matching step plus one tangent pass.
* ``"forward_ad"``: any model. The r != t rows go through one forward-mode pass
  (``torch.autograd.forward_ad``) whose primal output carries the gradient, before an ordinary
  forward pass of the r = t rows; its tangents stay out of the backward graph (see
  :class:`_LeanTangents`).
* ``"full"``: one forward-mode pass over the whole batch, the reference computation.

``"auto"`` picks ``dual`` where the model supports it, else ``forward_ad``. With
classifier-free guidance the field v is replaced, in the target *and* in the tangent, by

    v_g = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null)

(no gradient), for samples whose label was kept and whose t lies in [t_start, t_end].
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models.dual import Dual, supports_dual
from .path import _expand, conditional_velocity, interpolate
from .time_samplers import TimeSampler, jvp_mask

Stats = dict[str, float]
JVP_MODES = ("auto", "dual", "forward_ad", "full")


@dataclass(frozen=True)
class Shard:
    """Where a local batch sits in the global batch of one training step.

    The noise, times and label drops of the whole global batch are drawn from one generator and
    this shard's slice is used, so every sample's randomness depends only on (generator seed,
    global index): training is the same on one process or many.
    """

    offset: int = 0
    total: int | None = None


@dataclass(frozen=True)
class Draws:
    """Per-sample randomness of one batch. noise: (B, ...); r, t: (B,); dropped: (B,) bool."""

    noise: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    dropped: torch.Tensor
    jvp_index: torch.Tensor
    fm_index: torch.Tensor


@dataclass(frozen=True)
class Targets:
    """Everything the loss regresses: u (B, ...) with gradient; target, dudt, z, v (B, ...) without."""

    u: torch.Tensor
    target: torch.Tensor
    dudt: torch.Tensor
    z: torch.Tensor
    v: torch.Tensor
    labels: torch.Tensor | None
    draws: Draws


class MeanFlowLoss:
    """MeanFlow loss: ``loss, stats = loss_fn(model, x, labels=None)``.

    Args:
        ratio: fraction of each batch with r != t (paper: 0.25 on ImageNet, 0.75 on CIFAR-10).
        time_sampler: "lognorm" (default), "uniform" or "cifar_v1"; see ``time_samplers``.
        mu, sigma, r_mu, r_sigma: parameters of the logit-normal time samplers.
        weight_power: p of the adaptive weight 1 / (d + c)^p (0 = plain squared error).
        weight_eps: c of the adaptive weight.
        omega, kappa: guidance mixing inside the target (omega = 1, kappa = 0: no guidance).
        t_start, t_end: guidance is applied only for t in [t_start, t_end].
        label_drop: probability of replacing a label by the null class (class-conditional models).
        jvp: how du/dt is computed: "auto", "dual", "forward_ad" or "full" (module docstring);
            all give the same loss and gradients.

    The model must be callable as ``model(z, r, t, labels)`` and, when labels are used, expose
    ``num_classes`` (the null label is ``num_classes``).
    """

    def __init__(
        self,
        ratio: float = 0.25,
        time_sampler: str = "lognorm",
        mu: float = -0.4,
        sigma: float = 1.0,
        r_mu: float = -4.0,
        r_sigma: float = 1.6,
        weight_power: float = 1.0,
        weight_eps: float = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        t_start: float = 0.0,
        t_end: float = 1.0,
        label_drop: float = 0.1,
        jvp: str = "auto",
    ):
        _check_range("ratio", ratio, 0.0, 1.0)
        _check_range("label_drop", label_drop, 0.0, 1.0)
        _check_range("t_start", t_start, 0.0, 1.0)
        _check_range("t_end", t_end, t_start, 1.0)
        if weight_power < 0 or weight_eps <= 0:
            raise ValueError(f"adaptive weighting needs weight_power >= 0 and weight_eps > 0, got {weight_power}, {weight_eps}")
        if jvp not in JVP_MODES:
            raise ValueError(f"jvp must be one of {', '.join(JVP_MODES)}, got {jvp!r}")
        if omega <= 0:
            raise ValueError(f"guidance scale omega must be > 0, got {omega}")
        self.ratio = ratio
        self.time_sampler = TimeSampler(time_sampler, mu, sigma, r_mu, r_sigma)
        self.weight_power = weight_power
        self.weight_eps = weight_eps
        self.omega, self.kappa = omega, kappa
        self.t_start, self.t_end = t_start, t_end
        self.label_drop = label_drop
        self.jvp = jvp

    @property
    def guided(self) -> bool:
        return not (self.omega == 1.0 and self.kappa == 0.0)

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None, shard: Shard | None = None) -> Draws:
        """Draw noise, (r, t) and label drops for the batch x of shape (B, ...)."""
        shard = shard or Shard()
        size, total = x.shape[0], shard.total or x.shape[0]
        if shard.offset < 0 or shard.offset + size > total:
            raise ValueError(f"shard [{shard.offset}, {shard.offset + size}) lies outside a global batch of {total}")
        device = generator.device if generator is not None else x.device
        local = slice(shard.offset, shard.offset + size)
        noise = torch.randn((total, *x.shape[1:]), generator=generator, device=device, dtype=x.dtype)[local]
        normals = torch.randn((2, total), generator=generator, device=device, dtype=torch.float64)[:, local]
        drop_u = torch.rand(total, generator=generator, device=device, dtype=torch.float64)[local]
        r, t = self.time_sampler(normals[0], normals[1])
        mask = jvp_mask(self.ratio, shard.offset, size, total)
        keep = torch.tensor(mask, device=device)
        r = torch.where(keep, r, t)
        jvp_index = torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.long)
        fm_index = torch.tensor([i for i, m in enumerate(mask) if not m], dtype=torch.long)
        to = dict(device=x.device)
        return Draws(
            noise=noise.to(**to),
            r=r.to(dtype=x.dtype, **to),
            t=t.to(dtype=x.dtype, **to),
            dropped=(drop_u < self.label_drop).to(**to),
            jvp_index=jvp_index.to(**to),
            fm_index=fm_index.to(**to),
        )

    def __call__(
        self,
        model: nn.Module | Callable[..., torch.Tensor],
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> tuple[torch.Tensor, Stats]:
        """Loss (scalar, differentiable) and plain-float diagnostics for a data batch x (B, ...).

        ``generator`` supplies all randomness (default: the global RNG on x's device); ``shard``
        places x in a larger global batch (distributed training).
        """
        out = self.targets(model, x, labels, generator=generator, shard=shard)
        return self._reduce(out)

    def targets(
        self,
        model: nn.Module | Callable[..., torch.Tensor],
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> "Targets":
        """Network output u (with gradient), the target u_tgt and du/dt (no gradient), all (B, ...)."""
        draws = self.draw(x, generator, shard)
        labels = self._labels(model, labels, draws.dropped, x.shape[0])
        z = interpolate(x, draws.noise, draws.t)
        v = self.guided_velocity(model, z, draws.t, conditional_velocity(x, draws.noise), labels)
        if self.jvp == "full":
            u, target, dudt = self.jvp_target(model, z, draws.r, draws.t, v, labels)
        elif self._use_dual(model) and draws.jvp_index.numel():
            u, target, dudt = self._dual_forward(model, z, draws, v, labels)
        else:
            u, target, dudt = self._subset_forward(model, z, draws, v, labels)
        return Targets(u=u, target=target, dudt=dudt, z=z, v=v, labels=labels, draws=draws)

    def guided_velocity(
        self, model: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """v_g of the module docstring, (B, ...); equals v where no guidance applies."""
        if not self.guided:
            return v
        null = torch.full_like(labels, _num_classes(model))
        with torch.no_grad():
            if self.kappa != 0.0:
                u_both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, null])).to(v.dtype)
                u_cond, u_null = u_both.chunk(2)
            else:
                u_cond, u_null = 0.0, model(z, t, t, null).to(v.dtype)
            v_g = self.omega * v + self.kappa * u_cond + (1.0 - self.omega - self.kappa) * u_null
        apply = (labels != null) & (t >= self.t_start) & (t <= self.t_end)
        return torch.where(_expand(apply, v).bool(), v_g, v)

    def _labels(self, model, labels: torch.Tensor | None, dropped: torch.Tensor, size: int) -> torch.Tensor | None:
        """Labels fed to the network: dropped ones replaced by the null class."""
        num_classes = _num_classes(model)
        if num_classes == 0:
            if labels is not None:
                raise ValueError("labels were given but the model is unconditional (num_classes = 0)")
            if self.guided:
                raise ValueError("guidance (omega != 1 or kappa != 0) needs a class-conditional model")
            return None
        if labels is None:
            return torch.full((size,), num_classes, dtype=torch.long, device=dropped.device)
        if labels.shape != (size,):
            raise ValueError(f"labels must have shape ({size},), got {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range [{int(labels.min())}, {int(labels.max())}]")
        return torch.where(dropped, torch.full_like(labels, num_classes), labels)

    def _use_dual(self, model) -> bool:
        if self.jvp == "dual" and not supports_dual(model):
            raise ValueError("jvp='dual' needs a model that takes Dual inputs (supports_dual = True); use jvp='auto' or 'forward_ad'")
        return self.jvp in ("auto", "dual") and supports_dual(model)

    def _dual_forward(self, model, z, draws: Draws, v, labels):
        """One forward pass over the batch, r != t rows first, with du/dt of those rows as a Dual tangent.

        Returns u (with gradient), target and du/dt (no gradient), all (B, ...) in the batch's order.
        """
        mf, fm = draws.jvp_index, draws.fm_index
        order, n = torch.cat([mf, fm]), mf.numel()
        z, v, r, t = z[order], v[order], draws.r[order], draws.t[order]
        out = model(Dual(z, v[:n].to(z.dtype)), r, Dual(t, torch.ones_like(t[:n])), _take(labels, order))
        if not isinstance(out, Dual):
            raise TypeError(f"{type(model).__name__} claims supports_dual but returned {type(out).__name__} for Dual inputs")
        dtype = _target_dtype(z)
        u, dudt = out.primal.to(dtype), out.tangent.to(dtype)  # (B, ...), (n, ...)
        target = torch.cat([_mean_flow_target(v[:n], r[:n], t[:n], dudt), v[n:].to(dtype)])  # (B, ...)
        dudt = torch.cat([dudt, dudt.new_zeros(len(fm), *dudt.shape[1:])])  # (B, ...)
        return _to_batch_order(order, u, target, dudt)

    def _subset_forward(self, model, z, draws: Draws, v, labels):
        """JVP on the r != t part first, then a forward on the r = t part. Returns u, target, dudt (B, ...)."""
        fm, mf = draws.fm_index, draws.jvp_index
        us, targets, dudts = [], [], []
        if mf.numel():
            for out, part in zip((us, targets, dudts), self.jvp_target(model, z[mf], draws.r[mf], draws.t[mf], v[mf], _take(labels, mf))):
                out.append(part)
        if fm.numel():
            dtype = _target_dtype(z)
            us.append(model(z[fm], draws.t[fm], draws.t[fm], _take(labels, fm)).to(dtype))
            targets.append(v[fm].to(dtype))
            dudts.append(torch.zeros_like(targets[-1]))
        if not (mf.numel() and fm.numel()):
            return us[0], targets[0], dudts[0]
        return _to_batch_order(torch.cat([mf, fm]), *(torch.cat(parts) for parts in (us, targets, dudts)))

    def jvp_target(self, model, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, labels=None):
        """u (with gradient), u_tgt = v - (t - r) du/dt (no gradient) and du/dt, all (n, ...).

        The tangent (v, 0, 1) of (z, r, t) makes the JVP the total derivative d/dt u along the path
        (r gets no tangent). Target math runs in float32 (or float64 when the inputs are float64).
        """
        u, dudt = _jvp(model, z, r, t, v.to(z.dtype), labels)
        dtype = _target_dtype(z)
        u, dudt = u.to(dtype), dudt.to(dtype)
        return u, _mean_flow_target(v, r, t, dudt), dudt

    def _reduce(self, out: "Targets") -> tuple[torch.Tensor, Stats]:
        """Adaptive-weighted loss and diagnostics from per-sample squared errors."""
        u, target, dudt, draws = out.u, out.target, out.dudt, out.draws
        sq = (u - target.detach()).pow(2).flatten(1)  # (B, D)
        d = sq.sum(1)  # (B,)
        w = 1.0 / (d.detach() + self.weight_eps).pow(self.weight_power)
        loss = (w * d).mean()
        per_dim = sq.detach().mean(1)
        mf, fm = draws.jvp_index, draws.fm_index
        nan = per_dim.new_tensor(float("nan"))
        values = torch.stack([
            loss.detach(),
            per_dim.mean(),
            per_dim[fm].mean() if fm.numel() else nan,
            per_dim[mf].mean() if mf.numel() else nan,
            dudt.detach().abs().flatten(1)[mf].mean() if mf.numel() else nan,
        ]).tolist()
        names = ("loss", "mse", "mse_fm", "mse_mf", "dudt_abs")
        stats = dict(zip(names, values))
        stats["frac_jvp"] = mf.numel() / u.shape[0]
        return loss, stats


class FlowMatchingLoss(MeanFlowLoss):
    """Flow Matching baseline: the MeanFlow code with every sample at r = t (no JVP).

    Defaults to plain squared error (``weight_power = 0``): a fair baseline does not inherit
    MeanFlow's adaptive weighting (see MEANFLOW.md section 4).
    """

    def __init__(self, weight_power: float = 0.0, **options):
        if options.pop("ratio", 0.0) != 0.0:
            raise ValueError("FlowMatchingLoss has no r != t samples; use MeanFlowLoss for ratio > 0")
        super().__init__(ratio=0.0, weight_power=weight_power, **options)


_LINEAR_OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


class _LeanTangents(TorchFunctionMode):
    """Forward-mode AD that records nothing of the tangent for the backward pass. Values are exact.

    du/dt is never differentiated, but PyTorch's forward-mode rules run with gradients enabled on
    primal values that require them, so by default every tangent op is recorded, and its inputs
    saved, by autograd. Here every op output gets its tangent detached, which frees that record
    at once, and linear layers and convolutions get the tangent as a single product with the
    detached weight, W tangent(x): the built-in rule also multiplies the input by a materialised
    zero weight tangent (parameters carry none). Calls whose weight or bias carries a tangent go
    through untouched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LINEAR_OPS:
            return _detach_tangents(func(*args, **kwargs))
        x, weight, rest = args[0], args[1], list(args[2:])
        bias = kwargs.pop("bias") if "bias" in kwargs else (rest.pop(0) if rest else None)
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is None or _has_tangent(weight) or _has_tangent(bias):
            return func(x, weight, bias, *rest, **kwargs)
        out = func(primal, weight, bias, *rest, **kwargs)
        return fwAD.make_dual(out, func(tangent, weight.detach(), None, *rest, **kwargs))


def _jvp(model, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """u(z, r, t) with gradient and its derivative along (v, 0, 1) without, both (n, ...).

    ``torch.compile``'d modules (they have ``_orig_mod``) do not support forward-mode AD through
    ``torch.autograd.forward_ad``; they go through ``torch.func.jvp``.
    """
    if hasattr(model, "_orig_mod"):
        fn = lambda z_, t_: model(z_, r, t_, labels)  # noqa: E731
        u, dudt = torch.func.jvp(fn, (z, t), (v, torch.ones_like(t)))
        return u, dudt.detach()
    with _forward_mode():
        u, dudt = fwAD.unpack_dual(model(fwAD.make_dual(z, v), r, fwAD.make_dual(t, torch.ones_like(t)), labels))
        return u, dudt.detach()


@contextmanager
def _forward_mode() -> Iterator[None]:
    """A forward-AD level with :class:`_LeanTangents`, where activations are saved without their tangents.

    Saving a dual tensor for backward would keep its tangent alive until the level closes; the
    pack hook saves the detached primal values instead.
    """
    with fwAD.dual_level(), _LeanTangents(), torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
        yield


def _detach_tangents(out):
    """An op's output (a tensor, or a tuple or list of them) with tangents detached from autograd."""
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(_detach_tangents(o) for o in out)
    if not isinstance(out, torch.Tensor):
        return out
    primal, tangent = fwAD.unpack_dual(out)
    if tangent is None or not tangent.requires_grad:
        return out
    return fwAD.make_dual(primal, tangent.detach())


def _detached(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _has_tangent(x: torch.Tensor | None) -> bool:
    return x is not None and fwAD.unpack_dual(x).tangent is not None


def _target_dtype(z: torch.Tensor) -> torch.dtype:
    """Precision of the target math: float64 for float64 inputs, else float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _mean_flow_target(v: torch.Tensor, r: torch.Tensor, t: torch.Tensor, dudt: torch.Tensor) -> torch.Tensor:
    """u_tgt = v - (t - r) du/dt in du/dt's dtype, without gradient. v, dudt: (n, ...); r, t: (n,)."""
    h = _expand((t - r).clamp(0, 1), dudt).to(dudt.dtype)  # (n, 1, ...)
    return (v.to(dudt.dtype) - h * dudt).detach()


def _to_batch_order(order: torch.Tensor, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors whose rows follow ``order`` (r != t rows first), put back in the batch's order."""
    inverse = _inverse(order)
    return tuple(part.index_select(0, inverse) for part in parts)


def _num_classes(model) -> int:
    inner = getattr(model, "module", model)
    return int(getattr(inner, "num_classes", 0) or 0)


def _take(labels: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if labels is None else labels[index]


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: out[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
