"""Diffusion Transformer (DiT) backbone for MeanFlow, as in Peebles & Xie (2023) and the paper.

The image (or latent) is cut into p x p patches, embedded as tokens with a fixed 2-D sin-cos
position embedding, and processed by transformer blocks whose LayerNorms are modulated by the
conditioning vector c = emb_t(t) + emb_h(t - r) [+ emb_y(label)] ("adaLN-Zero": every
modulation and the final projection start at zero, so each block starts as the identity and
the network starts at u = 0). The tokens are finally projected back to patches.

Presets ("dit-b/4", ..., "dit-xl/2") follow the paper's sizes; the number after the slash
is the patch size.
"""
from __future__ import annotations

import torch
from torch import nn

from ..autodiff import dual
from .attention import attention
from ..autodiff.dual import Dual
from .embeddings import MeanFlowConditioning
from .registry import Family, register


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of integer positions: (N,) -> (N, dim), dim even."""
    freqs = 1.0 / 10_000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angles = positions.double()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D position embedding of a grid_h x grid_w token grid, row-major: (grid_h * grid_w, dim).

    The first half of the channels encodes the column (x), the second half the row (y), each as
    ``[sin, cos]``: the layout of MAE's and DiT's ``get_2d_sincos_pos_embed`` and of the official
    MeanFlow JAX code (its meshgrid puts the width coordinate first), so their weights load
    unchanged. dim must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (gh, gw) each
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


def modulate(x: torch.Tensor | Dual, shift: torch.Tensor | Dual, scale: torch.Tensor | Dual) -> torch.Tensor | Dual:
    """x * (1 + scale) + shift with per-sample shift, scale: x (B, N, D), shift/scale (B, D)."""
    return dual.addcmul(shift[:, None], x, 1 + scale[:, None])


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): non-overlapping p x p patches, linearly embedded."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = dual.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D), token-major in memory


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens through :func:`meanflow.models.attention.attention`."""

    def __init__(self, hidden: int, heads: int, backend: str | None = None):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = dual.Linear(hidden, 3 * hidden)
        self.proj = dual.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, heads, d_h)
        q, k, v = qkv.permute(0, 2, 3, 1, 4).unbind(1)  # (B, heads, N, d_h) each
        out = attention(q, k, v, self.backend)  # (B, heads, N, d_h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: c modulates both LayerNorms and gates both branches."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.norm1 = dual.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, heads, backend)
        self.norm2 = dual.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            dual.Linear(hidden, mlp_hidden), dual.GELU(approximate="tanh"), dual.Dropout(dropout), dual.Linear(mlp_hidden, hidden)
        )
        self.ada = nn.Sequential(dual.SiLU(), dual.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor | Dual, c: torch.Tensor | Dual) -> torch.Tensor | Dual:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # (B, D) each
        x = dual.addcmul(x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1)))  # (B, N, D)
        return dual.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm2(x), shift2, scale2)))  # (B, N, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its p x p x C patch."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = dual.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(dual.SiLU(), dual.Linear(hidden, 2 * hidden))
        self.linear = dual.Linear(hidden, patch * patch * out_channels)

    def forward(self, x: torch.Tensor | Dual, c: torch.Tensor | Dual) -> torch.Tensor | Dual:
        shift, scale = self.ada(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p * p * C)


class DiT(nn.Module):
    """u(z, r, t, labels): (B, C, H, W) -> (B, C, H, W), a DiT conditioned on (t, t - r) and a label.

    Args:
        in_channels: C, channels of the input (and output).
        input_size: H = W, or (H, W); each must be divisible by ``patch``.
        num_classes: number of classes; 0 for an unconditional model. Label ``num_classes`` is
            the null class, and ``labels=None`` means null for a class-conditional model.
        depth, hidden, heads, patch, mlp_ratio: transformer size.
        dropout: dropout inside the MLPs (0 in the paper).
        attention_backend: see :mod:`meanflow.models.attention`; None follows $MEANFLOW_ATTENTION.

    z and t may be :class:`meanflow.autodiff.dual.Dual` values (the MeanFlow JVP rides along the forward).
    """

    supports_dual = True

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int | tuple[int, int] = 32,
        num_classes: int = 0,
        depth: int = 12,
        hidden: int = 768,
        heads: int = 12,
        patch: int = 2,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_backend: str | None = None,
    ):
        super().__init__()
        height, width = _pair(input_size)
        if min(in_channels, height, width, depth, hidden, heads, patch) < 1:
            raise ValueError("DiT sizes (in_channels, input_size, depth, hidden, heads, patch) must be >= 1")
        if height % patch or width % patch:
            raise ValueError(f"DiT input size {height}x{width} is not divisible by the patch size {patch}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"DiT hidden width {hidden} must be divisible by 4 and by the number of heads {heads}")
        self.in_channels, self.input_size, self.patch = in_channels, (height, width), patch
        self.num_classes = num_classes
        self.grid = (height // patch, width // patch)
        self.patch_embed = PatchEmbed(in_channels, hidden, patch)
        self.register_buffer("pos_embed", sincos_2d(hidden, *self.grid), persistent=False)  # (N, D)
        self.cond = MeanFlowConditioning(hidden, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, dropout, attention_backend) for _ in range(depth))
        self.final = FinalLayer(hidden, patch, in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linear layers, N(0, 0.02) embedders, zero adaLN modulations and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.patch_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        for embedder in (self.cond.t_embed, self.cond.h_embed):
            for layer in (embedder.mlp[0], embedder.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
        if self.cond.y_embed is not None:
            nn.init.normal_(self.cond.y_embed.table.weight, std=0.02)
        for ada in [block.ada[-1] for block in self.blocks] + [self.final.ada[-1], self.final.linear]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    def unpatchify(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        """(B, N, p * p * C) tokens -> (B, C, H, W) image."""
        return unpatchify(x, self.grid, self.patch, self.in_channels)

    def forward(
        self, z: torch.Tensor | Dual, r: torch.Tensor, t: torch.Tensor | Dual, labels: torch.Tensor | None = None
    ) -> torch.Tensor | Dual:
        check_image(z, self.in_channels, self.input_size, "DiT")
        x = self.patch_embed(z) + self.pos_embed.to(z.dtype)  # (B, N, D)
        c = self.cond(r, t, labels)  # (B, D)
        for block in self.blocks:
            x = block(x, c)  # (B, N, D)
        x = self.final(x, c)  # (B, N, p * p * C)
        return self.unpatchify(x)  # (B, C, H, W)


def unpatchify(x: torch.Tensor | Dual, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor | Dual:
    """(B, gh * gw, p * p * C) tokens, row-major, each a (p, p, C) patch -> (B, C, gh * p, gw * p) image."""
    (gh, gw), p, c = grid, patch, channels
    x = x.reshape(x.shape[0], gh, gw, p, p, c)  # (B, gh, gw, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, gh * p, gw * p)  # (B, C, H, W)


def check_image(z: torch.Tensor | Dual, channels: int, size: tuple[int, int], family: str) -> None:
    """Raise ValueError unless z has shape (B, channels, *size)."""
    if z.ndim != 4 or tuple(z.shape[1:]) != (channels, *size):
        raise ValueError(
            f"{family} built for inputs of shape (B, {channels}, {size[0]}, {size[1]}) got {tuple(z.shape)}; "
            "set in_channels / input_size to match the data"
        )


FAMILY = Family(DiT, input_kind="images", example={"in_channels": 4, "input_size": 32, "num_classes": 1000})
# name: (depth, hidden, heads, patch); the paper's sizes plus small ones for CPU work.
DIT_PRESETS = {
    "dit-tiny/2": (4, 128, 4, 2),
    "dit-s/2": (12, 384, 6, 2),
    "dit-s/4": (12, 384, 6, 4),
    "dit-b/4": (12, 768, 12, 4),
    "dit-b/2": (12, 768, 12, 2),
    "dit-m/2": (16, 1024, 16, 2),
    "dit-l/2": (24, 1024, 16, 2),
    "dit-xl/2": (28, 1152, 16, 2),
}


def _register_preset(name: str, depth: int, hidden: int, heads: int, patch: int) -> None:
    def build(**kwargs) -> DiT:
        return DiT(**{"depth": depth, "hidden": hidden, "heads": heads, "patch": patch, **kwargs})

    build.__doc__ = f"{name}: DiT with depth {depth}, hidden {hidden}, {heads} heads, patch {patch}."
    register(name, FAMILY)(build)


for _name, _size in DIT_PRESETS.items():
    _register_preset(_name, *_size)
