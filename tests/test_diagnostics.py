"""Per-bin training diagnostics against a plain numpy recount."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from meanflow.training.diagnostics import Diagnostics


def _batch(seed: int, n: int = 64, dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g)
    r = torch.where(torch.arange(n) % 4 == 0, t * (1 - 0.5 * torch.rand(n, generator=g)), t)  # every 4th row r != t, h < 0.5
    draws = SimpleNamespace(r=r, t=t, jvp_index=torch.arange(0, n, 4))
    dudt = torch.zeros(n, dim)
    dudt[::4] = torch.randn(n // 4, dim, generator=g)
    return SimpleNamespace(u=torch.randn(n, dim, generator=g), target=torch.randn(n, dim, generator=g), dudt=dudt, draws=draws)


def _weighted(d):
    return d / (d + 0.01) ** 0.5


def _expected(batches, bins):
    mse = np.concatenate([((b.u - b.target) ** 2).mean(1).numpy() for b in batches]).astype(np.float64)
    d = np.concatenate([((b.u - b.target) ** 2).sum(1).numpy() for b in batches]).astype(np.float64)
    loss = d / (d + 0.01) ** 0.5
    t = np.concatenate([b.draws.t.numpy() for b in batches]).astype(np.float64)
    h = np.concatenate([(b.draws.t - b.draws.r).numpy() for b in batches]).astype(np.float64)
    mf = np.concatenate([np.arange(len(b.draws.t)) % 4 == 0 for b in batches])
    dudt = np.concatenate([b.dudt.abs().mean(1).numpy() for b in batches])
    out = {"loss_fm": loss[~mf].mean(), "loss_mf": loss[mf].mean(), "dudt_abs_mean": dudt[mf].mean()}
    for name, x, keep in (("t", t, np.ones_like(mf)), ("h", h, mf)):
        which = np.minimum((x * bins).astype(int), bins - 1)
        out[f"mse_by_{name}"] = [mse[keep & (which == k)].mean() if (keep & (which == k)).any() else None for k in range(bins)]
        out[f"loss_by_{name}"] = [loss[keep & (which == k)].mean() if (keep & (which == k)).any() else None for k in range(bins)]
    return out


def test_window_averages_match_a_recount_and_reset_after_flush():
    diag = Diagnostics(bins=5)
    batches = [_batch(0), _batch(1)]
    for b in batches:
        diag.update(b, _weighted)
    got, want = diag.flush(), _expected(batches, 5)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, list):
            assert [v is None for v in got[key]] == [v is None for v in value], key
            np.testing.assert_allclose([v for v in got[key] if v is not None], [v for v in value if v is not None], rtol=1e-5)
        else:
            assert got[key] == pytest.approx(value, rel=1e-5), key
    assert got["mse_by_h"][3:] == [None, None], "h < 0.5 by construction: the bins above 0.6 are empty"
    assert diag.flush() == {}
    diag.update(batches[1], _weighted)
    assert diag.flush()["loss_mf"] == pytest.approx(_expected([batches[1]], 5)["loss_mf"], rel=1e-5)


def test_bins_must_be_positive():
    with pytest.raises(ValueError, match="bins"):
        Diagnostics(bins=0)
