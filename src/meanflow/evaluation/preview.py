"""Preview images of a model: what 1 NFE, 2 NFE and the 100-step ODE give, side by side.

Points: scatter plots beside the data. Images: one class-ordered grid per sampler.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.images import grid_pixels
from ..data.points import save_point_panels
from ..sampling import decode_samples, generate, nfe

#: (method, steps) shown by default: MeanFlow with 1 and 2 jumps, Euler on u(z, t, t) with 100 steps
PREVIEW_PLAN = (("meanflow", 1), ("meanflow", 2), ("euler", 100))


def preview_plan(objective: str, ode_steps: int = 100) -> tuple[tuple[str, int], ...]:
    """What a run's preview shows: 1 and 2 NFE of the model's own sampler, then the ``ode_steps`` Euler ODE."""
    few = "euler" if objective == "flow_matching" else "meanflow"
    return ((few, 1), (few, 2), ("euler", ode_steps))


def save_preview(model: nn.Module, data, path: Path, seed: int = 0, device="cpu", num: int | None = None,
                 plan: tuple[tuple[str, int], ...] = PREVIEW_PLAN, omega: float | None = None,
                 interval: tuple[float, float] | None = None) -> Path:
    """One PNG with samples of every (method, steps) of ``plan`` side by side (same noise for each).

    Points (N, D): the data first, then one scatter per sampler (``num`` points, default up to 5000).
    Images: one grid per sampler, a row per class for class-conditional models.
    ``omega`` / ``interval``: guidance inputs of iMF-style models (None: the model's defaults).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    guidance = {"omega": omega, "interval": interval}
    if data.kind == "points":
        save_point_panels(point_panels(model, data, seed, device, num, plan, **guidance), path)
        return path
    shape, classes = tuple(data.sample_shape), data.num_classes
    n = num or (10 * classes if classes else 64)
    labels = (torch.arange(n) // max(n // classes, 1)).clamp(max=classes - 1) if classes else None
    grids = []
    for method, steps in plan:
        samples, _ = generate(model, n, shape, steps, method, labels=labels, num_classes=classes, seed=seed, device=device,
                              **guidance)
        images = decode_samples(samples, data.info, device) if data.kind == "latents" else samples
        grids.append((caption(method, steps), grid_pixels(images, nrow=(n // classes) if classes else None)))
    _save_image_panels(grids, path)
    return path


def point_panels(model: nn.Module, data, seed: int = 0, device="cpu", num: int | None = None,
                 plan: tuple[tuple[str, int], ...] = PREVIEW_PLAN, omega: float | None = None,
                 interval: tuple[float, float] | None = None) -> list[tuple[str, torch.Tensor]]:
    """[(caption, points (n, D))]: the first ``n`` data points, then samples of each sampler from the same noise
    (``omega`` / ``interval``: guidance inputs of iMF-style models)."""
    n = num or min(len(data), 5000)
    reference, _ = data.get(torch.arange(min(len(data), n)))
    panels = [(f"data (n={len(reference)})", reference)]
    for method, steps in plan:
        samples, _ = generate(model, n, tuple(data.sample_shape), steps, method, seed=seed, device=device, omega=omega,
                              interval=interval)
        panels.append((caption(method, steps), samples))
    return panels


def caption(method: str, steps: int) -> str:
    """Panel title of a sampler, e.g. "1 NFE (MeanFlow)" or "100 NFE (Euler ODE)"."""
    name = "MeanFlow" if method == "meanflow" else f"{method.capitalize()} ODE"
    return f"{nfe(steps, method)} NFE ({name})"


def _save_image_panels(grids, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = grids[0][1].shape[:2]
    fig = Figure(figsize=(len(grids) * max(3.0, width / 60), max(3.0, height / 60) + 0.4))
    FigureCanvasAgg(fig)
    for ax, (title, pixels) in zip(fig.subplots(1, len(grids), squeeze=False)[0], grids):
        ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


__all__ = ["PREVIEW_PLAN", "caption", "point_panels", "preview_plan", "save_preview"]
