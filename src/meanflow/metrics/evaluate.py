"""Generate samples from a trained model and score them against reference data.

Used at the end of training (``metrics.json``) and by ``meanflow sample`` / ``meanflow eval``.
Sampler names: ``meanflow`` (k-NFE average-velocity jumps) and ``euler`` / ``heun`` (ODE on u(z, t, t)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import sampling
from ..training.seeding import step_generator


@torch.no_grad()
def iterate_samples(
    model: nn.Module, num: int, sample_shape: tuple[int, ...], steps: int = 1, method: str = "meanflow",
    labels: torch.Tensor | None = None, num_classes: int = 0, seed: int = 0, batch_size: int = 1000,
    device: str | torch.device = "cpu", progress: bool = False, rank: int = 0, world_size: int = 1,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield (batch index i, samples (b, *sample_shape) on ``device``, labels (b,) or None).

    The noise of batch i comes from a generator seeded by (seed, i), so results do not depend on
    the device count; with ``world_size`` > 1 this process makes only the batches i = rank mod
    world_size. Class-conditional models without given labels cycle through the classes.
    """
    if num < 1:
        raise ValueError(f"number of samples must be >= 1, got {num}")
    if labels is None and num_classes > 0:
        labels = torch.arange(num) % num_classes
    if labels is not None and labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")
    if labels is not None and (labels.min() < 0 or labels.max() >= max(num_classes, 1)):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}]; got range [{int(labels.min())}, {int(labels.max())}]")
    starts = range(0, num, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling {method} x{steps}", unit="batch")
    for i, start in enumerate(starts):
        if i % world_size != rank:
            continue
        n = min(batch_size, num - start)
        noise = torch.randn((n, *sample_shape), generator=step_generator(seed, i, "sample")).to(device)
        y = None if labels is None else labels[start:start + n].to(device)
        yield i, _run_sampler(model, noise, steps, method, y).float(), y


def generate(model: nn.Module, num: int, sample_shape: tuple[int, ...], steps: int = 1, method: str = "meanflow",
             labels: torch.Tensor | None = None, num_classes: int = 0, seed: int = 0, batch_size: int = 1000,
             device: str | torch.device = "cpu", progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All ``num`` samples (num, *sample_shape) on the CPU and their labels (or None); see :func:`iterate_samples`."""
    batches = list(iterate_samples(model, num, sample_shape, steps, method, labels, num_classes, seed, batch_size, device, progress))
    samples = torch.cat([b[1].cpu() for b in batches])
    return samples, None if batches[0][2] is None else torch.cat([b[2].cpu() for b in batches])


def _run_sampler(model, noise, steps: int, method: str, labels):
    if method == "meanflow":
        return sampling.sample(model, noise, steps=steps, labels=labels)
    return sampling.ode_sample(model, noise, steps=steps, labels=labels, method=method)


def sampler_plan(objective: str, eval_steps: list[int], ode_steps: int) -> list[tuple[str, int]]:
    """(method, steps) pairs to score: MeanFlow at each k, plus the ODE baseline at 1..ode_steps NFE."""
    if objective == "flow_matching":
        return [("euler", k) for k in sorted(set(eval_steps) | {ode_steps})]
    return [("meanflow", k) for k in eval_steps] + [("euler", ode_steps)]


def evaluate_points(
    model: nn.Module, reference: torch.Tensor, plan: list[tuple[str, int]], num: int, seed: int,
    device: str | torch.device = "cpu", train_points: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Sliced W2 and energy distance of samples from each sampler vs held-out points (N, D).

    ``train_points`` (optional) gives the noise floor: the same metrics between training data and the
    reference at equal sample count.
    """
    from .pointcloud import energy_distance, sliced_wasserstein

    ref = reference[:num].double()
    results: dict[str, Any] = {}

    def score(x: torch.Tensor) -> dict[str, float]:
        gen = torch.Generator().manual_seed(seed)
        return {"sliced_w2": sliced_wasserstein(x.double(), ref, generator=gen), "energy_distance": energy_distance(x.double(), ref)}

    for method, steps in plan:
        samples, _ = generate(model, ref.shape[0], tuple(ref.shape[1:]), steps, method, seed=seed, device=device)
        results[f"{method}_{steps}nfe"] = {"method": method, "nfe": sampling.nfe(steps, method), **score(samples)}
    if train_points is not None:
        results["data_floor"] = {"method": "training data", "nfe": 0, **score(train_points[: ref.shape[0]])}
    return results


def save_preview(model: nn.Module, data, path: Path, steps: int = 1, seed: int = 0, device="cpu", num: int | None = None) -> Path:
    """PNG preview: a scatter of 1-NFE samples beside the data (points) or a class-ordered grid (images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(data.sample_shape)
    if data.kind == "points":
        from ..data.points import save_points_plot

        n = num or min(len(data), 5000)
        samples, _ = generate(model, n, shape, steps, seed=seed, device=device)
        reference, _ = data.get(torch.arange(min(len(data), n)))
        save_points_plot(samples.numpy(), path, reference=reference.numpy(), title=f"MeanFlow samples, {steps} NFE")
        return path
    from ..data.images import save_grid

    classes = data.num_classes
    n = num or (10 * classes if classes else 64)
    labels = (torch.arange(n) // max(n // classes, 1)).clamp(max=classes - 1) if classes else None
    samples, _ = generate(model, n, shape, steps, labels=labels, num_classes=classes, seed=seed, device=device)
    images = decode_samples(samples, data.info, device) if data.kind == "latents" else samples
    save_grid(images, path, nrow=(n // classes) if classes else None)
    return path


def decode_samples(samples: torch.Tensor, info: dict, device="cpu") -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE recorded in the data info."""
    from ..data.latents import decode

    return decode(samples, info, device=device)


def evaluate_run(run: str | Path, steps: list[int] | None = None, num: int | None = None, seed: int | None = None,
                 ema: bool = True, device: str | torch.device = "cpu", method: str | None = None,
                 fid_stats: str | None = None, inception_weights: str | None = None, batch_size: int | None = None,
                 info=None, save_samples: str | None = None, preview: Path | None = None) -> dict[str, Any]:
    """Score a run's checkpoint against its held-out reference data; returns a JSON-able dict.

    Points: sliced W2 / energy distance for MeanFlow at each k in ``steps`` and the ODE baseline.
    Images: class accuracy and Frechet distance in the digits classifier's feature space (digits
    data), and FID / Inception Score against ``fid_stats`` when given (see docs/EVALUATION.md).
    ``info`` (a DistInfo) defaults to the torchrun environment: every process samples its share.
    ``preview``: also write a 1-NFE preview PNG there (see :func:`save_preview`), from the same model.
    """
    from ..config import load_config
    from ..data import load_dataset
    from ..training import checkpoint as ckpt
    from ..training import distributed as D
    from ..training.inference import load_model

    info = info or D.setup(str(device))
    directory = ckpt.resolve_checkpoint(run)
    model, meta = load_model(directory, ema=ema, device=info.device)
    cfg = load_config(str(directory / "config.yaml"))
    steps = steps or cfg.eval.steps
    num = num or cfg.eval.num_samples
    seed = cfg.seed + 1 if seed is None else seed
    train_set, reference = load_dataset(cfg.data, cfg.seed)
    if preview is not None and info.is_main:
        save_preview(model, train_set, preview, steps=1, seed=cfg.seed, device=info.device)
    plan = [(method, k) for k in steps] if method else sampler_plan(cfg.objective.kind, steps, cfg.eval.baseline_ode_steps)
    header = {"checkpoint": str(directory), "step": meta.get("step"), "weights": "ema" if ema else "raw", "objective": cfg.objective.kind,
              "data": cfg.data.name, "num_samples": num, "seed": seed}
    if train_set.kind == "points":
        if reference is None:
            raise ValueError("this data set has no held-out reference points to compare with")
        ref, _ = reference.get(torch.arange(min(num, len(reference))))
        floor, _ = train_set.get(torch.arange(min(num, len(train_set))))
        return {**header, "results": evaluate_points(model, ref, plan, num, seed, info.device, train_points=floor)}
    from .image_eval import evaluate_images

    options = dict(fid_stats=fid_stats, inception_weights=inception_weights, batch_size=batch_size or cfg.eval.batch_size,
                   save_samples=save_samples)
    return {**header, "processes": info.world_size, "results": evaluate_images(model, meta, train_set, reference, plan, num, seed, info, **options)}
