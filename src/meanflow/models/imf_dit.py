"""The improved MeanFlow (iMF) network: a DiT with in-context conditioning and two heads.

Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows" (arXiv 2512.02012); official code
Lyy-iiis/imeanflow (``models/imfDiT.py``). Differences from the MeanFlow DiT (``dit.py``):

* No adaLN. The conditions enter as prefix tokens of the sequence, each group a learned token
  table plus one embedder output added to every token of the group:
  8 class tokens, 4 guidance-scale tokens (the embedder sees 1 - 1/omega), 2 + 2 tokens for the
  guidance interval (t_min, t_max) and 4 tokens for h = t - r. The network never sees t itself.
* Transformer blocks: pre-RMSNorm, bias-free q/k/v/out projections, RMSNorm on q and k per head,
  1-D rotary position embedding over the whole sequence (prefix and patches, theta 1e4, adjacent
  channel pairs), SwiGLU MLP (hidden 8/3 of the width, bias-free), and a zero-initialised
  per-channel gate on each residual branch.
* ``depth - head_depth`` shared blocks, then a u-head (average velocity) and an auxiliary v-head
  (instantaneous velocity) of ``head_depth`` blocks each, with their own final RMSNorm + linear.
  The v-head serves training only (the iMF target); inference models are built without it
  (``v_head=False``), as the released checkpoints are.

Module and parameter names follow the official PyTorch port (branch ``torch``), so its
checkpoints map onto this model by renaming alone (:mod:`meanflow.models.imf_weights`).
All layers take :class:`~meanflow.autodiff.dual.Dual` values: du/dt rides along the forward pass.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..autodiff import dual
from ..autodiff.dual import Dual
from .attention import attention
from .dit import PatchEmbed, check_image, unpatchify
from .embeddings import TimestepEmbedder
from .registry import Family, register

# In-context prefix: (group name, number of tokens), in sequence order.
PREFIX = (("class", 8), ("omega", 4), ("t_min", 2), ("t_max", 2), ("time", 4))


def rope_angles(head_dim: int, tokens: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles n * theta^(-2i / head_dim): (tokens, head_dim / 2) each, float64
    (the network casts them to its weights' dtype, so a float64 network is float64 throughout)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
    angles = torch.arange(tokens, dtype=torch.float64)[:, None] * freqs[None]  # (tokens, d/2)
    return angles.cos(), angles.sin()


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), all bias-free: (..., D) -> (..., D)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.w1 = dual.Linear(hidden, mlp_hidden, bias=False)
        self.w3 = dual.Linear(hidden, mlp_hidden, bias=False)
        self.w2 = dual.Linear(mlp_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        return self.w2(dual.swiglu(self.w1(x), self.w3(x)))


class RoPEAttention(nn.Module):
    """Self-attention with bias-free projections, per-head RMSNorm on q and k, then rotary embedding."""

    def __init__(self, hidden: int, heads: int, backend: str | None = None):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, hidden // heads, backend
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (dual.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.q_norm = dual.RMSNorm(self.head_dim)
        self.k_norm = dual.RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor | Dual, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | Dual:
        b, n, d = x.shape
        split = lambda y: y.reshape(b, n, self.heads, self.head_dim)  # noqa: E731  (B, N, heads, d_h)
        q = dual.rotary(self.q_norm(split(self.q_proj(x))), cos, sin)
        k = dual.rotary(self.k_norm(split(self.k_proj(x))), cos, sin)
        v = split(self.v_proj(x))
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.backend)  # (B, heads, N, d_h)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class IMFBlock(nn.Module):
    """x + attn_scale * attn(norm1(x)), then x + mlp_scale * mlp(norm2(x)); the scales start at zero."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 8 / 3, backend: str | None = None):
        super().__init__()
        self.norm1 = dual.RMSNorm(hidden)
        self.attn = RoPEAttention(hidden, heads, backend)
        self.norm2 = dual.RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, int(hidden * mlp_ratio))
        self.attn_scale = nn.Parameter(torch.zeros(hidden))
        self.mlp_scale = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor | Dual, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | Dual:
        x = dual.addcmul(x, self.attn(self.norm1(x), cos, sin), self.attn_scale)  # (B, L, D)
        return dual.addcmul(x, self.mlp(self.norm2(x)), self.mlp_scale)  # (B, L, D)


class IMFFinalLayer(nn.Module):
    """RMSNorm, then a linear map from each token to its p x p x C patch (zero-initialised)."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = dual.RMSNorm(hidden)
        self.linear = dual.Linear(hidden, patch * patch * out_channels)

    def forward(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        return self.linear(self.norm(x))  # (B, N, p * p * C)


class IMFDiT(nn.Module):
    """u(z, r, t, labels, omega, t_min, t_max) and the auxiliary v: (B, C, H, W) -> (B, C, H, W).

    Args:
        in_channels, input_size, num_classes: data shape and classes (label ``num_classes`` is the
            null class; ``labels=None`` means null).
        depth: shared blocks + u-head blocks (the official count; the v-head adds ``head_depth``).
        hidden, heads, patch, mlp_ratio: transformer size.
        head_depth: blocks in each head (8 in every official preset).
        v_head: build the auxiliary v-head (training); inference models leave it out.
        token_init, embedding_init, weight_init: the official initialisation constants: learned
            tokens and the label table ~ N(0, c / sqrt(hidden)), linear weights ~ N(0, c / sqrt(fan_in)).
        attention_backend: see :mod:`meanflow.models.attention`.
    """

    supports_dual = True
    guidance_input = True
    preset: str | None = None  # the registered preset name, set by ``create``

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int | tuple[int, int] = 32,
        num_classes: int = 1000,
        depth: int = 12,
        hidden: int = 768,
        heads: int = 12,
        patch: int = 2,
        head_depth: int = 8,
        mlp_ratio: float = 8 / 3,
        v_head: bool = True,
        token_init: float = 1.0,
        embedding_init: float = 1.0,
        weight_init: float = 0.32,
        attention_backend: str | None = None,
    ):
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if min(in_channels, height, width, depth, hidden, heads, patch, head_depth) < 1 or num_classes < 0:
            raise ValueError("iMF DiT sizes (in_channels, input_size, depth, hidden, heads, patch, head_depth) must be >= 1")
        if head_depth > depth:
            raise ValueError(f"iMF DiT head_depth {head_depth} exceeds depth {depth} (depth counts shared + u-head blocks)")
        if height % patch or width % patch:
            raise ValueError(f"iMF DiT input size {height}x{width} is not divisible by the patch size {patch}")
        if hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"iMF DiT hidden width {hidden} must split into {heads} heads of even width (rotary pairs)")
        self.in_channels, self.input_size, self.patch, self.num_classes = in_channels, (height, width), patch, num_classes
        self.grid = (height // patch, width // patch)
        self.x_embedder = PatchEmbed(in_channels, hidden, patch)
        self.h_embedder = TimestepEmbedder(hidden)
        self.omega_embedder = TimestepEmbedder(hidden)
        self.cfg_t_start_embedder = TimestepEmbedder(hidden)
        self.cfg_t_end_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)
        counts = dict(PREFIX)
        self.class_tokens = nn.Parameter(torch.empty(counts["class"], hidden))
        self.omega_tokens = nn.Parameter(torch.empty(counts["omega"], hidden))
        self.t_min_tokens = nn.Parameter(torch.empty(counts["t_min"], hidden))
        self.t_max_tokens = nn.Parameter(torch.empty(counts["t_max"], hidden))
        self.time_tokens = nn.Parameter(torch.empty(counts["time"], hidden))
        self.prefix_tokens = sum(counts.values())
        cos, sin = rope_angles(hidden // heads, self.prefix_tokens + self.grid[0] * self.grid[1])
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, d_h / 2), float64 until the model is cast
        self.register_buffer("rope_sin", sin, persistent=False)
        block = lambda: IMFBlock(hidden, heads, mlp_ratio, attention_backend)  # noqa: E731
        self.shared_blocks = nn.ModuleList(block() for _ in range(depth - head_depth))
        self.u_heads = nn.ModuleList(block() for _ in range(head_depth))
        self.u_final_layer = IMFFinalLayer(hidden, patch, in_channels)
        self.v_heads = nn.ModuleList(block() for _ in range(head_depth)) if v_head else None
        self.v_final_layer = IMFFinalLayer(hidden, patch, in_channels) if v_head else None
        self.reset_parameters(token_init, embedding_init, weight_init)

    @property
    def has_v_head(self) -> bool:
        return self.v_heads is not None

    def default_guidance(self, steps: int) -> tuple[float, tuple[float, float]]:
        """(omega, (t_min, t_max)) used when sampling at ``steps`` NFE without them: the official
        settings for the released presets, else omega 1 on [0, 1] (no guidance)."""
        return recommended_guidance(self.preset, steps) or (1.0, (0.0, 1.0))

    def reset_parameters(self, token_init: float = 1.0, embedding_init: float = 1.0, weight_init: float = 0.32) -> None:
        """The official initialisation (``TorchLinear`` "scaled_variance", zero gates and outputs)."""
        init_in_context(self, token_init, embedding_init, weight_init)
        conv = self.x_embedder.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)

    def forward(
        self,
        z: torch.Tensor | Dual,
        r: torch.Tensor,
        t: torch.Tensor | Dual,
        labels: torch.Tensor | None = None,
        *,
        omega: torch.Tensor | float | None = None,
        t_min: torch.Tensor | float | None = None,
        t_max: torch.Tensor | float | None = None,
        return_v: bool = False,
    ) -> torch.Tensor | Dual | tuple[torch.Tensor | Dual, torch.Tensor]:
        """u (B, C, H, W), or (u, v) with ``return_v=True`` from one pass of the shared blocks.

        r, t: (B,); only h = t - r reaches the network. omega, t_min, t_max: (B,) tensors or numbers
        (None: omega 1, interval (0, 1)). With Dual z and t, u is a Dual (du/dt in its tangent) and v a
        plain tensor: the v-head runs on the primal only, since the iMF target needs no du/dt of v.
        """
        check_image(z, self.in_channels, self.input_size, "iMF DiT")
        if return_v and not self.has_v_head:
            raise ValueError("return_v=True needs the auxiliary v-head, but this iMF model was built without it (v_head=False, as for inference)")
        seq = self.sequence(z, t - r, labels, omega, t_min, t_max)  # (B, P + N, D)
        rope = self.rope()
        for block in self.shared_blocks:
            seq = block(seq, *rope)
        u = self._head(self.u_heads, self.u_final_layer, seq, rope)
        if not return_v:
            return u
        return u, self._head(self.v_heads, self.v_final_layer, dual.primal(seq), rope)

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables cos, sin (L, d_h / 2) in the dtype of the weights (built in float64)."""
        dtype = self.x_embedder.proj.weight.dtype
        return self.rope_cos.to(dtype), self.rope_sin.to(dtype)

    def sequence(self, z, h, labels, omega, t_min, t_max) -> torch.Tensor | Dual:
        """Prefix tokens (class, omega, t_min, t_max, h) then patch tokens: (B, P + N, D)."""
        return dual.cat([*prefix_groups(self, dual.primal(z), h, labels, omega, t_min, t_max), self.x_embedder(z)], dim=1)

    def _head(self, blocks: nn.ModuleList, final: IMFFinalLayer, seq: torch.Tensor | Dual,
              rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | Dual:
        """Head blocks, then the final layer on the patch tokens: (B, P + N, D) -> (B, C, H, W)."""
        for block in blocks:
            seq = block(seq, *rope)
        return unpatchify(final(seq[:, self.prefix_tokens:]), self.grid, self.patch, self.in_channels)


def prefix_groups(model: nn.Module, like: torch.Tensor, h, labels: torch.Tensor | None, omega, t_min, t_max) -> list:
    """The in-context prefix of the iMF and pMF networks, in sequence order: class (B, 8, D), omega
    (B, 4, D; the embedder sees 1 - 1/omega), t_min (B, 2, D), t_max (B, 2, D) and h (B, 4, D; a Dual
    for a Dual h). ``like`` (B, ...) gives batch, dtype and device; None labels are the null class,
    None omega / t_min / t_max are 1 / 0 / 1 (no guidance)."""
    batch = like.shape[0]
    if labels is None:
        labels = torch.full((batch,), model.num_classes, dtype=torch.long, device=like.device)
    omega, t_min, t_max = (_per_sample(value, default, batch, like, name) for value, default, name in
                           ((omega, 1.0, "omega"), (t_min, 0.0, "t_min"), (t_max, 1.0, "t_max")))
    return [
        model.class_tokens + model.y_embedder(labels)[:, None],
        model.omega_tokens + model.omega_embedder(1 - 1 / omega)[:, None],
        model.t_min_tokens + model.cfg_t_start_embedder(t_min)[:, None],
        model.t_max_tokens + model.cfg_t_end_embedder(t_max)[:, None],
        model.h_embedder(h)[:, None] + model.time_tokens,
    ]


def init_in_context(model: nn.Module, token_init: float, embedding_init: float, weight_init: float) -> None:
    """The official initialisation shared by the in-context DiTs (iMF, pMF), all but the patch embedder:
    prefix tokens and label table ~ N(0, token_init or embedding_init / sqrt(D)), embedder weights
    ~ N(0, embedding_init / sqrt(fan_in)) with zero biases, block weights ~ N(0, weight_init / sqrt(fan_in)),
    final layers zero (the residual gates are built at zero)."""
    hidden = model.class_tokens.shape[1]
    for group, _ in PREFIX:
        nn.init.normal_(getattr(model, f"{group}_tokens"), std=token_init / math.sqrt(hidden))
    nn.init.normal_(model.y_embedder.weight, std=embedding_init / math.sqrt(hidden))
    for embedder in (model.h_embedder, model.omega_embedder, model.cfg_t_start_embedder, model.cfg_t_end_embedder):
        for layer in (embedder.mlp[0], embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=embedding_init / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
    for blocks in filter(None, (model.shared_blocks, model.u_heads, model.v_heads)):
        for module in blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=weight_init / math.sqrt(module.in_features))
    for final in filter(None, (model.u_final_layer, model.v_final_layer)):
        nn.init.zeros_(final.linear.weight)
        nn.init.zeros_(final.linear.bias)


def _per_sample(value: torch.Tensor | float | None, default: float, batch: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A conditioning value as a (B,) tensor in ``like``'s dtype: None -> default, a number or 0-d tensor -> repeated."""
    if value is None:
        value = default
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a number or a tensor of shape ({batch},), got shape {tuple(value.shape)}")
    return value


# name: (depth, hidden, heads, patch); every preset has head_depth 8 except the CPU one.
# Official: imfDiT_B_2, imfDiT_M_2, imfDiT_L_2, imfDiT_XL_2 in models/imfDiT.py.
IMF_PRESETS = {
    "imf-b/2": (12, 768, 12, 2),
    "imf-m/2": (24, 768, 12, 2),
    "imf-l/2": (32, 1024, 16, 2),
    "imf-xl/2": (48, 1024, 16, 2),
}
# Small model for CPU work (8x8 digits): 2 shared blocks, heads of 2 blocks.
IMF_SMALL_PRESETS = {"imf-tiny/2": (4, 64, 4, 2, 2)}

# Official sampling settings of the released checkpoints, per NFE: (omega, (t_min, t_max)).
# From the official evaluation commands (README of the `torch` branch, configs/eval_config.yml).
RECOMMENDED_GUIDANCE = {
    "imf-b/2": {1: (8.0, (0.4, 0.65))},
    "imf-m/2": {1: (10.5, (0.4, 0.6))},
    "imf-l/2": {1: (10.5, (0.4, 0.6))},
    "imf-xl/2": {1: (8.0, (0.42, 0.62)), 2: (4.0, (0.36, 0.64))},
}


def recommended_guidance(preset: str | None, steps: int) -> tuple[float, tuple[float, float]] | None:
    """(omega, (t_min, t_max)) recommended for ``preset`` at ``steps`` NFE (the 1-NFE entry when that
    NFE has none), or None for presets without released settings."""
    table = RECOMMENDED_GUIDANCE.get(preset)
    return None if table is None else table.get(steps, table[1])


FAMILY = Family(IMFDiT, input_kind="images", example={"in_channels": 4, "input_size": 32, "num_classes": 1000})


def _register_preset(name: str, depth: int, hidden: int, heads: int, patch: int, head_depth: int = 8) -> None:
    def build(**kwargs) -> IMFDiT:
        model = IMFDiT(**{"depth": depth, "hidden": hidden, "heads": heads, "patch": patch, "head_depth": head_depth, **kwargs})
        model.preset = name
        return model

    build.__doc__ = f"{name}: iMF DiT, depth {depth} (+ {head_depth} v-head blocks), hidden {hidden}, {heads} heads, patch {patch}."
    register(name, FAMILY)(build)


for _name, _size in {**IMF_PRESETS, **IMF_SMALL_PRESETS}.items():
    _register_preset(_name, *_size)
