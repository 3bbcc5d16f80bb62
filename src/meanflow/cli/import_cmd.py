"""``meanflow import``: turn released or foreign weights into a run directory that ``sample``, ``eval``
and ``train --init`` accept (formats: ``meanflow.models.pretrained``)."""
from __future__ import annotations

import argparse

from ..models.pretrained import formats, load_pretrained, save_as_run


def register(sub) -> None:
    p = sub.add_parser("import", help="import released weights (official MeanFlow, DiT/SiT) as a run directory", description=__doc__)
    p.add_argument("source", metavar="SRC", help="checkpoint file or directory")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run directory")
    p.add_argument("--preset", default=None, help="our preset to build (default: the one the file implies)")
    p.add_argument("--weights", default="ema", help="ema (default), model (raw weights); official CIFAR-10 files also ema1, ema2 (their extra EMAs)")
    p.add_argument("--format", default=None, choices=formats(), help="skip detection")
    p.add_argument("--input-size", type=int, default=None, help="DiT checkpoints from JAX: latent size (default 32)")
    p.add_argument("--h-embed", default=None, choices=("copy", "zero"), help="DiT/SiT: second time embedder copied (default) or zero")
    p.add_argument("--vae", default=None, help="latent models: the VAE to decode with (default stabilityai/sd-vae-ft-mse)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("input_size", args.input_size), ("h_embed", args.h_embed)) if v is not None}
    loaded = load_pretrained(args.source, args.preset, args.weights, format=args.format, **options)
    print(loaded.describe())
    if loaded.table:
        print(loaded.table_text())
    out = save_as_run(loaded, args.out, vae=args.vae)
    print(f"run directory: {out} (meanflow sample --run {out} ...; meanflow train --init {out} ...)")
    return 0
