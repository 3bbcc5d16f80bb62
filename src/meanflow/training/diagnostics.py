"""Training diagnostics by time bin, accumulated on the device between logging steps.

Every step adds its per-sample errors to running sums that stay on the device; only a logging
step reads them (one device-to-host copy) and starts a new window. What a logging step reports,
averaged over the steps since the previous one:

* ``mse_by_t`` / ``loss_by_t``: raw squared error per dimension ||u - u_tgt||^2 / D and the
  weighted loss (what is minimised), in ``bins`` equal-width bins of t over [0, 1];
* ``mse_by_h`` / ``loss_by_h``: the same in bins of h = t - r over [0, 1], r != t rows only
  (the r = t rows, all at h = 0, are ``mse_fm`` / ``loss_fm``);
* ``loss_fm`` / ``loss_mf``: the weighted loss on the r = t (Flow Matching) and r != t (MeanFlow)
  rows; ``dudt_abs_mean``: mean |du/dt| over the r != t rows.

A bin without samples in the window is reported as None.

:class:`StatsWindow` does the same for the per-step statistics (loss, mse, grad_norm, ...): each
is reported as its mean over the window's steps where it was finite (NaN when it never was), and
:func:`host_copy` reads everything a logging step reports in one device-to-host copy.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

DEFAULT_BINS = 8
_FIELDS = ("count", "mse", "loss")


class Diagnostics:
    """Running per-bin sums of one logging window (see the module docstring)."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 1:
            raise ValueError(f"number of time bins must be >= 1, got {bins}")
        self.bins = bins
        self._sums: torch.Tensor | None = None  # (2 groups [t, h], 3 fields, bins) + (2 parts [fm, mf], 3 fields) + dudt (2,)

    def update(self, out: Any, weighted: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add one batch: ``out`` is an objective's ``Targets`` (u, target, dudt (B, ...); draws.r, draws.t (B,),
        draws.jvp_index); ``weighted`` maps per-sample squared errors d (B,) to the loss terms (B,)."""
        with torch.no_grad():
            sq = (out.u.detach().float() - out.target.float()).pow(2).flatten(1)  # (B, D)
            mse, loss = sq.mean(1).double(), weighted(sq.sum(1)).double()  # (B,), (B,)
            t, h = out.draws.t.double(), (out.draws.t - out.draws.r).double()
            mf = torch.zeros_like(mse, dtype=torch.bool)
            mf[out.draws.jvp_index] = True
            by_t = self._binned(t, mse, loss, torch.ones_like(mf))
            by_h = self._binned(h, mse, loss, mf)
            parts = torch.stack([self._part(mse, loss, ~mf), self._part(mse, loss, mf)])  # (2, 3)
            dudt = out.dudt.detach().double().abs().flatten(1).mean(1)  # (B,)
            extra = torch.stack([(dudt * mf).sum(), mf.sum().double()])
            sums = torch.cat([by_t.flatten(), by_h.flatten(), parts.flatten(), extra])
            self._sums = sums if self._sums is None else self._sums + sums

    def flush(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
        """Averages of the window (one host copy) and a reset; ``reduce`` sums the totals over processes."""
        sums = self.take(reduce)
        return {} if sums is None else self.report(sums.tolist())

    def take(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        """The window's sums (1-D, on the device; None for an empty window), summed by ``reduce``, and a reset."""
        sums, self._sums = self._sums, None
        return reduce(sums) if reduce and sums is not None else sums

    def report(self, values: list[float]) -> dict[str, Any]:
        """The averages of the module docstring from the host copy of :meth:`take`'s sums."""
        n = 3 * self.bins
        by_t, by_h = values[:n], values[n:2 * n]
        fm, mf, (dudt_sum, dudt_count) = values[2 * n:2 * n + 3], values[2 * n + 3:2 * n + 6], values[2 * n + 6:]
        stats: dict[str, Any] = {}
        for group, table in (("t", by_t), ("h", by_h)):
            counts, mses, losses = (table[i * self.bins:(i + 1) * self.bins] for i in range(3))
            stats[f"mse_by_{group}"] = [_ratio(s, c) for s, c in zip(mses, counts)]
            stats[f"loss_by_{group}"] = [_ratio(s, c) for s, c in zip(losses, counts)]
        stats["loss_fm"], stats["loss_mf"] = _ratio(fm[2], fm[0]), _ratio(mf[2], mf[0])
        stats["dudt_abs_mean"] = _ratio(dudt_sum, dudt_count)
        return stats

    def bin_edges(self) -> list[float]:
        """The bins + 1 edges over [0, 1]."""
        return [i / self.bins for i in range(self.bins + 1)]

    def _binned(self, x: torch.Tensor, mse: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(3, bins): count, sum of mse, sum of loss of the kept rows by bin of x in [0, 1]."""
        index = (x * self.bins).long().clamp(0, self.bins - 1)
        weights = torch.stack([torch.ones_like(mse), mse, loss]) * keep  # (3, B)
        out = torch.zeros(3, self.bins, dtype=torch.float64, device=x.device)
        return out.index_add_(1, index, weights)

    @staticmethod
    def _part(mse: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(3,): count, sum of mse, sum of loss of the kept rows."""
        return torch.stack([keep.sum().double(), (mse * keep).sum(), (loss * keep).sum()])


class StatsWindow:
    """Per-step statistics summed on the device over a logging window: each key's mean over the steps
    where it was finite."""

    def __init__(self):
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}  # keys -> (2, K): sums of finite values, counts

    def add(self, keys: tuple[str, ...], values: torch.Tensor) -> None:
        """Add one step's statistics ``values`` (K,) named by ``keys``; nothing is read on the host."""
        finite = torch.isfinite(values)
        part = torch.stack([torch.where(finite, values, 0.0), finite.to(values.dtype)])
        self._sums[keys] = part if keys not in self._sums else self._sums[keys] + part

    def take(self) -> tuple[list[tuple[str, ...]], torch.Tensor]:
        """(key sets, their sums and counts flattened to 1-D on the device) and a reset."""
        keys, sums = list(self._sums), [s.flatten() for s in self._sums.values()]
        self._sums = {}
        return keys, torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)

    @staticmethod
    def means(keys: list[tuple[str, ...]], values: list[float]) -> dict[str, float]:
        """Each key's mean over its finite steps (NaN when none) from the host copy of :meth:`take`."""
        totals: dict[str, list[float]] = {}
        start = 0
        for names in keys:
            k = len(names)
            for i, name in enumerate(names):
                total = totals.setdefault(name, [0.0, 0.0])
                total[0] += values[start + i]
                total[1] += values[start + k + i]
            start += 2 * k
        return {name: s / c if c > 0 else float("nan") for name, (s, c) in totals.items()}


def host_copy(parts: Sequence[torch.Tensor]) -> list[list[float]]:
    """The values of several 1-D tensors, read together in one device-to-host copy (float64)."""
    device = next((p.device for p in parts if p.numel()), torch.device("cpu"))
    flat = torch.cat([p.to(device, torch.float64) for p in parts]).tolist()
    out, start = [], 0
    for p in parts:
        out.append(flat[start:start + p.numel()])
        start += p.numel()
    return out


def _ratio(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


__all__ = ["DEFAULT_BINS", "Diagnostics", "StatsWindow", "host_copy"]
