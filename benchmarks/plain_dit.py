"""A DiT written the way users write one: plain ``torch`` / ``nn`` ops, nothing from meanflow.

The benchmark (``bench_step.py --preset plain``) and the row-tangent tests use it to check that a
model the library has never seen trains with the one-pass MeanFlow JVP. adaLN-Zero blocks
(Peebles & Xie, 2023) conditioned on t and t - r; attention either through
``F.scaled_dot_product_attention`` with a timm-style ``qkv.reshape(B, N, 3, heads, d)`` or spelled
out as ``q @ k.transpose(-2, -1)`` and ``softmax``; patches in with a strided conv, out through
the original DiT's ``einsum`` unpatchify.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, fused)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2, self.drop = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(self.norm1(x) * (1 + scale1.unsqueeze(1)) + shift1.unsqueeze(1))
        h = self.norm2(x) * (1 + scale2.unsqueeze(1)) + shift2.unsqueeze(1)
        return x + gate2.unsqueeze(1) * self.fc2(self.drop(F.gelu(self.fc1(h), approximate="tanh")))


class PlainDiT(nn.Module):
    """u(z, r, t, labels): (B, C, H, W) -> (B, C, H, W).

    Args: channels, size (H = W), patch, dim, depth, heads, num_classes (0: unconditional; label
    num_classes is the null class), fused (SDPA or spelled-out attention), dropout (MLP),
    checkpoint (activation checkpointing around each block).
    """

    def __init__(self, channels: int = 4, size: int = 16, patch: int = 2, dim: int = 128, depth: int = 4, heads: int = 4,
                 num_classes: int = 0, fused: bool = True, dropout: float = 0.0, checkpoint: bool = False):
        super().__init__()
        self.channels, self.patch, self.num_classes, self.checkpoint = channels, patch, num_classes, checkpoint
        self.grid = size // patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.grid**2, dim))
        self.t_embed, self.h_embed = TimestepEmbedder(dim), TimestepEmbedder(dim)
        self.y_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.blocks = nn.ModuleList(Block(dim, heads, fused, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(z).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        c = self.t_embed(t) + self.h_embed(t - r)  # (B, D)
        if self.y_embed is not None:
            labels = torch.full_like(t, self.num_classes, dtype=torch.long) if labels is None else labels
            c = c + self.y_embed(labels)
        for block in self.blocks:
            x = checkpoint(block, x, c, use_reentrant=False) if self.checkpoint else block(x, c)
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        x = self.out(self.norm(x) * (1 + scale[:, None]) + shift[:, None])  # (B, N, p p C)
        return self.unpatchify(x)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p p C) -> (B, C, H, W)."""
        p, g, c = self.patch, self.grid, self.channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)
