"""Cost of per-sample dropout masks (``meanflow train``) against PyTorch's own dropout.

    python benchmarks/bench_dropout.py [--size 32] [--channels 3] [--repeats 11]

Training draws every dropout mask per global sample (:mod:`meanflow.autodiff.per_sample`), so that
one process and N processes train the same model. Printed, as process CPU time on one thread
(other jobs on the machine do not count), minimum over interleaved rounds: a MeanFlow training
step (75% r != t) of ``unet-tiny`` with dropout 0.1 in every residual block, with per-sample masks
and with PyTorch's, and the time of one mask of (64, 64, size, size) both ways.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import time

import torch

from meanflow import MeanFlowLoss
from meanflow.models import create
from bench_step import interleave
from meanflow.autodiff.per_sample import PerSampleDropout, uniform


def step_times(size: int, channels: int, repeats: int) -> dict[str, float]:
    """Minimum CPU ms of a training step with per-sample masks and with PyTorch's dropout."""
    torch.manual_seed(0)
    model = create("unet-tiny", in_channels=channels, input_size=size, num_classes=10, dropout=0.1).train()
    x, labels = torch.randn(64, channels, size, size), torch.randint(0, 10, (64,))
    loss_fn = MeanFlowLoss(ratio=0.75)

    def step(per_sample: bool, seed: int) -> None:
        masks = PerSampleDropout(seed, torch.arange(64), 64) if per_sample else contextlib.nullcontext()
        with masks:
            loss, _ = loss_fn(model, x, labels, generator=torch.Generator().manual_seed(seed))
        loss.backward()
        model.zero_grad(set_to_none=True)

    steps = {"per-sample masks": functools.partial(step, True), "torch dropout": functools.partial(step, False)}
    return {name: 1000 * min(spans) for name, spans in interleave(steps, 2, repeats, clock=time.process_time).items()}


def mask_times(size: int, repeats: int) -> dict[str, float]:
    """Minimum CPU ms of one (64, 64, size, size) mask: the per-sample uniforms, and F.dropout."""
    x, key, rows = torch.randn(64, 64, size, size), torch.tensor([12345, 678]), torch.arange(64)
    calls = {"per-sample uniforms": lambda: uniform(key, rows, (64, size, size)),
             "F.dropout": lambda: torch.nn.functional.dropout(x, 0.1, True)}
    times = interleave({name: (lambda seed, fn=fn: fn()) for name, fn in calls.items()}, 1, repeats, clock=time.process_time)
    return {name: 1000 * min(spans) for name, spans in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = step_times(args.size, args.channels, args.repeats)
    for name, ms in steps.items():
        print(f"training step, {name:<18} {ms:9.1f} ms CPU")
    print(f"ratio {steps['per-sample masks'] / steps['torch dropout']:.3f}")
    for name, ms in mask_times(args.size, args.repeats).items():
        print(f"one mask (64, 64, {args.size}, {args.size}), {name:<20} {ms:8.1f} ms CPU")


if __name__ == "__main__":
    main()
