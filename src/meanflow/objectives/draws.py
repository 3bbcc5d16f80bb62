"""The per-sample randomness of a training batch: noise, times (r, t), label drops, r != t rows.

Everything is drawn for the *global* batch of a step from one generator and this process's
slice is kept (:class:`Shard`), so each sample's randomness depends only on (generator state,
global index): training is the same on one process or many. Objectives that need more per-sample
randomness (iMF's guidance scale) draw it afterwards with :class:`BatchRandom`.

Label drops (class-conditional models): the number of dropped labels in a global batch is
Binomial(B, label_drop) and, as in both official MeanFlow codes, the dropped samples are r = t
samples (Flow Matching rows) in order of global index; only when there are more drops than
r = t samples do they spill onto r != t samples. ``drop_anywhere=True`` drops each label
independently instead (this package's behaviour before: about ``label_drop`` of the r != t rows
then train an unconditional average velocity that guided sampling never uses; kept to compare
with and to reproduce older runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .time_samplers import TimeSampler, jvp_mask


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
    """Per-sample randomness of one local batch of B samples.

    noise: (B, ...); r, t: (B,) with r = t outside the r != t rows; dropped: (B,) bool (label
    replaced by the null class); jvp_index, fm_index: (n,), (B - n,) int64 indices of the rows
    with r != t and r = t; conditioning: further per-sample model inputs, each (B,) (iMF: omega,
    t_min, t_max).
    """

    noise: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    dropped: torch.Tensor
    jvp_index: torch.Tensor
    fm_index: torch.Tensor
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def jvp_rows(self) -> torch.Tensor:
        """(B,) bool: the rows with r != t (the rows that get a JVP)."""
        rows = torch.zeros_like(self.dropped)
        rows[self.jvp_index] = True
        return rows


class BatchRandom:
    """Draws for the global batch from one generator, sliced to a shard of the local batch x (B, ...)."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None, shard: Shard | None):
        shard = shard or Shard()
        self.size, self.total, self.offset = x.shape[0], shard.total or x.shape[0], shard.offset
        if self.offset < 0 or self.offset + self.size > self.total:
            raise ValueError(f"shard [{self.offset}, {self.offset + self.size}) lies outside a global batch of {self.total}")
        self.generator = generator
        self.device = generator.device if generator is not None else x.device
        self.local = slice(self.offset, self.offset + self.size)

    def normal(self, *tail: int, lead: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normals of shape (*lead, total, *tail), sliced to (*lead, B, *tail)."""
        out = torch.randn((*lead, self.total, *tail), generator=self.generator, device=self.device, dtype=dtype)
        return out[(slice(None),) * len(lead) + (self.local,)]

    def uniform_global(self) -> torch.Tensor:
        """(total,) float64 U(0, 1) draws for the whole global batch (slice with ``self.local``)."""
        return torch.rand(self.total, generator=self.generator, device=self.device, dtype=torch.float64)

    def uniform(self) -> torch.Tensor:
        """(B,) float64 U(0, 1) draws of this shard."""
        return self.uniform_global()[self.local]

    def jvp_global(self, ratio: float) -> list[bool]:
        """Which samples of the global batch have r != t (:func:`jvp_mask`), by global index."""
        return jvp_mask(ratio, 0, self.total, self.total)


def draw_batch(
    x: torch.Tensor,
    generator: torch.Generator | None,
    shard: Shard | None,
    *,
    ratio: float,
    times: TimeSampler,
    label_drop: float,
    drop_anywhere: bool = False,
    single_time_at_r_eq_t: bool = False,
) -> tuple[Draws, BatchRandom]:
    """Noise, (r, t), label drops and r != t rows for the local batch x (B, ...).

    The pair (r, t) is ordered before the r = t rows are set (MeanFlow, iMF: there t is the larger
    of the two draws); ``single_time_at_r_eq_t`` sets r = t first, as pMF does, so that t on those
    rows is the first draw alone. Returns the draws (on x's device; noise in x's dtype, times in
    x's dtype) and the :class:`BatchRandom` whose generator has advanced past them, for further draws.
    """
    rand = BatchRandom(x, generator, shard)
    noise = rand.normal(*x.shape[1:], dtype=x.dtype)  # (B, ...)
    normals = rand.normal(lead=(2,))  # (2, B)
    drop_u = rand.uniform_global()  # (total,)
    r, t = times(normals[0], normals[1])
    mask = rand.jvp_global(ratio)  # host-side list: no device synchronisation
    local = mask[rand.local]
    if single_time_at_r_eq_t:
        t = torch.where(torch.tensor(local, device=rand.device), t, times(normals[0], normals[0])[1])
    dropped = _drops(drop_u, mask, label_drop, drop_anywhere)[rand.local]
    to = dict(device=x.device)
    draws = Draws(
        noise=noise.to(**to),
        r=torch.where(torch.tensor(local, device=rand.device), r, t).to(dtype=x.dtype, **to),
        t=t.to(dtype=x.dtype, **to),
        dropped=dropped.to(**to),
        jvp_index=torch.tensor([i for i, m in enumerate(local) if m], dtype=torch.long).to(**to),
        fm_index=torch.tensor([i for i, m in enumerate(local) if not m], dtype=torch.long).to(**to),
    )
    return draws, rand


def _drops(drop_u: torch.Tensor, mask: list[bool], p: float, anywhere: bool) -> torch.Tensor:
    """(total,) bool: dropped labels of the global batch (module docstring); ``mask``: r != t by global index.

    Computed on the device without reading the drop count back to the host.
    """
    hits = drop_u < p
    if anywhere:
        return hits
    order = [g for g, m in enumerate(mask) if not m] + [g for g, m in enumerate(mask) if m]  # r = t rows first
    rank = torch.empty(len(order), dtype=torch.long)
    rank[order] = torch.arange(len(order))
    return rank.to(hits.device) < hits.sum()
