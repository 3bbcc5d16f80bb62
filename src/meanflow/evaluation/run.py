"""Score a trained run: sample its checkpoint and compare with its held-out reference data.

Used at the end of training (``metrics.json``) and by ``meanflow eval``.
Sampler names: ``meanflow`` (k-NFE average-velocity jumps) and ``euler`` / ``heun`` (ODE on u(z, t, t)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import objectives
from ..config import Config, ConfigError, load_config
from ..data import load_dataset, source
from ..metrics.pointcloud import class_sliced_wasserstein, energy_distance, histogram_tv, sliced_wasserstein
from ..models.loading import load_model
from ..models.pretrained import PretrainedError, detect
from ..runtime import checkpoint as ckpt
from ..runtime import distributed as D
from ..sampling import generate, nfe
from .images import NO_IMAGE_METRIC, evaluate_images, image_metrics
from .preview import preview_plan, save_preview


def sampler_plan(objective: str, eval_steps: list[int], ode_steps: int) -> list[tuple[str, int]]:
    """(method, steps) pairs to score: the few-step sampler at each k, plus the ODE baseline at ode_steps NFE.

    Models of an objective without a few-step rule (Flow Matching) are scored as ODEs only.
    """
    if not objectives.get(objective).few_step:
        return [("euler", k) for k in sorted(set(eval_steps) | {ode_steps})]
    return [("meanflow", k) for k in eval_steps] + [("euler", ode_steps)]


def evaluate_points(
    model: nn.Module, reference: torch.Tensor, plan: list[tuple[str, int]], num: int, seed: int,
    device: str | torch.device = "cpu", train_points: torch.Tensor | None = None, batch_size: int = 1000,
    reference_labels: torch.Tensor | None = None, train_labels: torch.Tensor | None = None, **guidance,
) -> dict[str, Any]:
    """Sliced W2, energy distance and (2-D points) histogram TV of each sampler's samples vs held-out points (N, D).

    ``train_points`` (optional) gives the noise floor: the same metrics between training data and the
    reference at equal sample count. ``guidance``: ``omega`` / ``interval`` for iMF-style models.
    Labelled points for a class-conditional model (``reference_labels`` (N,), and ``train_labels``
    for the floor): samples are drawn with the reference's labels, and ``class_sliced_w2`` (the mean
    over classes of the sliced W2 within each class) is added.
    """
    ref = reference[:num].double()
    conditional = reference_labels is not None and getattr(model, "num_classes", 0) > 0
    ref_labels = reference_labels[: ref.shape[0]] if conditional else None
    results: dict[str, Any] = {}

    def score(x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        gen = torch.Generator().manual_seed(seed)
        out = {"sliced_w2": sliced_wasserstein(x.double(), ref, generator=gen), "energy_distance": energy_distance(x.double(), ref)}
        if ref.shape[1] == 2:
            out["histogram_tv"] = histogram_tv(x, ref)
        if ref_labels is not None:
            out["class_sliced_w2"] = class_sliced_wasserstein(x, labels, ref, ref_labels, generator=torch.Generator().manual_seed(seed))
        return out

    label_options = {} if ref_labels is None else {"labels": ref_labels, "num_classes": model.num_classes}
    for method, steps in plan:
        samples, labels = generate(model, ref.shape[0], tuple(ref.shape[1:]), steps, method, seed=seed, batch_size=batch_size,
                                   device=device, **label_options, **guidance)
        results[f"{method}_{steps}nfe"] = {"method": method, "nfe": nfe(steps, method), **score(samples, labels)}
    if train_points is not None:
        floor_labels = None if train_labels is None else train_labels[: ref.shape[0]]
        results["data_floor"] = {"method": "training data", "nfe": 0, **score(train_points[: ref.shape[0]], floor_labels)}
    return results


def check_options_apply(data: dict[str, Any], fid_stats: str | None = None, inception_weights: str | None = None,
                        save_samples: str | None = None) -> None:
    """ValueError for an image-only option on a point-cloud run, or Inception weights without FID statistics.

    ``data``: the checkpoint's ``meta["data"]`` (``kind`` and ``name``). Names the option as the
    ``meanflow eval`` flag and as the :func:`evaluate_run` argument.
    """
    given = {"fid_stats": fid_stats, "inception_weights": inception_weights, "save_samples": save_samples}
    image_only = [name for name, value in given.items() if value is not None]
    if data["kind"] == "points" and image_only:
        flags = ", ".join("--" + name.replace("_", "-") for name in image_only)
        raise ValueError(f"{flags} ({', '.join(image_only)}) apply to image runs, but this run trained on points "
                         f"(data.name={data['name']}), scored by sliced W2 and energy distance; drop {flags}")
    if inception_weights is not None and fid_stats is None:
        raise ValueError("--inception-weights (inception_weights) is read only with --fid-stats REF.npz (FID / IS); "
                         "add --fid-stats or drop --inception-weights")


def check_eval_config(cfg: Config, data_kind: str) -> None:
    """Before training: the run's own evaluation options fit its data (``eval.fid_stats``: image data, an existing file)."""
    check_options_apply({"kind": data_kind, "name": cfg.data.name}, fid_stats=cfg.eval.fid_stats)
    if cfg.eval.fid_stats and not Path(cfg.eval.fid_stats).is_file():
        raise FileNotFoundError(f"eval.fid_stats={cfg.eval.fid_stats!r}: no such file; make it with `meanflow fid-stats "
                                "SOURCE --out REF.npz`, or set eval.fid_stats=null")


def check_scored(cfg: Config) -> None:
    """ConfigError for a run that no metric applies to (image data, not digits, no ``eval.fid_stats``), for callers
    that need metrics (a sweep tabulates them); known from the config alone, before any training."""
    if source(cfg.data.name).kind != "points" and not image_metrics(cfg.data.name, cfg.eval.fid_stats):
        raise ConfigError(f"a sweep tabulates metrics, but runs on data.name={cfg.data.name} have none: {NO_IMAGE_METRIC}")


def evaluate_run(run: str | Path, steps: list[int] | None = None, num: int | None = None, seed: int | None = None,
                 ema: bool | None = None, device: str | torch.device = "cpu", method: str | None = None,
                 fid_stats: str | None = None, inception_weights: str | None = None, batch_size: int | None = None,
                 info=None, save_samples: str | None = None, preview: Path | None = None, omega: float | None = None,
                 interval: tuple[float, float] | None = None, allow_unscored: bool = False) -> dict[str, Any]:
    """Score a run's checkpoint against its held-out reference data; returns a JSON-able dict.

    Points: sliced W2 / energy distance for MeanFlow at each k in ``steps`` and the ODE baseline.
    Images: class accuracy and Frechet distance in the digits classifier's feature space (digits
    data), and FID / Inception Score against ``fid_stats`` when given (see docs/EVALUATION.md).
    ``info`` (a DistInfo) defaults to the torchrun environment: every process samples its share.
    ``preview``: also write a preview PNG there (1 NFE, 2 NFE and the ODE side by side, see
    :func:`save_preview`), from the same model.
    ``omega`` / ``interval``: guidance inputs of iMF-style models; None takes the run's ``eval.omega`` /
    ``eval.interval``, and where those are null the model's own defaults.
    Released weights (another format than our runs', recognised by content: e.g. the iMF ``.pth``
    files) have no run around them: they are scored with FID / IS against ``fid_stats`` at ``steps``
    (default 1) NFE on ``num`` (default 50000) samples.
    ``ema``: EMA (True) or raw (False) weights; None takes the run's ``eval.ema``; ``fid_stats``
    None takes the run's ``eval.fid_stats``.
    ``allow_unscored``: an image run that no metric applies to (not digits, no FID statistics) gets
    empty results and a ``note`` saying how to score it, instead of an error (the end of training).
    """
    info = info or D.setup(str(device))
    if _is_released(run):
        return _evaluate_released(Path(run), steps or [1], num or 50_000, seed or 0, fid_stats, inception_weights, batch_size or 250,
                                  save_samples, info, {"omega": omega, "interval": interval})
    directory = ckpt.resolve_checkpoint(run)
    cfg = load_config(str(directory / "config.yaml"))
    ema = cfg.eval.ema if ema is None else ema
    guidance = {"omega": cfg.eval.omega if omega is None else omega, "interval": cfg.eval.interval if interval is None else interval}
    fid_stats = cfg.eval.fid_stats if fid_stats is None else fid_stats
    model, meta = load_model(directory, ema=ema, device=info.device)
    check_options_apply(meta["data"], fid_stats=fid_stats, inception_weights=inception_weights, save_samples=save_samples)
    steps = steps or cfg.eval.steps
    num = num or cfg.eval.num_samples
    seed = cfg.seed + 1 if seed is None else seed
    train_set, reference = load_dataset(cfg.data, cfg.seed)
    if preview is not None and info.is_main:
        save_preview(model, train_set, preview, seed=cfg.seed, device=info.device,
                     plan=preview_plan(cfg.objective.kind, cfg.eval.baseline_ode_steps), **guidance)
    plan = [(method, k) for k in steps] if method else sampler_plan(cfg.objective.kind, steps, cfg.eval.baseline_ode_steps)
    header = {"checkpoint": str(directory), "step": meta.get("step"), "weights": "ema" if ema else "raw", "objective": cfg.objective.kind,
              "data": cfg.data.name, "num_samples": num, "seed": seed}
    if train_set.kind == "points":
        if reference is None:
            raise ValueError("this data set has no held-out reference points to compare with")
        ref, ref_labels = reference.get(torch.arange(min(num, len(reference))))
        floor, floor_labels = train_set.get(torch.arange(min(num, len(train_set))))
        results = evaluate_points(model, ref, plan, num, seed, info.device, train_points=floor,
                                  batch_size=batch_size or cfg.eval.batch_size, reference_labels=ref_labels,
                                  train_labels=floor_labels, **guidance)
        return {**header, "results": results}
    if allow_unscored and not image_metrics(cfg.data.name, fid_stats):
        return {**header, "results": {}, "note": NO_IMAGE_METRIC}
    options = dict(fid_stats=fid_stats, inception_weights=inception_weights, batch_size=batch_size or cfg.eval.batch_size,
                   save_samples=save_samples, **guidance)
    return {**header, "processes": info.world_size, "results": evaluate_images(model, meta, train_set, reference, plan, num, seed, info, **options)}


def _is_released(path: str | Path) -> bool:
    """Whether ``path`` holds weights in another format than our runs' (decided by content); False for a
    path no format reads (the run path then explains what is wrong with it)."""
    try:
        return detect(path) != "meanflow-run"
    except (FileNotFoundError, PretrainedError):
        return False


def _evaluate_released(path: Path, steps: list[int], num: int, seed: int, fid_stats: str | None, inception_weights: str | None,
                       batch_size: int, save_samples: str | None, info, guidance: dict) -> dict[str, Any]:
    """FID / IS of released weights (no run directory, no held-out data: ``fid_stats`` is required)."""
    if not fid_stats:
        raise ValueError(f"{str(path)!r} holds released weights ({detect(path)}) without reference data: pass --fid-stats REF.npz "
                         "(statistics of the data they were trained on, e.g. ImageNet 256)")
    model, meta = load_model(path, device=info.device)
    header = {"checkpoint": str(path), "step": None, "weights": "released", "objective": meta["objective"],
              "data": meta["data"]["name"], "num_samples": num, "seed": seed}
    results = evaluate_images(model, meta, None, None, [("meanflow", k) for k in steps], num, seed, info, fid_stats=fid_stats,
                              inception_weights=inception_weights, batch_size=batch_size, save_samples=save_samples, **guidance)
    return {**header, "processes": info.world_size, "results": results}
