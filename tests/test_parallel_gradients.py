"""What the optimizer receives: gradients averaged (not summed) over processes, and clipped when a clip is set.

Adam hides both: its update is invariant to the scale of the gradient, so a sum over two processes or a
clip that is never applied leaves Adam-trained weights almost where they were. These tests look where
the scale shows: a plain SGD step after the explicit all-reduce, the gradient the optimizer is handed,
and the logged gradient norm.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import free_port
from test_trainer_invariants import _cfg

from meanflow.runtime import distributed as D
from meanflow.training import trainer
from meanflow.training.trainer import train

LR = 0.5


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net.unused = torch.nn.Linear(2, 2)  # gets no gradient: contributes zeros to the all-reduce
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)


def _sgd_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: int) -> None:
    """One SGD step on the mean squared error of this process's rows, gradients averaged by all_reduce_gradients."""
    net.zero_grad(set_to_none=True)
    (net(x) - y).pow(2).sum(1).mean().backward()
    D.all_reduce_gradients(net, world)
    torch.optim.SGD(net.parameters(), lr=LR).step()


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.setup("cpu")
    try:
        net, (x, y) = _net(), _batch()
        rows = slice(rank * 4, rank * 4 + 4)
        _sgd_step(net, x[rows], y[rows], world)
        torch.save(net.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        D.teardown()


@pytest.mark.heavy
def test_the_explicit_all_reduce_averages_gradients_as_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes, each with half the batch, then one SGD step: the weights of one process's SGD step on
    the whole batch (a sum over the processes would take twice the step)."""
    import torch.multiprocessing as mp

    mp.start_processes(_all_reduce_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    reference, (x, y) = _net(), _batch()
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    _sgd_step(reference, x, y, 1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=f"rank {rank} {key}")
    moved = max(float((reference.state_dict()[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-2


def _optimizer_sees(monkeypatch) -> list[float]:
    """The norm of the gradient handed to the optimizer at each step (recorded in its step call)."""
    seen: list[float] = []
    build = trainer.build_optimizer

    def build_recording(model, cfg):
        optimizer = build(model, cfg)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.cat(grads))))
            return step(*args, **kwargs)

        optimizer.step = recording_step
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build_recording)
    return seen


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_the_optimizer_gets_the_gradient_clipped_to_the_configured_norm(tmp_path, monkeypatch, clip):
    """The logged grad_norm is the norm before clipping; the optimizer gets min(norm, clip) (all of it without a clip)."""
    seen = _optimizer_sees(monkeypatch)
    run = train(_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=4", f"train.grad_clip={clip}"), tmp_path / "run")
    logged = [json.loads(line)["grad_norm"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(seen) == len(logged) == 4
    for norm, handed in zip(logged, seen):
        expected = min(norm, clip) if clip else norm
        assert handed == pytest.approx(expected, rel=1e-5), (norm, handed)
    if clip:
        assert min(logged) > 2 * clip, "every step's gradient was above the clip, so every step was clipped"
