"""The training step reads nothing on the host except on logging steps and checkpoints.

A CPU run cannot observe device synchronisations, so this counts what causes them: every call that
copies a tensor's values to the host (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``cpu``,
``numpy``), made anywhere inside a step of a real (tiny) training run.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from meanflow.config import load_config
from meanflow.training import trainer
from meanflow.training.hooks import Hooks

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Records each host read with where it came from; ``marks`` splits the record into steps."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            caller = traceback.extract_stack(limit=3)[0]
            self.events.append(("read", f"{name} at {Path(caller.filename).name}:{caller.lineno}"))
        return func(*args, **(kwargs or {}))

    def mark(self, what: str) -> None:
        self.events.append(("mark", what))

    def per_step(self) -> dict[int, list[str]]:
        """{step (1-based): host reads between the start of the step and its after_step hook}."""
        steps, current = {}, None
        for kind, what in self.events:
            if kind == "mark" and what == "start":
                current = []
            elif kind == "mark":
                steps[int(what)], current = current, None
            elif current is not None:
                current.append(what)
        return steps


class StepEnd(Hooks):
    def __init__(self, reads: HostReads):
        self.reads = reads

    def after_step(self, step, stats, model):
        self.reads.mark(str(step))


def _points(path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 256)
    np.savez(path, x=rng.normal(size=(256, 2)).astype(np.float32) + labels[:, None], labels=labels)
    return path


@pytest.mark.parametrize("jvp", ["auto", "rows"])
def test_only_logging_steps_read_on_the_host(tmp_path, monkeypatch, jvp):
    cfg = load_config("toy", [
        "data.name=points", f"data.path={_points(tmp_path / 'p.npz')}", "data.holdout=64", "model.kwargs={width: 16, depth: 2}",
        "train.batch_size=32", "train.steps=8", "train.log_every=4", "train.checkpoint_every=0", "train.warmup_steps=2",
        "train.grad_clip=1.0", "train.device=cpu", f"objective.jvp={jvp}",
    ])
    reads = HostReads()
    lr = trainer.learning_rate

    def learning_rate(step, train_cfg):  # called first in every step
        reads.mark("start")
        return lr(step, train_cfg)

    monkeypatch.setattr(trainer, "learning_rate", learning_rate)
    with reads:
        trainer.train(cfg, tmp_path / "run", hooks=[StepEnd(reads)])
    steps = reads.per_step()
    assert sorted(steps) == list(range(1, 9))
    for step, events in steps.items():
        expected = 1 if step % 4 == 0 else 0  # a logging step copies its report once
        assert len(events) == expected, (step, events)
