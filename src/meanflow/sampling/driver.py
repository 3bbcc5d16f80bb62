"""Batched, seeded sampling of a trained model: the noise of batch i comes from (seed, i), so the
samples do not depend on the batch split over processes; latent samples decode through their VAE.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import EvalConfig, declared_option
from ..data.latents import decode
from ..runtime.seeding import step_generator
from .samplers import guidance_inputs, ode_sample, sample

DEFAULT_BATCH_SIZE = declared_option(EvalConfig, "batch_size").default  # the sampling batch, declared once with eval.batch_size


@torch.no_grad()
def iterate_samples(
    model: nn.Module, num: int, sample_shape: tuple[int, ...], steps: int = 1, method: str = "meanflow",
    labels: torch.Tensor | None = None, num_classes: int = 0, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu", progress: bool = False, rank: int = 0, world_size: int = 1,
    omega: float | None = None, interval: tuple[float, float] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield (batch index i, samples (b, *sample_shape) on ``device``, labels (b,) or None).

    The noise of batch i comes from a generator seeded by (seed, i), so results do not depend on
    the device count; with ``world_size`` > 1 this process makes only the batches i = rank mod
    world_size. Class-conditional models without given labels get labels drawn uniformly at
    random (from a generator seeded by ``seed``), as the official evaluation does.
    ``omega`` / ``interval``: guidance inputs of iMF-style models (:func:`~meanflow.sampling.samplers.guidance_inputs`).
    """
    guidance = guidance_inputs(model, steps, omega, interval)  # checked before any sampling
    if num < 1:
        raise ValueError(f"number of samples must be >= 1, got {num}")
    if labels is None and num_classes > 0:
        labels = torch.randint(num_classes, (num,), generator=step_generator(seed, 0, "labels"))
    if labels is not None and labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")
    if labels is not None and (labels.min() < 0 or labels.max() >= max(num_classes, 1)):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}]; got range [{int(labels.min())}, {int(labels.max())}]")
    starts = range(0, num, batch_size)
    if progress:
        starts = tqdm(starts, desc=f"sampling {method} x{steps}", unit="batch")
    for i, start in enumerate(starts):
        if i % world_size != rank:
            continue
        n = min(batch_size, num - start)
        noise = torch.randn((n, *sample_shape), generator=step_generator(seed, i, "sample")).to(device)
        y = None if labels is None else labels[start:start + n].to(device)
        yield i, _run_sampler(model, noise, steps, method, y, guidance).float(), y


def generate(model: nn.Module, num: int, sample_shape: tuple[int, ...], steps: int = 1, method: str = "meanflow",
             labels: torch.Tensor | None = None, num_classes: int = 0, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
             device: str | torch.device = "cpu", progress: bool = False, omega: float | None = None,
             interval: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All ``num`` samples (num, *sample_shape) on the CPU and their labels (or None); see :func:`iterate_samples`."""
    batches = list(iterate_samples(model, num, sample_shape, steps, method, labels, num_classes, seed, batch_size, device, progress,
                                   omega=omega, interval=interval))
    samples = torch.cat([b[1].cpu() for b in batches])
    return samples, None if batches[0][2] is None else torch.cat([b[2].cpu() for b in batches])


def _run_sampler(model, noise, steps: int, method: str, labels, guidance: dict[str, float]):
    options = {} if not guidance else {"omega": guidance["omega"], "interval": (guidance["t_min"], guidance["t_max"])}
    if method == "meanflow":
        return sample(model, noise, steps=steps, labels=labels, **options)
    return ode_sample(model, noise, steps=steps, labels=labels, method=method, **options)


def decode_samples(samples: torch.Tensor, info: dict, device="cpu", vae: str | None = None) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE recorded in the data info (or ``vae``, a local copy)."""
    return decode(samples, info, device=device, vae=vae)


__all__ = ["decode_samples", "generate", "iterate_samples"]
