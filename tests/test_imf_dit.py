"""The iMF network (``imf-*``): its Dual tangent rules and du/dt against ``torch.func.jvp`` in float64."""
from __future__ import annotations

import math

import pytest
import torch

from meanflow.autodiff import dual
from meanflow.autodiff.dual import Dual
from meanflow.models import create
from meanflow.models.imf_dit import IMFDiT, recommended_guidance, rope_angles

B, N = 5, 3  # batch, rows with a tangent
f64 = dict(dtype=torch.float64)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


def check_rule(fn, *shapes: tuple[int, ...]) -> None:
    """fn on Duals: primal equal to the plain fn, tangent equal to torch.func.jvp of the first N rows."""
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    dxs = [rand(N, *s[1:], seed=10 + i) for i, s in enumerate(shapes)]
    out = fn(*[Dual(x, dx) for x, dx in zip(xs, dxs)])
    _, ref = torch.func.jvp(fn, tuple(x[:N] for x in xs), tuple(dxs))
    torch.testing.assert_close(out.primal, fn(*xs), rtol=0, atol=0)
    torch.testing.assert_close(out.tangent, ref, rtol=1e-10, atol=1e-12)


def test_rms_norm_rule():
    weight = rand(6, seed=30)
    check_rule(lambda x: dual.rms_norm(x, weight, 1e-6), (B, 4, 6))
    check_rule(lambda x: dual.rms_norm(x, None, 1e-2), (B, 2, 3, 6))  # QK-norm shape (B, N, heads, d)


def test_rms_norm_formula():
    x, w = rand(B, 7), rand(7, seed=1)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(dual.rms_norm(x, w), expected, rtol=1e-14, atol=0)


def test_rotary_rule_and_complex_reference():
    cos, sin = rope_angles(8, 4)
    check_rule(lambda x: dual.rotary(x, cos, sin), (B, 4, 2, 8))
    # independent reference: channel pairs as complex numbers times exp(i n theta^(-2k/d))
    x = rand(B, 4, 2, 8)
    k = torch.arange(4, **f64)
    angle = torch.arange(4, **f64)[:, None] * 10_000.0 ** (-2 * k / 8)  # (N, d/2)
    rotated = torch.view_as_complex(x.reshape(B, 4, 2, 4, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)[:, None]
    torch.testing.assert_close(dual.rotary(x, cos.double(), sin.double()), torch.view_as_real(rotated).flatten(-2), rtol=1e-6, atol=1e-6)


def test_swiglu_rule():
    check_rule(dual.swiglu, (B, 4, 6), (B, 4, 6))


def build(v_head: bool = True, seed: int = 0) -> IMFDiT:
    torch.manual_seed(seed)
    model = create("imf-tiny/2", in_channels=2, input_size=4, num_classes=3, v_head=v_head).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # gates and final layers start at zero: make du/dt non-trivial
    return model


def inputs():
    z, v = rand(B, 2, 4, 4, seed=1), rand(B, 2, 4, 4, seed=2)
    r = torch.linspace(0.0, 0.4, B, **f64)
    t = r + torch.linspace(0.5, 0.1, B, **f64)
    cond = dict(omega=torch.linspace(1.0, 6.0, B, **f64), t_min=torch.full((B,), 0.2, **f64), t_max=torch.full((B,), 0.7, **f64))
    return z, v, r, t, torch.tensor([0, 2, 1, 3, 0]), cond


def test_dual_forward_gives_dudt_of_u_exactly():
    model = build()
    z, v, r, t, labels, cond = inputs()
    u, v_out = model(Dual(z, v[:N]), r, Dual(t, torch.ones(N, **f64)), labels, **cond, return_v=True)
    plain_u, plain_v = model(z, r, t, labels, **cond, return_v=True)
    head = {k: c[:N] for k, c in cond.items()}
    _, ref = torch.func.jvp(lambda z_, t_: model(z_, r[:N], t_, labels[:N], **head), (z[:N], t[:N]), (v[:N], torch.ones(N, **f64)))
    torch.testing.assert_close(u.primal, plain_u, rtol=0, atol=0)
    torch.testing.assert_close(u.tangent, ref, rtol=1e-10, atol=1e-12)
    assert ref.abs().max() > 1e-3
    assert isinstance(v_out, torch.Tensor) and not isinstance(v_out, Dual)
    torch.testing.assert_close(v_out, plain_v, rtol=0, atol=0)
    g_dual = torch.autograd.grad((u.primal.square().sum() + v_out.square().sum()), list(model.parameters()))
    g_plain = torch.autograd.grad((plain_u.square().sum() + plain_v.square().sum()), list(model.parameters()))
    for a, b in zip(g_dual, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_network_sees_only_h_and_every_condition_matters():
    model = build(v_head=False)
    z, _, r, t, labels, cond = inputs()
    base = model(z, r, t, labels, **cond)
    torch.testing.assert_close(model(z, r + 0.05, t + 0.05, labels, **cond), base, rtol=1e-12, atol=1e-12)
    changed = [model(z, r, t + 0.05, labels, **cond), model(z, r, t, (labels + 1) % 4, **cond)]
    changed += [model(z, r, t, labels, **{**cond, key: cond[key] * 0.9}) for key in cond]
    assert all((out - base).abs().max() > 1e-6 for out in changed)


def test_defaults_mean_no_guidance_and_null_label():
    model = build(v_head=False)
    z, _, r, t, _, _ = inputs()
    null = torch.full((B,), 3)
    expected = model(z, r, t, null, omega=torch.ones(B, **f64), t_min=torch.zeros(B, **f64), t_max=torch.ones(B, **f64))
    torch.testing.assert_close(model(z, r, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(z, r, t, null, omega=1.0, t_min=0.0, t_max=1.0), expected, rtol=0, atol=0)


def test_fresh_model_starts_at_zero_with_official_shapes():
    model = create("imf-tiny/2", in_channels=1, input_size=8, num_classes=10)
    assert model(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.ones(2)).abs().max() == 0
    assert model.prefix_tokens == 20 and model.rope_cos.shape == (20 + 16, 8)
    assert int(64 * 8 / 3) == model.u_heads[0].mlp.w1.out_features
    assert len(model.shared_blocks) == 2 and len(model.u_heads) == len(model.v_heads) == 2


def test_presets_match_the_official_sizes():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in create(name, v_head=False).parameters()) for name in ("imf-b/2", "imf-m/2", "imf-l/2", "imf-xl/2")}
    # the paper's parameter counts (Table: 89M, 174M, 409M, 610M), counted without the v-head
    assert [round(n / 1e6) for n in sizes.values()] == [89, 174, 409, 610]
    with torch.device("meta"):
        b2 = create("imf-b/2")
    assert len(b2.shared_blocks) == 4 and len(b2.u_heads) == len(b2.v_heads) == 8


def test_recommended_guidance_table():
    assert recommended_guidance("imf-b/2", 1) == (8.0, (0.4, 0.65))
    assert recommended_guidance("imf-xl/2", 2) == (4.0, (0.36, 0.64))
    assert recommended_guidance("imf-xl/2", 4) == (8.0, (0.42, 0.62))
    assert recommended_guidance("imf-tiny/2", 1) is None


def test_bad_inputs_are_named():
    model = build(v_head=False)
    z, _, r, t, _, _ = inputs()
    with pytest.raises(ValueError, match="v-head"):
        model(z, r, t, return_v=True)
    with pytest.raises(ValueError, match="omega must be"):
        model(z, r, t, omega=torch.ones(B + 1, **f64))
    with pytest.raises(ValueError, match="shape"):
        model(z[:, :1], r, t)
    with pytest.raises(ValueError, match="head_depth"):
        IMFDiT(in_channels=1, input_size=4, depth=2, hidden=16, heads=2, head_depth=3)


def test_initialisation_is_the_official_one_parameter_by_parameter():
    """The official imfDiT (models/imfDiT.py, embedder.py, torch_models.py of Lyy-iiis/imeanflow): residual gates,
    both final layers (weights and biases) and every bias zero; RMSNorm scales one; learned tokens and the label
    table N(0, 1 / sqrt(hidden)); embedder linears N(0, 1 / sqrt(fan_in)); block linears N(0, 0.32 / sqrt(fan_in));
    the patch convolution Xavier-uniform over (p, p, C) -> hidden."""
    torch.manual_seed(0)
    model = create("imf-tiny/2", in_channels=1, input_size=8, num_classes=10)
    hidden = model.class_tokens.shape[1]

    def official(name: str, p: torch.Tensor) -> float | str:
        if name.endswith(("attn_scale", "mlp_scale", ".bias")) or "final_layer.linear" in name:
            return "zeros"
        if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "final_layer.norm.weight")):
            return "ones"
        if name.endswith("_tokens") or name == "y_embedder.weight":
            return 1 / math.sqrt(hidden)
        if "_embedder.mlp" in name:
            return 1 / math.sqrt(p.shape[1])
        if name == "x_embedder.proj.weight":
            return math.sqrt(2 / (p[0].numel() + p.shape[0]))  # Xavier uniform: a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3)
        assert "blocks" in name or "heads" in name, name
        return 0.32 / math.sqrt(p.shape[1])

    seen = set()
    for name, p in model.named_parameters():
        expected = official(name, p)
        seen.add(expected if isinstance(expected, str) else "normal")
        if expected == "zeros":
            assert bool((p == 0).all()), name
        elif expected == "ones":
            assert bool((p == 1).all()), name
        else:
            std = float(p.detach().double().std())
            assert abs(std / expected - 1) < 4 / math.sqrt(2 * p.numel()), (name, std, expected)
            assert abs(float(p.detach().double().mean())) < 4 * expected / math.sqrt(p.numel()), name
    assert seen == {"zeros", "ones", "normal"}
    assert model.v_final_layer is not None and len(model.v_heads) == 2  # the v-head was checked too


def test_the_float64_network_rotates_with_float64_tables():
    """A float64 model's rotary tables are cos / sin of n theta^(-2i / d) to float64 rounding (built in float64,
    not rounded to float32 first); a float32 model gets float32 tables."""
    seen = []
    model = create("imf-tiny/2", in_channels=1, input_size=8, num_classes=10)
    model.shared_blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[1:]))
    z, r, t = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.ones(2)
    model(z, r, t)
    model.double()
    model(z.double(), r.double(), t.double())
    (cos32, sin32), (cos64, sin64) = seen
    d = model.shared_blocks[0].attn.head_dim
    angles = [[n * 10_000.0 ** (-2 * i / d) for i in range(d // 2)] for n in range(model.prefix_tokens + 16)]
    exact_cos = torch.tensor([[math.cos(a) for a in row] for row in angles], **f64)
    exact_sin = torch.tensor([[math.sin(a) for a in row] for row in angles], **f64)
    assert cos64.dtype == sin64.dtype == torch.float64 and cos32.dtype == sin32.dtype == torch.float32
    torch.testing.assert_close(cos64, exact_cos, rtol=0, atol=1e-14)
    torch.testing.assert_close(sin64, exact_sin, rtol=0, atol=1e-14)
    torch.testing.assert_close(cos32, exact_cos.float(), rtol=0, atol=0)
