"""Image model families (DiT, DDPM++ U-Net) and the forward-mode-AD attention they use.

References are independent of the code under test: central finite differences in float64 for
every Jacobian-vector product, PyTorch's own scaled_dot_product_attention for the math path,
and the paper's parameter counts for the presets.
"""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from meanflow.cli import models_cmd
from meanflow.models import attention as attn
from meanflow.models import create
from meanflow.models.dit import sincos_2d

SIZE, CHANNELS, CLASSES, BATCH = 8, 3, 10, 3
FAMILIES = ["dit-tiny/2", "unet-tiny"]


def build(name: str, num_classes: int = CLASSES, **kwargs) -> torch.nn.Module:
    """A float64 model whose zero-initialised layers are perturbed, so u and du/dt are not trivially 0."""
    torch.manual_seed(0)
    model = create(name, in_channels=CHANNELS, input_size=SIZE, num_classes=num_classes, **kwargs).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def inputs(num_classes: int = CLASSES):
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=generator, dtype=torch.float64)
    v = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    labels = torch.tensor([1, num_classes, 3]) if num_classes else None
    return z, v, r, t, labels


def jvp_and_fd(model, z, v, r, t, labels, dt: float, h: float, seed: int | None = None):
    """JVP with tangent (v, 0, dt) and central differences along (z + h v, r, t + h dt).

    With a seed, the RNG is reset before the jvp and before each finite-difference evaluation, so
    all of them draw the same dropout masks.
    """

    def f(z_, r_, t_):
        if seed is not None:
            torch.manual_seed(seed)
        return model(z_, r_, t_, labels)

    if seed is not None:
        torch.manual_seed(seed)
    u, dudt = torch.func.jvp(lambda *a: model(*a, labels), (z, r, t), (v, torch.zeros_like(r), dt * torch.ones_like(t)))
    fd = (f(z + h * v, r, t + h * dt) - f(z - h * v, r, t - h * dt)) / (2 * h)
    return u, dudt, fd, f(z, r, t)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("num_classes", [0, CLASSES])
def test_jvp_matches_finite_differences(name, num_classes):
    model = build(name, num_classes).eval()
    z, v, r, t, labels = inputs(num_classes)
    # z direction alone: float64 throughout, so the agreement is tight.
    u, dudz, fd, plain = jvp_and_fd(model, z, v, r, t, labels, dt=0.0, h=1e-5)
    assert u.shape == z.shape
    assert torch.allclose(u, plain, rtol=0, atol=1e-12)
    assert rel_err(dudz, fd) < 1e-6
    # Full MeanFlow tangent (v, 0, 1); time features follow the input dtype, so float64 throughout.
    _, dudt, fd, _ = jvp_and_fd(model, z, v, r, t, labels, dt=1.0, h=1e-5)
    assert rel_err(dudt, fd) < 1e-6
    assert rel_err(dudt, dudz) > 0.02  # the t part of the tangent matters


@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_mask_shared_by_primal_and_tangent(name):
    model = build(name, dropout=0.3).train()
    z, v, r, t, labels = inputs()
    u, dudt, fd, plain = jvp_and_fd(model, z, v, r, t, labels, dt=0.0, h=1e-5, seed=7)
    assert torch.equal(u, plain)  # same masks as a plain forward after the same seed
    assert rel_err(dudt, fd) < 1e-6  # tangent uses the primal's mask
    torch.manual_seed(8)
    assert not torch.allclose(model(z, r, t, labels), plain)  # dropout is active


@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_and_conditioning(name):
    model = build(name).eval()
    z, _, r, t, labels = inputs()
    null = torch.full_like(labels, CLASSES)
    with torch.no_grad():
        u = model(z, r, t, labels)
        assert u.shape == z.shape
        assert torch.equal(model(z, r, t), model(z, r, t, null))  # labels=None means the null class
        assert not torch.allclose(u, model(z, r, t, (labels + 1) % CLASSES))
        assert not torch.allclose(u, model(z, t, t, labels))  # r matters through t - r
    unconditional = build(name, num_classes=0).eval()
    assert unconditional.num_classes == 0 and model.num_classes == CLASSES
    assert unconditional(z, r, t).shape == z.shape


@pytest.mark.parametrize("name", FAMILIES)
def test_untrained_output_is_zero(name):
    torch.manual_seed(0)
    model = create(name, in_channels=CHANNELS, input_size=SIZE)
    z, _, r, t, _ = inputs(0)
    assert torch.equal(model(z.float(), r.float(), t.float()), torch.zeros_like(z.float()))


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_input_shape_raises(name):
    model = build(name)
    z, _, r, t, labels = inputs()
    with pytest.raises(ValueError, match="built for inputs"):
        model(z[:, :2], r, t, labels)
    with pytest.raises(ValueError, match="built for inputs"):
        model(F.pad(z, (0, 4, 0, 4)), r, t, labels)


def test_non_square_inputs_and_patch4():
    model = create("dit-s/4", in_channels=1, input_size=(8, 12), depth=1).double()
    z = torch.randn(2, 1, 8, 12, dtype=torch.float64)
    assert model(z, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)).shape == z.shape
    unet = create("unet-tiny", in_channels=1, input_size=(8, 12))
    assert unet(z.float(), torch.zeros(2), torch.ones(2)).shape == z.shape


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="not divisible by the patch"):
        create("dit-b/4", in_channels=4, input_size=30)
    with pytest.raises(ValueError, match="divisible by 2"):
        create("unet-small", in_channels=3, input_size=30)


def test_position_embedding_is_distinct_and_bounded():
    pos = sincos_2d(16, 3, 5)  # (15, 16)
    assert pos.shape == (15, 16) and pos.abs().max() <= 1
    assert torch.cdist(pos, pos).add(torch.eye(15)).min() > 0.1  # no two positions collide


def qkv(shape=(2, 3, 10, 8), dtype=torch.float64):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3)]


def test_math_attention_equals_sdpa():
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attn.attention(q, k, v), expected, atol=1e-12)
    assert torch.allclose(attn.attention(q, k, v, "sdpa"), expected, atol=1e-12)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_jvp_matches_finite_differences(backend):
    primals, tangents = qkv(), qkv((2, 3, 10, 8))[::-1]
    fn = lambda *x: attn.attention(*x, backend=backend)  # noqa: E731
    _, jvp = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    h = 1e-6
    fd = (fn(*[p + h * d for p, d in zip(primals, tangents)]) - fn(*[p - h * d for p, d in zip(primals, tangents)])) / (2 * h)
    assert rel_err(jvp, fd) < 1e-7


def test_backend_selection(monkeypatch):
    q, k, v = qkv()
    assert attn.resolve_backend(q, k, v) == "math"  # CPU default
    monkeypatch.setenv(attn.ENV_VAR, "sdpa")
    assert attn.resolve_backend(q, k, v) == "sdpa"
    assert attn.resolve_backend(q, k, v, backend="math") == "math"  # argument beats environment
    monkeypatch.setenv(attn.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="auto, math, sdpa, jvp_flash"):
        attn.attention(q, k, v)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.attention(q, k, v, backend="flash")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            attn.attention(q, k, v, backend="jvp_flash")


def count_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create(name, **kwargs).parameters())


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("dit-b/2", dict(in_channels=4, input_size=32, num_classes=1000), 131e6),
        ("dit-xl/2", dict(in_channels=4, input_size=32, num_classes=1000), 676e6),
        ("unet-cifar10", dict(in_channels=3, input_size=32), 55.7e6),
    ],
)
def test_parameter_counts_match_paper(name, kwargs, expected):
    assert abs(count_on_meta(name, **kwargs) / expected - 1) < 0.02


def test_models_command_lists_presets(capsys):
    parser = argparse.ArgumentParser()
    models_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "--name", "dit-b"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dit-b/2" in out and "dit-b/4" in out and "unet" not in out
    assert "131.1M" in out  # dit-b/2: 131,091,472 parameters at 4x32x32, 1000 classes
    args = parser.parse_args(["models", "--name", "unet-tiny", "--input-size", "16", "--channels", "1"])
    args.func(args)
    assert "1x16x16" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no model preset"):
        args.func(parser.parse_args(["models", "--name", "resnet"]))
