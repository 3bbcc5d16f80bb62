"""The pMF network (``pmf-*``): one-pass JVP against ``torch.func.jvp`` in float64, shapes, the
official parameter counts, the x-prediction and the velocity derived from it."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import meanflow
from meanflow.autodiff import Tangent, jvp
from meanflow.models import create
from meanflow.models.mit import MiT, RECOMMENDED_GUIDANCE, rope_2d, rotate

B, N = 5, 3  # batch, rows with a tangent
f64 = dict(dtype=torch.float64)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


def build(v_head: bool = True, seed: int = 0) -> MiT:
    torch.manual_seed(seed)
    model = create("pmf-tiny/4", input_size=8, num_classes=3, v_head=v_head).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # gates and final layers start at zero: make every path count
    return model


def inputs():
    z, dz = rand(B, 3, 8, 8, seed=1), rand(B, 3, 8, 8, seed=2)
    t = torch.tensor([0.9, 0.6, 0.03, 0.5, 0.2], **f64)  # one t below the clip at 0.05
    r = t * torch.tensor([0.1, 0.5, 0.0, 1.0, 0.3], **f64)
    cond = dict(omega=torch.linspace(1.0, 6.0, B, **f64), t_min=torch.full((B,), 0.2, **f64), t_max=torch.full((B,), 0.7, **f64))
    return z, dz, r, t, torch.tensor([0, 2, 1, 3, 0]), cond


@pytest.mark.parametrize("mode", ["rows", "auto"])
def test_one_pass_jvp_is_exact_in_float64(mode):
    model = build()
    z, dz, r, t, labels, cond = inputs()
    rows = torch.tensor([2, 0, 4])
    out = jvp(model, z, r, t, labels, rows, Tangent(z=dz[:N]), mode=mode, conditioning=cond, return_v=True)
    plain_u, plain_v = model(z, r, t, labels, **cond, return_v=True)
    sub = {k: c[rows] for k, c in cond.items()}
    with sdpa_kernel(SDPBackend.MATH):
        _, ref = torch.func.jvp(lambda z_, t_: model(z_, r[rows], t_, labels[rows], **sub), (z[rows], t[rows]), (dz[:N], torch.ones(N, **f64)))
    torch.testing.assert_close(out.u, plain_u, rtol=0, atol=1e-13)
    torch.testing.assert_close(out.v, plain_v, rtol=0, atol=1e-13)
    torch.testing.assert_close(out.du, ref, rtol=1e-10, atol=1e-12)
    assert ref.abs().max() > 1e-2


def test_auto_takes_the_row_tangent():
    assert not getattr(MiT, "supports_dual", False)
    assert meanflow.models.registry.family("pmf-b/16").fast_jvp is False


def test_velocity_is_derived_from_the_predicted_image():
    model = build()
    z, _, r, t, labels, cond = inputs()
    u, v = model(z, r, t, labels, **cond, return_v=True)
    x_u, x_v = model.denoise(z, t - r, labels, **cond, return_v=True)
    clipped = t.clamp(0.05, 1.0)[:, None, None, None]
    torch.testing.assert_close(u, (z - x_u) / clipped, rtol=1e-14, atol=0)
    torch.testing.assert_close(v, (z - x_v) / clipped, rtol=1e-14, atol=0)
    above = t >= 0.05  # there x_hat = z - t u, the image the perceptual losses see
    torch.testing.assert_close((z - t[:, None, None, None] * u)[above], x_u[above], rtol=1e-12, atol=1e-12)
    # one jump from noise at t = 1 to r = 0 lands on the predicted image, the noise scaled by the prior's scale
    model.noise_scale = 2.0
    e = rand(B, 3, 8, 8, seed=7)
    x = meanflow.sample(model, e, steps=1, labels=labels, omega=2.0, interval=(0.1, 0.7))
    ones = torch.ones(B, **f64)
    expected, _ = model.denoise(2.0 * e, ones, labels, omega=2.0, t_min=0.1, t_max=0.7)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


def test_network_sees_h_and_t_only_through_the_output_division():
    model = build()
    z, _, r, t, labels, cond = inputs()
    u = model(z, r, t, labels, **cond)
    x_u, _ = model.denoise(z, t - r, labels, **cond)
    shifted = t + 0.05  # same h, another t: the same image, u rescaled by the clipped t
    expected = (z - x_u) / shifted.clamp(0.05, 1.0)[:, None, None, None]
    torch.testing.assert_close(model(z, r + 0.05, shifted, labels, **cond), expected, rtol=1e-12, atol=1e-12)
    changed = [model(z, r, t + 0.05, labels, **cond), model(z, r, t, (labels + 1) % 4, **cond)]
    changed += [model(z, r, t, labels, **{**cond, key: cond[key] * 0.9}) for key in cond]
    assert all((out - u).abs().max() > 1e-6 for out in changed)


def test_rotary_turns_rows_and_columns_of_the_patches_only():
    cos, sin = rope_2d(8, 3)  # head width 8: pairs 0, 1 turn with the row, pairs 2, 3 with the column
    x = rand(2, 4 + 9, 2, 8)
    out = rotate(x, cos.double(), sin.double())
    torch.testing.assert_close(out[:, :4], x[:, :4], rtol=0, atol=0)
    pairs = torch.view_as_complex(x[:, 4:].reshape(2, 9, 2, 4, 2).contiguous())
    row, col = torch.arange(9) // 3, torch.arange(9) % 3
    freqs = 10_000.0 ** (-torch.arange(2, **f64) / 2)  # theta^(-2k / (d / 2)), k < d / 4
    angle = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=1)  # (9, 4)
    expected = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)[:, None]).flatten(-2)
    torch.testing.assert_close(out[:, 4:], expected, rtol=1e-6, atol=1e-6)


def test_shapes_and_a_fresh_model_predicts_zero():
    model = create("pmf-tiny/4", input_size=16, num_classes=10)
    z = torch.randn(2, 3, 16, 16)
    x_hat, _ = model.denoise(z, torch.ones(2))
    assert x_hat.abs().max() == 0 and model(z, torch.zeros(2), torch.ones(2)).shape == z.shape
    assert model.prefix_tokens == 20 and model.pos_embed.shape == (20 + 16, 64) and model.rope_cos.shape == (16, 8)
    assert model.x_embedder.proj1.weight.shape == (16, 3, 4, 4) and model.x_embedder.proj2.weight.shape == (64, 16, 1, 1)
    assert len(model.shared_blocks) == 2 and len(model.u_heads) == len(model.v_heads) == 2
    assert model.u_heads[0].mlp.w1.out_features == int(64 * 8 / 3)


def test_presets_have_the_official_parameter_counts():
    """Counted against the official network written in flax from the official configs (tests/pmf_reference.py)."""
    pytest.importorskip("flax")
    import pmf_reference as official

    names = {"pmfDiT_B_16": "pmf-b/16", "pmfDiT_L_16": "pmf-l/16", "pmfDiT_H_16": "pmf-h/16",
             "pmfDiT_B_32": "pmf-b/32", "pmfDiT_L_32": "pmf-l/32", "pmfDiT_H_32": "pmf-h/32"}
    for theirs, ours in names.items():
        with torch.device("meta"):
            train, infer = create(ours), create(ours, v_head=False)
        assert sum(p.numel() for p in train.parameters()) == official.param_count(official.official_config(theirs))
        assert sum(p.numel() for p in infer.parameters()) == official.param_count(official.official_config(theirs, eval=True))
    # the paper's sizes, in millions, of the inference networks
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in create(n, v_head=False).parameters()) for n in names.values()]
    assert [round(n / 1e6) for n in sizes] == [118, 410, 955, 120, 413, 958]


def test_official_prior_scales_and_guidance():
    with torch.device("meta"):
        scales = {n: create(n).noise_scale for n in RECOMMENDED_GUIDANCE}
    assert scales == {"pmf-b/16": 1.0, "pmf-l/16": 1.0, "pmf-h/16": 2.0, "pmf-b/32": 2.0, "pmf-l/32": 4.0, "pmf-h/32": 4.0}
    with torch.device("meta"):
        b16 = create("pmf-b/16")
    assert b16.default_guidance(1) == (8.5, (0.1, 0.7)) and b16.input_size == (256, 256)
    # configs/eval_config.yml (main, hsdp) and the torch branch's evaluation commands: omega, (t_min, t_max)
    assert RECOMMENDED_GUIDANCE == {"pmf-b/16": (8.5, (0.1, 0.7)), "pmf-l/16": (7.0, (0.2, 0.7)), "pmf-h/16": (7.0, (0.2, 0.6)),
                                    "pmf-b/32": (6.5, (0.1, 0.7)), "pmf-l/32": (7.5, (0.2, 0.6)), "pmf-h/32": (5.5, (0.1, 0.6))}
    assert build().default_guidance(1) == (1.0, (0.0, 1.0))


def test_bad_inputs_are_named():
    """The MiT's own checks (input shape and guidance values go through the iMF DiT's, tests/test_imf_dit.py)."""
    z, _, r, t, _, _ = inputs()
    with pytest.raises(ValueError, match="pMF MiT built for inputs of shape"):
        build()(z[:, :1], r, t)
    with pytest.raises(ValueError, match="needs the auxiliary v-head.*v_head=False"):
        build(v_head=False)(z, r, t, return_v=True)
    with pytest.raises(ValueError, match="divisible by 4"):
        MiT(input_size=8, depth=2, hidden=24, heads=4, patch=4, head_depth=1)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        MiT(input_size=10, depth=2, hidden=32, heads=2, patch=4, head_depth=1)
    with pytest.raises(ValueError, match="noise_scale"):
        MiT(input_size=8, depth=2, hidden=32, heads=2, patch=4, head_depth=1, noise_scale=0.0)
    assert math.isclose(create("pmf-tiny/4", input_size=8, num_classes=3, noise_scale=3.0).noise_scale, 3.0)
