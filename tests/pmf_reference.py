"""The official pMF network (Lyy-iiis/pMF, ``models/pmfDiT.py``) written again in flax for the tests.

Written here from a reading of the official code, independently of ``meanflow.models.mit``: the
same module tree and parameter names (so its params are a checkpoint in the official layout), NHWC
images, the rotary embedding done with complex numbers as the official code does, attention through
``flax.linen.dot_product_attention``. ``PixelMeanFlow`` holds it as ``net``, as the official
``pixelMeanFlow`` does, so ``init`` gives the ``{"net": ...}`` tree of the checkpoints.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

PREFIX = {"class_tokens": 8, "omega_tokens": 4, "t_min_tokens": 2, "t_max_tokens": 2, "time_tokens": 4}

# official configs: (depth, hidden, heads, patch, image size)
OFFICIAL = {
    "pmfDiT_B_16": (16, 768, 12, 16, 256), "pmfDiT_L_16": (32, 1024, 16, 16, 256), "pmfDiT_H_16": (48, 1280, 16, 16, 256),
    "pmfDiT_B_32": (16, 768, 12, 32, 512), "pmfDiT_L_32": (32, 1024, 16, 32, 512), "pmfDiT_H_32": (48, 1280, 16, 32, 512),
}


class Wrapped(nn.Module):
    """The official linear layer: a Dense stored under ``_flax_linear``."""

    features: int
    bias: bool = True

    def setup(self):
        self._flax_linear = nn.Dense(self.features, use_bias=self.bias)

    def __call__(self, x):
        return self._flax_linear(x)


class Norm(nn.Module):
    """RMSNorm with its scale stored as ``kernel``."""

    dim: int

    @nn.compact
    def __call__(self, x):
        scale = self.param("kernel", nn.initializers.ones, (self.dim,))
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


class Scalar(nn.Module):
    """Sinusoidal features (cos first, 256 of them) and a two-layer MLP in ``mlp.layers_0 / layers_2``."""

    hidden: int

    def setup(self):
        self.mlp = nn.Sequential([Wrapped(self.hidden), nn.silu, Wrapped(self.hidden)])

    def __call__(self, s):
        k = jnp.arange(128, dtype=jnp.float32)
        angle = s[:, None].astype(jnp.float32) * jnp.exp(-math.log(10000.0) * k / 128)[None]
        return self.mlp(jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1))


class Table(nn.Module):
    rows: int
    hidden: int

    @nn.compact
    def __call__(self, y):
        return self.param("embedding", nn.initializers.normal(1.0), (1, self.rows, self.hidden))[0, y]


class Labels(nn.Module):
    rows: int
    hidden: int

    def setup(self):
        self.embedding_table = Table(self.rows, self.hidden)

    def __call__(self, y):
        return self.embedding_table(y)


class Patches(nn.Module):
    patch: int
    bottleneck: int
    hidden: int

    def setup(self):
        self.proj1 = nn.Conv(self.bottleneck, (self.patch, self.patch), strides=(self.patch, self.patch))
        self.proj2 = nn.Conv(self.hidden, (1, 1))

    def __call__(self, x):
        x = self.proj2(self.proj1(x))  # (B, h, w, D)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def rope_table(head_dim: int, side: int):
    """(side^2, head_dim / 2) complex rotations: first half by the patch row, second by its column."""
    half = head_dim // 2
    freqs = 1.0 / 10000.0 ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half)
    pos = jnp.arange(side, dtype=jnp.float32)
    rows = jnp.broadcast_to((pos[:, None] * freqs)[:, None, :], (side, side, freqs.size))
    cols = jnp.broadcast_to((pos[:, None] * freqs)[None, :, :], (side, side, freqs.size))
    angle = jnp.concatenate([rows, cols], axis=-1).reshape(side * side, half)
    return jnp.cos(angle) + 1j * jnp.sin(angle)


def rope(x, table):
    """x (B, L, heads, d): channel pairs as complex numbers; the last side^2 tokens multiplied by the table."""
    c = x[..., 0::2] + 1j * x[..., 1::2]
    n = table.shape[0]
    c = jnp.concatenate([c[:, :-n], c[:, -n:] * table[None, :, None, :]], axis=1)
    return jnp.stack([c.real, c.imag], axis=-1).reshape(x.shape).astype(x.dtype)


class Attn(nn.Module):
    hidden: int
    heads: int

    def setup(self):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Wrapped(self.hidden, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = Norm(self.hidden // self.heads), Norm(self.hidden // self.heads)

    def __call__(self, x, table):
        b, n, _ = x.shape
        split = lambda a: a.reshape(b, n, self.heads, -1)  # noqa: E731
        q = rope(self.q_norm(split(self.q_proj(x))), table)
        k = rope(self.k_norm(split(self.k_proj(x))), table)
        out = nn.dot_product_attention(q, k, split(self.v_proj(x)))
        return self.out_proj(out.reshape(b, n, self.hidden))


class Mlp(nn.Module):
    hidden: int

    def setup(self):
        inner = int(self.hidden * 8 / 3)
        self.w1, self.w3, self.w2 = Wrapped(inner, bias=False), Wrapped(inner, bias=False), Wrapped(self.hidden, bias=False)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, table):
        attn_gate = self.param("attn_scale", nn.initializers.zeros, (self.hidden,))
        mlp_gate = self.param("mlp_scale", nn.initializers.zeros, (self.hidden,))
        x = x + Attn(self.hidden, self.heads, name="attn")(Norm(self.hidden, name="norm1")(x), table) * attn_gate
        return x + Mlp(self.hidden, name="mlp")(Norm(self.hidden, name="norm2")(x)) * mlp_gate


class Out(nn.Module):
    hidden: int
    size: int

    def setup(self):
        self.norm, self.linear = Norm(self.hidden), Wrapped(self.size)

    def __call__(self, x):
        return self.linear(self.norm(x))


class OfficialMiT(nn.Module):
    """pmfDiT: (x NHWC, t, h, omega, t_min, t_max, y) -> (u, v) NHWC; ``eval``: no v-head (v is zero)."""

    size: int
    patch: int
    hidden: int
    depth: int
    heads: int
    classes: int = 1000
    channels: int = 3
    head_depth: int = 8
    bottleneck: int = 0  # 0: the official rule, 128 up to width 1024, else 256 (the tests' small network sets its own)
    eval: bool = False

    @nn.compact
    def __call__(self, x, t, h, omega, t_min, t_max, y):
        side, d = self.size // self.patch, self.hidden
        seq = [self.param(name, nn.initializers.normal(0.02), (1, n, d)) for name, n in PREFIX.items()]
        seq[0] = seq[0] + Labels(self.classes + 1, d, name="y_embedder")(y)[:, None]
        for i, (name, value) in enumerate((("omega_embedder", 1 - 1 / omega), ("cfg_t_start_embedder", t_min),
                                           ("cfg_t_end_embedder", t_max), ("h_embedder", h)), start=1):
            seq[i] = seq[i] + Scalar(d, name=name)(value)[:, None]
        patches = Patches(self.patch, self.bottleneck or (128 if d <= 1024 else 256), d, name="x_embedder")(x)
        seq = jnp.concatenate([jnp.broadcast_to(s, (x.shape[0], *s.shape[1:])) for s in seq] + [patches], axis=1)
        seq = seq + self.param("pos_embed", nn.initializers.normal(0.02), (1, seq.shape[1], d))
        table = rope_table(d // self.heads, side)
        for i in range(self.depth - self.head_depth):
            seq = Layer(d, self.heads, name=f"shared_blocks_{i}")(seq, table)
        outs = []
        for head in ("u", "v")[: 1 if self.eval else 2]:
            s = seq
            for i in range(self.head_depth):
                s = Layer(d, self.heads, name=f"{head}_heads_{i}")(s, table)
            tokens = Out(d, self.patch**2 * self.channels, name=f"{head}_final_layer")(s[:, seq.shape[1] - side**2:])
            image = tokens.reshape(-1, side, side, self.patch, self.patch, self.channels)
            image = image.transpose(0, 1, 3, 2, 4, 5).reshape(-1, side * self.patch, side * self.patch, self.channels)
            outs.append((x - image) / jnp.clip(t, 0.05, 1.0)[:, None, None, None])
        return outs[0], (outs[1] if len(outs) > 1 else jnp.zeros_like(outs[0]))


class PixelMeanFlow(nn.Module):
    """The official wrapper: the network as ``net``."""

    config: dict

    def setup(self):
        self.net = OfficialMiT(**self.config)

    def __call__(self, *args):
        return self.net(*args)


def official_config(name: str, eval: bool = False) -> dict:
    depth, hidden, heads, patch, size = OFFICIAL[name]
    return dict(size=size, patch=patch, hidden=hidden, depth=depth, heads=heads, eval=eval)


def example_inputs(batch: int, size: int, channels: int = 3):
    """Dummy inputs of the right shapes for ``init`` / ``eval_shape``."""
    ones = jnp.ones((batch,), jnp.float32)
    return jnp.zeros((batch, size, size, channels), jnp.float32), ones, ones, ones * 2, ones * 0, ones, jnp.zeros((batch,), jnp.int32)


def param_count(config: dict) -> int:
    """Parameters of the official network of ``config``, from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(PixelMeanFlow(config).init, jax.random.PRNGKey(0), *example_inputs(1, config["size"]))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))
