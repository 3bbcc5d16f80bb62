"""What every objective shares: options, the registry by name, labels, the adaptive weight, Targets.

An objective is a class with a ``kind`` name, :class:`~meanflow.options.Option` attributes (its
options, default and range written once), ``targets()`` (what the network regresses) and
``reduce()`` (the loss), registered with :func:`register`. Calling it gives
``loss, stats = loss_fn(model, x, labels=None)``. ``reduce()`` and ``loss_and_targets()`` keep the
statistics on the device (0-d tensors, :data:`DeviceStats`: training reads them only on logging
steps); calling the objective copies them to plain floats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .. import options as opts
from ..autodiff import mode_names
from ..options import Option, OptionSet
from .draws import Draws, Shard

Stats = dict[str, float]
DeviceStats = dict[str, torch.Tensor]  # 0-d tensors on the batch's device
Model = nn.Module | Callable[..., Any]


@dataclass(frozen=True)
class Targets:
    """What the loss regresses, for a batch of B samples (all (B, ...) unless said).

    u: network output with gradient. target: its regression target (no gradient). dudt: the
    derivative of u along ``tangent`` on the r != t rows, zero on the others. z: the noisy
    inputs. v: the velocity field of the target (guided where guidance applies). labels: the
    labels fed to the network (dropped ones are the null class), or None. draws: the batch's
    randomness. tangent: the JVP tangent on z (None without JVP). v_head: the auxiliary v-head output with
    gradient (two-headed models), else None.
    """

    u: torch.Tensor
    target: torch.Tensor
    dudt: torch.Tensor
    z: torch.Tensor
    v: torch.Tensor
    labels: torch.Tensor | None
    draws: Draws
    tangent: torch.Tensor | None = None
    v_head: torch.Tensor | None = None


class Trainable:
    """What the training loop asks of every objective, with the plain answers; the option mixins
    (:class:`WeightOptions`, :class:`JVPOptions`) refine them. Separate from :class:`Objective` so
    that a mixin listed after ``Objective`` among an objective's bases still takes precedence."""

    def weighted(self, d: torch.Tensor) -> torch.Tensor:
        """The loss terms (B,) of per-sample squared errors d (B,): d itself (no adaptive weight)."""
        return d

    @property
    def one_forward(self) -> bool:
        """Whether the loss calls the model's forward once with gradients (so DDP or FSDP can wrap the model)."""
        return True


class Objective(Trainable):
    """Base class of training objectives (module docstring). Options are keyword arguments."""

    kind: ClassVar[str] = ""
    #: models it trains are sampled by their own few-step rule (False: as an ODE velocity field)
    few_step: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.__dict__["_options"] = self.option_set().resolve(options)

    @classmethod
    def option_set(cls) -> OptionSet:
        return OptionSet("objective", cls.kind, opts.declared(cls), cls.relations)

    @classmethod
    def relations(cls, values: dict[str, Any]) -> None:
        """Check constraints between options: every base's ``relate(values)`` in turn."""
        for klass in cls.__mro__:
            if "relate" in vars(klass):
                vars(klass)["relate"](values)

    @property
    def options(self) -> dict[str, Any]:
        """Every option's value."""
        return dict(self.__dict__["_options"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def __call__(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, *, shard: Shard | None = None,
                 cond: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Stats]:
        """Loss (scalar, differentiable) and plain-float diagnostics for a data batch x (B, ...).

        ``generator`` supplies all randomness (default: the global RNG on x's device); ``shard``
        places x in a larger global batch (distributed training). ``cond``: per-sample keyword
        inputs of the model, each (B, ...) (e.g. ``{"augment_labels": a}``, a: (B, 6)); every model
        call gets the rows of each that match its inputs (objectives that take ``cond``).
        """
        loss, stats, _ = self.loss_and_targets(model, x, labels, generator=generator, shard=shard, cond=cond)
        return loss, host_stats(stats)

    def at_step(self, step: int, steps: int) -> None:
        """Training step ``step`` (0-based) of ``steps`` comes next; objectives with a schedule over training
        (AlphaFlow's alpha) read it, the others ignore it."""

    def loss_and_targets(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                         generator: torch.Generator | None = None, shard: Shard | None = None,
                         cond: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, DeviceStats, Targets]:
        """The loss, its statistics still on the device (no host synchronisation) and the :class:`Targets`
        behind them (per-sample diagnostics)."""
        extra = {"cond": checked_cond(cond, x.shape[0])} if cond else {}
        out = self.targets(model, x, labels, generator, shard=shard, **extra)
        return (*self.reduce(out), out)

    def targets(self, model: Model, x: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, *, shard: Shard | None = None) -> Targets:
        raise NotImplementedError

    def reduce(self, out: Targets) -> tuple[torch.Tensor, DeviceStats]:
        raise NotImplementedError


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by its ``kind`` (config ``objective.kind``), filed in
    the one registry of components (:func:`meanflow.options.register`), where the config finds its options."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a kind name to be registered")
    return opts.register("objective", cls.kind, cls)


def get(kind: str) -> type[Objective]:
    """The objective class registered as ``kind``; ValueError listing the kinds."""
    return opts.lookup("objective", kind)


def create(kind: str, **options: Any) -> Objective:
    """An objective by name with options, e.g. ``create("meanflow", ratio=0.75)``."""
    return get(kind)(**options)


def available() -> list[str]:
    return opts.kinds("objective")


# ---- options shared by several objectives --------------------------------------------------------


class WeightOptions(Trainable):
    """The adaptive loss weight w = 1 / sg(d + c)^p of a per-sample squared error d."""

    weight_power = Option(1.0, low=0.0, doc="p of the adaptive weight 1 / (d + c)^p; 0 is plain squared error")
    weight_eps = Option(1e-3, above=0.0, doc="c of the adaptive weight 1 / (d + c)^p")

    def weighted(self, d: torch.Tensor) -> torch.Tensor:
        """d / sg(d + c)^p for per-sample errors d (B,)."""
        return d / (d.detach() + self.weight_eps).pow(self.weight_power)


class LabelDropOptions:
    """Classifier-free guidance training: some labels are replaced by the null class."""

    label_drop = Option(0.1, low=0.0, high=1.0, doc="probability of replacing a label by the null class")


class JVPOptions(Trainable):
    """How the JVP layer computes du/dt (``meanflow.autodiff.jvp``); every mode gives the same result."""

    jvp = Option("auto", choices=mode_names, doc="how du/dt is computed; every mode gives the same result")
    #: the modes whose tangent rides outside autograd, in the one forward pass with gradients
    ONE_FORWARD_MODES: ClassVar[tuple[str, ...]] = ("auto", "dual", "rows")

    @property
    def one_forward(self) -> bool:
        """Whether the loss calls the model's forward once with gradients: not with forward-mode AD."""
        return self.jvp in self.ONE_FORWARD_MODES


def checked_cond(cond: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """``cond`` unchanged after checking that every entry is a tensor with one row per sample."""
    for key, value in cond.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != size:
            raise ValueError(f"cond[{key!r}] must be a tensor with one row per sample ({size}), got {getattr(value, 'shape', value)!r}")
    return cond


def num_classes(model: Model) -> int:
    """The model's class count (0: unconditional); the null label is this number."""
    inner = getattr(model, "module", model)
    return int(getattr(inner, "num_classes", 0) or 0)


def checked_labels(model: Model, labels: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor | None:
    """Class labels (B,) for the model: None for unconditional models, all-null when none are given."""
    classes = num_classes(model)
    if classes == 0:
        if labels is not None:
            raise ValueError("labels were given but the model is unconditional (num_classes = 0)")
        return None
    if labels is None:
        return torch.full((size,), classes, dtype=torch.long, device=device)
    if labels.shape != (size,):
        raise ValueError(f"labels must have shape ({size},), got {tuple(labels.shape)}")
    _check_label_range(labels, classes)
    return labels


def _check_label_range(labels: torch.Tensor, classes: int) -> None:
    """ValueError unless every label (B,) lies in [0, classes - 1], decided without a host read.

    On an accelerator the check is asynchronous (a device-side assertion that fails at the next
    synchronisation) so that a training step does not wait for the device; on the CPU it raises at once.
    """
    message = f"labels must lie in [0, {classes - 1}]"
    try:
        torch._assert_async(((labels >= 0) & (labels < classes)).all(), message)
    except RuntimeError:
        raise ValueError(f"{message}, got range [{int(labels.min())}, {int(labels.max())}]") from None


def drop_labels(labels: torch.Tensor | None, dropped: torch.Tensor, null: int) -> torch.Tensor | None:
    """Labels (B,) with the dropped ones replaced by ``null``."""
    return None if labels is None else torch.where(dropped, torch.full_like(labels, null), labels)


def target_dtype(z: torch.Tensor) -> torch.dtype:
    """Precision of the target math: float64 for float64 inputs, else float32."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def scatter_rows(rows: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """(size, ...) zeros with ``values`` (n, ...) at ``rows`` (n,)."""
    out = values.new_zeros((size, *values.shape[1:]))
    out[rows] = values
    return out


def weighted_regression(out: Targets, weighted: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, DeviceStats]:
    """mean_i weighted(||u_i - sg(target_i)||^2) and its diagnostics (:func:`error_stats`)."""
    sq = (out.u - out.target.detach()).pow(2).flatten(1)  # (B, D)
    loss = weighted(sq.sum(1)).mean()
    return loss, error_stats(sq, out.draws, out.dudt, loss=loss)


def error_stats(sq: torch.Tensor, draws: Draws, dudt: torch.Tensor, **extra: torch.Tensor) -> DeviceStats:
    """Diagnostics as 0-d tensors on sq's device: mse over all / r = t / r != t rows, mean |du/dt| on
    r != t rows, frac_jvp (NaN for an empty set of rows).

    sq: (B, D) squared errors; dudt: (B, ...); extra: further scalar tensors to report.
    """
    per_dim = sq.detach().mean(1)
    mf, fm = draws.jvp_index, draws.fm_index
    nan = per_dim.new_tensor(float("nan"))
    values = {
        **{k: v.detach() for k, v in extra.items()},
        "mse": per_dim.mean(),
        "mse_fm": per_dim[fm].mean() if fm.numel() else nan,
        "mse_mf": per_dim[mf].mean() if mf.numel() else nan,
        "dudt_abs": dudt.detach().abs().flatten(1)[mf].mean() if mf.numel() else nan,
        "frac_jvp": per_dim.new_tensor(mf.numel() / sq.shape[0]),
    }
    return {k: v.to(per_dim.dtype) for k, v in values.items()}


def host_stats(stats: DeviceStats) -> Stats:
    """The statistics as plain floats (one device-to-host copy)."""
    return dict(zip(stats, torch.stack(list(stats.values())).tolist())) if stats else {}
