"""Turn config sections into objects: model (sized from the data), loss, optimizer, LR schedule."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import models
from ..config import ConfigError, ModelConfig, ObjectiveConfig, TrainConfig
from ..objectives import FlowMatchingLoss, MeanFlowLoss


def data_kwargs(name: str, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Constructor arguments a model preset takes from the data: (dim,) or (in_channels, input_size)."""
    if name.lower().startswith("mlp"):
        if len(sample_shape) != 1:
            raise ConfigError(f"model {name!r} takes vectors of shape (N, D) but the data samples have shape {sample_shape}; use an image model (dit-*, unet-*)")
        return {"dim": sample_shape[0], "num_classes": num_classes}
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ConfigError(f"model {name!r} takes square images (C, H, H) but the data samples have shape {sample_shape}")
    return {"in_channels": sample_shape[0], "input_size": sample_shape[1], "num_classes": num_classes}


def model_spec(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Resolved ``{"name", "kwargs"}``: the user's kwargs plus data-derived ones; conflicts are errors."""
    if cfg.name.lower() not in models.available():
        raise ConfigError(f"model.name {cfg.name!r} is not a model preset; available: {', '.join(models.available())}")
    derived = data_kwargs(cfg.name, sample_shape, num_classes)
    for key, value in derived.items():
        if key in cfg.kwargs and cfg.kwargs[key] != value:
            what = "number of classes" if key == "num_classes" else "shape"
            raise ConfigError(
                f"model.kwargs.{key}={cfg.kwargs[key]!r} does not fit the data ({what}: {key}={value!r}, data samples "
                f"of shape {sample_shape}); remove the key to size the model from the data"
            )
    return {"name": cfg.name.lower(), "kwargs": {**cfg.kwargs, **derived}}


def build_model(spec: dict[str, Any]) -> nn.Module:
    try:
        return models.create(spec["name"], **spec["kwargs"])
    except TypeError as err:
        raise ConfigError(f"invalid model.kwargs for {spec['name']!r}: {err}") from err


def build_loss(cfg: ObjectiveConfig) -> MeanFlowLoss:
    options = {k: v for k, v in vars(cfg).items() if k not in ("kind", "ratio") and v is not None}
    if cfg.kind == "flow_matching":
        return FlowMatchingLoss(**options)
    return MeanFlowLoss(ratio=cfg.ratio, **options)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` then constant (the paper's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr
