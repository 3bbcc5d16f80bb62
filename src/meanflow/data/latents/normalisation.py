"""Latent normalisation for the network: ``(z - shift) * scale`` with the VAE's scaling factor
(``data.latent_norm=vae``) or iMF's per-channel statistics (``imf``), and its inverse."""
from __future__ import annotations

from typing import Any

import torch

from ...config import LATENT_NORMALISATIONS

# How latents are normalised for the network: "vae" (z - shift) * scale with the VAE's own scaling
# factor (DiT, MeanFlow), or "imf": per-channel (z - mean_c) / std_c with the statistics of the
# official iMF code (utils/vae_util.py, SD-VAE ft-mse latents of ImageNet 256).
NORMALISATIONS = LATENT_NORMALISATIONS


IMF_LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)


IMF_LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)


def channel_statistics(info: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """(mean_c, std_c) of a per-channel normalisation: those ``info`` records, or iMF's when it names
    ``latent_norm: imf`` only (a released iMF model's meta); None for ``(z - shift) * scale``."""
    if "latent_mean" in info:
        return list(info["latent_mean"]), list(info["latent_std"])
    if info.get("latent_norm") == "imf":
        return list(IMF_LATENT_MEAN), list(IMF_LATENT_STD)
    return None


def normalise(z: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """VAE latents (B, C, h, w) -> network inputs, in place: per-channel ``(z - mean_c) / std_c`` for
    iMF's normalisation (:func:`channel_statistics`), else ``(z - shift) * scale``."""
    stats = channel_statistics(info)
    if stats is not None:
        mean, std = (torch.tensor(v, dtype=z.dtype, device=z.device)[:, None, None] for v in stats)
        return z.sub_(mean).div_(std)
    return z.sub_(float(info.get("latent_shift", 0.0))).mul_(float(info["latent_scale"]))


def denormalise(x: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """Network outputs (B, C, h, w) -> VAE latents: the inverse of :func:`normalise` (a new tensor)."""
    stats = channel_statistics(info)
    if stats is not None:
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in stats)
        return x * std + mean
    return x / float(info["latent_scale"]) + float(info.get("latent_shift", 0.0))
