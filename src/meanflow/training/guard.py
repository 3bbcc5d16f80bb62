"""The non-finite guard, decided on the device: a step whose loss or gradient norm is not finite
leaves the weights, the optimizer state and the EMA untouched, without the host waiting for it.

The decision is a 0-d bool tensor. The optimizer applies it itself (fused Adam / AdamW skip their
whole update, step count included, when ``found_inf`` is 1: the mechanism of PyTorch's
``GradScaler``), and the EMA update is weighted by it. The counters stay on the device and are read
by the training loop only when it reads its statistics anyway (logging steps, checkpoints, the end):

* ``bad``: skipped steps since the start of the run (exact, saved with checkpoints);
* ``run``: the current run of consecutive skipped steps;
* ``tripped``: the step at which a run first reached ``max_bad`` (0: none yet).

Bound: training that reaches ``train.max_bad_steps`` consecutive skipped steps stops with
:class:`TrainingDiverged` at the next step that reads the counters, that is at most
``train.log_every - 1`` steps later (the next checkpoint or the end when ``log_every`` is 0);
no checkpoint is written in between.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..runtime import checkpoint as ckpt
from .ema import EMA


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Device-side skip decision and counters (see the module docstring)."""

    def __init__(self, device: torch.device, max_bad: int, bad: int = 0, run: int = 0):
        self.max_bad = max_bad
        self.counters = torch.tensor([bad, run, 0], dtype=torch.int64, device=device)  # (3,): bad, run, tripped

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """Whether step ``step`` (1-based) is applied: 0-d bool, True when the loss () and gradient norm ()
        are both finite; counts it. Nothing is read on the host."""
        applied = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad, run, tripped = self.counters.unbind()
        skipped = (~applied).long()
        run = (run + 1) * skipped
        tripped = torch.where((tripped == 0) & (run >= self.max_bad), step, tripped)
        self.counters = torch.stack([bad + skipped, run, tripped])
        return applied

    def check(self, counters: list[float], step: int, out: Path) -> tuple[int, int]:
        """(bad, run) from the host copy of :attr:`counters`; TrainingDiverged when a run reached ``max_bad``."""
        bad, run, tripped = (int(v) for v in counters)
        if tripped:
            last = ckpt.latest_checkpoint(out / "checkpoints")
            raise TrainingDiverged(
                f"training stopped at step {step}: from step {tripped - self.max_bad + 1} to step {tripped}, "
                f"{self.max_bad} consecutive steps had a non-finite loss or gradient (train.max_bad_steps={self.max_bad}); "
                f"weights were not updated by them. Last good checkpoint: {last if last else 'none'}. "
                "Lower train.lr, set train.grad_clip, or check the data for NaN/inf."
            )
        return bad, run


def apply_step(optimizer: torch.optim.Optimizer, ema: EMA, model: torch.nn.Module, applied: torch.Tensor, step: int) -> None:
    """Optimizer step ``step`` (1-based) and its EMA update where ``applied`` (0-d bool, on the device) is True;
    on a skipped step both leave every value bit-identical, and the host never reads ``applied``."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(
            f"{type(optimizer).__name__} cannot skip a step on the device; the trainer needs a fused optimizer "
            "(torch.optim.Adam / AdamW with fused=True, as meanflow.training.builders.build_optimizer makes)"
        )
    optimizer.found_inf = (~applied).float()  # read by the fused kernel on the device
    optimizer.step()
    ema.update(model, step, applied)


__all__ = ["NonFiniteGuard", "TrainingDiverged", "apply_step"]
