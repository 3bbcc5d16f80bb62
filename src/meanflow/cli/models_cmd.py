"""``meanflow models``: list the model presets with their parameter counts.

Models are built on PyTorch's "meta" device, so even DiT-XL/2 is counted instantly without
allocating memory. Image presets are sized by ``--input-size``, ``--channels`` and
``--num-classes``; otherwise each preset is shown at its family's example sizes (registered with
the family: DiT 4x32x32 latents, 1000 classes; U-Net 3x32x32 images, unconditional; MLP 2-D).
"""
from __future__ import annotations

import argparse

import torch

from ..models import available, create
from ..models.registry import family


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
    """Constructor arguments for one preset: the user's values where given, else its family's example sizes."""
    given = {"input_size": input_size, "in_channels": channels, "num_classes": num_classes}
    example = family(name).example
    return {**example, **{k: v for k, v in given.items() if v is not None and (k in example or k == "num_classes")}}


def count_parameters(name: str, **kwargs) -> tuple[torch.nn.Module, int]:
    """Build a preset on the meta device; return it and its number of parameters."""
    with torch.device("meta"):
        model = create(name, **kwargs)
    return model, sum(p.numel() for p in model.parameters())


def describe_input(name: str, kwargs: dict) -> str:
    """'CxHxW' for image models, the vector width for point models."""
    return "x".join(str(s) for s in family(name).sample_shape(kwargs))


def _check_flags_apply(args: argparse.Namespace, names: list[str]) -> None:
    """--input-size / --channels size image models only: an error when no listed preset takes images."""
    given = [flag for flag, value in (("--input-size", args.input_size), ("--channels", args.channels)) if value is not None]
    if given and all(family(name).input_kind != "images" for name in names):
        raise ValueError(f"{' and '.join(given)} size image models, but the presets matching --name {args.name!r} "
                         f"({', '.join(names)}) take vectors; drop {' and '.join(given)} or choose an image model")


def run(args: argparse.Namespace) -> int:
    """Print one row per matching preset: name, family, input shape, classes, parameters."""
    names = [name for name in available() if args.name.lower() in name]
    if not names:
        raise ValueError(f"no model preset matches {args.name!r}; available: {', '.join(available())}")
    _check_flags_apply(args, names)
    print(f"{'preset':<14}{'family':<8}{'input':<11}{'classes':>8}{'jvp':>6}  parameters")
    for name in names:
        kwargs = preset_kwargs(name, args.input_size, args.channels, args.num_classes)
        try:
            model, count = count_parameters(name, **kwargs)
        except (ValueError, TypeError) as err:
            print(f"{name:<14}n/a: {err}")
            continue
        fam = family(name)
        jvp = "dual" if fam.fast_jvp else "rows"  # what objective.jvp=auto takes: Dual layers, else the row tangent
        print(f"{name:<14}{fam.name:<8}{describe_input(name, kwargs):<11}{model.num_classes:>8}{jvp:>6}  {count / 1e6:8.1f}M  ({count:,})")
    return 0
