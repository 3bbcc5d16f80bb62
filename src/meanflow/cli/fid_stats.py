"""``meanflow fid-stats``: reference statistics (mu, sigma) of a set of images for FID.

SOURCE is a folder of images (searched recursively; .png, .jpg, ...), a .npz/.npy of uint8 images
(NHWC or NCHW, key ``arr_0``, ``samples``, ``images`` or ``x``), or a named data set: ``digits``
(scikit-learn, offline) or ``cifar10`` (the 50k training images, through torchvision).
Writes ``--out FILE.npz`` with keys ``mu`` and ``sigma`` (read back by ``meanflow.metrics.load_stats``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..data.images import folder_batches, load_digits, load_torchvision
from ..data.arrays import read_array_file
from ..metrics import DigitsClassifier, InceptionFeatures, image_statistics, images_to_nchw, save_stats

DATASET_SOURCES = ("digits", "cifar10")
DEFAULT_DATA_ROOT = "data"
_NPZ_KEYS = ("arr_0", "samples", "images", "x")


def register(sub) -> None:
    p = sub.add_parser("fid-stats", help="compute FID reference statistics of images", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help=f"image folder, .npz/.npy file, or one of: {', '.join(DATASET_SOURCES)}")
    p.add_argument("--out", required=True, help="output .npz (keys mu, sigma)")
    p.add_argument("--feature", default="inception", choices=("inception", "digits"),
                   help="feature space: FID Inception v3 pool features, or the project's digits classifier")
    p.add_argument("--weights", default=None, help="FID Inception weights file (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--num", type=int, default=None, help="use only the first NUM images")
    p.add_argument("--image-size", type=int, default=None, help="resolution for the digits data set (default 16)")
    p.add_argument("--data-root", default=None, help=f"torchvision data directory for cifar10 (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10 when missing")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="device for the feature network (default: cuda if available)")
    p.set_defaults(func=run)


def _npz_images(path: Path, limit: int | None) -> torch.Tensor:
    """uint8 images (N, C, H, W) from a .npz (first of ``_NPZ_KEYS`` present) or .npy file."""
    array, _ = read_array_file(path, _NPZ_KEYS)
    if array.dtype != np.uint8:
        raise ValueError(f"{str(path)!r}: images must be uint8 (0..255), got {array.dtype}")
    return images_to_nchw(array[:limit])


def _dataset_images(args: argparse.Namespace) -> torch.Tensor:
    """uint8 images (N, C, H, W) of a named data set."""
    if args.source == "digits":
        return load_digits(args.image_size).x[: args.num]
    try:
        return load_torchvision("cifar10", args.data_root or DEFAULT_DATA_ROOT, train=True, download=args.download).x[: args.num]
    except RuntimeError as err:
        raise RuntimeError(f"{err}; for fid-stats the options are --download and --data-root DIR") from err


def image_source(args: argparse.Namespace, channels: int):
    """SOURCE -> one uint8 array (N, C, H, W) or an iterable of uint8 batches (B, H, W, C)."""
    if args.source in DATASET_SOURCES:
        return _dataset_images(args)
    path = Path(args.source)
    if path.is_dir():
        return folder_batches(path, channels, args.batch_size, args.num)
    if path.is_file() and path.suffix in (".npz", ".npy"):
        return _npz_images(path, args.num)
    raise FileNotFoundError(f"SOURCE {args.source!r} is neither an image folder, a .npz/.npy file, "
                            f"nor one of {', '.join(DATASET_SOURCES)}")


def check_flags_apply(args: argparse.Namespace) -> None:
    """ValueError for a flag the chosen SOURCE or --feature does not read, naming what does."""
    readers = {"--image-size": ("digits", args.image_size is not None), "--data-root": ("cifar10", args.data_root is not None),
               "--download": ("cifar10", args.download)}
    for flag, (source, given) in readers.items():
        if given and args.source != source:
            raise ValueError(f"{flag} is read only for SOURCE {source}, not {args.source!r}; drop {flag}")
    if args.weights is not None and args.feature != "inception":
        raise ValueError(f"--weights (Inception weights) is read only with --feature inception, not --feature {args.feature}; drop --weights")


def run(args: argparse.Namespace) -> int:
    check_flags_apply(args)
    if args.feature == "inception":
        extractor, channels = InceptionFeatures(args.weights, device=args.device, batch_size=args.batch_size), 3
    else:
        extractor, channels = DigitsClassifier.load_or_train(), 1
    mu, sigma, count = image_statistics(image_source(args, channels), extractor, args.batch_size)
    save_stats(args.out, mu, sigma, feature=args.feature, source=str(args.source), num_samples=count)
    print(json.dumps({"out": str(args.out), "feature": args.feature, "source": str(args.source),
                      "num_samples": count, "dim": int(mu.shape[0])}))
    return 0
