"""Moving averages of the parameters, several profiles at once: exponential (ramped up) and power-function.

The update after optimizer step ``k`` (1-based) is ``theta_ema <- beta_k theta_ema + (1 - beta_k) theta_k``
with a per-step ``beta_k`` given by the profile:

* :class:`Exponential` (``train.ema_decays``): ``beta_k = min(decay, 0.5 ** (1 / (rampup * k)))``, EDM's
  ramp-up (Karras et al. 2022, ``ema_rampup_ratio``; the same rule in EDM2's ``TraditionalEMA`` and in
  the pixel MeanFlow code): the half-life of the average, in steps, is at most ``rampup`` times the steps
  taken so far, so a short run with a long decay averages its recent weights instead of keeping a share
  of the random initialisation. ``rampup = 0`` is the plain EMA ``beta_k = decay`` started from the
  initial weights (for reproducing older runs).
* :class:`PowerFunction` (``train.ema_stds``): EDM2's power-function EMA (Karras et al. 2024, eq. 127),
  ``beta_k = (1 - 1 / k) ** (gamma + 1)``: after ``k`` steps the average weighs step ``i`` by
  ``(i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / k ** (gamma + 1)``, a profile ``~ t ** gamma`` that
  stretches with the run; it is set by its relative standard deviation ``std`` (the profile's width
  over its length, EDM2 eq. 123): std 0.05 is gamma 16.97, std 0.10 is gamma 6.94.

Why EDM's rule for the ramp-up: while ``rampup * k`` is below the half-life, the weight the average
gives to the steps before step ``i`` is ``0.5 ** ((H_k - H_i) / rampup)`` (``H`` the harmonic numbers),
about ``(i / k) ** (ln 2 / rampup)``: a power-function profile with gamma = ln 2 / rampup - 1 (12.9 at
the default 0.05) that covers the last few percent of the run, and the initial weights keep at most
``0.5 ** (1 / rampup)`` (1e-6) of it. Once ``rampup * k`` passes the half-life, it is the plain EMA.
Both profiles depend only on ``k``, which the trainer saves with every checkpoint, so a resumed run
continues the same averages bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..config import MAX_EMA_STD
from ..runtime.distributed import local, shard_like


class Profile(Protocol):
    """An EMA profile: the decay of each update and a name for its weights file."""

    label: str

    def beta(self, step: int) -> float:
        """Decay of the update after optimizer step ``step`` (1-based), in [0, 1)."""
        ...


@dataclass(frozen=True)
class Exponential:
    """Exponential moving average of ``decay`` with EDM's ramp-up (``rampup = 0``: none); see the module docstring."""

    decay: float
    rampup: float = 0.0

    def beta(self, step: int) -> float:
        if self.rampup == 0.0:
            return self.decay
        return min(self.decay, 0.5 ** (1.0 / (self.rampup * step)))

    @property
    def label(self) -> str:
        return f"{self.decay:g}"


@dataclass(frozen=True)
class PowerFunction:
    """EDM2's power-function EMA of relative standard deviation ``std`` in (0, ``MAX_EMA_STD`` = 12 ** -0.5, gamma = 0];
    see the module docstring."""

    std: float

    def __post_init__(self) -> None:
        if not 0.0 < self.std <= MAX_EMA_STD:
            raise ValueError(f"a power-function EMA's std must be in (0, {MAX_EMA_STD:.4f}] (gamma >= 0); got {self.std!r}")

    @property
    def gamma(self) -> float:
        return std_to_gamma(self.std)

    def beta(self, step: int) -> float:
        return (1.0 - 1.0 / step) ** (self.gamma + 1.0)

    @property
    def label(self) -> str:
        return f"std{self.std:g}"


def gamma_to_std(gamma: float) -> float:
    """Relative standard deviation of the power-function profile t ** gamma (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def std_to_gamma(std: float) -> float:
    """Inverse of :func:`gamma_to_std`: the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2
    (EDM2 eq. 126), in float64."""
    s2 = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


class EMA:
    """Shadow copies of the parameters, one per profile, updated after every optimizer step.

    ``profiles``: :class:`Exponential` / :class:`PowerFunction` objects, or plain numbers (an
    :class:`Exponential` of that decay without ramp-up). Buffers (none in our models, but allowed) are
    copied, not averaged. The shadows have the parameters' layout: DTensors with the same shards when
    the model is sharded (FSDP2), each rank updating its own shard; :meth:`state_dict` returns them as
    they are (gather with :func:`meanflow.runtime.distributed.full_tensor`), :meth:`load_state_dict`
    takes full tensors.
    """

    def __init__(self, model: nn.Module, profiles: Sequence[Profile | float]):
        self.profiles = [Exponential(float(p)) if isinstance(p, (int, float)) else p for p in profiles]
        self.shadows = [{k: v.detach().clone().float() for k, v in model.state_dict().items()} for _ in self.profiles]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, applied: torch.Tensor | None = None) -> None:
        """The update after optimizer step ``step`` (1-based) from ``model``; ``applied`` (0-d bool on the device,
        None = True) masks it on the device: where False every shadow stays bit-identical, without a host read."""
        params = dict(model.named_parameters())
        for profile, shadow in zip(self.profiles, self.shadows):
            rate = 1.0 - profile.beta(step)
            weight = rate if applied is None else applied.float() * rate
            for name, value in model.state_dict().items():
                mine, value = local(shadow[name]), local(value)
                if name in params:
                    mine.lerp_(value.float(), weight)
                elif applied is None:
                    mine.copy_(value)
                else:
                    mine.copy_(torch.where(applied, value.to(mine.dtype), mine))

    def state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        return self.shadows[index]

    def load_state_dict(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Replace shadow ``index`` by the full tensors ``state``, laid out like the current shadows."""
        missing = set(self.shadows[index]) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (differing keys: {sorted(missing)[:5]})")
        self.shadows[index] = {k: shard_like(v.float().clone(), self.shadows[index][k]) for k, v in state.items()}

    def file_names(self) -> list[str]:
        """``ema.safetensors`` for the first profile (the evaluated one), ``ema_<label>.safetensors`` for the
        others: ``ema_0.9999.safetensors`` (decay), ``ema_std0.05.safetensors`` (power function)."""
        return ["ema.safetensors" if i == 0 else f"ema_{p.label}.safetensors" for i, p in enumerate(self.profiles)]
