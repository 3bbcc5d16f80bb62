"""Stop-gradients in the regression targets, on every JVP path.

The guided field, the JVP tangent, du/dt and the target are constants of the loss: the gradient of
every objective must equal the gradient of the same loss written with those values frozen (computed
once, detached, and fed to a plain forward pass of the model), whichever way du/dt was computed, and
none of them may carry an autograd graph back to the weights.
"""
from __future__ import annotations

import pytest
import torch

from meanflow import MeanFlowLoss
from meanflow.models import create
from meanflow.objectives import IMFLoss

MODES = ("dual", "rows", "forward_ad", "full")
f64 = {"dtype": torch.float64}


def _flat_grad(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def _assert_constants(out) -> None:
    assert out.u.requires_grad
    for name in ("target", "dudt", "v", "tangent"):
        assert not getattr(out, name).requires_grad, f"{name} carries a graph to the weights"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [{"omega": 2.0, "kappa": 0.3, "t_end": 0.8}, {"omega": 1.5, "tangent_velocity": "model"}],
                         ids=["guided", "guided-model-tangent"])
def test_meanflow_gradient_is_that_of_a_frozen_guided_target(mode, options):
    torch.manual_seed(0)
    model = create("mlp", dim=2, width=32, depth=2, num_classes=3).double()
    x, labels = torch.randn(16, 2, **f64), torch.arange(16) % 3
    loss_fn = MeanFlowLoss(ratio=0.5, jvp=mode, label_drop=0.2, **options)
    out = loss_fn.targets(model, x, labels, torch.Generator().manual_seed(1))
    _assert_constants(out)
    loss, _ = loss_fn(model, x, labels, torch.Generator().manual_seed(1))
    d = out.draws
    u = model(out.z.detach(), d.r, d.t, out.labels)
    sq = (u - out.target.detach()).pow(2).sum(1)
    reference = (sq / (sq.detach() + loss_fn.weight_eps) ** loss_fn.weight_power).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat_grad(loss, model), _flat_grad(reference, model), rtol=1e-9, atol=1e-12)
    assert bool((out.target != out.v).any()), "the guided target differs from the field on the r != t rows"


@pytest.mark.parametrize("mode", MODES)
def test_imf_gradient_is_that_of_a_frozen_guided_target_and_du_dt(mode):
    torch.manual_seed(0)
    model = create("imf-tiny/2", in_channels=2, input_size=4, num_classes=3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised gates and heads too
    x, labels = torch.randn(6, 2, 4, 4, **f64), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = IMFLoss(jvp=mode)
    out = loss_fn.targets(model, x, labels, torch.Generator().manual_seed(2))
    _assert_constants(out)
    assert out.v_head.requires_grad
    loss, _ = loss_fn(model, x, labels, torch.Generator().manual_seed(2))
    d = out.draws
    u, v = model(out.z.detach(), d.r, d.t, out.labels, **d.conditioning, return_v=True)
    target, dudt = out.target.detach(), out.dudt.detach()
    sq_u = (u + (d.t - d.r)[:, None, None, None] * dudt - target).pow(2).flatten(1).sum(1)
    sq_v = (v - target).pow(2).flatten(1).sum(1)
    eps = loss_fn.weight_eps
    reference = (sq_u / (sq_u.detach() + eps) + sq_v / (sq_v.detach() + eps)).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat_grad(loss, model), _flat_grad(reference, model), rtol=1e-9, atol=1e-12)
    assert float(dudt.abs().max()) > 1e-3
