"""``meanflow encode``: turn an image folder into a latent cache for ``data.name=latents``.

The folder holds one sub-folder per class (ImageNet layout; labels follow the sorted folder
names). Every image is centre cropped as in ADM to --image-size and encoded by a diffusers
AutoencoderKL (default: the SD VAE ft-mse); the posterior mean and std are stored in fp16 shards
with the labels, and latents.json records the VAE, the latent scale factor and the shard list.
Re-running the same command after an interruption finishes the cache. See docs/LATENTS.md.
"""
from __future__ import annotations

import argparse

import torch

from ..data.latents import DEFAULT_SHARD_SIZE, DEFAULT_VAE, encode_folder
from ..data.latents.encode import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE, DEFAULT_NUM_WORKERS


def register(sub) -> None:
    """Add the ``encode`` sub-command."""
    p = sub.add_parser("encode", help="encode an image folder into a VAE latent cache", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="image folder: one sub-folder of images per class")
    p.add_argument("--out", required=True, help="cache folder to create (new or empty), e.g. data/imagenet256-latents")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"hub id or local folder / weights file of a diffusers AutoencoderKL (default: {DEFAULT_VAE}; offline, pass a local copy)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"side of the ADM centre crop in pixels (default: {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--flip", action="store_true", help="also encode the mirror image of each picture (training picks one at random)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"images per VAE call (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"images per shard file (default: {DEFAULT_SHARD_SIZE})")
    p.add_argument("--device", default="auto", help="torch device for the VAE: auto (cuda when available), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--num-workers", type=int, default=DEFAULT_NUM_WORKERS, help=f"processes decoding and cropping images (default: min(4, CPU count) = {DEFAULT_NUM_WORKERS} here; 0 = in the main process)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def resolve_device(name: str):
    """``auto`` -> cuda when available else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from err


def run(args: argparse.Namespace) -> int:
    meta = encode_folder(
        args.source, args.out, vae=args.vae, image_size=args.image_size, flip=args.flip, batch_size=args.batch_size,
        shard_size=args.shard_size, device=resolve_device(args.device), num_workers=args.num_workers, progress=not args.no_progress,
    )
    shape = "x".join(str(s) for s in meta["latent_shape"])
    print(f"encoded {meta['count']} images ({meta['num_classes']} classes, {meta['views']} view(s) each) into {args.out}: "
          f"latents {shape}, scale factor {meta['latent_scale']}, {len(meta['shards'])} shard(s)")
    print(f"train with: meanflow train --config imagenet-b4 data.path={args.out}")
    return 0
