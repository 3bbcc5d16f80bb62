"""Released and earlier weights: checkpoint formats written here in the official layouts.

The references are written in this file from a reading of the official code, independently of
the loader: the official PyTorch CIFAR-10 U-Net as a function of its own state dict (its key
names, its resampling buffers), the official JAX DiT as a flax module with the official module
tree, saved by ``flax.training.checkpoints`` in both the Orbax and the msgpack format, and the
facebookresearch DiT key layout. Bad inputs must raise PretrainedError and return nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meanflow.models import create
from meanflow.models.pretrained import PretrainedError, detect, from_pretrained, load_pretrained
from meanflow.runtime import checkpoint as ckpt

# --- the official CIFAR-10 U-Net (SongUNet as configured by py-meanflow), at a small size -------------

RES, CH, MULT, BLOCKS, ATTN, AUG = 8, 32, (1, 2), 1, (8,), 6  # the unet-tiny preset


def official_unet_state(seed: int) -> dict[str, torch.Tensor]:
    """A random state dict in SongUNet's layout: enc.{r}x{r}_conv/_down/_blockI, dec.{r}x{r}_in0/in1/_up/_blockI, aux_norm/conv."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    rnd = lambda *shape: 0.2 * torch.randn(*shape, generator=gen)  # noqa: E731
    emb, noise = 4 * CH, 2 * CH
    fir = torch.tensor([1.0, 3.0, 3.0, 1.0])
    fir = (torch.outer(fir, fir) / 64)[None, None]

    def block(name, cin, cout, attention=False, resample=False):
        sd.update({f"{name}.norm0.weight": 1 + rnd(cin), f"{name}.norm0.bias": rnd(cin), f"{name}.conv0.weight": rnd(cout, cin, 3, 3) / 3,
                   f"{name}.conv0.bias": rnd(cout), f"{name}.affine.weight": rnd(cout, emb) / 3, f"{name}.affine.bias": rnd(cout),
                   f"{name}.norm1.weight": 1 + rnd(cout), f"{name}.norm1.bias": rnd(cout), f"{name}.conv1.weight": rnd(cout, cout, 3, 3) / 3,
                   f"{name}.conv1.bias": rnd(cout)})
        if resample:
            sd[f"{name}.conv0.resample_filter"] = fir.clone()
        if cin != cout or resample:
            sd.update({f"{name}.skip.weight": rnd(cout, cin, 1, 1), f"{name}.skip.bias": rnd(cout)})
            if resample:
                sd[f"{name}.skip.resample_filter"] = fir.clone()
        if attention:
            sd.update({f"{name}.norm2.weight": 1 + rnd(cout), f"{name}.norm2.bias": rnd(cout), f"{name}.qkv.weight": rnd(3 * cout, cout, 1, 1),
                       f"{name}.qkv.bias": rnd(3 * cout), f"{name}.proj.weight": rnd(cout, cout, 1, 1), f"{name}.proj.bias": rnd(cout)})

    sd.update({"map_augment.weight": rnd(2 * noise, AUG), "map_layer0.weight": rnd(emb, 2 * noise), "map_layer0.bias": rnd(emb),
               "map_layer1.weight": rnd(emb, emb) / 3, "map_layer1.bias": rnd(emb)})
    cout, skips = CH, []
    sd.update({f"enc.{RES}x{RES}_conv.weight": rnd(CH, 3, 3, 3), f"enc.{RES}x{RES}_conv.bias": rnd(CH)})
    skips.append(CH)
    for level, mult in enumerate(MULT):
        res = RES >> level
        if level:
            block(f"enc.{res}x{res}_down", cout, cout, resample=True)
            skips.append(cout)
        for i in range(BLOCKS):
            block(f"enc.{res}x{res}_block{i}", cout, CH * mult, attention=res in ATTN)
            cout = CH * mult
            skips.append(cout)
    for level, mult in reversed(list(enumerate(MULT))):
        res = RES >> level
        if level == len(MULT) - 1:
            block(f"dec.{res}x{res}_in0", cout, cout, attention=True)
            block(f"dec.{res}x{res}_in1", cout, cout)
        else:
            block(f"dec.{res}x{res}_up", cout, cout, resample=True)
        for i in range(BLOCKS + 1):
            block(f"dec.{res}x{res}_block{i}", cout + skips.pop(), CH * mult, attention=i == BLOCKS and res in ATTN)
            cout = CH * mult
    sd.update({f"dec.{RES}x{RES}_aux_norm.weight": 1 + rnd(cout), f"dec.{RES}x{RES}_aux_norm.bias": rnd(cout),
               f"dec.{RES}x{RES}_aux_conv.weight": rnd(3, cout, 3, 3), f"dec.{RES}x{RES}_aux_conv.bias": rnd(3)})
    return sd


def official_unet_forward(sd, x, t, h, aug):
    """SongUNet.forward read off its state dict: [sin, cos] endpoint time features of t and h concatenated,
    plus the augmentation map, two-layer mapping; encoder / decoder in key order; FIR filters from the buffers."""
    def lin(name, v):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def gn(name, v):
        return F.group_norm(v, min(32, v.shape[1] // 4), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def conv(name, v, mode=None):
        f = sd.get(f"{name}.resample_filter")
        if mode == "down":
            v = F.conv2d(v, f.tile([v.shape[1], 1, 1, 1]), groups=v.shape[1], stride=2, padding=1)
        if mode == "up":
            v = F.conv_transpose2d(v, (4 * f).tile([v.shape[1], 1, 1, 1]), groups=v.shape[1], stride=2, padding=1)
        w = sd[f"{name}.weight"]
        return F.conv2d(v, w, sd[f"{name}.bias"], padding=w.shape[-1] // 2)

    def feats(s):
        freqs = (1 / 10000) ** (torch.arange(CH, dtype=torch.float64) / (CH - 1))
        a = s[:, None].double() * freqs
        return torch.cat([a.sin(), a.cos()], 1).float()

    emb = torch.cat([feats(t), feats(h)], 1) + aug @ sd["map_augment.weight"].T
    emb = F.silu(lin("map_layer1", F.silu(lin("map_layer0", emb))))

    def block(name, v):
        mode = "down" if name.endswith("_down") else "up" if name.endswith("_up") else None
        out = conv(f"{name}.conv0", F.silu(gn(f"{name}.norm0", v)), mode)
        out = F.silu(gn(f"{name}.norm1", out + lin(f"{name}.affine", emb)[:, :, None, None]))
        out = conv(f"{name}.conv1", out)
        out = (out + (conv(f"{name}.skip", v, mode) if f"{name}.skip.weight" in sd else v)) * math.sqrt(0.5)
        if f"{name}.qkv.weight" in sd:
            b, c = out.shape[:2]
            q, k, val = conv(f"{name}.qkv", gn(f"{name}.norm2", out)).flatten(2).chunk(3, dim=1)  # (B, C, N) each
            w = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / math.sqrt(c), dim=-1)
            a = torch.einsum("bnm,bcm->bcn", w, val).reshape(out.shape)
            out = (conv(f"{name}.proj", a) + out) * math.sqrt(0.5)
        return out

    names = list(dict.fromkeys(k.rsplit(".", 2)[0] if k.count(".") > 2 else k.rsplit(".", 1)[0] for k in sd if k.startswith(("enc.", "dec."))))
    skips = []
    for name in [n for n in names if n.startswith("enc.")]:
        x = conv(name, x) if name.endswith("_conv") else block(name, x)
        skips.append(x)
    for name in [n for n in names if n.startswith("dec.") and "aux" not in n]:
        if x.shape[1] != sd[f"{name}.norm0.weight"].shape[0]:
            x = torch.cat([x, skips.pop()], 1)
        x = block(name, x)
    aux = f"dec.{RES}x{RES}_aux"
    return conv(f"{aux}_conv", F.silu(gn(f"{aux}_norm", x)))


def write_official_cifar(path: Path, args=None) -> dict[str, dict[str, torch.Tensor]]:
    nets = {name: official_unet_state(seed) for seed, name in enumerate(("net", "net_ema", "net_ema1", "net_ema2"))}
    model = {f"{net}.{k}": v for net, sd in nets.items() for k, v in sd.items()}
    model["num_updates"] = torch.tensor(16)
    args = args or argparse.Namespace(ema_decay=0.9999, ema_decays=[0.99995, 0.9996], dropout=0.2, lr=6e-4)
    torch.save({"model": model, "optimizer": {}, "epoch": 7, "args": args}, path)
    return nets


def cifar_inputs():
    gen = torch.Generator().manual_seed(5)
    return (torch.randn(3, 3, RES, RES, generator=gen), torch.tensor([0.0, 0.3, 0.1]), torch.tensor([1.0, 0.3, 0.8]),
            torch.randn(3, AUG, generator=gen))


@pytest.mark.parametrize("weights, net", [("ema", "net_ema"), ("model", "net"), ("ema2", "net_ema2")])
def test_official_cifar_checkpoint_gives_the_official_unets_outputs(tmp_path, weights, net):
    path = tmp_path / "checkpoint-last.pth"
    nets = write_official_cifar(path)
    loaded = load_pretrained(path, preset="unet-tiny", weights=weights)
    assert loaded.format == "py-meanflow" and detect(path) == "py-meanflow"
    assert loaded.weights.startswith(net + " ")
    assert loaded.spec["kwargs"]["augment_dim"] == AUG and loaded.spec["kwargs"]["dropout"] == 0.2
    x, r, t, aug = cifar_inputs()
    with torch.no_grad():
        for a in (aug, None):
            ref = official_unet_forward(nets[net], x, t, t - r, aug if a is not None else torch.zeros_like(aug))
            out = loaded.model(x, r, t, augment_labels=a)
            assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_ema_is_the_default_and_is_stated(tmp_path, capsys):
    path = tmp_path / "ck.pth"
    write_official_cifar(path)
    from_pretrained(path, preset="unet-tiny")
    assert "weights: net_ema (EMA, decay 0.9999)" in capsys.readouterr().out


# --- the official JAX DiT, written with flax -----------------------------------------------------------

flax = pytest.importorskip("flax")
jax = pytest.importorskip("jax")
jnp = jax.numpy
linen = flax.linen


class TorchLinear(linen.Module):  # the official wrapper: a Dense inside "_flax_linear"
    features: int

    def setup(self):
        self._flax_linear = linen.Dense(self.features)

    def __call__(self, x):
        return self._flax_linear(x)


class Embedder(linen.Module):
    hidden: int

    def setup(self):
        self.mlp = linen.Sequential([TorchLinear(self.hidden), linen.silu, TorchLinear(self.hidden)])

    def __call__(self, t):
        half = 128
        freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t[:, None] * freqs[None]
        return self.mlp(jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1))


class LabelTable(linen.Module):
    rows: int
    hidden: int

    def setup(self):
        self._flax_embedding = linen.Embed(self.rows, self.hidden)

    def __call__(self, y):
        return self._flax_embedding(y)


class LabelEmbedder(linen.Module):
    rows: int
    hidden: int

    def setup(self):
        self.embedding_table = LabelTable(self.rows, self.hidden)

    def __call__(self, y):
        return self.embedding_table(y)


class Attention(linen.Module):
    dim: int
    heads: int

    def setup(self):
        self.qkv, self.proj = TorchLinear(3 * self.dim), TorchLinear(self.dim)

    def __call__(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = jax.nn.softmax((q * (c // self.heads) ** -0.5) @ k.transpose(0, 1, 3, 2), axis=-1)
        return self.proj((attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c))


class Mlp(linen.Module):
    dim: int

    def setup(self):
        self.fc1, self.fc2 = TorchLinear(4 * self.dim), TorchLinear(self.dim)

    def __call__(self, x):
        return self.fc2(linen.gelu(self.fc1(x), approximate=True))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(linen.Module):
    dim: int
    heads: int

    def setup(self):
        self.attn, self.mlp = Attention(self.dim, self.heads), Mlp(self.dim)
        self.adaLN_modulation = linen.Sequential([linen.silu, TorchLinear(6 * self.dim)])
        self.norm = linen.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)

    def __call__(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = jnp.split(self.adaLN_modulation(c), 6, axis=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm(x), s2, sc2))


class Final(linen.Module):
    dim: int
    out: int

    def setup(self):
        self.linear = TorchLinear(self.out)
        self.adaLN_modulation = linen.Sequential([linen.silu, TorchLinear(2 * self.dim)])
        self.norm = linen.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchEmbed(linen.Module):
    dim: int
    patch: int

    def setup(self):
        self.proj = linen.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch))

    def __call__(self, x):
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[3])


def pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D table: np.meshgrid(w, h) puts the column first; each half [sin, cos]."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1).astype(np.float32)


class DiT(linen.Module):
    size: int = 8
    patch: int = 2
    channels: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    classes: int = 10

    def setup(self):
        self.x_embedder = PatchEmbed(self.dim, self.patch)
        self.t_embedder, self.h_embedder = Embedder(self.dim), Embedder(self.dim)
        self.y_embedder = LabelEmbedder(self.classes + 1, self.dim)
        self.blocks = linen.Sequential([Block(self.dim, self.heads) for _ in range(self.depth)])
        self.final_layer = Final(self.dim, self.patch * self.patch * self.channels)

    def __call__(self, x, t, h, y):
        x = self.x_embedder(x) + pos_embed(self.dim, self.size // self.patch)
        c = self.t_embedder(t) + self.h_embedder(h) + self.y_embedder(y)
        for block in self.blocks.layers:
            x = block(x, c)
        x = self.final_layer(x, c)
        g, p = self.size // self.patch, self.patch
        x = x.reshape(x.shape[0], g, g, p, p, self.channels)
        return jnp.einsum("nhwpqc->nhpwqc", x).reshape(x.shape[0], g * p, g * p, self.channels)


class Net(linen.Module):  # the official MeanFlow module holds the DiT as "net"
    def setup(self):
        self.net = DiT()

    def __call__(self, *args):
        return self.net(*args)


def dit_inputs():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 8, 8, 4).astype(np.float32)
    t, h, y = np.array([0.9, 0.5, 0.3], np.float32), np.array([0.7, 0.0, 0.2], np.float32), np.array([1, 10, 3], np.int32)
    return x, t, h, y


@pytest.fixture(scope="module")
def jax_state():
    x, t, h, y = dit_inputs()
    shapes = jax.eval_shape(Net().init, jax.random.PRNGKey(0), x, t, h, y)["params"]  # the module tree, no compilation
    rng = np.random.RandomState(1)
    params = jax.tree_util.tree_map(lambda a: (0.05 * rng.randn(*a.shape)).astype(np.float32), shapes)
    ema = jax.tree_util.tree_map(lambda a: 0.9 * a, params)
    return {"step": 5, "params": params, "ema_params": ema, "opt_state": {}}


def save_flax(workdir: Path, state, orbax: bool) -> None:
    from flax.training import checkpoints

    previous = flax.config.flax_use_orbax_checkpointing
    flax.config.update("flax_use_orbax_checkpointing", orbax)
    try:
        checkpoints.save_checkpoint(str(workdir), state, int(state.get("step", 0)), overwrite=True)
    finally:
        flax.config.update("flax_use_orbax_checkpointing", previous)


def torch_dit_out(model, x, t, h, y):
    z = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(z, torch.from_numpy(t - h), torch.from_numpy(t), torch.from_numpy(y).long()).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def jax_reference():
    """The reference DiT's output as a function of its params, compiled once (op-by-op dispatch is slow)."""
    x, t, h, y = dit_inputs()
    return jax.jit(lambda params: Net().apply({"params": params}, x, t, h, y))


@pytest.mark.heavy
@pytest.mark.parametrize("orbax", [True, False])
def test_official_jax_checkpoint_gives_the_official_dits_outputs(tmp_path, jax_state, jax_reference, orbax):
    save_flax(tmp_path / "workdir", jax_state, orbax)
    x, t, h, y = dit_inputs()
    for weights, key in (("ema", "ema_params"), ("model", "params")):
        loaded = load_pretrained(tmp_path / "workdir", weights=weights, input_size=8)
        assert loaded.format == "flax-meanflow" and loaded.spec["name"] == "dit-tiny/2" and loaded.weights.startswith(key)
        ref = np.asarray(jax_reference(jax_state[key]))
        out = torch_dit_out(loaded.model, x, t, h, y)
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    single = next((tmp_path / "workdir").iterdir())  # the checkpoint itself, not its work directory
    assert load_pretrained(single, input_size=8).weights.startswith("ema_params")


def test_jax_checkpoint_without_params_is_refused(tmp_path, jax_state):
    save_flax(tmp_path / "wd", {"step": 1, "ema_params": jax_state["ema_params"]}, orbax=False)
    with pytest.raises(PretrainedError, match="no 'params'"):
        load_pretrained(tmp_path / "wd", input_size=8)


def test_jax_checkpoint_of_another_size_is_refused(tmp_path, jax_state):
    save_flax(tmp_path / "wd", jax_state, orbax=False)
    with pytest.raises(PretrainedError, match="not dit-s/2"):
        load_pretrained(tmp_path / "wd", preset="dit-s/2", input_size=8)


def test_truncated_msgpack_is_refused(tmp_path, jax_state):
    save_flax(tmp_path / "wd", jax_state, orbax=False)
    file = next((tmp_path / "wd").iterdir())
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(PretrainedError, match=r"could not be read as a flax checkpoint: ValueError: .*incomplete input"):
        load_pretrained(file, input_size=8)


@pytest.mark.parametrize("orbax", [True, False])
def test_jax_checkpoint_by_relative_path(tmp_path, jax_state, monkeypatch, orbax):
    """Orbax takes only absolute paths: a relative one is resolved first (it used to fail as "corrupt")."""
    save_flax(tmp_path / "ckpt", jax_state, orbax)
    monkeypatch.chdir(tmp_path)
    for relative in ("ckpt", "ckpt/checkpoint_5", "./ckpt/../ckpt/checkpoint_5"):
        loaded = load_pretrained(relative, input_size=8)
        assert loaded.format == "flax-meanflow" and loaded.info["step"] == 5


# --- facebookresearch DiT / willisma SiT as initialisation ------------------------------------------------

def dit_torch_state(learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """facebookresearch DiT key layout, depth 4, width 128, patch 2, 4 channels, 10 classes + null row."""
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    d, p, c = 128, 2, 4
    sd = {"pos_embed": torch.zeros(1, 16, d), "x_embedder.proj.weight": rnd(d, c, p, p), "x_embedder.proj.bias": rnd(d),
          "t_embedder.mlp.0.weight": rnd(d, 256), "t_embedder.mlp.0.bias": rnd(d), "t_embedder.mlp.2.weight": rnd(d, d),
          "t_embedder.mlp.2.bias": rnd(d), "y_embedder.embedding_table.weight": rnd(11, d)}
    for i in range(4):
        sd.update({f"blocks.{i}.attn.qkv.weight": rnd(3 * d, d), f"blocks.{i}.attn.qkv.bias": rnd(3 * d),
                   f"blocks.{i}.attn.proj.weight": rnd(d, d), f"blocks.{i}.attn.proj.bias": rnd(d),
                   f"blocks.{i}.mlp.fc1.weight": rnd(4 * d, d), f"blocks.{i}.mlp.fc1.bias": rnd(4 * d),
                   f"blocks.{i}.mlp.fc2.weight": rnd(d, 4 * d), f"blocks.{i}.mlp.fc2.bias": rnd(d),
                   f"blocks.{i}.adaLN_modulation.1.weight": rnd(6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": rnd(6 * d)})
    out = p * p * c * (2 if learn_sigma else 1)
    sd.update({"final_layer.linear.weight": rnd(out, d), "final_layer.linear.bias": rnd(out),
               "final_layer.adaLN_modulation.1.weight": rnd(2 * d, d), "final_layer.adaLN_modulation.1.bias": rnd(2 * d)})
    from meanflow.models.dit import sincos_2d

    sd["pos_embed"] = sincos_2d(d, 4, 4)[None]
    return sd


@pytest.mark.parametrize("h_embed", ["copy", "zero"])
def test_dit_checkpoint_initialises_our_dit_with_a_key_table(tmp_path, h_embed, capsys):
    sd = dit_torch_state()
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    model = from_pretrained(tmp_path / "DiT-tiny.pt", h_embed=h_embed)
    printed = capsys.readouterr().out
    assert "format dit-pytorch" in printed and re.search(r"blocks\.3\.mlp\.fc1\.weight +-> +blocks\.3\.mlp\.0\.weight +mapped", printed)
    assert "pos_embed" in printed and "dropped (fixed sin-cos table, the same as ours)" in printed
    ours = model.state_dict()
    assert torch.equal(ours["blocks.2.mlp.3.weight"], sd["blocks.2.mlp.fc2.weight"])
    assert torch.equal(ours["cond.h_embed.mlp.0.weight"], sd["t_embedder.mlp.0.weight"])
    h2 = ours["cond.h_embed.mlp.2.weight"]
    assert torch.equal(h2, sd["t_embedder.mlp.2.weight"]) if h_embed == "copy" else not h2.any()
    # learn_sigma: outputs laid out (p, q, 2C) with C fastest; the first C (the mean) are kept
    theirs = sd["final_layer.linear.weight"].reshape(2, 2, 8, 128)[:, :, :4].reshape(16, 128)
    assert torch.equal(ours["final.linear.weight"], theirs)


def test_dit_training_checkpoint_picks_ema_or_raw(tmp_path):
    raw, ema = dit_torch_state(), {k: v * 2 for k, v in dit_torch_state().items()}
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "0100000.pt")
    for weights, ref in (("ema", ema), ("model", raw)):
        loaded = load_pretrained(tmp_path / "0100000.pt", weights=weights)
        assert torch.equal(loaded.model.state_dict()["patch_embed.proj.weight"], ref["x_embedder.proj.weight"])


# --- our own runs and bad inputs ----------------------------------------------------------------------------

def test_our_run_directory(tmp_path):
    spec = {"name": "mlp", "kwargs": {"dim": 2, "width": 16, "depth": 2, "num_classes": 0}}
    torch.manual_seed(0)
    a, b = create("mlp", **spec["kwargs"]), create("mlp", **spec["kwargs"])
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 3, {"model.safetensors": a.state_dict(), "ema.safetensors": b.state_dict(),
                                                             "meta.json": {"model": spec, "step": 3}}, keep=2)
    loaded = load_pretrained(tmp_path / "run")
    assert loaded.format == "meanflow-run" and "ema.safetensors (step 3)" in loaded.weights
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(PretrainedError, match="not dit-b/4"):
        load_pretrained(tmp_path / "run", preset="dit-b/4")


def test_another_architecture_is_refused_and_nothing_returned(tmp_path):
    path = tmp_path / "ck.pth"
    write_official_cifar(path)
    with pytest.raises(PretrainedError, match="does not fit unet-small"):
        load_pretrained(path, preset="unet-small")


def test_truncated_torch_file_is_refused(tmp_path):
    path = tmp_path / "ck.pth"
    write_official_cifar(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PretrainedError, match="truncated or corrupt"):
        load_pretrained(path)


class Payload:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


MARK = Path("/tmp/meanflow-pickle-ran")  # replaced per test


def test_pickle_outside_the_allow_list_is_refused_without_running(tmp_path, monkeypatch):
    global MARK
    MARK = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    nets = official_unet_state(0)
    torch.save({"model": {f"net_ema.{k}": v for k, v in nets.items()}, "args": Payload()}, path)
    with pytest.raises(PretrainedError, match="not on the allow-list"):
        load_pretrained(path)
    assert not MARK.exists()


def test_unknown_file_says_which_formats_exist(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(PretrainedError, match="none of the known checkpoint formats"):
        load_pretrained(tmp_path / "x.bin")


def test_import_makes_a_run_that_sample_and_init_accept(tmp_path):
    from meanflow.cli import main
    from meanflow.config import load_config
    from meanflow.models.loading import load_model
    from meanflow.training.trainer import train

    path = tmp_path / "checkpoint-last.pth"
    nets = write_official_cifar(path)
    run = tmp_path / "imported"
    assert main(["import", str(path), "--out", str(run), "--preset", "unet-tiny"]) == 0
    model, meta = load_model(run)
    x, r, t, aug = cifar_inputs()
    with torch.no_grad():
        ref = official_unet_forward(nets["net_ema"], x, t, t - r, torch.zeros_like(aug))
        assert ((model(x, r, t) - ref).abs().max() / ref.abs().max()) < 1e-5
    assert meta["data"]["sample_shape"] == [3, RES, RES] and meta["imported"]["format"] == "py-meanflow"
    assert main(["sample", "--run", str(run), "--num", "4", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["import", str(path), "--out", str(run), "--preset", "unet-tiny"]) == 2  # never over an existing run
    assert main(["import", str(path), "--out", str(tmp_path / "x"), "--h-embed", "zero"]) == 2  # option of another format
    # train --init from the imported run: the first weights are the imported EMA weights, no optimizer state
    cfg = load_config("digits", ["model.name=unet-tiny", "model.kwargs={attn_resolutions: [8], augment_dim: 6, dropout: 0.2}",
                                 "data.name=npz", f"data.path={tmp_path / 'd.npz'}", "data.conditional=false", "train.steps=1",
                                 "train.batch_size=4", "train.lr=1.0e-12", "train.warmup_steps=0", "objective.omega=1.0",
                                 f"init.path={run}", "train.sample_every=0", "train.checkpoint_every=1"])
    np.savez(tmp_path / "d.npz", images=np.random.RandomState(0).randint(0, 255, (16, RES, RES, 3)).astype(np.uint8))
    out = train(cfg, tmp_path / "finetune")
    first, _ = load_model(out, ema=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first.state_dict().values(), model.state_dict().values()))


def test_state_mismatch_names_each_problem_once_and_truncates_long_lists():
    from meanflow.models.weights import state_mismatch
    own = {f"w{i}": torch.zeros(2) for i in range(5)} | {"b": torch.zeros(3)}
    assert state_mismatch(own, dict(own)) == []
    state = {f"w{i}": torch.zeros(2) for i in range(1, 5)} | {"b": torch.zeros(4), "x": torch.zeros(1), "y": torch.zeros(1)}
    assert state_mismatch(own, state, shown=1) == [
        "missing keys: w0", "unexpected keys: x ... (2 in all)", "wrong shapes: b: file (4,), model (3,)"]


def test_one_fill_step_names_every_problem_and_loads_nothing(tmp_path):
    """fill_model: missing, unexpected and misshaped keys are all named, and the model keeps its weights."""
    from meanflow.models.weights import fill_model

    model = create("mlp", dim=2, width=8, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in before.items()}
    first, last = sorted(state)[0], sorted(state)[-1]
    state.pop(first)
    state[last] = torch.ones(3, *state[last].shape)
    state["extra.weight"] = torch.ones(1)
    with pytest.raises(PretrainedError, match=rf"file.pt does not fit mlp \(missing keys: {re.escape(first)} \| unexpected keys: "
                                              rf"extra.weight \| wrong shapes: {re.escape(last)}: file \(3,.*\); pass another"):
        fill_model(model, state, "file.pt", "pass another", target="mlp")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fill_model(model, {k: torch.ones_like(v) for k, v in before.items()}, "file.pt")
    assert all(bool((v == 1).all()) for v in model.state_dict().values())


def test_a_safetensors_name_is_not_enough_to_be_a_run(tmp_path):
    """Detection by content: a file named model.safetensors beside a meta.json that is not safetensors is no run."""
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(PretrainedError, match="none of the known checkpoint formats"):
        detect(tmp_path / "model.safetensors")
