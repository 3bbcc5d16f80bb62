"""Hooks: user code the training loop calls at fixed points, without editing the loop.

Subclass :class:`Hooks`, override what you need, and pass instances to
``train(cfg, out, hooks=[...])``. They run in the order given, on every process unless noted.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..data.base import Dataset


class Hooks:
    """No-op callbacks; ``step`` is always the number of steps completed so far."""

    def after_step(self, step: int, stats: dict[str, float], model: nn.Module) -> None:
        """After every step (also a skipped non-finite one): ``stats`` as logged (loss, grad_norm, lr,
        bad_steps, ...; averaged over processes), ``model`` the raw weights being trained."""

    def at_checkpoint(self, step: int, path: Path | None) -> None:
        """After a checkpoint is saved: its directory on the main process, None on the others."""

    def at_evaluation(self, step: int, model: nn.Module, data: Dataset) -> None:
        """Every ``train.sample_every`` steps, on the main process only, after the preview images are
        written: ``model`` an eval-mode copy holding the first EMA weights, ``data`` the training set."""


__all__ = ["Hooks"]
