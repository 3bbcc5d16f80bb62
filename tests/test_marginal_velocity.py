"""The batch estimate of the marginal velocity E[e - x | z_t] (``objective.velocity=batch``).

References: the posterior mean of a two-atom distribution in closed form, a brute-force float64
evaluation of the Gaussian path likelihoods, and the objectives' own draws.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from meanflow import FlowMatchingLoss, MeanFlowLoss
from meanflow.objectives.path import marginal_velocity


def brute_force(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(z - E[x | z]) / t with E[x | z] over the batch's points, by explicit log N(z_i; (1 - t_i) x_j, t_i^2 I)."""
    b, d = x.shape
    z = (1 - t)[:, None] * x + t[:, None] * noise
    log_p = torch.empty(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            diff = z[i] - (1 - t[i]) * x[j]
            log_p[i, j] = -0.5 * float(diff @ diff) / float(t[i]) ** 2 - d * math.log(float(t[i]))
    w = torch.softmax(log_p, dim=1)
    return (z - w @ x) / t[:, None]


def test_two_atoms_match_the_closed_form_posterior():
    # equal numbers of +a and -a: the batch is the distribution, E[x | z] = a tanh(a (1 - t) z / t^2)
    a, n = 1.5, 6
    x = torch.cat([torch.full((n, 1), a), torch.full((n, 1), -a)]).double()
    noise = torch.randn(2 * n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.linspace(0.2, 0.95, 2 * n, dtype=torch.float64)
    z = (1 - t)[:, None] * x + t[:, None] * noise
    expected = (z - a * torch.tanh(a * (1 - t)[:, None] * z / t[:, None] ** 2)) / t[:, None]
    torch.testing.assert_close(marginal_velocity(x, noise, t), expected, rtol=1e-12, atol=1e-12)


def test_matches_brute_force_likelihoods_on_scattered_points():
    gen = torch.Generator().manual_seed(1)
    x, noise = torch.randn(24, 3, generator=gen, dtype=torch.float64), torch.randn(24, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(24, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    v = marginal_velocity(x, noise, t)
    torch.testing.assert_close(v, brute_force(x, noise, t), rtol=1e-10, atol=1e-10)
    assert (v - (noise - x)).abs().max() > 0.1  # not the per-sample velocity


def test_image_shaped_points_and_float32_keep_their_shape_and_dtype():
    gen = torch.Generator().manual_seed(2)
    x, noise, t = torch.randn(8, 2, 3, 3, generator=gen), torch.randn(8, 2, 3, 3, generator=gen), torch.rand(8, generator=gen)
    v = marginal_velocity(x, noise, t)
    assert v.shape == x.shape and v.dtype == torch.float32
    flat = brute_force(x.reshape(8, -1).double(), noise.reshape(8, -1).double(), t.double()).reshape(x.shape)
    torch.testing.assert_close(v, flat.float(), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_leaves_the_float64_weights_alone():
    gen = torch.Generator().manual_seed(7)
    x, noise, t = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen), torch.rand(64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = marginal_velocity(x, noise, t)
    assert torch.equal(under, marginal_velocity(x, noise, t))


def test_near_the_data_it_is_the_per_sample_velocity():
    gen = torch.Generator().manual_seed(3)
    x, noise = torch.randn(16, 2, generator=gen), torch.randn(16, 2, generator=gen)
    t = torch.tensor([0.0, 1e-9, 1e-6, 1e-4] * 4)
    v = marginal_velocity(x, noise, t)  # no NaN at t = 0: only x_i can have led to z_i
    torch.testing.assert_close(v, noise - x, rtol=0, atol=0)


def test_labels_restrict_the_candidates_and_the_null_label_uses_all():
    # class 0 sits at +2, class 1 at -2; a labelled row knows its source, a null row (label 2) does not
    x = torch.tensor([[2.0], [2.0], [-2.0], [-2.0]], dtype=torch.float64)
    noise = torch.tensor([[0.3], [-1.0], [0.5], [2.0]], dtype=torch.float64)
    t = torch.full((4,), 0.7, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    v = marginal_velocity(x, noise, t, labels, null=2)
    torch.testing.assert_close(v[[0, 2]], (noise - x)[[0, 2]], rtol=0, atol=1e-12)
    torch.testing.assert_close(v[[1, 3]], marginal_velocity(x, noise, t)[[1, 3]], rtol=0, atol=0)
    assert (v[[1, 3]] - (noise - x)[[1, 3]]).abs().min() > 1e-3


@pytest.mark.parametrize("kind", ["meanflow", "flow_matching"])
def test_objectives_regress_the_batch_estimate(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).double()
    f = lambda z, r, t, labels=None: model(z) * (1 + t - r)[:, None] + t[:, None]  # noqa: E731
    x = torch.randn(32, 2, dtype=torch.float64)
    meanflow = MeanFlowLoss(velocity="batch", ratio=0.5, jvp="forward_ad")
    loss = meanflow if kind == "meanflow" else FlowMatchingLoss(velocity="batch")
    out = loss.targets(f, x, generator=torch.Generator().manual_seed(4))
    d = out.draws
    v = marginal_velocity(x, d.noise, d.t)
    torch.testing.assert_close(out.v, v, rtol=0, atol=0)
    if kind == "flow_matching":
        torch.testing.assert_close(out.target, v, rtol=0, atol=0)
        return
    torch.testing.assert_close(out.tangent, v, rtol=0, atol=0)  # the JVP runs along the estimate too
    with fwAD.dual_level():
        dual = f(fwAD.make_dual(out.z, v), d.r, fwAD.make_dual(d.t, torch.ones_like(d.t)))
        dudt = fwAD.unpack_dual(dual).tangent
    rows = d.jvp_rows
    torch.testing.assert_close(out.target[rows], (v - (d.t - d.r)[:, None] * dudt)[rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.target[~rows], v[~rows], rtol=0, atol=0)


def test_unknown_velocity_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="velocity.*conditional.*batch"):
        MeanFlowLoss(velocity="marginal")


def _shard_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from meanflow.objectives import Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, labels = _global_batch()
    half = slice(8 * rank, 8 * rank + 8)
    out_ = MeanFlowLoss(velocity="batch", ratio=0.5, label_drop=0.3).targets(
        Labelled(), x[half], labels[half], torch.Generator().manual_seed(5), shard=Shard(8 * rank, 16))
    torch.save(out_.v, f"{out}/v{rank}.pt")
    dist.destroy_process_group()


class Labelled(torch.nn.Module):
    num_classes = 2

    def forward(self, z, r, t, labels=None):
        return z * (1 + t - r)[:, None] + labels[:, None]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    return torch.randn(16, 2, generator=gen, dtype=torch.float64), torch.arange(16) % 2


@pytest.mark.heavy
def test_processes_estimate_over_the_global_batch_as_one_process_does(tmp_path):
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.start_processes(_shard_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    x, labels = _global_batch()
    one = MeanFlowLoss(velocity="batch", ratio=0.5, label_drop=0.3).targets(Labelled(), x, labels, torch.Generator().manual_seed(5))
    both = torch.cat([torch.load(tmp_path / "v0.pt"), torch.load(tmp_path / "v1.pt")])
    assert one.draws.dropped.any() and not one.draws.dropped.all()
    torch.testing.assert_close(both, one.v, rtol=1e-12, atol=1e-12)
    half = MeanFlowLoss(velocity="batch", ratio=0.5, label_drop=0.3).targets(Labelled(), x[:8], labels[:8], torch.Generator().manual_seed(5))
    assert (half.v - one.v[:8]).abs().max() > 1e-6  # the other process's points matter


def test_a_shard_without_a_process_group_is_refused():
    from meanflow.objectives import Shard

    x, labels = _global_batch()
    with pytest.raises(ValueError, match="velocity=batch needs the global batch of 16 samples, gathered 8.*torchrun"):
        MeanFlowLoss(velocity="batch").targets(Labelled(), x[:8], labels[:8], shard=Shard(0, 16))
