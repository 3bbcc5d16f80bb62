"""Build a model from its recorded spec, size a preset from the data, load a trained model (any format
:mod:`meanflow.models.pretrained` reads) with its meta.

The spec ``{"name", "kwargs"}`` is what a checkpoint's ``meta.json`` records under ``"model"``
(file layout: :mod:`meanflow.runtime.checkpoint`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .pretrained import load_pretrained
from .registry import available, create, family


def data_kwargs(name: str, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Constructor arguments preset ``name`` takes from the data (its family's input kind decides which)."""
    fam = family(name)
    try:
        return fam.data_kwargs(sample_shape, num_classes)
    except ValueError as err:
        if fam.input_kind == "images" and len(sample_shape) == 3:
            raise ConfigError(f"model {name!r} {err}; set data.image_size to centre crop them square") from None
        fits = sorted({p.split("-")[0] + ("-*" if "-" in p else "") for p in available() if family(p).input_kind != fam.input_kind})
        raise ConfigError(f"model {name!r} {err}; use a model that takes {'vectors' if fam.input_kind == 'images' else 'images'} "
                          f"({', '.join(fits)})") from None


def model_spec(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int, augment_dim: int = 0) -> dict[str, Any]:
    """Resolved ``{"name", "kwargs"}``: the user's kwargs plus data-derived ones; conflicts are errors.

    ``augment_dim`` > 0 (EDM augmentation on) tells the network about the augmentation labels; only
    U-Nets take them.
    """
    if cfg.name.lower() not in available():
        raise ConfigError(f"model.name {cfg.name!r} is not a model preset; available: {', '.join(available())}")
    derived = data_kwargs(cfg.name, sample_shape, num_classes)
    if augment_dim:
        if not cfg.name.lower().startswith("unet"):
            raise ConfigError(f"data.augment > 0 feeds augmentation labels to the network, which model {cfg.name!r} does not take; use a unet-* model or data.augment=0")
        derived["augment_dim"] = augment_dim
    for key, value in derived.items():
        if key in cfg.kwargs and cfg.kwargs[key] != value:
            what = "number of classes" if key == "num_classes" else "shape"
            raise ConfigError(
                f"model.kwargs.{key}={cfg.kwargs[key]!r} does not fit the data ({what}: {key}={value!r}, data samples "
                f"of shape {sample_shape}); remove the key to size the model from the data"
            )
    return {"name": cfg.name.lower(), "kwargs": {**cfg.kwargs, **derived}}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised model from a spec ``{"name", "kwargs"}``."""
    try:
        return create(spec["name"], **spec["kwargs"])
    except TypeError as err:
        raise ConfigError(f"invalid model.kwargs for {spec['name']!r}: {err}") from err


def load_model(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(eval-mode model, checkpoint meta) from anything :func:`~meanflow.models.pretrained.load_pretrained`
    reads: a run dir, checkpoint dir or weights file of ours, released iMF weights, ...

    ``ema=True`` takes the EMA weights (the field's convention for reported numbers), else the raw
    ones; the meta is the checkpoint's ``meta.json``, or what an import would record for the format.
    """
    loaded = load_pretrained(path, weights="ema" if ema else "model")
    return loaded.model.to(device), loaded.run_meta()
