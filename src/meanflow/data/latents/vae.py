"""The VAE: loading a diffusers ``AutoencoderKL`` (local folder, weights file or hub id; cached per
device) and decoding generated latents to images."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .normalisation import channel_statistics, denormalise

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_VAE_CACHE: dict[tuple[str, str], Any] = {}


def load_vae(name_or_path: str, device: str | torch.device = "cpu"):
    """A diffusers ``AutoencoderKL`` in eval mode on ``device``, cached per (name, device).

    ``name_or_path``: a local directory saved with ``save_pretrained``, a single weights file
    (.safetensors / .ckpt / .pt, loaded with ``from_single_file``), or a Hugging Face hub id such as
    ``stabilityai/sd-vae-ft-mse`` (needs network access or the Hugging Face cache).
    """
    key = (str(name_or_path), str(torch.device(device)))
    if key not in _VAE_CACHE:
        _VAE_CACHE[key] = _load_vae_uncached(str(name_or_path)).to(device).eval().requires_grad_(False)
    return _VAE_CACHE[key]


def _load_vae_uncached(name: str):
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise RuntimeError("latent data needs diffusers; install it with pip install 'meanflow[latent]'") from err
    path = Path(name).expanduser()
    if not path.exists() and not _HUB_ID.match(name):
        raise FileNotFoundError(f"VAE path {name!r} does not exist; pass a directory saved with save_pretrained, a weights file, or a hub id such as {DEFAULT_VAE}")
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path))
        return AutoencoderKL.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as err:
        if path.exists():
            raise RuntimeError(f"cannot load a diffusers AutoencoderKL from {name!r}: {err}") from err
        raise RuntimeError(
            f"cannot load the VAE {name!r}: there is no local folder of that name, and loading it from the Hugging Face hub "
            f"failed (no network and not in the Hugging Face cache?): "
            f"{str(err).rstrip('.')}. Download it once where there is network (huggingface-cli download {name} --local-dir vae) and pass "
            f"the local directory: meanflow encode ... --vae ./vae"
        ) from err


def _vae_reference(name: str) -> str:
    """What the metadata records: an absolute path for local VAEs, else the hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _latent_normalisation(vae) -> tuple[float, float]:
    """(scale, shift) with which latents are normalised: (z - shift) * scale (diffusers' convention)."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return scale, shift


@torch.no_grad()
def decode(latents: torch.Tensor, info: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 32,
           vae: str | None = None) -> torch.Tensor:
    """Normalised latents (N, C, h, w) -> images (N, 3, H, W) float32 in [-1, 1] on the CPU.

    Undoes the normalisation recorded in ``info`` (:func:`denormalise`) and runs the decoder
    of ``info["vae"]`` (or ``vae``, e.g. a local copy when the recorded path moved).
    """
    missing = [k for k, present in (("vae", vae or "vae" in info), ("latent_scale", "latent_scale" in info or channel_statistics(info) is not None)) if not present]
    if missing:
        raise ValueError(f"the data info has no {', '.join(missing)}: these samples do not come from a latent data set")
    model = load_vae(vae or info["vae"], device)
    images = []
    for chunk in latents.split(batch_size):
        z = denormalise(chunk.to(device=device, dtype=torch.float32), info)  # (b, C, h, w)
        images.append(model.decode(z).sample.clamp(-1.0, 1.0).float().cpu())  # (b, 3, H, W)
    return torch.cat(images)
