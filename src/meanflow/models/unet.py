"""DDPM++ U-Net (Song et al. 2021, as configured in EDM, Karras et al. 2022) for MeanFlow.

The design: a 3x3 stem convolution, then per resolution level a stack of residual blocks
(GroupNorm, SiLU, 3x3 conv; the conditioning vector adds a per-channel shift, or a scale and
shift, around the second GroupNorm; SiLU, dropout, zero-initialised 3x3 conv; residual sum
scaled by sqrt(1/2)),
with self-attention at chosen resolutions and 2x down/up sampling between levels. The decoder
mirrors the encoder, concatenating the encoder's skip activations, and ends with GroupNorm,
SiLU and a zero-initialised 3x3 conv, so the untrained network outputs u = 0.

By default the network is the official MeanFlow CIFAR-10 U-Net (Gsunshine/py-meanflow):

* resampling with the separable FIR filter [1, 3, 3, 1] / 8 (``resample_filter``): a depthwise
  stride-2 convolution down, a depthwise stride-2 transposed convolution up. The filter
  ``(1, 1)`` is average pooling and nearest upsampling (DDPM++'s own choice);
* time conditioning (``time_mlp="shared"``): sinusoidal features of t and of t - r, each
  ``2 * model_channels`` wide (sin half first, frequencies 10000^(-k / (n - 1))), concatenated;
  the augmentation labels (a bias-free linear map) and, for class-conditional models, a label
  embedding with a null row are added; then one shared MLP:
  ``emb = silu(W1 silu(W0 [f(t), f(t - r)] + ...))``, ``emb_mult * model_channels`` wide.

``time_mlp="separate"`` is our earlier conditioning, kept as an option (off by default) because
runs trained before the official layout was adopted use it: two DiT-style embedders
(``model_channels``-wide [cos, sin] features, each through its own MLP) summed with the label
embedding, then SiLU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..autodiff import dual
from .attention import attention
from .dit import check_image
from ..autodiff.dual import Dual
from .embeddings import LabelEmbedder, MeanFlowConditioning, sinusoidal_embedding
from .registry import Family, register

SKIP_SCALE = math.sqrt(0.5)
TIME_MLPS = ("shared", "separate")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, channels / 4) groups."""
    return dual.GroupNorm(max(1, min(32, channels // 4)), channels, eps=1e-6)


def conv(cin: int, cout: int, kernel: int, zero: bool = False) -> nn.Conv2d:
    """'Same'-padded convolution, Xavier-uniform (or zero) weights, zero bias."""
    layer = dual.Conv2d(cin, cout, kernel, padding=kernel // 2)
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def fir_kernel(taps: tuple[int, ...]) -> torch.Tensor:
    """The separable 2-D resampling filter of 1-D ``taps``: (k, k), summing to 1."""
    taps = tuple(float(a) for a in taps)
    if len(taps) < 2 or len(taps) % 2 or sum(taps) <= 0:
        raise ValueError(f"resample_filter must be an even number (>= 2) of taps with a positive sum, got {taps}")
    f = torch.tensor(taps, dtype=torch.float64, device="cpu") / sum(taps)  # (k,)
    return torch.outer(f, f).float()


def resample(x: torch.Tensor | Dual, mode: str | None, kernel: torch.Tensor) -> torch.Tensor | Dual:
    """(B, C, H, W) -> 2x down- ("down") or up-sampled ("up") with the FIR ``kernel`` (k, k), or unchanged (None).

    Down: depthwise convolution with stride 2 and padding (k - 1) / 2, (B, C, H/2, W/2). Up: depthwise
    transposed convolution with 4 * kernel, stride 2, same padding, (B, C, 2H, 2W). With the 2-tap
    kernel these are average pooling and nearest upsampling.
    """
    if mode is None:
        return x
    channels, pad = x.shape[1], (kernel.shape[-1] - 1) // 2
    if mode == "down":
        weight = kernel.to(x.dtype).expand(channels, 1, *kernel.shape)
        op = lambda a: F.conv2d(a, weight, stride=2, padding=pad, groups=channels)  # noqa: E731
    else:
        weight = (4 * kernel).to(x.dtype).expand(channels, 1, *kernel.shape)
        op = lambda a: F.conv_transpose2d(a, weight, stride=2, padding=pad, groups=channels)  # noqa: E731
    return x.map(op) if isinstance(x, Dual) else op(x)


class SpatialAttention(nn.Module):
    """Residual multi-head self-attention over the H * W positions of a feature map."""

    def __init__(self, channels: int, heads: int = 1, backend: str | None = None):
        super().__init__()
        if channels % heads:
            raise ValueError(f"U-Net attention: {channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.backend = backend
        self.norm = group_norm(channels)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj = conv(channels, channels, 1, zero=True)
        with torch.no_grad():
            self.qkv.weight.mul_(math.sqrt(0.2))  # EDM's attention initialisation

    def forward(self, x: torch.Tensor | Dual) -> torch.Tensor | Dual:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, N, d) each
        out = attention(q, k, v, self.backend)  # (B, heads, N, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return (x + self.proj(out)) * SKIP_SCALE  # (B, C, H, W)


class UNetBlock(nn.Module):
    """Residual block (B, cin, H, W) -> (B, cout, H', W') conditioned on emb, with optional attention.

    ``mode`` "down" / "up" halves / doubles the resolution (H' = H / 2 or 2 H) with the FIR
    filter ``resample_filter``, None keeps it. The embedding gives a per-channel shift added before the second GroupNorm (DDPM++), or with
    ``adaptive_scale`` a scale and shift applied after it: norm(h) * (1 + scale) + shift (ADM).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        mode: str | None = None,
        attend: bool = False,
        dropout: float = 0.0,
        adaptive_scale: bool = False,
        heads: int = 1,
        backend: str | None = None,
        resample_filter: tuple[int, ...] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.mode, self.adaptive_scale = mode, adaptive_scale
        self.register_buffer("kernel", fir_kernel(resample_filter), persistent=False)  # (k, k)
        self.norm0 = group_norm(cin)
        self.conv0 = conv(cin, cout, 3)
        self.affine = dual.Linear(emb_channels, 2 * cout if adaptive_scale else cout)
        self.norm1 = group_norm(cout)
        self.dropout = dual.Dropout(dropout)
        self.conv1 = conv(cout, cout, 3, zero=True)
        self.skip = conv(cin, cout, 1) if cin != cout or mode is not None else nn.Identity()
        self.attn = SpatialAttention(cout, heads, backend) if attend else nn.Identity()
        nn.init.xavier_uniform_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor | Dual, emb: torch.Tensor | Dual) -> torch.Tensor | Dual:
        h = self.conv0(resample(dual.silu(self.norm0(x)), self.mode, self.kernel))  # (B, cout, H', W')
        params = self.affine(emb)[:, :, None, None]  # (B, 2 cout or cout, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)  # (B, cout, 1, 1) each
            h = dual.addcmul(shift, self.norm1(h), 1 + scale)  # (B, cout, H', W')
        else:
            h = self.norm1(h + params)  # (B, cout, H', W')
        h = self.conv1(self.dropout(dual.silu(h)))  # (B, cout, H', W')
        x = (h + self.skip(resample(x, self.mode, self.kernel))) * SKIP_SCALE  # (B, cout, H', W')
        return self.attn(x)  # (B, cout, H', W')


class SharedTimeConditioning(nn.Module):
    """The official CIFAR-10 conditioning: (r, t, label, augment labels) -> (B, hidden), before the last SiLU.

    ``W1 silu(W0 ([f(t), f(t - r)] + A a + E[label]) + b0) + b1`` with f the ``noise_channels``-wide
    sinusoidal features (sin half first, endpoint frequencies), A a bias-free map of the
    augmentation labels a (B, augment_dim) and E a label table with a null row.
    """

    def __init__(self, hidden: int, noise_channels: int, num_classes: int = 0, augment_dim: int = 0):
        super().__init__()
        self.noise_channels, self.num_classes = noise_channels, num_classes
        self.augment = dual.Linear(augment_dim, 2 * noise_channels, bias=False) if augment_dim else None
        self.y_embed = LabelEmbedder(num_classes, 2 * noise_channels) if num_classes > 0 else None
        self.layer0 = dual.Linear(2 * noise_channels, hidden)
        self.layer1 = dual.Linear(hidden, hidden)
        for layer in (self.augment, self.layer0, self.layer1):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
        for layer in (self.layer0, self.layer1):
            nn.init.zeros_(layer.bias)

    def features(self, t: torch.Tensor | Dual) -> torch.Tensor | Dual:
        """(B,) -> (B, noise_channels) sinusoidal features in the layers' dtype."""
        out = sinusoidal_embedding(t, self.noise_channels, endpoint=True, sin_first=True)
        return out.to(self.layer0.weight.dtype)

    def forward(
        self, r: torch.Tensor, t: torch.Tensor | Dual, labels: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor | Dual:
        """r, t: (B,); labels: (B,) int64 or None (null); augment_labels: (B, augment_dim) or None (none)."""
        emb = dual.cat([self.features(t), self.features(t - r)], dim=1)  # (B, 2 noise)
        if self.y_embed is not None:
            if labels is None:
                labels = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.y_embed(labels)
        if augment_labels is not None:
            if self.augment is None:
                raise ValueError("augment_labels were given but the U-Net was built without augment_dim; set augment_dim")
            if augment_labels.shape != (t.shape[0], self.augment.in_features):
                raise ValueError(f"augment_labels must have shape ({t.shape[0]}, {self.augment.in_features}), got {tuple(augment_labels.shape)}")
            emb = emb + self.augment(augment_labels.to(self.layer0.weight.dtype))
        return self.layer1(dual.silu(self.layer0(emb)))  # (B, hidden)


class UNet(nn.Module):
    """u(z, r, t, labels): (B, C, H, W) -> (B, C, H, W), a DDPM++ U-Net conditioned on (t, t - r) and a label.

    Args:
        in_channels: C, channels of the input (and output).
        input_size: H = W, or (H, W); each divisible by 2^(len(channel_mult) - 1).
        num_classes: number of classes, 0 for unconditional; label ``num_classes`` is the null class
            and ``labels=None`` means null for a class-conditional model.
        model_channels: width of the first level; level i has model_channels * channel_mult[i].
        channel_mult: per-level width multipliers (one level per entry; 2x downsampling between).
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: feature-map sizes (H at that level) that get self-attention.
        dropout: dropout probability inside every residual block.
        adaptive_scale: condition each block by scale and shift (ADM) instead of shift only (DDPM++).
        attn_heads: attention heads (DDPM++ uses one).
        emb_mult: conditioning width is emb_mult * model_channels.
        attention_backend: see :mod:`meanflow.models.attention`; None follows $MEANFLOW_ATTENTION.
        resample_filter: 1-D taps of the separable down/up-sampling filter; (1, 3, 3, 1) official,
            (1, 1) average pooling / nearest upsampling.
        time_mlp: "shared" (official: both time embeddings concatenated through one MLP) or
            "separate" (our earlier layout, module docstring).
        augment_dim: width of the augmentation labels the network is told about (6 for the
            official EDM augmentation subset, :mod:`meanflow.data.augment`); 0 = none.

    z and t may be :class:`meanflow.autodiff.dual.Dual` values (the MeanFlow JVP rides along the forward).
    """

    supports_dual = True

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int | tuple[int, int] = 32,
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        adaptive_scale: bool = False,
        attn_heads: int = 1,
        emb_mult: int = 4,
        attention_backend: str | None = None,
        resample_filter: tuple[int, ...] = (1, 3, 3, 1),
        time_mlp: str = "shared",
        augment_dim: int = 0,
    ):
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        levels = len(channel_mult)
        if min(in_channels, height, width, model_channels, num_blocks, emb_mult, levels, *channel_mult) < 1:
            raise ValueError("U-Net sizes (in_channels, input_size, model_channels, channel_mult, num_blocks, emb_mult) must be >= 1")
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"U-Net input size {height}x{width} must be divisible by 2^{levels - 1} for {levels} levels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if time_mlp not in TIME_MLPS:
            raise ValueError(f"time_mlp must be one of {', '.join(TIME_MLPS)}, got {time_mlp!r}")
        if augment_dim < 0 or (augment_dim and time_mlp != "shared"):
            raise ValueError(f"augment_dim={augment_dim}: augmentation labels need augment_dim >= 0 and time_mlp='shared'")
        self.in_channels, self.input_size, self.num_classes = in_channels, (height, width), num_classes
        self.augment_dim = augment_dim
        emb_channels = emb_mult * model_channels
        if time_mlp == "shared":
            self.cond = SharedTimeConditioning(emb_channels, 2 * model_channels, num_classes, augment_dim)
        else:
            self.cond = MeanFlowConditioning(emb_channels, num_classes, frequency_dim=model_channels)
        block = dict(
            emb_channels=emb_channels, dropout=dropout, adaptive_scale=adaptive_scale, heads=attn_heads, backend=attention_backend,
            resample_filter=tuple(resample_filter),
        )

        self.stem = conv(in_channels, model_channels, 3)
        self.encoder = nn.ModuleList()
        skips, cout = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            res = height >> level
            if level > 0:
                self.encoder.append(UNetBlock(cout, cout, mode="down", **block))
                skips.append(cout)
            for _ in range(num_blocks):
                self.encoder.append(UNetBlock(cout, model_channels * mult, attend=res in attn_resolutions, **block))
                cout = model_channels * mult
                skips.append(cout)

        self.middle = nn.ModuleList([UNetBlock(cout, cout, attend=True, **block), UNetBlock(cout, cout, **block)])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = height >> level
            if level < levels - 1:
                self.decoder.append(UNetBlock(cout, cout, mode="up", **block))
            for index in range(num_blocks + 1):
                attend = index == num_blocks and res in attn_resolutions
                self.decoder.append(UNetBlock(cout + skips.pop(), model_channels * mult, attend=attend, **block))
                cout = model_channels * mult
        self.out_norm = group_norm(cout)
        self.out_conv = conv(cout, in_channels, 3, zero=True)

    def forward(
        self,
        z: torch.Tensor | Dual,
        r: torch.Tensor,
        t: torch.Tensor | Dual,
        labels: torch.Tensor | None = None,
        *,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor | Dual:
        """z: (B, C, H, W); r, t: (B,); labels: (B,) or None; augment_labels: (B, augment_dim) or None.

        ``augment_labels=None`` means "not augmented" (zero labels), as at sampling time.
        """
        check_image(z, self.in_channels, self.input_size, "U-Net")
        if isinstance(self.cond, SharedTimeConditioning):
            emb = dual.silu(self.cond(r, t, labels, augment_labels))  # (B, E)
        elif augment_labels is not None:
            raise ValueError("augment_labels need a U-Net with time_mlp='shared' and augment_dim > 0")
        else:
            emb = dual.silu(self.cond(r, t, labels))  # (B, E)
        x = self.stem(z)  # (B, C0, H, W)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)  # (B, C_l, H_l, W_l)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)  # (B, C_L, H_L, W_L)
        for block in self.decoder:
            if block.mode != "up":
                x = dual.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H_l, W_l)
            x = block(x, emb)  # (B, C_l, H_l, W_l)
        return self.out_conv(dual.silu(self.out_norm(x)))  # (B, C, H, W)


FAMILY = Family(UNet, input_kind="images", example={"in_channels": 3, "input_size": 32, "num_classes": 0})
# name: (model_channels, channel_mult, num_blocks, attn_resolutions, dropout)
UNET_PRESETS = {
    "unet-tiny": (32, (1, 2), 1, (8,), 0.0),
    "unet-small": (64, (1, 2, 2), 2, (16,), 0.0),
    "unet-cifar10": (128, (2, 2, 2), 4, (16,), 0.2),
}


def _register_preset(name: str, channels: int, mult: tuple[int, ...], blocks: int, attn: tuple[int, ...], dropout: float) -> None:
    def build(**kwargs) -> UNet:
        size = dict(model_channels=channels, channel_mult=mult, num_blocks=blocks, attn_resolutions=attn, dropout=dropout)
        return UNet(**{**size, **kwargs})

    build.__doc__ = f"{name}: DDPM++ U-Net, {channels} channels x {mult}, {blocks} blocks per level, attention at {attn}."
    register(name, FAMILY)(build)


for _name, _size in UNET_PRESETS.items():
    _register_preset(_name, *_size)
