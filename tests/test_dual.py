"""Row-subset dual numbers (``meanflow.autodiff.dual``) against an independent reference.

Every tangent is compared, in float64, with ``torch.func.jvp`` (PyTorch's forward-mode AD) of
the plain function restricted to the first n rows; every primal with the plain function itself.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meanflow import MeanFlowLoss
from meanflow.autodiff import dual
from meanflow.autodiff.dual import Dual
from meanflow.models import attention as attn
from meanflow.models import create
from meanflow.models.embeddings import sinusoidal_embedding

B, N = 5, 3  # batch, rows with a tangent
f64 = dict(dtype=torch.float64)


def rand(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)
    return x.requires_grad_(requires_grad)


def check_op(fn, *shapes: tuple[int, ...], plain: tuple[torch.Tensor, ...] = ()) -> None:
    """fn(*duals, *plain) against fn(*tensors, *plain) (primal) and torch.func.jvp on the first N rows (tangent).

    Plain extra arguments with the batch dimension are cut to N rows for the reference.
    """
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    dxs = [rand(N, *s[1:], seed=10 + i) for i, s in enumerate(shapes)]
    out = fn(*[Dual(x, dx) for x, dx in zip(xs, dxs)], *plain)
    head = [p[:N] if p.ndim and p.shape[0] == B else p for p in plain]
    _, ref = torch.func.jvp(lambda *a: fn(*a, *head), tuple(x[:N] for x in xs), tuple(dxs))
    assert isinstance(out, Dual) and out.rows == N
    torch.testing.assert_close(out.primal, fn(*xs, *plain), rtol=0, atol=0)
    torch.testing.assert_close(out.tangent, ref, rtol=1e-10, atol=1e-12)


def test_linear_and_conv():
    w, b = rand(7, 4, seed=20), rand(7, seed=21)
    check_op(lambda x: dual.linear(x, w, b), (B, 6, 4))
    cw, cb = rand(8, 3, 3, 3, seed=22), rand(8, seed=23)
    check_op(lambda x: dual.conv2d(x, cw, cb, padding=1, stride=2), (B, 3, 6, 6))


@pytest.mark.parametrize("affine", [False, True])
def test_normalisations(affine):
    w, b = (rand(6, seed=30), rand(6, seed=31)) if affine else (None, None)
    check_op(lambda x: dual.layer_norm(x, (6,), w, b, 1e-5), (B, 4, 6))
    check_op(lambda x: dual.group_norm(x, 3, w, b, 1e-6), (B, 6, 2, 3))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_elementwise(approximate):
    check_op(lambda x: dual.gelu(x, approximate), (B, 4, 6))
    check_op(dual.silu, (B, 7))


def test_arithmetic_and_broadcasting():
    per_sample, shared = rand(B, 1, 6, seed=40), rand(6, seed=41)
    check_op(lambda x, s: dual.addcmul(s, x, 1 + s), (B, 4, 6), (B, 1, 6))  # Dual shift and scale broadcast over tokens
    check_op(lambda x, p: dual.addcmul(p, x, shared), (B, 4, 6), plain=(per_sample,))
    check_op(lambda x, y: x * y - 2.0 * y + (1.0 - x) / 4.0, (B, 4), (B, 4))
    check_op(lambda x, p: x * p + shared, (B, 3, 6), plain=(per_sample,))
    check_op(lambda x, y, p: dual.cat([x, p.expand(-1, 3, 6), y], dim=1), (B, 2, 6), (B, 4, 6), plain=(per_sample,))


def test_shape_ops_keep_the_batch_dimension():
    check_op(lambda x: x.reshape(x.shape[0], 6, 4).permute(0, 2, 1).flatten(1)[:, None], (B, 4, 6))
    check_op(lambda x: x.chunk(2, dim=2)[1].transpose(1, 2).contiguous(), (B, 4, 6))
    x = Dual(rand(B, 4, 6), rand(N, 4, 6))
    with pytest.raises(IndexError, match="batch dimension"):
        x[1:]
    for bad in (lambda: x.reshape(B * 4, 6), lambda: x.permute(1, 0, 2), lambda: x.transpose(0, 1), lambda: x.chunk(2, 0)):
        with pytest.raises(ValueError, match="batch dimension"):
            bad()
    with pytest.raises(ValueError, match="batch dimension"):
        x + rand(2, B, 4, 6)  # a plain operand of higher rank would move the batch
    with pytest.raises(ValueError, match="batch dimension"):
        Dual(rand(4, 6), rand(N, 6)) + x  # a rank-2 Dual would broadcast along the rank-3 batch
    with pytest.raises(ValueError, match="different numbers of rows"):
        x + Dual(rand(B, 4, 6), rand(N - 1, 4, 6))
    with pytest.raises(ValueError, match="leading rows"):
        Dual(rand(B, 4), rand(B + 1, 4))


def test_permute_keeps_the_batch_first_also_written_negatively():
    d = Dual(torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64))
    out = d.permute(-3, 2, 1)
    assert torch.equal(out.primal, d.primal.permute(0, 2, 1)) and torch.equal(out.tangent, d.tangent.permute(0, 2, 1))
    with pytest.raises(ValueError, match=r"permuting a Dual must keep the batch dimension first, got \(1, 0, 2\)"):
        d.permute(1, 0, 2)
    flat = d.flatten()  # by default everything after the batch dimension
    assert torch.equal(flat.primal, d.primal.flatten(1)) and torch.equal(flat.tangent, d.tangent.flatten(1))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention(backend):
    """The primal goes through the backend; the tangent reuses math attention's probabilities or recomputes them."""
    check_op(lambda q, k, v: attn.attention(q, k, v, backend), (B, 2, 5, 4), (B, 2, 5, 4), (B, 2, 5, 4))


def test_sinusoidal_embedding_tangent():
    for dim in (8, 9):
        check_op(lambda t: sinusoidal_embedding(t, dim), (B,))


def test_dropout_shares_its_mask_between_primal_and_tangent():
    x, dx = rand(B, 200) + 3.0, rand(N, 200, seed=1)
    torch.manual_seed(0)
    out = dual.dropout(Dual(x, dx), 0.4, training=True)
    kept = out.primal[:N] != 0
    assert 0.3 < (~kept).double().mean() < 0.5
    torch.testing.assert_close(out.tangent, torch.where(kept, dx / 0.6, torch.zeros_like(dx)))
    same = dual.dropout(Dual(x, dx), 0.4, training=False)
    assert same.primal is x and same.tangent is dx


MODELS = {"mlp": dict(dim=3), "mlp+fourier": dict(dim=3, fourier_features=8, fourier_scale=0.7), "dit-tiny/2": dict(in_channels=3, input_size=8), "unet-tiny": dict(in_channels=3, input_size=8)}


def build(name: str, num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create(name.split("+")[0], num_classes=num_classes, **MODELS[name]).double()  # "family+variant"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised layers too, so du/dt is non-trivial
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_models_propagate_duals_exactly(name):
    model = build(name)
    shape = (MODELS[name]["dim"],) if "dim" in MODELS[name] else (3, 8, 8)
    z, v = rand(B, *shape, seed=1), rand(B, *shape, seed=2)
    r = torch.linspace(0.0, 0.4, B, **f64)
    t = r + torch.linspace(0.5, 0.1, B, **f64)
    labels = torch.tensor([0, 4, 2, 1, 3])
    out = model(Dual(z, v[:N]), r, Dual(t, torch.ones(N, **f64)), labels)
    plain = model(z, r, t, labels)
    _, ref = torch.func.jvp(lambda z_, t_: model(z_, r[:N], t_, labels[:N]), (z[:N], t[:N]), (v[:N], torch.ones(N, **f64)))
    torch.testing.assert_close(out.primal, plain, rtol=0, atol=0)
    torch.testing.assert_close(out.tangent, ref, rtol=1e-9, atol=1e-12)
    assert ref.abs().max() > 1e-3 and not out.tangent.requires_grad
    # the primal carries the same gradient as the plain forward
    g_dual = torch.autograd.grad(out.primal.square().sum(), list(model.parameters()))
    g_plain = torch.autograd.grad(plain.square().sum(), list(model.parameters()))
    for a, b in zip(g_dual, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(MODELS))
def test_models_under_bf16_autocast_keep_the_plain_primal(name):
    """Under autocast the primal follows autocast's dtype policy exactly; the tangent agrees to bf16 precision."""
    model = build(name).float()
    shape = (MODELS[name]["dim"],) if "dim" in MODELS[name] else (3, 8, 8)
    z, v = rand(B, *shape, seed=1).float(), rand(B, *shape, seed=2).float()
    r, t, labels = torch.full((B,), 0.2), torch.full((B,), 0.7), torch.tensor([0, 4, 2, 1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(Dual(z, v[:N]), r, Dual(t, torch.ones(N)), labels)
        plain = model(z, r, t, labels)
    _, ref = torch.func.jvp(lambda z_, t_: model(z_, r[:N], t_, labels[:N]), (z[:N], t[:N]), (v[:N], torch.ones(N)))
    assert out.primal.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(out.primal, plain, rtol=0, atol=0)
    assert (out.tangent.float() - ref).abs().max() < 3e-2 * ref.abs().max()


@pytest.mark.heavy
def test_compiled_model_takes_the_dual_path():
    """torch.compile traces through Dual values: same loss and gradients as the eager model."""
    model = build("mlp").float()
    compiled = torch.compile(model)
    x = rand(16, 3, seed=5).float()
    grads = []
    for net in (model, compiled):
        loss, _ = MeanFlowLoss(ratio=0.5, jvp="dual")(net, x, generator=torch.Generator().manual_seed(0))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["dit-tiny/2", "unet-tiny"])
def test_loss_is_the_same_for_every_jvp_mode(name):
    """dual (one pass), forward_ad (subset) and full (reference) agree in loss, target and gradients, with guidance."""
    model = build(name)
    x, labels = rand(8, 3, 8, 8, seed=3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    results = {}
    for mode in ("dual", "forward_ad", "full"):
        loss_fn = MeanFlowLoss(ratio=0.5, omega=1.5, kappa=0.3, jvp=mode)
        out = loss_fn.targets(model, x, labels, generator=torch.Generator().manual_seed(4))
        loss, _ = loss_fn(model, x, labels, generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[mode] = (loss, out.target, out.dudt[out.draws.jvp_index], torch.cat([g.flatten() for g in grads]))
    assert results["dual"][2].abs().max() > 1e-3
    for mode in ("forward_ad", "full"):
        for a, b in zip(results["dual"], results[mode]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_dual_mode_needs_a_dual_model():
    class Plain(torch.nn.Module):
        def forward(self, z, r, t, labels=None):
            return z * t[:, None]

    with pytest.raises(ValueError, match="supports_dual"):
        MeanFlowLoss(jvp="dual")(Plain(), rand(4, 2))
    with pytest.raises(ValueError, match="jvp must be one of"):
        MeanFlowLoss(jvp="fast")
    loss, _ = MeanFlowLoss(jvp="auto")(Plain(), rand(4, 2))  # falls back to forward-mode AD
    assert torch.isfinite(loss)
