"""Encoding an image folder into a latent cache (``meanflow encode``): ADM centre crop, posterior
moments of every image (and its mirror with ``--flip``), written shard by shard, resumable."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...runtime.files import atomic_path
from ..images import _list_image_files, _open_image
from .layout import FORMAT, FORMAT_VERSION, METADATA_FILE, read_metadata
from .vae import DEFAULT_VAE, _latent_normalisation, _vae_reference, load_vae

DEFAULT_IMAGE_SIZE = 256  # side of the ADM centre crop
DEFAULT_BATCH_SIZE = 64  # images per VAE call
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)  # processes decoding and cropping images; 0 = in the main process


def adm_center_crop(image, size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image to (size, size, 3) uint8 RGB.

    While the shorter side is at least 2 * size, halve the image with a BOX filter (cheap
    anti-aliasing); then resize with BICUBIC so the shorter side is exactly ``size``; then cut the
    central size x size square.
    """
    from PIL import Image

    if size < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (H', W', 3), min(H', W') == size
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> (uint8 (3, S, S) tensor, position), for a DataLoader with worker processes."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        array = adm_center_crop(_open_image(self.files[i]), self.size)  # (S, S, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), i


@torch.no_grad()
def _encode_moments(vae, images: torch.Tensor, flip: bool, device: torch.device) -> np.ndarray:
    """uint8 images (B, 3, S, S) -> fp16 posterior moments (B, V, 2, C, h, w); V = 2 with the mirror view."""
    x = images.to(device).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
    if flip:
        x = torch.cat([x, x.flip(-1)])  # (2B, 3, S, S)
    posterior = vae.encode(x).latent_dist
    moments = torch.stack([posterior.mean, posterior.std], dim=1)  # (VB, 2, C, h, w)
    views = 2 if flip else 1
    moments = moments.unflatten(0, (views, images.shape[0])).transpose(0, 1)  # (B, V, 2, C, h, w)
    return moments.to(torch.float16).cpu().numpy()


def encode_folder(
    source: str | Path, out: str | Path, vae: str = DEFAULT_VAE, image_size: int = DEFAULT_IMAGE_SIZE, flip: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE, shard_size: int = DEFAULT_SHARD_SIZE, device: str | torch.device = "cpu",
    num_workers: int = DEFAULT_NUM_WORKERS, progress: bool = True,
) -> dict[str, Any]:
    """Encode the images under ``source`` into a latent cache in ``out``; return its metadata.

    Shards are written atomically (temporary file + rename); ``latents.json`` is written first with
    ``"complete": false`` and rewritten at the end. Running the same command again after an
    interruption keeps the finished shards and encodes the rest.
    """
    source, out = Path(source), Path(out)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = decode in the main process), got {num_workers}")
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {str(source)!r} does not exist")
    for name, value in (("image size", image_size), ("batch size", batch_size), ("shard size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    files, labels, classes = _list_image_files(source)
    fingerprint = _fingerprint(source, files, labels, vae, image_size, flip, shard_size)
    resuming = _check_out(out, fingerprint)
    device = torch.device(device)
    model = load_vae(vae, device)
    scale, shift = _latent_normalisation(model)
    counts = [min(shard_size, len(files) - start) for start in range(0, len(files), shard_size)]
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False, "vae": _vae_reference(vae),
        "latent_scale": scale, "latent_shift": shift, "image_size": image_size, "preprocessing": "adm_center_crop",
        "posterior": "moments", "views": 2 if flip else 1, "dtype": "float16", "count": len(files),
        "num_classes": len(classes), "classes": classes, "source": str(source.resolve()), "fingerprint": fingerprint,
        "shards": [{"latents": f"shard-{k:05d}.npy", "labels": f"shard-{k:05d}.labels.npy", "count": n} for k, n in enumerate(counts)],
    }
    if not resuming:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / METADATA_FILE, meta)
    pending = [k for k, shard in enumerate(meta["shards"]) if not _shard_done(out, shard)]
    _encode_shards(model, files, labels, pending, meta, out, batch_size, shard_size, device, num_workers, progress)
    meta["latent_shape"] = list(np.load(out / meta["shards"][0]["latents"], mmap_mode="r").shape[3:])
    meta["complete"] = True
    _write_json(out / METADATA_FILE, meta)
    return meta


def _fingerprint(source: Path, files: list[Path], labels: list[int], vae: str, size: int, flip: bool, shard_size: int) -> str:
    """Hash of everything that fixes the cache contents (file list, labels, settings)."""
    digest = hashlib.sha256(json.dumps([_vae_reference(vae), size, flip, shard_size]).encode())
    for file, label in zip(files, labels):
        digest.update(f"{file.relative_to(source)}\t{label}\n".encode())
    return digest.hexdigest()


def _check_out(out: Path, fingerprint: str) -> bool:
    """True when ``out`` holds an interrupted run of the same command (to finish), False when it is new or
    empty; anything else is an error."""
    if (out / METADATA_FILE).exists():
        old = read_metadata(out, require_complete=False)
        if old["complete"]:
            raise ValueError(f"{str(out)!r} already holds a complete latent cache; choose another --out or delete it")
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{str(out)!r} holds an unfinished latent cache made from other images or settings; re-run the original "
                f"command to finish it, or choose another --out"
            )
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {str(out)!r} exists and is not an empty folder or a latent cache; choose a new or empty folder")
    return False


def _shard_done(out: Path, shard: dict[str, Any]) -> bool:
    latents, labels = out / shard["latents"], out / shard["labels"]
    return latents.exists() and labels.exists() and np.load(latents, mmap_mode="r").shape[0] == shard["count"]


def _encode_shards(model, files, labels, pending: list[int], meta, out: Path, batch_size: int, shard_size: int,
                   device: torch.device, num_workers: int, progress: bool) -> None:
    """Encode the shards listed in ``pending`` in order; a shard is written as soon as it is full."""
    spans = {k: (k * shard_size, k * shard_size + meta["shards"][k]["count"]) for k in pending}  # [start, end) per shard
    batches = [list(range(i, min(i + batch_size, end))) for start, end in spans.values() for i in range(start, end, batch_size)]
    loader = torch.utils.data.DataLoader(_ImageFiles(files, meta["image_size"]), batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    parts: list[np.ndarray] = []
    with tqdm(total=sum(len(b) for b in batches), unit="img", desc="encoding", disable=not progress) as bar:
        for images, positions in loader:
            parts.append(_encode_moments(model, images, meta["views"] == 2, device))
            bar.update(len(positions))
            shard = int(positions[0]) // shard_size
            start, end = spans[shard]
            if int(positions[-1]) + 1 == end:
                _save_npy(out / meta["shards"][shard]["labels"], np.asarray(labels[start:end], dtype=np.int64))
                _save_npy(out / meta["shards"][shard]["latents"], np.concatenate(parts))
                parts = []


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
