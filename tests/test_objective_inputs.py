"""Every model call of the MeanFlow loss gets the batch's labels and per-sample conditioning.

References computed in the test by calling the model directly (and forward-mode AD for du/dt).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from meanflow import FlowMatchingLoss, MeanFlowLoss


class Conditioned(nn.Module):
    """u depends on z, r, t, the label and a per-sample keyword input ``augment_labels`` (B, 2)."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.labels = nn.Embedding(4, 2)
        self.aug = nn.Linear(2, 2)

    def forward(self, z, r, t, labels=None, augment_labels=None):
        out = z * torch.sin(3 * t)[:, None] + (t - r)[:, None] * z**2 + self.labels(labels)
        return out if augment_labels is None else out + self.aug(augment_labels)


def test_guidance_calls_get_the_conditioning():
    torch.manual_seed(0)
    model, x = Conditioned(), torch.randn(8, 2)
    labels, aug = torch.arange(8) % 3, torch.randn(8, 2)
    loss = MeanFlowLoss(ratio=0.5, omega=2.0, label_drop=0.0)
    out = loss.targets(model, x, labels, torch.Generator().manual_seed(1), cond={"augment_labels": aug})
    t = out.draws.t
    with torch.no_grad():
        unguided = model(out.z, t, t, torch.full_like(labels, 3), augment_labels=aug)
    expected = 2.0 * (out.draws.noise - x) + (1 - 2.0) * unguided  # v_g = omega v + (1 - omega) u(z, t, t | null)
    torch.testing.assert_close(out.v, expected)
    torch.testing.assert_close(out.tangent, out.v)  # the JVP runs along the guided field
    torch.testing.assert_close(out.u, model(out.z, out.draws.r, t, labels, augment_labels=aug))  # and so does the main forward


def test_flow_matching_gives_the_conditioning_to_the_guidance_and_the_forward():
    torch.manual_seed(0)
    model, x = Conditioned(), torch.randn(8, 2)
    labels, aug = torch.arange(8) % 3, torch.randn(8, 2)
    out = FlowMatchingLoss(omega=2.0, kappa=0.5, label_drop=0.0).targets(model, x, labels, torch.Generator().manual_seed(1),
                                                                         cond={"augment_labels": aug})
    t = out.draws.t
    with torch.no_grad():
        cond = model(out.z, t, t, labels, augment_labels=aug)
        unguided = model(out.z, t, t, torch.full_like(labels, 3), augment_labels=aug)
    torch.testing.assert_close(out.target, 2.0 * (out.draws.noise - x) + 0.5 * cond + (1 - 2.0 - 0.5) * unguided)
    torch.testing.assert_close(out.u, model(out.z, t, t, labels, augment_labels=aug))


def test_jvp_target_passes_the_labels():
    torch.manual_seed(0)
    model, z, v = Conditioned(), torch.randn(5, 2), torch.randn(5, 2)
    r, t, labels = torch.rand(5) * 0.5, 0.5 + torch.rand(5) * 0.5, torch.tensor([0, 1, 2, 3, 1])
    u, target, dudt = MeanFlowLoss().jvp_target(model, z, r, t, v, labels)
    with fwAD.dual_level():
        out = model(fwAD.make_dual(z, v), r, fwAD.make_dual(t, torch.ones_like(t)), labels)
        primal, tangent = fwAD.unpack_dual(out)
    torch.testing.assert_close(u, primal)
    torch.testing.assert_close(dudt, tangent)
    torch.testing.assert_close(target, v - (t - r)[:, None] * tangent)


@pytest.mark.parametrize("option, dr, dt", [("v01", 0.0, 1.0), ("v00", 0.0, 0.0), ("v10", 1.0, 0.0)])
def test_tangent_option_sets_the_time_tangents(option, dr, dt):
    torch.manual_seed(0)
    model, x, labels = Conditioned(), torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    out = MeanFlowLoss(ratio=1.0, tangent=option, jvp="forward_ad").targets(model, x, labels, torch.Generator().manual_seed(2))
    r, t = out.draws.r, out.draws.t
    with fwAD.dual_level():
        dual = model(fwAD.make_dual(out.z, out.v), fwAD.make_dual(r, torch.full_like(r, dr)), fwAD.make_dual(t, torch.full_like(t, dt)), out.labels)
        expected = fwAD.unpack_dual(dual).tangent
    torch.testing.assert_close(out.dudt, expected)


@pytest.mark.parametrize("omega", [1.0, 2.0])
def test_model_tangent_velocity_is_the_networks_own_u_tt_on_the_jvp_rows(omega):
    torch.manual_seed(0)
    model, x = Conditioned().double(), torch.randn(8, 2, dtype=torch.float64)
    labels, aug = torch.arange(8) % 3, torch.randn(8, 2, dtype=torch.float64)
    loss = MeanFlowLoss(ratio=0.5, omega=omega, label_drop=0.0, tangent_velocity="model", jvp="rows")
    out = loss.targets(model, x, labels, torch.Generator().manual_seed(1), cond={"augment_labels": aug})
    r, t, rows = out.draws.r, out.draws.t, out.draws.jvp_rows
    assert 0 < rows.sum() < 8
    with torch.no_grad():
        u_tt = model(out.z, t, t, labels, augment_labels=aug)
    torch.testing.assert_close(out.tangent[rows], u_tt[rows], rtol=1e-12, atol=1e-12)  # the network's velocity ...
    torch.testing.assert_close(out.tangent[~rows], out.v[~rows], rtol=0, atol=0)  # ... where a JVP runs
    with fwAD.dual_level():
        dual = model(fwAD.make_dual(out.z, u_tt), r, fwAD.make_dual(t, torch.ones_like(t)), labels, augment_labels=aug)
        dudt = fwAD.unpack_dual(dual).tangent
    torch.testing.assert_close(out.dudt[rows], dudt[rows], rtol=1e-10, atol=1e-12)
    # the target keeps the (guided) velocity v: u_tgt = v - (t - r) du/dt along (u(z, t, t), 0, 1)
    torch.testing.assert_close(out.target[rows], (out.v - (t - r)[:, None] * dudt)[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.target[~rows], out.v[~rows], rtol=0, atol=0)
    baseline = MeanFlowLoss(ratio=0.5, omega=omega, label_drop=0.0, jvp="rows")
    plain = baseline.targets(model, x, labels, torch.Generator().manual_seed(1), cond={"augment_labels": aug})
    torch.testing.assert_close(plain.v, out.v, rtol=0, atol=0)  # same draws, same v; only the tangent differs
    assert (plain.dudt[rows] - out.dudt[rows]).abs().max() > 1e-3


def test_calling_the_loss_checks_cond_and_gives_it_to_every_row():
    torch.manual_seed(0)
    model, x, labels, aug = Conditioned(), torch.randn(8, 2), torch.arange(8) % 3, torch.randn(8, 2)
    loss_fn = MeanFlowLoss(ratio=0.5, label_drop=0.0)
    loss, _, out = loss_fn.loss_and_targets(model, x, labels, generator=torch.Generator().manual_seed(1), cond={"augment_labels": aug})
    torch.testing.assert_close(out.u, model(out.z, out.draws.r, out.draws.t, labels, augment_labels=aug))
    assert torch.equal(loss, loss_fn(model, x, labels, torch.Generator().manual_seed(1), cond={"augment_labels": aug})[0])
    for bad, shown in [(aug[:5], r"torch.Size\(\[5, 2\]\)"), (torch.tensor(1.0), r"torch.Size\(\[\]\)"), ([1, 2], r"\[1, 2\]")]:
        with pytest.raises(ValueError, match=r"cond\['augment_labels'\] must be a tensor with one row per sample \(8\), got " + shown):
            loss_fn(model, x, labels, cond={"augment_labels": bad})
