"""Hooks: user code the training loop calls at fixed points, without editing the loop.

Subclass :class:`Hooks`, override what you need, and pass instances to
``train(cfg, out, hooks=[...])``. They run in the order given, on every process unless noted.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..data.base import Dataset


class Hooks:
    """No-op callbacks; ``step`` is always the number of steps completed so far."""

    def after_step(self, step: int, stats: Mapping[str, float], model: nn.Module) -> None:
        """After every step (also a skipped non-finite one): ``stats`` this step's statistics (loss,
        grad_norm, lr, bad_steps, ...; averaged over processes, a :class:`StepStats`), ``model`` the raw
        weights being trained. Reading ``stats`` copies them to the host: a hook that reads them every
        step makes every step wait for the device."""

    def at_checkpoint(self, step: int, path: Path | None) -> None:
        """After a checkpoint is saved: its directory on the main process, None on the others."""

    def at_evaluation(self, step: int, model: nn.Module, data: Dataset) -> None:
        """Every ``train.sample_every`` steps, on the main process only, after the preview images are
        written: ``model`` an eval-mode copy holding the first EMA weights, ``data`` the training set."""


class StepStats(Mapping[str, float]):
    """One step's statistics, kept as 0-d device tensors (or floats) until the first read, which copies
    all of them to the host at once."""

    def __init__(self, values: dict[str, torch.Tensor | float]):
        self._values = values
        self._host: dict[str, float] | None = None

    def __getitem__(self, key: str) -> float:
        if self._host is None:
            tensors = {k: v for k, v in self._values.items() if isinstance(v, torch.Tensor)}
            read = torch.stack([v.double() for v in tensors.values()]).tolist() if tensors else []
            self._host = {**self._values, **dict(zip(tensors, read))}
        return self._host[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


__all__ = ["Hooks", "StepStats"]
