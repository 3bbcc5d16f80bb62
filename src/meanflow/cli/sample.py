"""``meanflow sample``: draw samples from a trained run or checkpoint into .npz or .png."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..data.images import save_grid, to_uint8
from ..data.points import save_points_plot
from ..models.loading import load_model
from ..config import EvalConfig, declared_option
from ..sampling import METHODS, decode_samples, generate
from ..sampling.driver import DEFAULT_BATCH_SIZE


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate samples from a trained model", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (newest checkpoint)")
    src.add_argument("--checkpoint", help="checkpoint directory, .safetensors file, or released weights (iMF-B-2.pth, pMF-B-16.zip or its directory)")
    p.add_argument("--steps", type=int, default=1, help="network evaluations (MeanFlow jumps or ODE steps)")
    p.add_argument("--num", type=int, default=1000, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz (array 'samples', 'labels' if conditional) or .png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="meanflow", choices=METHODS, help="MeanFlow jumps or an ODE solver on u(z, t, t)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--class", dest="cls", type=int, default=None, help="generate only this class")
    classes.add_argument("--labels", default=None, help="comma-separated classes to cycle through, e.g. 0,3,7")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"{declared_option(EvalConfig, 'batch_size').doc} (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--omega", type=float, default=None, help="guidance scale of an iMF or pMF model (> 0; default: the preset's official value, else 1)")
    p.add_argument("--interval", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
                   help="guidance interval of an iMF or pMF model, 0 <= T_MIN <= T_MAX <= 1 (default: the preset's official one, else 0 1)")
    p.add_argument("--vae", default=None, help="decode latents with this VAE (local folder or hub id) instead of the recorded one")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in (".npz", ".png"):
        raise ValueError(f"--out must end in .npz or .png, got {out.name!r}")
    model, meta = load_model(args.run or args.checkpoint, ema=not args.raw, device=args.device)
    data = meta["data"]
    if args.vae is not None and data["kind"] != "latents":
        raise ValueError(f"--vae decodes latents, but this model generates {data['kind']} (data.name={data['name']}); drop --vae")
    labels = _labels(args, data["num_classes"])
    samples, labels = generate(model, args.num, tuple(data["sample_shape"]), args.steps, args.method, labels=labels,
                               num_classes=data["num_classes"], seed=args.seed, batch_size=args.batch_size,
                               device=args.device, progress=True, omega=args.omega, interval=args.interval)
    if data["kind"] == "latents":
        samples = decode_samples(samples, data["info"], args.device, vae=args.vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, samples, labels, data)
    print(f"wrote {args.num} samples ({args.steps} step(s), {args.method}) to {out}")
    return 0


def _labels(args, num_classes: int) -> torch.Tensor | None:
    if args.cls is None and args.labels is None:
        return None
    if num_classes == 0:
        raise ValueError("--class/--labels given but the model is unconditional")
    classes = [args.cls] if args.cls is not None else [int(c) for c in args.labels.split(",") if c.strip()]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {num_classes - 1}]")
    return torch.tensor(classes)[torch.arange(args.num) % len(classes)]


def _write(out: Path, samples: torch.Tensor, labels, data: dict) -> None:
    is_image = samples.ndim == 4
    if out.suffix == ".npz":
        arrays = {"samples": _to_uint8(samples) if is_image else samples.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(out, **arrays)
    elif is_image:
        save_grid(samples, out)
    else:
        save_points_plot(samples.numpy(), out, title=f"{len(samples)} samples")


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return np.asarray(to_uint8(images))
