"""Turn config sections into training objects: loss, optimizer, LR schedule, EMA profiles (models: :mod:`meanflow.models.loading`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import objectives
from ..config import ObjectiveConfig, TrainConfig
from .ema import Exponential, PowerFunction, Profile
from .muon import MuonAdamW


def build_loss(cfg: ObjectiveConfig) -> objectives.Objective:
    """The objective named by ``cfg.kind`` with the options given in the config."""
    return objectives.create(cfg.kind, **cfg.options)


def ema_profiles(cfg: TrainConfig) -> list[Profile]:
    """The EMAs of a run: one per ``ema_decays`` entry (with the ``ema_rampup`` ramp-up), then one per ``ema_stds`` entry."""
    return [*(Exponential(float(d), cfg.ema_rampup) for d in cfg.ema_decays), *(PowerFunction(float(s)) for s in cfg.ema_stds)]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer named by ``cfg.optimizer`` over all parameters, with the configured lr, betas and weight
    decay, fused: the fused kernels can skip a step on the device (the non-finite guard,
    :mod:`meanflow.training.guard`). ``muon``: :class:`~meanflow.training.muon.MuonAdamW`."""
    if cfg.optimizer == "muon":
        return MuonAdamW(model, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                         ns_steps=cfg.muon_ns_steps, adjust_lr=cfg.muon_adjust_lr)
    adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer | MuonAdamW, state: dict) -> None:
    """Load ``state`` into a :func:`build_optimizer` optimizer, also one saved by an unfused optimizer
    (checkpoints of older versions): the Adam groups stay fused, the step counts move to the device."""
    groups = [{**group, "fused": True, "foreach": None} if "fused" in group else group for group in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then constant (the paper's schedule) or decayed to 0 at the last step.

    ``lr_decay``: "cosine" multiplies by (1 + cos(pi f)) / 2 and "linear" by 1 - f, with f the
    fraction of the post-warm-up steps done (0 at the first, 1 at step ``steps``).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "none":
        return cfg.lr
    done = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    factor = 0.5 * (1.0 + math.cos(math.pi * done)) if cfg.lr_decay == "cosine" else 1.0 - done
    return cfg.lr * factor
