"""The pixel MeanFlow (pMF) network: a DiT on raw pixels that predicts the clean image.

Lu, Lu, Sun, Zhao, Jiang, Wang, Li, Geng, He, "One-step Latent-free Image Generation with Pixel
Mean Flows" (arXiv 2601.22158); official code Lyy-iiis/pMF (``models/pmfDiT.py``, JAX; the
H models on branch ``hsdp``). Written here in plain PyTorch ops, so the library's row tangent
(``jvp="rows"``, which ``jvp="auto"`` picks for any model without ``supports_dual``) gives it the
one-pass MeanFlow JVP.

* Input: (B, 3, H, W) pixels z_t. A bottleneck patch embedder: a p x p stride-p convolution to
  128 channels (256 for widths above 1024), then a 1 x 1 convolution to the width.
* In-context conditioning as in the iMF network (``imf_dit.py``): prefix tokens for the class
  (8), the guidance scale (4, the embedder sees 1 - 1/omega), the guidance interval (2 + 2) and
  h = t - r (4), each a learned token table plus one embedder output. A learned position table
  covers the whole sequence (prefix and patches).
* Blocks: pre-RMSNorm, bias-free q/k/v/out, per-head RMSNorm on q and k, 2-D rotary embedding on
  the patch tokens only (half of each head's channel pairs turn with the patch row, half with its
  column, theta 1e4), SwiGLU MLP (hidden 8/3 of the width), zero-initialised per-channel gates.
* ``depth - head_depth`` shared blocks, then a u-head and an auxiliary v-head of ``head_depth``
  blocks each (the v-head serves training only; inference models leave it out, ``v_head=False``).
* Output: each head predicts the clean image x_hat; the velocity is derived from it,
  u = (z_t - x_hat) / clip(t, 0.05, 1), so t reaches the network only there. ``denoise(z, h)`` returns
  x_hat itself.

The sampling prior of the official recipe is N(0, noise_scale^2) (1, 2 or 4 by model):
``noise_scale`` is an attribute of the network, which the samplers and the pMF objective read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dit import check_image, unpatchify
from .embeddings import TimestepEmbedder
from .imf_dit import PREFIX, init_in_context, prefix_groups
from .registry import Family, register

T_CLIP = 0.05  # u = (z - x_hat) / clip(t, T_CLIP, 1)
Guidance = torch.Tensor | float | None  # omega, t_min, t_max: (B,) or one number for the batch


def rope_2d(head_dim: int, grid: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2-D rotary angles of a grid x grid patch sequence: (grid^2, head_dim / 2) each.

    Channel pair k < head_dim / 4 turns by row * theta^(-4k / head_dim), pair head_dim / 4 + k by
    column * the same frequency; patches are numbered row-major.
    """
    quarter = head_dim // 4
    freqs = theta ** (-4 * torch.arange(quarter, dtype=torch.float64) / head_dim)  # (d/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, d/2)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the last ``N`` tokens: x (B, L, heads, d), cos / sin (N, d / 2); adjacent
    channels (2k, 2k + 1) form the pair k. The first L - N tokens pass unchanged."""
    n = cos.shape[0]
    prefix, tokens = x[:, : x.shape[1] - n], x[:, x.shape[1] - n:]
    pairs = tokens.unflatten(-1, (-1, 2))  # (B, N, heads, d/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (N, 1, d/2)
    turned = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)  # (B, N, heads, d)
    return torch.cat([prefix, turned], dim=1)


class BottleneckPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): a p x p stride-p convolution to ``bottleneck`` channels, then 1 x 1 to D."""

    def __init__(self, in_channels: int, hidden: int, patch: int, bottleneck: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck, kernel_size=patch, stride=patch)
        self.proj2 = nn.Conv2d(bottleneck, hidden, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)  # (B, N, D), patches row-major


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free: (..., D) -> (..., D)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, mlp_hidden, bias=False)
        self.w3 = nn.Linear(hidden, mlp_hidden, bias=False)
        self.w2 = nn.Linear(mlp_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Self-attention: bias-free projections, per-head RMSNorm on q and k, 2-D rotary on the patch tokens."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = rotate(self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim)), cos, sin)  # (B, L, heads, d_h)
        k = rotate(self.k_norm(self.k_proj(x).view(b, n, self.heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, L, d_h)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # (B, L, D)


class Block(nn.Module):
    """x + attn_scale * attn(norm1(x)), then x + mlp_scale * mlp(norm2(x)); the scales start at zero."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.RMSNorm(hidden, eps=1e-6)
        self.mlp = SwiGLU(hidden, int(hidden * mlp_ratio))
        self.attn_scale = nn.Parameter(torch.zeros(hidden))
        self.mlp_scale = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale  # (B, L, D)
        return x + self.mlp(self.norm2(x)) * self.mlp_scale


class FinalLayer(nn.Module):
    """RMSNorm, then a linear map from each token to its p x p x C patch (zero-initialised)."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))  # (B, N, p * p * C)


class MiT(nn.Module):
    """u(z, r, t, labels, omega, t_min, t_max) and the auxiliary v: (B, C, H, W) -> (B, C, H, W).

    Args:
        in_channels, input_size, num_classes: data shape and classes (label ``num_classes`` is the
            null class; ``labels=None`` means null). The input must be square (2-D rotary grid).
        depth: shared blocks + u-head blocks (the official count; the v-head adds ``head_depth``).
        hidden, heads, patch, mlp_ratio: transformer size; hidden / heads must be a multiple of 4.
        head_depth: blocks in each head (8 in every official preset).
        bottleneck: channels of the patch embedder's bottleneck (official: 128, 256 above width 1024).
        v_head: build the auxiliary v-head (training); inference models leave it out.
        noise_scale: standard deviation of the prior the model was trained with (samplers scale
            standard normal noise by it).
        token_init, embedding_init, weight_init: the official initialisation constants.
    """

    guidance_input = True
    preset: str | None = None  # the registered preset name, set by ``create``

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 256,
        num_classes: int = 1000,
        depth: int = 16,
        hidden: int = 768,
        heads: int = 12,
        patch: int = 16,
        head_depth: int = 8,
        bottleneck: int | None = None,
        mlp_ratio: float = 8 / 3,
        v_head: bool = True,
        noise_scale: float = 1.0,
        token_init: float = 1.0,
        embedding_init: float = 1.0,
        weight_init: float = 0.32,
    ):
        super().__init__()
        bottleneck = bottleneck or (128 if hidden <= 1024 else 256)
        if min(in_channels, input_size, depth, hidden, heads, patch, head_depth, bottleneck) < 1 or num_classes < 0:
            raise ValueError("pMF MiT sizes (in_channels, input_size, depth, hidden, heads, patch, head_depth, bottleneck) must be >= 1")
        if head_depth > depth:
            raise ValueError(f"pMF MiT head_depth {head_depth} exceeds depth {depth} (depth counts shared + u-head blocks)")
        if input_size % patch:
            raise ValueError(f"pMF MiT input size {input_size} is not divisible by the patch size {patch}")
        if hidden % heads or (hidden // heads) % 4:
            raise ValueError(f"pMF MiT hidden width {hidden} must split into {heads} heads of a width divisible by 4 (2-D rotary pairs)")
        if not noise_scale > 0:
            raise ValueError(f"pMF MiT noise_scale must be > 0, got {noise_scale}")
        self.in_channels, self.input_size, self.patch, self.num_classes = in_channels, (input_size, input_size), patch, num_classes
        self.noise_scale = float(noise_scale)
        side = input_size // patch
        self.grid = (side, side)
        self.x_embedder = BottleneckPatchEmbed(in_channels, hidden, patch, bottleneck)
        self.h_embedder, self.omega_embedder, self.cfg_t_start_embedder, self.cfg_t_end_embedder = (TimestepEmbedder(hidden) for _ in range(4))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)
        counts = dict(PREFIX)
        for group, count in PREFIX:
            setattr(self, f"{group}_tokens", nn.Parameter(torch.empty(count, hidden)))
        self.prefix_tokens = sum(counts.values())
        self.pos_embed = nn.Parameter(torch.empty(self.prefix_tokens + side * side, hidden))
        cos, sin = rope_2d(hidden // heads, side)
        self.register_buffer("rope_cos", cos, persistent=False)  # (N, d_h / 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        block = lambda: Block(hidden, heads, mlp_ratio)  # noqa: E731
        self.shared_blocks = nn.ModuleList(block() for _ in range(depth - head_depth))
        self.u_heads = nn.ModuleList(block() for _ in range(head_depth))
        self.u_final_layer = FinalLayer(hidden, patch, in_channels)
        self.v_heads = nn.ModuleList(block() for _ in range(head_depth)) if v_head else None
        self.v_final_layer = FinalLayer(hidden, patch, in_channels) if v_head else None
        self.reset_parameters(token_init, embedding_init, weight_init)

    @property
    def has_v_head(self) -> bool:
        return self.v_heads is not None

    def default_guidance(self, steps: int) -> tuple[float, tuple[float, float]]:
        """(omega, (t_min, t_max)) when sampling without them: the official 1-NFE settings of the
        released presets (:data:`RECOMMENDED_GUIDANCE`, any NFE), else omega 1 on [0, 1]."""
        return RECOMMENDED_GUIDANCE.get(self.preset, (1.0, (0.0, 1.0)))

    def reset_parameters(self, token_init: float = 1.0, embedding_init: float = 1.0, weight_init: float = 0.32) -> None:
        """The official initialisation (:func:`~meanflow.models.imf_dit.init_in_context`), positions
        ~ N(0, 0.02) and Xavier-uniform patch convolutions (fan in p * p * C, fan out D, as flax)."""
        init_in_context(self, token_init, embedding_init, weight_init)
        nn.init.normal_(self.pos_embed, std=0.02)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)

    def forward(
        self,
        z: torch.Tensor,
        r: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        omega: Guidance = None,
        t_min: Guidance = None,
        t_max: Guidance = None,
        return_v: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """u (B, C, H, W), or (u, v) with ``return_v=True``: (z - x_hat) / clip(t, 0.05, 1) of each head.

        r, t: (B,); the blocks see h = t - r, the output division t. omega, t_min, t_max: (B,)
        tensors or numbers (None: omega 1, interval (0, 1)).
        """
        x_u, x_v = self.denoise(z, t - r, labels, omega=omega, t_min=t_min, t_max=t_max, return_v=return_v)
        scale = t.clamp(T_CLIP, 1.0).to(z.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        u = (z - x_u) / scale
        return (u, (z - x_v) / scale) if return_v else u

    def denoise(self, z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None = None, *, omega: Guidance = None,
                t_min: Guidance = None, t_max: Guidance = None, return_v: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heads' predicted clean images (x_u, x_v), each (B, C, H, W), from z and h = t - r (B,);
        x_v is None without ``return_v``."""
        check_image(z, self.in_channels, self.input_size, "pMF MiT")
        if return_v and not self.has_v_head:
            raise ValueError("return_v=True needs the auxiliary v-head, but this pMF model was built without it (v_head=False, as for inference)")
        seq = self.sequence(z, h, labels, omega, t_min, t_max)  # (B, P + N, D)
        for block in self.shared_blocks:
            seq = block(seq, self.rope_cos, self.rope_sin)
        x_u = self._head(self.u_heads, self.u_final_layer, seq)
        return x_u, self._head(self.v_heads, self.v_final_layer, seq) if return_v else None

    def sequence(self, z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None, omega, t_min, t_max) -> torch.Tensor:
        """Prefix tokens (:func:`~meanflow.models.imf_dit.prefix_groups`) then patch tokens, plus positions: (B, P + N, D)."""
        return torch.cat([*prefix_groups(self, z, h, labels, omega, t_min, t_max), self.x_embedder(z)], dim=1) + self.pos_embed

    def _head(self, blocks: nn.ModuleList, final: FinalLayer, seq: torch.Tensor) -> torch.Tensor:
        """Head blocks, then the final layer on the patch tokens: (B, P + N, D) -> (B, C, H, W)."""
        for block in blocks:
            seq = block(seq, self.rope_cos, self.rope_sin)
        return unpatchify(final(seq[:, self.prefix_tokens:]), self.grid, self.patch, self.in_channels)


# name: (depth, hidden, heads, patch, official input size); head_depth 8.
# Official: pmfDiT_{B,L,H}_{16,32} in models/pmfDiT.py (H on branch hsdp).
PMF_PRESETS = {
    "pmf-b/16": (16, 768, 12, 16, 256),
    "pmf-l/16": (32, 1024, 16, 16, 256),
    "pmf-h/16": (48, 1280, 16, 16, 256),
    "pmf-b/32": (16, 768, 12, 32, 512),
    "pmf-l/32": (32, 1024, 16, 32, 512),
    "pmf-h/32": (48, 1280, 16, 32, 512),
}
# Small model for CPU work (8 x 8 or 16 x 16 images): 2 shared blocks, heads of 2 blocks, bottleneck 16.
PMF_SMALL_PRESETS = {"pmf-tiny/4": (4, 64, 4, 4, 16)}

# The official prior scale of each released model (configs/pMF_*_config.yml, `noise_scale`).
NOISE_SCALE = {"pmf-b/16": 1.0, "pmf-l/16": 1.0, "pmf-h/16": 2.0, "pmf-b/32": 2.0, "pmf-l/32": 4.0, "pmf-h/32": 4.0}

# Official 1-NFE sampling settings of the released checkpoints: (omega, (t_min, t_max)); from
# configs/eval_config.yml (main and hsdp) and the evaluation commands of the `torch` branch README.
RECOMMENDED_GUIDANCE = {
    "pmf-b/16": (8.5, (0.1, 0.7)),
    "pmf-l/16": (7.0, (0.2, 0.7)),
    "pmf-h/16": (7.0, (0.2, 0.6)),
    "pmf-b/32": (6.5, (0.1, 0.7)),
    "pmf-l/32": (7.5, (0.2, 0.6)),
    "pmf-h/32": (5.5, (0.1, 0.6)),
}

# One family per official resolution, so ``meanflow models`` counts each preset at its own size.
FAMILIES = {size: Family(MiT, input_kind="images", example={"in_channels": 3, "input_size": size, "num_classes": 1000})
            for size in (256, 512)}


def _register_preset(name: str, depth: int, hidden: int, heads: int, patch: int, size: int, head_depth: int = 8,
                     bottleneck: int | None = None) -> None:
    official = {"depth": depth, "hidden": hidden, "heads": heads, "patch": patch, "head_depth": head_depth,
                "input_size": size, "bottleneck": bottleneck, "noise_scale": NOISE_SCALE.get(name, 1.0)}

    def build(**kwargs) -> MiT:
        model = MiT(**{**official, **kwargs})
        model.preset = name
        return model

    build.__doc__ = (f"{name}: pMF MiT, depth {depth} (+ {head_depth} v-head blocks), hidden {hidden}, {heads} heads, "
                     f"patch {patch}, official input {size} x {size}, noise scale {official['noise_scale']}.")
    register(name, FAMILIES[512 if size == 512 else 256])(build)


for _name, _size in PMF_PRESETS.items():
    _register_preset(_name, *_size)
_register_preset("pmf-tiny/4", *PMF_SMALL_PRESETS["pmf-tiny/4"], head_depth=2, bottleneck=16)
