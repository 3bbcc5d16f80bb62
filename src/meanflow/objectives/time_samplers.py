"""Samplers of the time pair (r, t) with 0 <= r <= t <= 1.

Every sampler is a pure function of standard-normal draws, so the caller owns the randomness
(see :mod:`meanflow.objectives.draws`):

* ``uniform``: two U(0, 1) values, t = max, r = min.
* ``lognorm``: two logit-normal values sigmoid(N(mu, sigma)), t = max, r = min (paper default,
  ImageNet: mu = -0.4, sigma = 1.0).
* ``cifar_v1``: the official CIFAR-10 code: t ~ lognorm(mu, sigma), r ~ lognorm(r_mu, r_sigma),
  r = min(r, t) (defaults mu = -0.6, sigma = 1.6, r_mu = -4.0, r_sigma = 1.6).

Which samples keep r != t is decided separately by :func:`jvp_mask` (a fixed count per batch);
for the others r is set to t. The objectives' options for the samplers are declared here, once
(:class:`TimeOptions`, :class:`PairTimeOptions`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..options import Option

TIME_SAMPLERS = ("uniform", "lognorm", "cifar_v1")


@dataclass(frozen=True)
class TimeSampler:
    """Configuration of the (r, t) distribution; see the module docstring.

    r_mu, r_sigma: the r distribution of ``cifar_v1``; None for objectives that use t only.
    """

    kind: str
    mu: float
    sigma: float
    r_mu: float | None = None
    r_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TIME_SAMPLERS:
            raise ValueError(f"time sampler kind must be one of {TIME_SAMPLERS}, got {self.kind!r}")

    def __call__(self, n1: torch.Tensor, n2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map two (B,) standard-normal draws to (r, t), each (B,), with r <= t."""
        if self.kind == "uniform":
            a, b = _normal_cdf(n1), _normal_cdf(n2)
            return torch.minimum(a, b), torch.maximum(a, b)
        if self.kind == "lognorm":
            a = torch.sigmoid(self.mu + self.sigma * n1)
            b = torch.sigmoid(self.mu + self.sigma * n2)
            return torch.minimum(a, b), torch.maximum(a, b)
        t = torch.sigmoid(self.mu + self.sigma * n1)
        if self.r_mu is None or self.r_sigma is None:
            return t, t
        r = torch.sigmoid(self.r_mu + self.r_sigma * n2)
        return torch.minimum(r, t), t


def _normal_cdf(n: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(n / 2**0.5))


def jvp_count(ratio: float, total: int) -> int:
    """Number of samples with r != t in a global batch of ``total`` samples.

    As both official JAX codes (MeanFlow and iMF) count them: ``int(total * data_proportion)``
    samples have r = t, with data_proportion = 1 - ratio, and the rest r != t; so an odd batch at
    ratio 0.5 has its middle sample with r != t (B - int(B / 2)). The product is taken on the
    decimal value of ``ratio`` (0.7, not the binary float 0.69999...), so that no float rounding
    moves a sample across the floor.
    """
    return total - math.floor(total * (1 - Fraction(repr(float(ratio)))))


def jvp_mask(ratio: float, offset: int, size: int, total: int) -> list[bool]:
    """Which samples of a shard keep r != t.

    The global batch of ``total`` samples has exactly ``jvp_count(ratio, total)`` samples with
    r != t, spread evenly over global indices (sample g is selected when
    floor((g + 1) n / total) > floor(g n / total)). A shard holds global indices
    [offset, offset + size). The pattern depends only on global indices, so it is the same on
    one process or many, and the count per shard is fixed (deterministic shapes).
    """
    n = jvp_count(ratio, total)
    return [((g + 1) * n) // total > (g * n) // total for g in range(offset, offset + size)]


class TimeOptions:
    """Options of the time sampler that an objective reads t from (mixin of objectives)."""

    time_sampler = Option("lognorm", choices=TIME_SAMPLERS, doc="time sampler of (r, t): lognorm, uniform or cifar_v1")
    mu = Option(-0.4, doc="mean of the logit-normal time sampler")
    sigma = Option(1.0, above=0.0, doc="standard deviation of the logit-normal time sampler")

    def times(self) -> TimeSampler:
        return TimeSampler(self.time_sampler, self.mu, self.sigma)


class PairTimeOptions(TimeOptions):
    """Time-sampler options of objectives that also read r (the r distribution of ``cifar_v1``)."""

    r_mu = Option(-4.0, doc="mean of r's logit-normal in the cifar_v1 sampler")
    r_sigma = Option(1.6, above=0.0, doc="standard deviation of r's logit-normal in the cifar_v1 sampler")

    def times(self) -> TimeSampler:
        return TimeSampler(self.time_sampler, self.mu, self.sigma, self.r_mu, self.r_sigma)
