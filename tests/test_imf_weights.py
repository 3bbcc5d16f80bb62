"""Official iMF checkpoints (``iMF-*-2.pth``, the state dict of the official ``iMeanFlow(eval=True)``).

The tests write checkpoints in the official key layout (``net.*``, ``_flax_linear`` wrappers,
``v_final_layer`` without v-head blocks) and compare our model with an independent functional
re-implementation of the official PyTorch forward (branch ``torch``: complex-number RoPE, einsum
attention with a float32 softmax, ``x * rsqrt(mean(x^2) + 1e-6) * w`` RMSNorm), in float32.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from meanflow.models import create
from meanflow.models.imf_weights import official_architecture, official_preset
from meanflow.models.pretrained import load_official_imf

PREFIX_GROUPS = (("class_tokens", 8), ("omega_tokens", 4), ("t_min_tokens", 2), ("t_max_tokens", 2), ("time_tokens", 4))
EMBEDDERS = ("h_embedder", "omega_embedder", "cfg_t_start_embedder", "cfg_t_end_embedder")


def official_state(hidden=32, heads=2, shared=2, head_depth=2, patch=2, channels=4, classes=10, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the official eval-model key names (listed from the official module tree)."""
    gen = torch.Generator().manual_seed(seed)
    mlp = int(hidden * 8 / 3)
    shapes = {"net.x_embedder.proj.weight": (hidden, channels, patch, patch), "net.x_embedder.proj.bias": (hidden,),
              "net.y_embedder.embedding_table._flax_embedding.weight": (classes + 1, hidden)}
    for name in EMBEDDERS:
        shapes |= {f"net.{name}.mlp.0._flax_linear.weight": (hidden, 256), f"net.{name}.mlp.0._flax_linear.bias": (hidden,),
                   f"net.{name}.mlp.2._flax_linear.weight": (hidden, hidden), f"net.{name}.mlp.2._flax_linear.bias": (hidden,)}
    shapes |= {f"net.{name}": (count, hidden) for name, count in PREFIX_GROUPS}
    blocks = [f"net.shared_blocks.{i}" for i in range(shared)] + [f"net.u_heads.{i}" for i in range(head_depth)]
    for b in blocks:
        shapes |= {f"{b}.norm1.weight": (hidden,), f"{b}.norm2.weight": (hidden,), f"{b}.attn_scale": (hidden,), f"{b}.mlp_scale": (hidden,),
                   f"{b}.attn.q_norm.weight": (hidden // heads,), f"{b}.attn.k_norm.weight": (hidden // heads,),
                   f"{b}.mlp.w1._flax_linear.weight": (mlp, hidden), f"{b}.mlp.w3._flax_linear.weight": (mlp, hidden),
                   f"{b}.mlp.w2._flax_linear.weight": (hidden, mlp)}
        shapes |= {f"{b}.attn.{p}_proj._flax_linear.weight": (hidden, hidden) for p in "qkv"} | {f"{b}.attn.out_proj._flax_linear.weight": (hidden, hidden)}
    for final in ("u_final_layer", "v_final_layer"):
        shapes |= {f"net.{final}.norm.weight": (hidden,), f"net.{final}.linear._flax_linear.weight": (patch * patch * channels, hidden),
                   f"net.{final}.linear._flax_linear.bias": (patch * patch * channels,)}
    state = {}
    for key, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 if key.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else 1.0 / math.sqrt(max(fan_in, 1))
        base = 1.0 if scale == 1.0 else 0.0
        state[key] = base + scale * torch.randn(shape, generator=gen)
    return state


def official_forward(state, x, t, h, omega, t_min, t_max, y, heads: int) -> torch.Tensor:
    """The official imfDiT forward (eval model: shared blocks, u-head, u final layer), written functionally."""
    W = lambda name: state[f"net.{name}"]  # noqa: E731
    lin = lambda a, name, bias=False: F.linear(a, W(f"{name}._flax_linear.weight"), W(f"{name}._flax_linear.bias") if bias else None)  # noqa: E731

    def rms(a, name):
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * W(f"{name}.weight")

    def embed(s, name):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = s[:, None].float() * freqs[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return lin(F.silu(lin(feats, f"{name}.mlp.0", True)), f"{name}.mlp.2", True)

    b, c, size, _ = x.shape
    hidden, _, p, _ = W("x_embedder.proj.weight").shape
    patches = F.conv2d(x, W("x_embedder.proj.weight"), W("x_embedder.proj.bias"), stride=p)
    patches = patches.permute(0, 2, 3, 1).reshape(b, -1, hidden)
    y_embed = F.embedding(y, W("y_embedder.embedding_table._flax_embedding.weight"))
    seq = torch.cat([W("class_tokens") + y_embed[:, None], W("omega_tokens") + embed(1 - 1 / omega, "omega_embedder")[:, None],
                     W("t_min_tokens") + embed(t_min, "cfg_t_start_embedder")[:, None],
                     W("t_max_tokens") + embed(t_max, "cfg_t_end_embedder")[:, None],
                     W("time_tokens") + embed(h, "h_embedder")[:, None], patches], 1)
    length, dh = seq.shape[1], hidden // heads
    freqs = 1.0 / 10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    rot = torch.polar(torch.ones(length, dh // 2), torch.outer(torch.arange(length, dtype=torch.float32), freqs))

    def rope(a):
        return torch.view_as_real(torch.view_as_complex(a.float().reshape(*a.shape[:-1], -1, 2).contiguous()) * rot[None, :, None]).flatten(-2)

    blocks = sorted({k.split(".")[1] + "." + k.split(".")[2] for k in state if k.startswith(("net.shared_blocks.", "net.u_heads."))},
                    key=lambda n: (not n.startswith("shared"), int(n.split(".")[1])))
    for blk in blocks:
        a = rms(seq, f"{blk}.norm1")
        q, k, v = (lin(a, f"{blk}.attn.{n}_proj").reshape(b, length, heads, dh) for n in "qkv")
        q, k = rope(rms(q, f"{blk}.attn.q_norm")), rope(rms(k, f"{blk}.attn.k_norm"))
        weights = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(dh), k).softmax(-1, dtype=torch.float32)
        attn = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, hidden)
        seq = seq + lin(attn, f"{blk}.attn.out_proj") * W(f"{blk}.attn_scale")
        m = rms(seq, f"{blk}.norm2")
        seq = seq + lin(F.silu(lin(m, f"{blk}.mlp.w1")) * lin(m, f"{blk}.mlp.w3"), f"{blk}.mlp.w2") * W(f"{blk}.mlp_scale")
    out = lin(rms(seq[:, 20:], "u_final_layer.norm"), "u_final_layer.linear", True)
    g = size // p
    return torch.einsum("nhwpqc->nchpwq", out.reshape(b, g, g, p, p, c)).reshape(b, c, size, size)


def inputs(classes=10, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, size, size, generator=gen)
    t, h = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([1.0, 0.4, 0.1])
    cond = dict(omega=torch.tensor([8.0, 1.0, 3.0]), t_min=torch.tensor([0.4, 0.0, 0.2]), t_max=torch.tensor([0.65, 1.0, 0.9]))
    return x, t, h, cond, torch.tensor([1, 2, classes])


def test_outputs_equal_the_official_forward(tmp_path):
    state = official_state()
    torch.save(state, tmp_path / "iMF-test.pth")
    model = load_official_imf(tmp_path / "iMF-test.pth", input_size=8)
    assert not model.training and not model.has_v_head and model.preset is None
    x, t, h, cond, y = inputs()
    with torch.no_grad():
        ours = model(x, t - h, t, y, **cond)
        ref = official_forward(state, x, t, h, cond["omega"], cond["t_min"], cond["t_max"], y, heads=2)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_round_trip_of_our_weights_through_the_official_layout(tmp_path):
    """Our model's weights, written under the official names, load back into an identical model."""
    torch.manual_seed(0)
    ours = create("imf-tiny/2", in_channels=4, input_size=8, num_classes=10, v_head=False)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    official = official_state(hidden=64, heads=4, shared=2, head_depth=2)
    mine = ours.state_dict()
    for key in official:
        name = key[4:].replace("._flax_linear.", ".").replace(".embedding_table._flax_embedding.", ".")
        if not name.startswith("v_final_layer"):
            official[key] = mine[name].clone()
    torch.save(official, tmp_path / "round.pth")
    loaded = load_official_imf(tmp_path / "round.pth", input_size=8)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, mine[key], rtol=0, atol=0)
    x, t, h, cond, y = inputs()
    torch.testing.assert_close(loaded(x, t - h, t, y, **cond), ours.eval()(x, t - h, t, y, **cond), rtol=0, atol=0)


def test_official_sizes_are_recognised():
    for name in ("imf-m/2", "imf-xl/2"):  # each shares its width with another preset (B/2, L/2): told apart by depth
        with torch.device("meta"):
            state = create(name, v_head=False).state_dict()  # our names = official names after renaming
        assert official_preset(official_architecture(state)) == name


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("net.u_heads.1.mlp.w2._flax_linear.weight"), "missing keys: u_heads.1.mlp.w2.weight"),
    (lambda s: s.update({"net.u_heads.0.extra": torch.zeros(1)}), "unexpected keys: u_heads.0.extra"),
    (lambda s: s.update({"net.u_heads.0.attn_scale": torch.zeros(7)}), r"u_heads.0.attn_scale: file \(7,\), model \(32,\)"),
    (lambda s: s.update({"net.v_final_layer.linear._flax_linear.bias": torch.zeros(3)}), r"v_final_layer.linear.bias: file \(3,\)"),
    (lambda s: s.update({"ema.net.x": torch.zeros(1)}), "keys outside 'net.': ema.net.x"),
])
def test_damaged_checkpoints_name_the_key(tmp_path, damage, message):
    state = official_state()
    damage(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_official_imf(tmp_path / "bad.pth", input_size=8)


def test_checkpoint_of_another_preset_and_foreign_files(tmp_path):
    torch.save(official_state(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="no official size.*not 'imf-b/2'"):
        load_official_imf(tmp_path / "small.pth", preset="imf-b/2", input_size=8)
    torch.save({"model": official_state()}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not an official iMF checkpoint"):
        load_official_imf(tmp_path / "wrapped.pth")


def test_sampling_equals_the_official_generate_loop(tmp_path):
    """meanflow.sample with omega and interval = the official iMeanFlow.generate steps z <- z - (t - r) u."""
    import meanflow

    state = official_state(seed=3)
    torch.save(state, tmp_path / "iMF-test.pth")
    model = load_official_imf(tmp_path / "iMF-test.pth", input_size=8)
    noise, y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 4, 9])
    for steps, omega, (lo, hi) in ((1, 8.0, (0.4, 0.65)), (2, 4.0, (0.36, 0.64))):
        z, grid = noise.clone(), torch.linspace(1.0, 0.0, steps + 1)
        for t, r in zip(grid[:-1], grid[1:]):
            full = lambda v: torch.full((3,), float(v))  # noqa: E731
            z = z - (t - r) * official_forward(state, z, full(t), full(t - r), full(omega), full(lo), full(hi), y, heads=2)
        ours = meanflow.sample(model, noise, steps=steps, labels=y, omega=omega, interval=(lo, hi))
        assert (ours - z).abs().max() <= 1e-5 * z.abs().max()


def test_eval_of_a_released_checkpoint_needs_reference_statistics(tmp_path):
    from meanflow.evaluation import evaluate_run

    torch.save(official_state(), tmp_path / "iMF-test.pth")
    with pytest.raises(ValueError, match="--fid-stats"):
        evaluate_run(tmp_path / "iMF-test.pth", omega=8.0, interval=(0.4, 0.65))


def test_from_pretrained_reads_released_imf_files(tmp_path):
    from meanflow.models import pretrained

    state = official_state(seed=4)
    torch.save(state, tmp_path / "iMF-test.pth")
    assert pretrained.detect(tmp_path / "iMF-test.pth") == "imf-official"
    loaded = pretrained.load_pretrained(tmp_path / "iMF-test.pth", input_size=8)
    assert loaded.format == "imf-official" and not loaded.model.training
    direct = load_official_imf(tmp_path / "iMF-test.pth", input_size=8)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    rebuilt = create(loaded.spec["name"], **loaded.spec["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    x, t, h, cond, y = inputs()
    with torch.no_grad():
        ref = official_forward(state, x, t, h, cond["omega"], cond["t_min"], cond["t_max"], y, heads=2)
        ours = pretrained.from_pretrained(tmp_path / "iMF-test.pth", verbose=False, input_size=8)(x, t - h, t, y, **cond)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_released_weights_are_recognised_by_content_whatever_their_name(tmp_path):
    """The iMF file under a name without the .pth suffix is still read as released weights, by sample's and
    eval's reader too (load_model gives the official meta: iMF latents, named normalisation)."""
    from meanflow.models.loading import load_model
    from meanflow.models.pretrained import detect

    torch.save(official_state(seed=6), tmp_path / "weights.bin")
    assert detect(tmp_path / "weights.bin") == "imf-official"
    model, meta = load_model(tmp_path / "weights.bin")
    direct = load_official_imf(tmp_path / "weights.bin")
    assert meta["objective"] == "imf" and meta["data"]["info"]["latent_norm"] == "imf"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
