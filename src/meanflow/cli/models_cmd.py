"""``meanflow models``: list the model presets with their parameter counts.

Models are built on PyTorch's "meta" device, so even DiT-XL/2 is counted instantly without
allocating memory. Image presets are sized by ``--input-size``, ``--channels`` and
``--num-classes``; each family has its own defaults (DiT: 4x32x32 latents, 1000 classes;
U-Net: 3x32x32 images, unconditional).
"""
from __future__ import annotations

import argparse

import torch

from ..models import available, create

# preset-name prefix -> default (input_size, channels, num_classes)
FAMILY_DEFAULTS = {"dit-": (32, 4, 1000), "imf-": (32, 4, 1000), "unet-": (32, 3, 0)}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command."""
    parser = subparsers.add_parser(
        "models", help="list model presets and parameter counts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--name", default="", help="show only presets whose name contains this text (e.g. dit-b, unet)")
    parser.add_argument("--input-size", type=int, default=None, help="image / latent side length (default: per family)")
    parser.add_argument("--channels", type=int, default=None, help="input channels (default: per family)")
    parser.add_argument("--num-classes", type=int, default=None, help="number of classes, 0 = unconditional (default: per family)")
    parser.set_defaults(func=run)


def preset_kwargs(name: str, input_size: int | None, channels: int | None, num_classes: int | None) -> dict:
    """Constructor arguments for one preset: the user's values where given, else the family defaults."""
    for prefix, (size, chans, classes) in FAMILY_DEFAULTS.items():
        if name.startswith(prefix):
            return dict(
                input_size=size if input_size is None else input_size,
                in_channels=chans if channels is None else channels,
                num_classes=classes if num_classes is None else num_classes,
            )
    return {} if num_classes is None else dict(num_classes=num_classes)


def count_parameters(name: str, **kwargs) -> tuple[torch.nn.Module, int]:
    """Build a preset on the meta device; return it and its number of parameters."""
    with torch.device("meta"):
        model = create(name, **kwargs)
    return model, sum(p.numel() for p in model.parameters())


def describe_input(model: torch.nn.Module) -> str:
    """'CxHxW' for image models, the vector width for point models."""
    if hasattr(model, "input_size"):
        return "x".join(str(s) for s in (model.in_channels, *model.input_size))
    return str(getattr(model, "dim", "-"))


def run(args: argparse.Namespace) -> int:
    """Print one row per matching preset: name, family, input shape, classes, parameters."""
    names = [name for name in available() if args.name.lower() in name]
    if not names:
        raise ValueError(f"no model preset matches {args.name!r}; available: {', '.join(available())}")
    print(f"{'preset':<14}{'family':<8}{'input':<11}{'classes':>8}  parameters")
    for name in names:
        try:
            model, count = count_parameters(name, **preset_kwargs(name, args.input_size, args.channels, args.num_classes))
        except (ValueError, TypeError) as err:
            print(f"{name:<14}n/a: {err}")
            continue
        family = type(model).__name__
        classes = getattr(model, "num_classes", 0)
        print(f"{name:<14}{family:<8}{describe_input(model):<11}{classes:>8}  {count / 1e6:8.1f}M  ({count:,})")
    return 0
