"""Preview images of a model: a scatter of samples beside the data (points) or a class-ordered grid (images)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.images import save_grid
from ..data.points import save_points_plot
from ..sampling import decode_samples, generate


def save_preview(model: nn.Module, data, path: Path, steps: int = 1, seed: int = 0, device="cpu", num: int | None = None) -> Path:
    """PNG preview: a scatter of 1-NFE samples beside the data (points) or a class-ordered grid (images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(data.sample_shape)
    if data.kind == "points":
        n = num or min(len(data), 5000)
        samples, _ = generate(model, n, shape, steps, seed=seed, device=device)
        reference, _ = data.get(torch.arange(min(len(data), n)))
        save_points_plot(samples.numpy(), path, reference=reference.numpy(), title=f"MeanFlow samples, {steps} NFE")
        return path
    classes = data.num_classes
    n = num or (10 * classes if classes else 64)
    labels = (torch.arange(n) // max(n // classes, 1)).clamp(max=classes - 1) if classes else None
    samples, _ = generate(model, n, shape, steps, labels=labels, num_classes=classes, seed=seed, device=device)
    images = decode_samples(samples, data.info, device) if data.kind == "latents" else samples
    save_grid(images, path, nrow=(n // classes) if classes else None)
    return path


__all__ = ["save_preview"]
